"""submit_batch: validate a manifest, pre-flight every job, register the batch, dispatch jobs.

Idempotent: the manifest's sha256 names the batch and its jobs, so submitting the same
manifest again finds the same batch (its inputs are not copied again) and dispatches only
jobs that still need rendering. Nothing is registered while any job is invalid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect import flow, tags, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.states import State

from db.batches import JobSpec, find_batch, register_batch
from db.jobs import fail_crashed_job, requeue_job
from db.models import Job, JobStatus
from emo import media
from emo.errors import EmoError, JobStateError
from emo.manifest import Manifest, ManifestError, parse_manifest
from emo.models.config import FULL
from emo.plan import frame_count
from emo.render import (
    estimate_seconds,
    fetch,
    job_id_for,
    portrait_region,
    resolve_params,
)
from flows.context import Services, services
from flows.render_track import render_track

log = logging.getLogger(__name__)
ACTOR = "submit-batch"


@dataclass
class PreparedJob:
    """A validated job: where its inputs are locally, and what rendering it will take."""

    spec: JobSpec
    image: Path
    audio: Path
    seconds: float
    clips: int
    estimate_seconds: float
    face: str


def read_source(source: str, svc: Services) -> tuple[bytes, str]:
    """Manifest bytes from a path, file:// or s3:// URI; and the base for relative inputs."""
    parsed = urlparse(source)
    if parsed.scheme == "s3":
        from emo.store import open_store

        store = open_store(f"s3://{parsed.netloc}", svc.settings)
        key = parsed.path.lstrip("/")
        return store.get_bytes(key), source.rsplit("/", 1)[0]
    path = Path(parsed.path if parsed.scheme == "file" else source)
    if not path.is_file():
        raise ManifestError(source, ["file does not exist"])
    return path.read_bytes(), str(path.parent.absolute())


def _resolve(uri: str, base: str) -> str:
    if urlparse(uri).scheme in ("s3", "file") or Path(uri).is_absolute():
        return uri
    return f"{base.rstrip('/')}/{uri}"


@task(cache_policy=NO_CACHE)
def preflight(
    svc: Services, manifest: Manifest, sha256: str, base: str, source: str
) -> list[PreparedJob]:
    """Decode every input, find every face, estimate the work; report all problems at once."""
    settings = svc.settings
    scratch = settings.home / "scratch" / f"submit-{sha256[:16]}"
    prepared, problems = [], []
    for row, job in enumerate(manifest.jobs, start=1):
        place = f"job {job.name!r} (row {row})"
        job_id = job_id_for(sha256, job.name)
        options = manifest.job_options(job)
        params = resolve_params(
            options,
            job_id=job_id,
            settings=settings,
            model_steps=FULL.steps,
            model_guidance=FULL.guidance_scale,
        )
        image_uri, audio_uri = _resolve(job.image, base), _resolve(job.audio, base)
        try:
            image = fetch(
                image_uri,
                scratch / job_id / "image" / _name(job.image),
                base_dir=Path(base),
                settings=settings,
            )
            audio = fetch(
                audio_uri,
                scratch / job_id / "audio" / _name(job.audio),
                base_dir=Path(base),
                settings=settings,
            )
            pixels = media.load_image(image)
            region = portrait_region(pixels, params, Path(job.image).name)
            samples = media.load_audio(audio, settings.sample_rate)
        except EmoError as error:
            message = str(error)
            for local, uri in (
                (scratch / job_id / "image", image_uri),
                (scratch / job_id / "audio", audio_uri),
            ):
                for candidate in local.glob("*"):  # name the user's file, not our copy
                    message = message.replace(str(candidate), uri)
            problems.append(f"{place}: {message}")
            continue

        clips = -(
            -frame_count(samples.size, settings.sample_rate, settings.fps) // settings.clip_frames
        )
        spec = JobSpec(
            name=job.name,
            image_uri=job.image,
            audio_uri=job.audio,
            params=options,
            priority=options.get("priority", 0),
            max_attempts=settings.max_attempts,
            id=job_id,
        )
        prepared.append(
            PreparedJob(
                spec=spec,
                image=image,
                audio=audio,
                seconds=samples.size / settings.sample_rate,
                clips=clips,
                estimate_seconds=estimate_seconds(clips, params.steps, "full"),
                face=region.source,
            )
        )
    if problems:
        raise ManifestError(source, problems)
    return prepared


def _name(uri: str) -> str:
    return Path(urlparse(uri).path).name or "input"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def upload_inputs(svc: Services, jobs: list[PreparedJob]) -> list[JobSpec]:
    """Copy each job's inputs under jobs/<job>/inputs/; the specs then point at them."""
    specs = []
    for job in jobs:
        job_id = job.spec.id
        image_key = f"jobs/{job_id}/inputs/image/{job.image.name}"
        audio_key = f"jobs/{job_id}/inputs/audio/{job.audio.name}"

        svc.store.put_file(image_key, job.image)
        svc.store.put_file(audio_key, job.audio)
        spec = job.spec
        specs.append(
            JobSpec(
                name=spec.name,
                image_uri=svc.store.uri(image_key),
                audio_uri=svc.store.uri(audio_key),
                params={
                    **spec.params,
                    "source_image": spec.image_uri,
                    "source_audio": spec.audio_uri,
                },
                priority=spec.priority,
                max_attempts=spec.max_attempts,
                id=job_id,
            )
        )
    return specs


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
    """Render the jobs: as subflows here (inline) or as deployment runs (Kubernetes)."""
    outcome: dict[str, str] = {}
    if svc.settings.dispatch == "inline":
        for job_id in job_ids:
            output = _output_path(svc, job_id, output_dir)
            try:
                with tags(f"batch:{batch_name}"):
                    result = render_track(job_id=job_id, output=output)
                outcome[job_id] = result["status"]
            except Exception as error:  # noqa: BLE001 (one job's failure is not the batch's)
                log.error("job %s failed: %s", job_id, error)
                outcome[job_id] = f"failed: {error}"
        return outcome
    runs = {}
    for job_id in job_ids:
        key = _dispatch_key(svc, job_id)
        if key is None:
            outcome[job_id] = "failed: crashed with no attempts left"
            continue
        runs[job_id] = run_deployment(
            svc.settings.render_deployment,
            parameters={"job_id": job_id, "output": _output_path(svc, job_id, output_dir)},
            idempotency_key=key,
            timeout=0,
            tags=[f"batch:{batch_name}"],
        )
    for job_id, run in runs.items():
        outcome[job_id] = _wait(run.id).name
    return outcome


def _dispatch_key(svc: Services, job_id: str) -> str | None:
    """Idempotency key of the render run for the job's current attempt, or None when the job
    crashed and has no attempts left.

    A queued job's run will be attempt+1; a running job's run is the one that made it
    running (attempt), so a retried submit-batch gets that run back instead of starting a
    second render. A running job whose render died (no live lease) is first marked failed and
    requeued: its next run is a new attempt with a new key, not the crashed run.
    """
    with svc.sessions() as session:
        crashed = fail_crashed_job(session=session, job_id=job_id, actor=ACTOR)
    if crashed:
        with svc.sessions() as session:
            try:
                requeue_job(session=session, job_id=job_id, actor=ACTOR, reason="crashed run")
            except JobStateError:  # attempts used up: the job stays failed
                return None
    with svc.sessions() as session:
        job = session.get(Job, job_id)
        attempt = job.attempt + 1 if job.status is JobStatus.QUEUED else job.attempt
    return f"{job_id}:attempt-{attempt}"


def _wait(run_id: Any, poll_seconds: float = 10.0) -> State:
    """Wait for a deployment run to finish; ``run_deployment`` does not raise on failure."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return state
            time.sleep(poll_seconds)


def _output_path(svc: Services, job_id: str, output_dir: str | None) -> str | None:
    if output_dir is None:
        return None
    with svc.sessions() as session:
        job = session.get(Job, job_id)
        suffix = {"mov": ".mov", "png": ""}.get(job.params.get("format", "mp4"), ".mp4")
        return str(Path(output_dir) / f"{job.name}{suffix}")


@flow(name="submit-batch", flow_run_name="submit {manifest}")
def submit_batch(
    manifest: str, output_dir: str | None = None, render: bool = True, base: str | None = None
) -> dict[str, Any]:
    """Validate, pre-flight, register and dispatch one manifest; publish the batch table.

    ``base`` is where relative input paths are resolved (default: next to the manifest).
    """
    svc = services()
    data, manifest_dir = read_source(manifest, svc)
    base = base or manifest_dir

    parsed, sha = parse_manifest(data, source=manifest)
    with svc.sessions() as session:
        existing = find_batch(session=session, manifest_sha256=sha)
    if existing is None:
        prepared = preflight(svc, parsed, sha, base, manifest)
        specs = upload_inputs(svc, prepared)
        with svc.sessions() as session:
            batch, created = register_batch(
                session=session, name=parsed.name, manifest_sha256=sha, jobs=specs, actor=ACTOR
            )
    else:
        batch, created = existing, False
    with svc.sessions() as session:
        jobs = list(session.get(type(batch), batch.id).jobs)
        todo = [
            j.id
            for j in sorted(jobs, key=lambda j: (-j.priority, j.created_at))
            if j.status in (JobStatus.QUEUED, JobStatus.RUNNING)
        ]
    outcome = dispatch(svc, parsed.name, todo, output_dir) if render else {}
    with svc.sessions() as session:
        jobs = list(session.get(type(batch), batch.id).jobs)
        rows = batch_rows(jobs)
    create_table_artifact(
        key=f"batch-{batch.id[:12]}",
        table=rows,
        description=f"batch {parsed.name} ({len(jobs)} jobs)",
    )
    return {
        "batch_id": batch.id,
        "name": parsed.name,
        "created": created,
        "jobs": {j.name: j.id for j in jobs},
        "dispatched": outcome,
        "table": rows,
    }


if __name__ == "__main__":
    import sys

    submit_batch(sys.argv[1])
