"""render_track: one job, segment by segment, resumable from its checkpoints.

Take the job's lease (heartbeat while running) -> load inputs -> plan segments once -> for each
segment in order: skip it if its checkpoint verifies, else render its clips from the previous
checkpoint's motion state, write the checkpoint (video, motion state, manifest last) and record
it in the database -> assemble (stream-copy concat + audio mux) -> QC -> sidecar -> succeeded.
Any failure marks the job failed with the reason; verified checkpoints stay in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from db.jobs import begin_run, get_job, record_result, transition_job
from db.models import JobStatus
from db.segments import list_segments, record_segment_done, store_plan
from emo import media, progress
from emo.errors import EmoError
from emo.eval.qc import qc_report
from emo.pipeline import EMOPipeline, MotionState
from emo.plan import PlannedSegment, SegmentPlan, plan_segments
from emo.render import (
    JobParams,
    device_and_dtype,
    load_pipeline,
    portrait_region,
    prepare_portrait,
    render_segment,
    resolve_params,
    resolve_weights,
    speed_schedule,
)
from emo.store.checkpoint import (
    SegmentCheckpoint,
    read_segment_checkpoint,
    write_segment_checkpoint,
)
from flows.context import JobLease, Services, services
from flows.gpu_slot import GpuSlot
from flows.versions import software_versions

log = logging.getLogger(__name__)


class JobCancelled(EmoError):
    """The job was cancelled while rendering."""


@dataclass
class JobInputs:
    """A job's decoded inputs, prepared for the model."""

    portrait: np.ndarray  # (R, R, 3) uint8, square crop around the face
    face_box: tuple[float, float, float, float]  # in portrait coordinates
    face_source: str
    audio: np.ndarray  # (N,) float32 mono at the configured rate
    audio_path: Path  # the original track, muxed into the final video
    speeds: np.ndarray  # (frames,) head speed per frame
    scratch: Path


def _run_name() -> str:
    job_id = flow_run.parameters.get("job_id", "?")
    try:
        with services().sessions() as session:
            job = get_job(session=session, job_id=job_id)
            return f"{job.batch.name}/{job.name}"
    except Exception:  # noqa: BLE001 (a name is cosmetic; never fail a run over it)
        return f"job {job_id}"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def load_inputs(svc: Services, job_id: str, params: JobParams, resolution: int) -> JobInputs:
    """Fetch the job's inputs from the store and prepare the portrait and audio."""
    with svc.sessions() as session:
        job = get_job(session=session, job_id=job_id)
        image_key, audio_key = _key(svc, job.image_uri), _key(svc, job.audio_uri)
    scratch = svc.settings.home / "scratch" / job_id
    image_path = svc.store.get_file(image_key, scratch / Path(image_key).name)
    audio_path = svc.store.get_file(audio_key, scratch / Path(audio_key).name)
    image = media.load_image(image_path)
    region = portrait_region(image, params, Path(image_key).name)
    portrait, box = prepare_portrait(image, region, resolution)
    audio = media.load_audio(audio_path, svc.settings.sample_rate)
    frames = -(-audio.size // svc.settings.samples_per_frame)
    return JobInputs(
        portrait=portrait,
        face_box=box,
        face_source=region.source,
        audio=audio,
        audio_path=audio_path,
        speeds=speed_schedule(params.speed, frames, svc.settings.fps),
        scratch=scratch,
    )


def _key(svc: Services, uri: str) -> str:
    prefix = svc.store.url.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise EmoError(f"input {uri} is not in the configured object store {svc.store.url}")
    return uri[len(prefix) :]


@task(cache_policy=NO_CACHE)
def plan_job(svc: Services, job_id: str, audio: np.ndarray, params: JobParams) -> SegmentPlan:
    """The job's stored plan, or a new one stored now (a job's plan never changes)."""
    with svc.sessions() as session:
        job = get_job(session=session, job_id=job_id)
        if job.plan is not None:
            return SegmentPlan.from_dict(job.plan)
        settings = svc.settings
        plan = plan_segments(
            audio,
            sample_rate=settings.sample_rate,
            fps=settings.fps,
            clip_frames=settings.clip_frames,
            segment_seconds=params.segment_seconds,
        )
        store_plan(session=session, job_id=job_id, plan=plan, actor="render-track")
        return plan


@task(cache_policy=NO_CACHE)
def load_model(svc: Services) -> EMOPipeline:
    """The weights bundle, loaded once per process."""
    device, dtype = device_and_dtype(svc.settings)
    path = resolve_weights(svc.settings)
    return load_pipeline(
        str(path),
        str(device),
        str(dtype).removeprefix("torch."),
        svc.settings.fps,
        svc.settings.sample_rate,
    )


def _clock(seconds: float) -> str:
    """m:ss.s, how the UI shows where in the track a segment lies."""
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}:{rest:04.1f}"


def _segment_run_name() -> str:
    """Task-run name in the UI: the segment's index and its time range in the track."""
    segment = task_run.parameters.get("segment")
    if segment is None:
        return "segment"
    return (
        f"segment {segment.index} ({_clock(segment.start_seconds)}-{_clock(segment.end_seconds)})"
    )


@task(cache_policy=NO_CACHE, task_run_name=_segment_run_name)
def render_segment_task(
    svc: Services,
    lease: JobLease,
    job_id: str,
    pipeline: EMOPipeline,
    inputs: JobInputs,
    plan: SegmentPlan,
    segment: PlannedSegment,
    params: JobParams,
    previous: SegmentCheckpoint | None,
) -> SegmentCheckpoint:
    """Render one segment, checkpoint it (manifest last), then record it in the database."""
    started = time.perf_counter()
    motion = None
    if previous is not None:
        path = svc.store.get_file(
            previous.key("motion.safetensors"),
            inputs.scratch / f"motion-in-{segment.index:05d}.safetensors",
        )
        motion = MotionState.load(path)
    frames, state = _render(pipeline, inputs, plan, segment, params, motion, lease)
    video = inputs.scratch / f"segment-{segment.index:05d}.mp4"
    with media.VideoWriter(
        video, width=frames.shape[2], height=frames.shape[1], fps=svc.settings.fps
    ) as writer:
        writer.write(frames)
    motion_path = inputs.scratch / f"motion-{segment.index:05d}.safetensors"
    state.save(motion_path)
    seconds = time.perf_counter() - started
    checkpoint = write_segment_checkpoint(
        svc.store,
        job_id=job_id,
        index=segment.index,
        files={"video.mp4": video, "motion.safetensors": motion_path},
        meta={
            "frames": [segment.frame_start, segment.frame_end],
            "samples": [segment.sample_start, segment.sample_end],
            "clips": [segment.clip_start, segment.clip_start + segment.clip_count],
            "seed": params.seed,
            "weights_sha256": pipeline.bundle.sha256 if pipeline.bundle else None,
            "params": params.to_dict(),
            "previous_manifest_sha256": previous.manifest_sha256 if previous else None,
            "render_seconds": seconds,
        },
    )
    lease.verify()  # a render that lost the job must not record segments for it
    with svc.sessions() as session:
        record_segment_done(
            session=session,
            job_id=job_id,
            index=segment.index,
            checkpoint_uri=svc.store.uri(checkpoint.prefix + "manifest.json"),
            manifest_sha256=checkpoint.manifest_sha256,
            render_seconds=seconds,
            actor="render-track",
        )
    video.unlink(missing_ok=True)
    return checkpoint


def _render(
    pipeline: EMOPipeline,
    inputs: JobInputs,
    plan: SegmentPlan,
    segment: PlannedSegment,
    params: JobParams,
    motion: MotionState | None,
    lease: JobLease,
):
    report = progress.reporter(plan.total_clips)

    def on_step(clip: int, step: int, steps: int) -> None:
        lease.check()  # stop between steps, not after the segment, once the lease is gone
        lease.mark_progress()
        if report is not None:
            report(clip, step, steps)

    return render_segment(
        pipeline,
        portrait=inputs.portrait,
        face_box=inputs.face_box,
        audio=inputs.audio,
        speeds=inputs.speeds,
        plan=plan,
        segment=segment,
        params=params,
        motion_state=motion,
        callback=on_step,
    )


def _check_reusable(
    checkpoint: SegmentCheckpoint,
    previous: SegmentCheckpoint | None,
    weights_sha256: str | None,
    params: JobParams,
) -> None:
    """Refuse to splice in a checkpoint made by other weights, parameters or history.

    Checkpoints are never rewritten, so a job whose weights or resolved parameters changed
    between attempts cannot be resumed; it must be submitted again as a new job.
    """
    found = checkpoint.manifest
    expected_previous = previous.manifest_sha256 if previous else None
    problems = []
    if found.get("weights_sha256") != weights_sha256:
        problems.append(
            f"weights {str(found.get('weights_sha256'))[:12]} (now {str(weights_sha256)[:12]})"
        )
    if found.get("params") != json.loads(json.dumps(params.to_dict())):  # as stored (JSON)
        problems.append("different parameters (settings defaults changed?)")
    if found.get("previous_manifest_sha256") != expected_previous:
        problems.append("a different previous segment")
    if problems:
        raise EmoError(
            f"segment {checkpoint.index} of job {checkpoint.job_id} was rendered with "
            + "; ".join(problems)
            + ": its checkpoint cannot continue this render; submit the job again under a "
            "new name (checkpoints are never rewritten)"
        )


def _repair_row(svc: Services, job_id: str, checkpoint: SegmentCheckpoint) -> None:
    """The database follows the store: a verified checkpoint is recorded if it is not."""
    with svc.sessions() as session:
        rows = {s.index: s for s in list_segments(session=session, job_id=job_id)}
        row = rows.get(checkpoint.index)
        if row is not None and row.manifest_sha256 != checkpoint.manifest_sha256:
            record_segment_done(
                session=session,
                job_id=job_id,
                index=checkpoint.index,
                checkpoint_uri=svc.store.uri(checkpoint.prefix + "manifest.json"),
                manifest_sha256=checkpoint.manifest_sha256,
                render_seconds=float(checkpoint.manifest.get("render_seconds", 0.0)),
                actor="render-track (repaired from the store)",
            )


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def assemble(
    svc: Services,
    job_id: str,
    checkpoints: list[SegmentCheckpoint],
    inputs: JobInputs,
    params: JobParams,
) -> tuple[Path, str]:
    """Concatenate the segments (stream copy), mux the track, export, upload."""
    videos = [
        svc.store.get_file(c.key("video.mp4"), inputs.scratch / f"final-{c.index:05d}.mp4")
        for c in checkpoints
    ]
    final = media.concat_videos(videos, inputs.scratch / "final.mp4", audio=inputs.audio_path)
    for video in videos:
        video.unlink(missing_ok=True)
    if params.format == "mov":
        final = media.to_prores(final, inputs.scratch / "final.mov")
    elif params.format == "png":
        frames = media.to_png_sequence(final, inputs.scratch / "final_png")
        archive = shutil.make_archive(str(inputs.scratch / "final_png"), "zip", frames[0].parent)
        final = Path(archive)
    key = f"jobs/{job_id}/{final.name}"
    svc.store.put_file(key, final)
    return final, key


@task(cache_policy=NO_CACHE)
def quality(svc: Services, video: Path, inputs: JobInputs, plan: SegmentPlan) -> dict[str, Any]:
    """QC scores and warnings of the final video."""
    settings = svc.settings
    boundaries = {c * plan.clip_frames for c in range(1, plan.total_clips)}
    boundaries |= {s.frame_start for s in plan.segments[1:]}
    mp4 = video if video.suffix == ".mp4" else inputs.scratch / "final.mp4"
    return qc_report(
        mp4,
        reference=inputs.portrait,
        face_box=inputs.face_box,
        audio=inputs.audio,
        samples_per_frame=settings.samples_per_frame,
        boundaries=boundaries,
        max_seam_jitter=settings.qc_max_seam_jitter,
        min_identity=settings.qc_min_identity,
        min_sync=settings.qc_min_sync,
    )


def _publish_output(final: Path, output: Path, sidecar: dict[str, Any]) -> Path:
    """Copy the result next to where the user asked, with its sidecar JSON."""
    from emo.store.local import atomic_copy, atomic_write

    if final.suffix == ".zip":  # PNG frames: unpack into the output directory
        target = output if output.suffix == "" else output.with_suffix("")
        _replace_frame_folder(final, target)
    else:
        target = output
        atomic_copy(final, target)
    atomic_write(
        target.with_name(target.stem + ".json"),
        json.dumps(sidecar, indent=2, sort_keys=True).encode(),
    )
    return target


def _replace_frame_folder(archive: Path, target: Path) -> None:
    """Unpack PNG frames next to ``target``, then swap them in; never delete a user's files.

    ``target`` may be missing, empty, or a frame folder this command wrote before
    (``frame_*.png`` only); anything else in it is refused with a clear error.
    """
    if target.exists():
        foreign = [p.name for p in target.iterdir() if not p.name.startswith("frame_")]
        if not target.is_dir() or foreign:
            raise EmoError(
                f"output {str(target)!r} exists and is not a frame folder from emo "
                f"(holds {', '.join(sorted(foreign)[:3]) or 'a file'}); choose a new folder"
            )
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.unpack_archive(archive, staging)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _check_cancelled(svc: Services, job_id: str) -> None:
    with svc.sessions() as session:
        if get_job(session=session, job_id=job_id).status is JobStatus.CANCELLED:
            raise JobCancelled(f"job {job_id} was cancelled")


@flow(name="render-track", flow_run_name=_run_name, log_prints=True)
def render_track(job_id: str, output: str | None = None) -> dict[str, Any]:
    """Render one job; safe to run again (it resumes from the last verified segment)."""
    svc = services()
    started = time.perf_counter()
    with JobLease(svc, job_id) as lease:
        with svc.sessions() as session:
            job = begin_run(session=session, job_id=job_id, actor=lease.owner)
            name, batch_name, options = job.name, job.batch.name, dict(job.params)
        try:
            return _render_job(svc, lease, job_id, name, batch_name, options, output, started)
        except JobCancelled:
            log.warning("job %s cancelled; verified segments are kept", job_id)
            return {"job_id": job_id, "status": JobStatus.CANCELLED.value}
        except BaseException as error:
            _mark_failed(svc, lease, job_id, error)
            raise


def _mark_failed(svc: Services, lease: JobLease, job_id: str, error: BaseException) -> None:
    """Record the failure, unless the job now belongs to another render (lease lost)."""
    try:
        holder = lease.holder()  # the database decides, even if this render stopped itself
    except Exception as failure:  # noqa: BLE001 (unreachable: the sweep finds the job later)
        log.error("job %s: cannot record its failure (%s); it stays running", job_id, failure)
        return
    if holder != lease.owner:
        log.error("job %s: lease lost; leaving its state to the render that holds it", job_id)
        return
    with svc.sessions() as session:
        if get_job(session=session, job_id=job_id).status is JobStatus.RUNNING:
            transition_job(
                session=session,
                job_id=job_id,
                to=JobStatus.FAILED,
                actor=lease.owner,
                reason=(str(error) or type(error).__name__)[:2000],
            )


def _render_job(
    svc: Services,
    lease: JobLease,
    job_id: str,
    name: str,
    batch_name: str,
    options: dict[str, Any],
    output: str | None,
    started: float,
) -> dict[str, Any]:
    # One GPU slot for the whole job, taken before the model is loaded onto the device: the
    # render holds its device from first to last segment.
    slot = GpuSlot(
        svc,
        lease,
        wait_seconds=svc.settings.slot_wait_seconds,
        grace_seconds=svc.settings.heartbeat_seconds,
        on_wait=lambda: _check_cancelled(svc, job_id),
    )
    with slot:
        work = _render_segments(svc, lease, job_id, f"{batch_name}/{name}", options)
    return _finish(svc, lease, work, name, batch_name, output, started)


@dataclass
class RenderedSegments:
    """A job whose segments all have verified checkpoints, ready to assemble."""

    job_id: str
    pipeline: EMOPipeline
    params: JobParams
    inputs: JobInputs
    plan: SegmentPlan
    checkpoints: list[SegmentCheckpoint]
    rendered: int  # segments rendered by this run (the rest were resumed)


def _render_segments(
    svc: Services,
    lease: JobLease,
    job_id: str,
    title: str,
    options: dict[str, Any],
) -> RenderedSegments:
    """Load the model and inputs, then render (or resume) every segment in order."""
    pipeline = load_model(svc)
    lease.mark_progress()  # work done while holding the slot counts as progress to waiters
    config = pipeline.config
    params = resolve_params(
        options,
        job_id=job_id,
        settings=svc.settings,
        model_steps=config.steps,
        model_guidance=config.guidance_scale,
    )
    inputs = load_inputs(svc, job_id, params, config.resolution)
    plan = plan_job(svc, job_id, inputs.audio, params)
    progress_id = create_progress_artifact(
        progress=0.0, key=f"job-{job_id[:12]}-progress", description=f"{title}: segments done"
    )
    checkpoints: list[SegmentCheckpoint] = []
    rendered = 0
    weights_sha256 = pipeline.bundle.sha256 if pipeline.bundle else None
    for segment in plan.segments:
        lease.mark_progress()
        lease.verify()  # still the job's holder, and still holding its GPU slot
        _check_cancelled(svc, job_id)
        checkpoint = read_segment_checkpoint(svc.store, job_id=job_id, index=segment.index)
        if checkpoint is not None:
            previous = checkpoints[-1] if checkpoints else None
            _check_reusable(checkpoint, previous, weights_sha256, params)
            _repair_row(svc, job_id, checkpoint)
        else:
            label = (
                f"segment {segment.index:03d} "
                f"[{segment.start_seconds:.1f}-{segment.end_seconds:.1f} s]"
            )
            checkpoint = render_segment_task.with_options(name=label)(
                svc,
                lease,
                job_id,
                pipeline,
                inputs,
                plan,
                segment,
                params,
                checkpoints[-1] if checkpoints else None,
            )
            rendered += 1
        checkpoints.append(checkpoint)
        progress.segment_done(segment.index, len(plan.segments))
        update_progress_artifact(
            progress_id, progress=100.0 * len(checkpoints) / len(plan.segments)
        )
    return RenderedSegments(job_id, pipeline, params, inputs, plan, checkpoints, rendered)


def _finish(
    svc: Services,
    lease: JobLease,
    work: RenderedSegments,
    name: str,
    batch_name: str,
    output: str | None,
    started: float,
) -> dict[str, Any]:
    """Assemble, QC, sidecar, outputs and artifacts; then mark the job succeeded."""
    job_id, pipeline, params, inputs, plan = (
        work.job_id,
        work.pipeline,
        work.params,
        work.inputs,
        work.plan,
    )
    checkpoints, rendered, config = work.checkpoints, work.rendered, work.pipeline.config
    key = f"job-{job_id[:12]}"
    final, final_key = assemble(svc, job_id, checkpoints, inputs, params)
    qc = quality(svc, final, inputs, plan)
    sidecar = {
        "job_id": job_id,
        "name": name,
        "batch": batch_name,
        "seed": params.seed,
        "params": params.to_dict(),
        "weights_sha256": pipeline.bundle.sha256 if pipeline.bundle else None,
        "model_config": config.name,
        "face_region": {"box_in_portrait": inputs.face_box, "source": inputs.face_source},
        "frames": plan.total_frames,
        "fps": svc.settings.fps,
        "segments": [
            {
                "index": c.index,
                "manifest_sha256": c.manifest_sha256,
                "render_seconds": c.manifest.get("render_seconds"),
            }
            for c in checkpoints
        ],
        "segments_rendered_this_run": rendered,
        "prefect_flow_run": str(flow_run.id) if flow_run.id else None,
        "qc": qc,
        "software": software_versions(),
        "timings": {"run_seconds": time.perf_counter() - started},
    }
    svc.store.put_bytes(f"jobs/{job_id}/qc.json", json.dumps(qc, indent=2).encode())
    svc.store.put_bytes(
        f"jobs/{job_id}/sidecar.json", json.dumps(sidecar, indent=2, sort_keys=True).encode()
    )
    target = _publish_output(final, Path(output), sidecar) if output else None
    output_uri = svc.store.uri(final_key)
    create_table_artifact(
        key=f"{key}-qc",
        table=[{"measure": k, "value": str(v)} for k, v in qc.items() if k != "thresholds"],
        description=f"QC of {batch_name}/{name}",
    )
    create_link_artifact(
        key=f"{key}-video",
        link=svc.store.url_for(final_key),
        link_text=f"{name}{final.suffix}",
        description=f"final video of {batch_name}/{name}",
    )
    lease.verify()  # only the lease holder may finish the job
    with svc.sessions() as session:
        record_result(
            session=session, job_id=job_id, output_uri=output_uri, qc=qc, actor=lease.owner
        )
        transition_job(
            session=session,
            job_id=job_id,
            to=JobStatus.SUCCEEDED,
            actor=lease.owner,
            reason=f"{rendered} segment(s) rendered this run",
        )
    shutil.rmtree(inputs.scratch, ignore_errors=True)
    return {
        "job_id": job_id,
        "status": JobStatus.SUCCEEDED.value,
        "flow_run_id": sidecar["prefect_flow_run"],
        "qc_uri": svc.store.uri(f"jobs/{job_id}/qc.json"),
        "output_uri": output_uri,
        "output": str(target) if target else None,
        "qc": qc,
        "rendered": rendered,
        "segments": len(plan.segments),
    }


if __name__ == "__main__":
    import sys

    render_track(sys.argv[1])
