"""submit_batch: validate a manifest, pre-flight every job, register the batch, dispatch jobs.

A batch is its content: the manifest's bytes and the bytes of every input it names (fetched
and hashed at each submit) name the batch and its jobs. Submitting the same manifest over the
same inputs again finds the same batch and dispatches only jobs that still need rendering; an
input edited in place makes a new batch of new jobs, and the old ones stay as they were.
Inputs are stored content-addressed (``inputs/<sha256>.<ext>``); each job pins the weights
bundle configured at registration (a copy is kept in the store under its hash). Nothing is
registered while any job is invalid.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from db.batches import BatchShare, JobSpec, find_batch, register_batch, set_output_dir
from db.dispatch import record_submit_run
from db.jobs import job_statuses
from db.models import Batch, Job, JobStatus
from emo import media
from emo.confine import input_problem
from emo.cost import gpu_seconds
from emo.errors import EmoError, ObjectNotFound, StoreAuthError, StoreUnavailable
from emo.inputs import fetch, portrait_region
from emo.job import batch_key, job_id_for, resolve_params
from emo.manifest import (
    Manifest,
    ManifestError,
    parse_manifest,
    read_manifest_source,
)
from emo.plan import frame_count
from emo.render import check_frame_layout
from emo.settings import Settings
from emo.store.base import is_fresh, sha256_file
from emo.store.weights import pin_bundle, resolve_weights
from flows.context import Services, services
from flows.dispatch import settle

log = logging.getLogger(__name__)
ACTOR = "submit-batch"
DISPATCH_POLL_SECONDS = 10.0  # how often a waiting submit looks at its jobs and their runs


@dataclass(frozen=True)
class FetchedInputs:
    """One job's inputs copied locally, with the sha256 of their bytes."""

    name: str
    image_uri: str  # as resolved from the manifest
    audio_uri: str
    image: Path
    audio: Path
    image_sha256: str
    audio_sha256: str


@dataclass
class PreparedJob:
    """A validated job: where its inputs are locally, and what rendering it will take."""

    spec: JobSpec
    inputs: FetchedInputs
    seconds: float
    clips: int
    steps: int
    estimate_seconds: float
    face: str


def _resolve(uri: str, base: str) -> str:
    if urlparse(uri).scheme in ("s3", "file") or Path(uri).is_absolute():
        return uri
    return f"{base.rstrip('/')}/{uri}"


@task(cache_policy=NO_CACHE)
def fetch_inputs(
    settings: Settings, manifest: Manifest, scratch: Path, base: str, inbox: bool = False
) -> list[FetchedInputs | str]:
    """Copy every job's image and audio locally and hash the copies (what the job renders is
    what was hashed); a job whose inputs cannot be fetched, or may not be read from where
    they are (``emo.confine``), gets its problem instead."""
    fetched: list[FetchedInputs | str] = []
    for row, job in enumerate(manifest.jobs, start=1):
        folder = scratch / f"{row:05d}"
        image_uri, audio_uri = _resolve(job.image, base), _resolve(job.audio, base)
        refused = [
            f"job {job.name!r} (row {row}): {kind} {problem}"
            for kind, uri, where in (
                ("image", job.image, image_uri),
                ("audio", job.audio, audio_uri),
            )
            if (problem := input_problem(uri, settings=settings, inbox=inbox, resolved=where))
        ]
        if refused:
            fetched.append("; ".join(refused))
            continue
        try:
            image, audio = (
                fetch(uri, folder / kind / _name(uri), base_dir=Path(base), settings=settings)
                for kind, uri in (("image", image_uri), ("audio", audio_uri))
            )
        except (StoreUnavailable, StoreAuthError):
            raise  # the store is down or refuses us: not a problem of the manifest
        except EmoError as error:
            fetched.append(f"job {job.name!r} (row {row}): {error}")
            continue
        fetched.append(
            FetchedInputs(
                name=job.name,
                image_uri=image_uri,
                audio_uri=audio_uri,
                image=image,
                audio=audio,
                image_sha256=sha256_file(image),
                audio_sha256=sha256_file(audio),
            )
        )
    return fetched


def _submit_scratch(svc: Services, sha256: str) -> Path:
    """This run's own copy folder (two submits of one manifest never share copies)."""
    return (
        svc.settings.home / "scratch" / f"submit-{sha256[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


def _over_limits(
    steps: int, segment_seconds: float, settings: Settings, clip_frames: int
) -> list[str]:
    """What a job asks beyond the studio's limits (the track length and image size are
    checked while decoding them)."""
    problems = []
    if steps > settings.max_steps:
        problems.append(
            f"steps {steps} is above {settings.max_steps}, the most allowed (EMO_MAX_STEPS): "
            "ask fewer, or raise the limit"
        )
    clip_seconds = clip_frames / settings.fps
    if segment_seconds < clip_seconds:
        problems.append(
            f"segment_seconds {segment_seconds:g} is shorter than one clip of this model "
            f"({clip_frames} frames, {clip_seconds:g} s): give at least {clip_seconds:g}"
        )
    return problems


@task(cache_policy=NO_CACHE)
def preflight(
    settings: Settings,
    manifest: Manifest,
    key: str,
    fetched: list[FetchedInputs | str],
    weights: Path,
    source: str,
    allow_cost_hours: float | None = None,
) -> list[PreparedJob]:
    """Decode every input, find every face, estimate the work; report all problems at once
    (with those of inputs that could not be fetched)."""
    from emo.bundle import read_bundle_info

    bundle = read_bundle_info(weights)
    config = bundle.config
    check_frame_layout(settings, config.clip_frames, config.motion_frames)
    prepared, problems = [], []
    for row, (job, inputs) in enumerate(zip(manifest.jobs, fetched, strict=True), start=1):
        place = f"job {job.name!r} (row {row})"
        if isinstance(inputs, str):
            problems.append(inputs)
            continue
        job_id = job_id_for(key, job.name)
        options = manifest.job_options(job)
        params = resolve_params(
            options,
            job_id=job_id,
            settings=settings,
            model_steps=config.steps,
            model_guidance=config.guidance_scale,
        )
        over = _over_limits(params.steps, params.segment_seconds, settings, config.clip_frames)
        problems.extend(f"{place}: {problem}" for problem in over)
        try:
            pixels = media.load_image(inputs.image)
            region = portrait_region(pixels, params, Path(job.image).name)
            sample_count = media.audio_sample_count(
                inputs.audio, settings.sample_rate, max_seconds=settings.max_track_seconds
            )
        except EmoError as error:
            message = str(error)
            for local, uri in ((inputs.image, inputs.image_uri), (inputs.audio, inputs.audio_uri)):
                message = message.replace(str(local), uri)  # name the user's file, not our copy
            problems.append(f"{place}: {message}")
            continue
        seconds = sample_count / settings.sample_rate
        clip_seconds = config.clip_frames / settings.fps
        if seconds < clip_seconds:
            problems.append(
                f"{place}: audio {job.audio!r} is {seconds:.2f} s long, shorter than one clip of "
                f"this model ({clip_seconds:g} s); give a longer track"
            )
            continue
        if over:
            continue

        clips = -(
            -frame_count(sample_count, settings.sample_rate, settings.fps) // config.clip_frames
        )
        spec = JobSpec(
            name=job.name,
            image_uri=job.image,
            audio_uri=job.audio,
            # The segment length is resolved now: it shapes the plan, which must not change
            # with the environment of whichever worker renders or resumes the job.
            params={**options, "segment_seconds": params.segment_seconds},
            priority=options.get("priority", 0),
            max_attempts=settings.max_attempts,
            id=job_id,
            image_sha256=inputs.image_sha256,
            audio_sha256=inputs.audio_sha256,
            weights_sha256=bundle.sha256,
        )
        prepared.append(
            PreparedJob(
                spec=spec,
                inputs=inputs,
                seconds=seconds,
                clips=clips,
                steps=params.steps,
                estimate_seconds=gpu_seconds(clips, params.steps, config, settings.gpu_class),
                face=region.source,
            )
        )
    if problems:
        raise ManifestError(source, problems)
    _check_cost(prepared, settings, allow_cost_hours, source)
    return prepared


def _check_cost(
    prepared: list[PreparedJob], settings: Settings, allow_hours: float | None, source: str
) -> None:
    """Refuse a batch estimated above EMO_MAX_BATCH_GPU_HOURS unless the submitter allowed
    at least its estimate (``--allow-cost HOURS``)."""
    hours = sum(job.estimate_seconds for job in prepared) / 3600
    if hours <= settings.max_batch_gpu_hours or (allow_hours is not None and hours <= allow_hours):
        return
    raise ManifestError(
        source,
        [
            f"the batch needs about {hours:,.1f} GPU-hours on {settings.gpu_class} "
            f"(EMO_GPU_CLASS), over EMO_MAX_BATCH_GPU_HOURS ({settings.max_batch_gpu_hours:g}); "
            f"check each job with emo validate, or allow it with --allow-cost {math.ceil(hours)}"
        ],
    )


def _name(uri: str) -> str:
    return Path(urlparse(uri).path).name or "input"


def input_key(sha256: str, name: str) -> str:
    """Content-addressed key of an input; the original suffix helps tools that probe it."""
    suffix = Path(name).suffix.lower()
    return f"inputs/{sha256}{suffix if suffix[1:].isalnum() else ''}"


def _stored(svc: Services, key: str, path: Path) -> bool:
    """The input is in the store, whole, and recently written (an old copy is written again,
    so `emo gc`, which leaves young objects alone, cannot collect it while jobs register)."""
    try:
        info = svc.store.stat(key)
    except ObjectNotFound:
        return False
    return info.size == path.stat().st_size and is_fresh(info)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def upload_inputs(svc: Services, jobs: list[PreparedJob], weights: Path) -> list[JobSpec]:
    """Store each input under its hash (once, whoever else uses it) and pin the weights
    bundle in the store; the specs then point at the stored copies."""
    pin_bundle(svc.store, weights)
    specs = []
    for job in jobs:
        inputs, spec = job.inputs, job.spec
        keys = []
        for path, sha in ((inputs.image, inputs.image_sha256), (inputs.audio, inputs.audio_sha256)):
            key = input_key(sha, path.name)
            if not _stored(svc, key, path):
                svc.store.put_file(key, path)
            keys.append(key)
        specs.append(
            replace(
                spec,
                image_uri=svc.store.uri(keys[0]),
                audio_uri=svc.store.uri(keys[1]),
                params={
                    **spec.params,
                    "source_image": spec.image_uri,
                    "source_audio": spec.audio_uri,
                },
            )
        )
    return specs


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def restore_inputs(svc: Services, batch_id: str, fetched: list[FetchedInputs | str]) -> None:
    """A batch submitted again: put back any stored input that has gone missing (deleted by
    hand, or by `emo gc` while it was unreferenced) from this submit's copies of the same bytes."""
    copies = {}
    for item in fetched:
        if not isinstance(item, str):
            copies[item.image_sha256], copies[item.audio_sha256] = item.image, item.audio
    with svc.sessions() as session:
        jobs = list(session.get(Batch, batch_id).jobs)
        wanted = [
            (uri, sha)
            for job in jobs
            for uri, sha in ((job.image_uri, job.image_sha256), (job.audio_uri, job.audio_sha256))
            if sha is not None
        ]
    for uri, sha in wanted:
        key = svc.store.key_of(uri)
        if sha in copies and not svc.store.exists(key):
            log.warning("input %s was missing from the store; stored again", uri)
            svc.store.put_file(key, copies[sha])


def batch_rows(jobs: list[Job]) -> list[dict[str, Any]]:
    """The batch table shown in the Prefect UI and by ``emo status``."""
    rows = []
    for job in jobs:
        duration = (
            (job.finished_at - job.started_at).total_seconds()
            if job.finished_at and job.started_at
            else None
        )
        warnings = (job.qc or {}).get("warnings", [])
        rows.append(
            {
                "job": job.name,
                "status": job.status.value,
                "attempt": job.attempt,
                "duration_s": round(duration, 1) if duration is not None else "",
                "qc": "; ".join(warnings) if warnings else ("ok" if job.qc else ""),
                "output": job.output_uri or "",
                "error": (job.error or "")[:200],
            }
        )
    return rows


def dispatch(
    svc: Services, batch_name: str, job_ids: list[str], output_dir: str | None
) -> dict[str, str]:
    """Render the jobs that need it (``flows.dispatch.settle``: a job already rendering or
    waiting for its run keeps it) and wait until each has ended; job id -> how it ended.

    Inline, each is rendered here in turn. With deployments, jobs held back by fair sharing are
    dispatched as GPUs free up (by the renders that free them, or here), a job's render may
    hand it to a finish-job run, and a run that died is replaced, as the sweep would: so this
    waits for the jobs, not for their first runs."""
    outcomes = settle(
        svc,
        job_ids,
        actor=ACTOR,
        batch_name=batch_name,
        output_dir=output_dir,
        eager=True,
        linked=True,
    )
    if svc.settings.dispatch == "inline":
        return {o.job_id: o.detail or o.action for o in outcomes}
    tracked = [o.job_id for o in outcomes]
    while True:
        with svc.sessions() as session:
            statuses = job_statuses(session=session, job_ids=tracked)
        pending = [j for j in tracked if statuses[j] in (JobStatus.QUEUED, JobStatus.RUNNING)]
        if not pending:
            return {job_id: statuses[job_id].value for job_id in tracked}
        time.sleep(DISPATCH_POLL_SECONDS)
        try:
            settle(
                svc, pending, actor=ACTOR, batch_name=batch_name, output_dir=output_dir, linked=True
            )
        except Exception as error:  # noqa: BLE001 (Prefect or the database blinked: next round)
            log.warning("dispatching batch %s: %s; trying again", batch_name, error)


def content_key(manifest_sha256: str, fetched: list[FetchedInputs | str]) -> str:
    """The batch's identity: the manifest's bytes and the bytes of every input fetched."""
    hashes = [(f.name, f.image_sha256, f.audio_sha256) for f in fetched if not isinstance(f, str)]
    return batch_key(manifest_sha256, hashes)


def _register(
    svc: Services,
    parsed: Manifest,
    sha: str,
    base: str,
    source: str,
    *,
    inbox: bool,
    allow_cost_hours: float | None,
) -> tuple[Batch, bool, dict[str, PreparedJob]]:
    """Fetch and hash the inputs; find the batch of this content, or pre-flight, store and
    register it (with each new job's pre-flight: track length, clips, estimated GPU time).
    The submit's copies of the inputs are removed however it ends."""
    scratch = _submit_scratch(svc, sha)
    try:
        fetched = fetch_inputs(svc.settings, parsed, scratch, base, inbox)
        key = content_key(sha, fetched)
        with svc.sessions() as session:  # a batch with unfetchable inputs was never registered
            existing = find_batch(session=session, manifest_sha256=key)
        if existing is not None:
            restore_inputs(svc, existing.id, fetched)
            return existing, False, {}
        weights = resolve_weights(svc.settings)
        prepared = preflight(svc.settings, parsed, key, fetched, weights, source, allow_cost_hours)
        specs = upload_inputs(svc, prepared, weights)
        with svc.sessions() as session:
            share = BatchShare(parsed.priority, parsed.weight, parsed.max_concurrent, parsed.tenant)
            batch, created = register_batch(
                session=session,
                name=parsed.name,
                manifest_sha256=key,
                jobs=specs,
                actor=ACTOR,
                share=share,
            )
        return batch, created, {job.spec.name: job for job in prepared}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def validate_manifest(
    source: str,
    settings: Settings,
    base: str | None = None,
    inbox: bool = False,
    allow_cost_hours: float | None = None,
) -> tuple[Manifest, list[PreparedJob]]:
    """Everything a submit checks before registering (the manifest, fetching and decoding
    every input, faces, limits, the estimate), touching neither the job database nor the
    store: ``emo validate``. Raises ``ManifestError`` listing every problem."""
    data, manifest_dir = read_manifest_source(source, settings)
    parsed, sha = parse_manifest(data, source=source)
    scratch_root = settings.home / "scratch"
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="validate-", dir=scratch_root) as scratch:
        fetched = fetch_inputs.fn(settings, parsed, Path(scratch), base or manifest_dir, inbox)
        key = content_key(sha, fetched)
        weights = resolve_weights(settings)
        prepared = preflight.fn(settings, parsed, key, fetched, weights, source, allow_cost_hours)
    return parsed, prepared


@flow(name="submit-batch", flow_run_name="submit {manifest}")
def submit_batch(
    manifest: str,
    output_dir: str | None = None,
    render: bool = True,
    base: str | None = None,
    inbox: bool = False,
    allow_cost_hours: float | None = None,
) -> dict[str, Any]:
    """Validate, pre-flight, register and dispatch one manifest; publish the batch table.

    ``base`` is where relative input paths are resolved (default: next to the manifest);
    ``inbox`` confines inputs to it (a manifest dropped in the inbox, ``emo.confine``);
    ``allow_cost_hours`` lets a batch estimated above EMO_MAX_BATCH_GPU_HOURS through.
    """
    svc = services()
    data, manifest_dir = read_manifest_source(manifest, svc.settings)
    base = base or manifest_dir

    parsed, sha = parse_manifest(data, source=manifest)
    batch, created, prepared = _register(
        svc, parsed, sha, base, manifest, inbox=inbox, allow_cost_hours=allow_cost_hours
    )
    if deployment.id is not None and flow_run.parent_flow_run_id is None:
        # A submit-batch deployment run of its own (not nightly's): cancelling it in the UI
        # cancels the batch, jobs the sweep dispatched again included.
        with svc.sessions() as session:
            record_submit_run(session=session, batch_id=batch.id, flow_run_id=str(flow_run.id))
    with svc.sessions() as session:
        jobs = list(session.get(type(batch), batch.id).jobs)
        todo = [
            j.id
            for j in sorted(jobs, key=lambda j: (-j.priority, j.created_at))
            if j.status in (JobStatus.QUEUED, JobStatus.RUNNING)
        ]
    if output_dir is not None:
        with svc.sessions() as session:
            set_output_dir(session=session, batch_id=batch.id, output_dir=output_dir)
    outcome = dispatch(svc, parsed.name, todo, output_dir) if render else {}
    with svc.sessions() as session:
        jobs = list(session.get(type(batch), batch.id).jobs)
        rows = batch_rows(jobs)
    estimates = {name: job.estimate_seconds for name, job in prepared.items()}
    cost = ""
    if prepared:  # a new batch: its pre-flight, per job and in all
        hours = sum(estimates.values()) / 3600
        cost = f"; estimated {hours:,.2f} GPU-hours on {svc.settings.gpu_class}"
        for row in rows:
            job = prepared.get(row["job"])
            if job is not None:
                row["track seconds"] = round(job.seconds, 1)
                row["clips"] = job.clips
                row["estimated GPU seconds"] = round(job.estimate_seconds, 1)
    create_table_artifact(
        key=f"batch-{batch.id[:12]}",
        table=rows,
        description=f"batch {parsed.name} ({len(jobs)} jobs{cost})",
    )
    return {
        "batch_id": batch.id,
        "name": parsed.name,
        "created": created,
        "jobs": {j.name: j.id for j in jobs},
        "dispatched": outcome,
        "table": rows,
        "estimate_seconds": estimates,
    }


if __name__ == "__main__":
    import sys

    submit_batch(sys.argv[1])
