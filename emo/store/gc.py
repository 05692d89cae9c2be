"""``emo gc``: find, and on request delete, what no job references any more.

Garbage, by kind (anything not listed here is never touched):

- ``lost-attempt``: a checkpoint attempt of a segment whose database row records another
  attempt (a displaced render's, or one that lost a race).
- ``unfit-attempt``: an unrecorded attempt that can never count for its job: rendered with
  other weights or inputs than the job's (after ``emo resume --new-weights``), or left without
  its manifest by a crash (a resume writes a new attempt instead).
- ``unused-output``: a final video, QC report and sidecar of an epoch the job's row does not
  name (a displaced render's).
- ``unused-input``: a content-addressed input no job names (its batch was deleted).
- ``unused-bundle``: a copy of a weights bundle (``bundles/<sha256>/``) no job is pinned to.

Inputs and bundle copies younger than ``min_age_seconds`` are left alone: a submit stores them
before it registers the jobs that name them.
- ``scratch``: a local scratch folder of a job that no render holds (finished, failed or
  gone), or of a submit more than an hour old.
- ``unknown-job``: objects of a job id the database does not know. Listed, but deleted only
  with ``include_unknown_jobs``: after a database restored from an older backup they are the
  checkpoints a resubmission would adopt.

Jobs with a live lease are skipped entirely (a render may be writing), and every job is
checked again just before its objects are deleted.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from db.references import JobReferences
from emo.errors import ObjectNotFound, StoreError
from emo.store.base import ObjectInfo, ObjectStore
from emo.store.checkpoint import MANIFEST

log = logging.getLogger(__name__)
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SUBMIT_SCRATCH_SECONDS = 3600
FIRST = (MANIFEST, "emo.json")  # deleted first: what makes the rest count


@dataclass
class Garbage:
    """One deletable thing: a key prefix in the store, or a local folder."""

    kind: str
    where: str  # key prefix (ends with /) or key; or a local path for scratch
    reason: str
    job_id: str | None = None
    keys: list[str] = field(default_factory=list)  # empty for local folders
    size: int = 0
    local: bool = False


def _groups(store: ObjectStore) -> dict[str, list[ObjectInfo]]:
    """Store keys grouped by the unit gc decides on (an attempt, an output epoch, an input, a
    bundle copy, a job folder's legacy file), each with its size."""
    groups: dict[str, list[ObjectInfo]] = defaultdict(list)
    for info in store.list(""):
        parts = info.key.split("/")
        if parts[0] == "jobs" and len(parts) >= 6 and parts[2] == "segments":
            unit = "/".join(parts[:5]) + "/"
        elif parts[0] == "jobs" and len(parts) >= 5 and parts[2] == "output":
            unit = "/".join(parts[:4]) + "/"
        elif parts[0] == "bundles" and len(parts) >= 3 and SHA256.match(parts[1]):
            unit = "/".join(parts[:2]) + "/"
        else:
            unit = info.key
        groups[unit].append(info)
    return groups


def find_garbage(
    store: ObjectStore,
    jobs: list[JobReferences],
    *,
    scratch: Path,
    include_unknown_jobs: bool = False,
    min_age_seconds: float = 24 * 3600,
    now: datetime | None = None,
) -> list[Garbage]:
    """Everything collectable, given every job's references (``db.references``).

    Raises ``StoreError`` if a job names an object outside this store: the store URL is then
    spelled differently from when the job was registered, and nothing could be judged."""
    now = now or datetime.now(UTC)
    jobs = [_as_keys(store, job) for job in jobs]
    by_id = {job.job_id: job for job in jobs}
    referenced = {key for job in jobs for key in (job.image_uri, job.audio_uri)}
    pinned = {job.weights_sha256 for job in jobs}
    found: list[Garbage] = []
    for unit, objects in sorted(_groups(store).items()):
        item = _judge(store, unit, by_id, referenced, pinned, include_unknown_jobs)
        if item is None:
            continue
        newest = max((o.modified for o in objects if o.modified), default=None)
        young = newest is not None and (now - newest).total_seconds() < min_age_seconds
        if item.kind in ("unused-input", "unused-bundle") and young:
            continue
        item.keys = [o.key for o in objects]
        item.size = sum(o.size for o in objects)
        found.append(item)
    found.extend(_scratch(scratch, by_id))
    return found


def _as_keys(store: ObjectStore, job: JobReferences) -> JobReferences:
    """The job's references as keys of ``store`` (gc compares keys, never URL spellings)."""

    def key(uri: str) -> str:
        try:
            return store.key_of(uri)
        except StoreError:
            raise StoreError(
                f"job {job.job_id} names {uri}, outside the store {store.url}; gc judges "
                "nothing (is EMO_STORE_URL spelled differently from when the job was made?)"
            ) from None

    return replace(
        job,
        image_uri=key(job.image_uri),
        audio_uri=key(job.audio_uri),
        output_uri=key(job.output_uri) if job.output_uri else None,
        recorded={index: key(uri) for index, uri in job.recorded.items()},
    )


def _judge(
    store: ObjectStore,
    unit: str,
    jobs: dict[str, JobReferences],
    inputs: set[str],
    pinned: set[str | None],
    include_unknown_jobs: bool,
) -> Garbage | None:
    parts = unit.split("/")
    if parts[0] == "inputs" and len(parts) == 2:
        if unit in inputs:
            return None
        return Garbage("unused-input", unit, "no job names this input")
    if parts[0] == "bundles" and unit.endswith("/"):
        if parts[1] in pinned:
            return None
        return Garbage("unused-bundle", unit, "no job is pinned to this bundle")
    if parts[0] != "jobs" or len(parts) < 3:
        return None
    job = jobs.get(parts[1])
    if job is None:
        if not include_unknown_jobs:
            return None
        return Garbage("unknown-job", unit, "the database has no such job", job_id=parts[1])
    if job.live:
        return None
    if parts[2] == "segments" and unit.endswith("/"):
        return _judge_attempt(store, unit, job, int(parts[3]))
    if parts[2] == "output" and unit.endswith("/"):
        if job.output_uri and job.output_uri.startswith(unit):
            return None
        return Garbage("unused-output", unit, "the job's result names another", job_id=job.job_id)
    return None  # legacy layout (inputs, final video of jobs made before revision 0005)


def _judge_attempt(
    store: ObjectStore, prefix: str, job: JobReferences, index: int
) -> Garbage | None:
    recorded = job.recorded.get(index)
    if recorded == prefix + MANIFEST:
        return None
    if recorded is not None:
        return Garbage("lost-attempt", prefix, "the database records another", job_id=job.job_id)
    try:
        manifest = json.loads(store.get_bytes(prefix + MANIFEST))
    except ObjectNotFound:
        return Garbage("unfit-attempt", prefix, "no manifest (a crash)", job_id=job.job_id)
    except ValueError:
        return Garbage("unfit-attempt", prefix, "manifest unreadable", job_id=job.job_id)
    for name in ("weights_sha256", "image_sha256", "audio_sha256"):
        wanted = getattr(job, name)
        if wanted is not None and manifest.get(name) != wanted:
            reason = f"{name} differs from the job's"
            return Garbage("unfit-attempt", prefix, reason, job_id=job.job_id)
    return None  # it may still be adopted by the job's next render


def _still_garbage(store: ObjectStore, item: Garbage, job: JobReferences | None) -> bool:
    if job is None:
        return item.kind in ("unknown-job", "scratch")
    if job.live:
        return False
    if item.local:
        return True
    again = _judge(store, item.where, {job.job_id: _as_keys(store, job)}, set(), set(), True)
    return again is not None and again.kind == item.kind


def _scratch(scratch: Path, jobs: dict[str, JobReferences]) -> Iterable[Garbage]:
    if not scratch.is_dir():
        return
    for folder in sorted(scratch.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith("submit-"):
            if time.time() - folder.stat().st_mtime > SUBMIT_SCRATCH_SECONDS:
                yield Garbage(
                    "scratch", str(folder), "a submit's copies", local=True, size=_du(folder)
                )
            continue
        job = jobs.get(folder.name)
        if job is None or not job.live:
            state = "unknown job" if job is None else f"job {job.status}, not rendering"
            yield Garbage(
                "scratch", str(folder), state, job_id=folder.name, local=True, size=_du(folder)
            )


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def delete_garbage(
    store: ObjectStore,
    items: list[Garbage],
    *,
    current: Callable[[str], JobReferences | None],
) -> list[Garbage]:
    """Delete ``items`` (a checkpoint's manifest and a bundle's emo.json first, so a half-deleted
    one reads as absent, never as complete). Each item of a job is judged again first against
    ``current(job_id)`` (the job as the database has it now): one the job took up since it was
    found (a render started, or recorded that attempt) is skipped. Returns what was deleted."""
    deleted = []
    for item in items:
        if item.job_id is not None and not _still_garbage(store, item, current(item.job_id)):
            log.warning("gc: skipped %s (job %s uses it now)", item.where, item.job_id)
            continue
        if item.local:
            shutil.rmtree(item.where, ignore_errors=True)
        else:
            for key in sorted(item.keys, key=lambda k: k.rsplit("/", 1)[-1] not in FIRST):
                store.delete(key)
        deleted.append(item)
    return deleted
