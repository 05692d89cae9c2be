"""Segment checkpoints: data objects first, ``manifest.json`` last, verified on read.

Layout (one attempt directory per render, named by the writer's lease epoch, so a re-render
never touches earlier objects)::

    jobs/<job>/segments/<index:05d>/e<epoch:06d>-<render_id>/video.mp4
    jobs/<job>/segments/<index:05d>/e<epoch:06d>-<render_id>/motion.safetensors
    jobs/<job>/segments/<index:05d>/e<epoch:06d>-<render_id>/manifest.json   <- written last

The manifest holds the sha256 and size of every data object plus the *binding*: everything
the segment depends on (job, inputs, plan, frame layout, ranges, weights, parameters, the
previous segment's manifest hash) and the writer's lease epoch. An attempt counts for a render
only if every object verifies and every bound field equals what that render expects; anything
else reads as absent, with the reason logged. Which of several good attempts counts is the
database's word (the attempt its segment row records), not the store's listing order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emo.errors import ObjectNotFound, StoreError
from emo.store.base import ObjectStore, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: binding fields and the lease epoch


@dataclass(frozen=True)
class SegmentCheckpoint:
    """A verified checkpoint: where it lives, its manifest and the manifest's sha256."""

    job_id: str
    index: int
    prefix: str  # jobs/<job>/segments/<index>/e<epoch>-<render_id>/
    manifest: dict[str, Any]
    manifest_sha256: str

    def key(self, name: str) -> str:
        """The object key of the data file ``name`` (e.g. ``video.mp4``)."""
        return self.manifest["files"][name]["key"]


def segment_prefix(job_id: str, index: int) -> str:
    """Key prefix of every attempt of one segment."""
    return f"jobs/{job_id}/segments/{index:05d}/"


def _render_id() -> str:
    """Sortable by time, unique across concurrent writers."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def verify_manifest(store: ObjectStore, manifest_key: str) -> SegmentCheckpoint | None:
    """The checkpoint whose manifest is at ``manifest_key``, or None unless it all verifies."""
    try:
        raw = store.get_bytes(manifest_key)
        manifest = json.loads(raw)
        files = manifest["files"]
        prefix = manifest_key[: -len(MANIFEST)]
        for name, entry in files.items():
            key = entry["key"]
            if not key.startswith(prefix):
                log.warning("checkpoint %s: %s lies outside its attempt", manifest_key, name)
                return None
            if store.stat(key).size != entry["size"] or store.sha256(key) != entry["sha256"]:
                log.warning("checkpoint %s: %s does not match its hash", manifest_key, name)
                return None
        return SegmentCheckpoint(
            job_id=manifest["job_id"],
            index=int(manifest["index"]),
            prefix=prefix,
            manifest=manifest,
            manifest_sha256=hashlib.sha256(raw).hexdigest(),
        )
    except ObjectNotFound:
        log.warning("checkpoint %s: an object it names is missing", manifest_key)
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("checkpoint %s: manifest is not valid", manifest_key)
        return None


def _normal(value: Any) -> Any:
    """A value as a JSON manifest stores it (tuples become lists), for comparison."""
    return json.loads(json.dumps(value))


def binding_mismatch(manifest: Mapping[str, Any], expect: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's manifest does not fit ``expect`` (field: found vs expected), or None."""
    problems = []
    for name, wanted in expect.items():
        found = manifest.get(name)
        if _normal(found) != _normal(wanted):
            problems.append(f"{name} {_short(found)} (expected {_short(wanted)})")
    return "; ".join(problems) or None


def _short(value: Any) -> str:
    text = json.dumps(_normal(value), sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def attempt_manifests(store: ObjectStore, job_id: str, index: int) -> list[str]:
    """Manifest keys of every attempt of one segment, oldest epoch and render first."""
    return sorted(
        info.key
        for info in store.list(segment_prefix(job_id, index))
        if info.key.endswith("/" + MANIFEST)
    )


def read_segment_checkpoint(
    store: ObjectStore,
    *,
    job_id: str,
    index: int,
    expect: Mapping[str, Any] | None = None,
    recorded_key: str | None = None,
) -> SegmentCheckpoint | None:
    """The attempt of a segment that verifies and fits ``expect`` (every bound field), or None.

    ``recorded_key`` (the manifest the database records for the segment) is tried first: the
    database decides between good attempts. Otherwise the oldest attempt that fits wins (a
    render that died after writing it, before recording it). Misfits are logged, never raised.
    """
    keys = attempt_manifests(store, job_id, index)
    if recorded_key in keys:
        keys.remove(recorded_key)
        keys.insert(0, recorded_key)
    for key in keys:
        checkpoint = verify_manifest(store, key)
        if checkpoint is None:
            continue
        reason = binding_mismatch(checkpoint.manifest, {"job_id": job_id, "index": index})
        reason = reason or binding_mismatch(checkpoint.manifest, expect or {})
        if reason is None:
            return checkpoint
        log.warning("checkpoint %s does not fit this render: %s", key, reason)
    return None


def write_segment_checkpoint(
    store: ObjectStore,
    *,
    job_id: str,
    index: int,
    epoch: int,
    files: Mapping[str, Path],
    meta: Mapping[str, Any],
) -> SegmentCheckpoint:
    """Upload ``files`` (name -> local path), then the manifest, as a new attempt.

    A new attempt never overwrites another's objects (its directory is new); it counts once
    the database records it (``db.segments.record_segment_done``, fenced by ``epoch``).
    """
    prefix = f"{segment_prefix(job_id, index)}e{epoch:06d}-{_render_id()}/"
    entries = {}
    for name, path in files.items():
        if "/" in name or name == MANIFEST:
            raise StoreError(f"invalid checkpoint file name {name!r}")
        digest = sha256_file(path)
        info = store.put_file(prefix + name, path)
        entries[name] = {"key": prefix + name, "sha256": digest, "size": info.size}
    manifest = {
        **meta,
        "format": FORMAT_VERSION,
        "job_id": job_id,
        "index": index,
        "epoch": epoch,
        "created_at": datetime.now(UTC).isoformat(),
        "files": entries,
    }
    raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
    store.put_bytes(prefix + MANIFEST, raw)
    return SegmentCheckpoint(
        job_id=job_id,
        index=index,
        prefix=prefix,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
    )
