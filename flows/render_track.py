"""render_track: one job, segment by segment, resumable from its checkpoints.

Take the job's lease (its epoch is this render's fencing token) -> load the pinned weights
and the job's inputs (checked against their hashes) -> plan (a pure function of the audio and
the frame layout; a stored plan must match) -> for each segment in order: reuse the attempt the
database records, or adopt one that fits and chains, else render from the previous segment's
motion state, write a new attempt under this epoch (manifest last) and record it, fenced by the
epoch -> assemble (stream-copy concat + audio mux; frame count and duration checked) -> QC ->
sidecar -> succeeded, fenced by the epoch -> only then publish the user's output. Any failure
marks the job failed with the reason; verified checkpoints stay in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from functools import partial
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
from prefect.client.schemas.objects import StateType
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run, task_run

from db.jobs import begin_run, fail_job, finish_job, get_job, job_status, stop_job
from db.models import JobStatus
from db.segments import list_segments, record_segment_done, store_plan
from emo import media, progress
from emo.errors import EmoError, EpochSuperseded, JobStateError, MediaError, SettingsError
from emo.eval.qc import qc_report
from emo.models.config import EMOConfig
from emo.pipeline import EMOPipeline, MotionState
from emo.plan import PlannedSegment, SegmentPlan, plan_segments
from emo.render import (
    JobParams,
    bundle_sha256,
    check_frame_layout,
    device_and_dtype,
    load_pipeline,
    pinned_bundle,
    portrait_region,
    prepare_portrait,
    render_segment,
    resolve_params,
    resolve_weights,
    speed_schedule,
)
from emo.store.base import sha256_file
from emo.store.checkpoint import (
    MANIFEST,
    SegmentCheckpoint,
    read_segment_checkpoint,
    write_segment_checkpoint,
)
from flows.context import JobCancelled, JobLease, LeaseHeld, Services, services
from flows.gpu_slot import GpuSlot
from flows.retry import in_place
from flows.versions import software_versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobRecord:
    """What the database says a job is: the render binds every checkpoint to it."""

    job_id: str
    name: str
    batch_name: str
    options: dict[str, Any]
    image_sha256: str | None  # None: registered before inputs were content-keyed
    audio_sha256: str | None
    weights_sha256: str | None  # None: registered before weights were pinned


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
def load_inputs(svc: Services, job: JobRecord, params: JobParams, resolution: int) -> JobInputs:
    """Fetch the job's inputs from the store, check their hashes, prepare portrait and audio."""
    with svc.sessions() as session:
        row = get_job(session=session, job_id=job.job_id)
        image_key, audio_key = svc.store.key_of(row.image_uri), svc.store.key_of(row.audio_uri)
    scratch = svc.settings.home / "scratch" / job.job_id
    image_path = svc.store.get_file(image_key, scratch / Path(image_key).name)
    audio_path = svc.store.get_file(audio_key, scratch / Path(audio_key).name)
    for path, key, expected in (
        (image_path, image_key, job.image_sha256),
        (audio_path, audio_key, job.audio_sha256),
    ):
        if expected is not None and sha256_file(path) != expected:
            raise MediaError(
                f"input {svc.store.uri(key)} does not match the hash job {job.job_id} was "
                f"registered with ({expected[:12]}); the store was altered: submit the job again"
            )
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


@task(cache_policy=NO_CACHE)
def plan_job(
    svc: Services,
    lease: JobLease,
    job_id: str,
    audio: np.ndarray,
    params: JobParams,
    clip_frames: int,
) -> SegmentPlan:
    """The job's plan: computed from the audio, the bundle's clip length and the settings, and
    stored once. A stored plan that differs is refused, naming what changed: checkpoints are
    only valid for the segment boundaries they were rendered with."""
    settings = svc.settings
    plan = plan_segments(
        audio,
        sample_rate=settings.sample_rate,
        fps=settings.fps,
        clip_frames=clip_frames,
        segment_seconds=params.segment_seconds,
    )

    def store() -> None:
        with svc.sessions() as session:
            job = get_job(session=session, job_id=job_id)
            if job.plan is not None and job.plan_sha256 != plan.sha256:
                raise SettingsError(_plan_change(job_id, SegmentPlan.from_dict(job.plan), plan))
            store_plan(
                session=session, job_id=job_id, plan=plan, actor="render-track", epoch=lease.epoch
            )

    try:
        in_place(store, lease=lease, what="storing the plan")
    except EpochSuperseded as error:
        lease.fenced(error)
    return plan


def _plan_change(job_id: str, stored: SegmentPlan, now: SegmentPlan) -> str:
    """What differs between the stored plan and the one computed now, by the setting's name."""
    names = {
        "fps": "EMO_FPS",
        "sample_rate": "EMO_SAMPLE_RATE",
        "clip_frames": "the weights bundle's clip_frames",
        "segment_seconds": "segment_seconds (EMO_SEGMENT_SECONDS or the job's option)",
        "total_samples": "the audio's length",
    }
    changed = [
        f"{label} {getattr(stored, field)} -> {getattr(now, field)}"
        for field, label in names.items()
        if getattr(stored, field) != getattr(now, field)
    ] or ["the audio's quiet points (the input changed)"]
    return (
        f"job {job_id} was planned with other settings: {'; '.join(changed)}. Restore them to "
        "resume it, or `emo resume JOB --new-weights` to render it again from scratch"
    )


@task(cache_policy=NO_CACHE)
def load_model(svc: Services, weights_sha256: str | None) -> EMOPipeline:
    """The job's pinned weights bundle (or, for a job registered before pinning, the configured
    one), loaded once per process; refused if EMO_CLIP_FRAMES/EMO_MOTION_FRAMES disagree."""
    device, dtype = device_and_dtype(svc.settings)
    if weights_sha256 is None:
        path = resolve_weights(svc.settings)
    else:
        path = pinned_bundle(svc.settings, svc.store, weights_sha256)
    pipeline = load_pipeline(
        str(path),
        str(device),
        str(dtype).removeprefix("torch."),
        svc.settings.fps,
        svc.settings.sample_rate,
        bundle_sha256(path),
    )
    found = pipeline.bundle.sha256 if pipeline.bundle else None
    if weights_sha256 is not None and found != weights_sha256:
        raise SettingsError(
            f"the bundle at {path} changed while in use ({str(found)[:12]}, the job is pinned "
            f"to {weights_sha256[:12]}); run the job again"
        )
    check_frame_layout(svc.settings, pipeline.config.clip_frames, pipeline.config.motion_frames)
    return pipeline


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
    binding: dict[str, Any],
) -> SegmentCheckpoint:
    """Render one segment, write it as a new attempt under this render's lease epoch (manifest
    last), then record it in the database; the record commits only while the epoch is current.
    """
    started = time.perf_counter()
    motion = None
    if previous is not None:
        path = in_place(
            lambda: svc.store.get_file(
                previous.key("motion.safetensors"),
                inputs.scratch / f"motion-in-{segment.index:05d}.safetensors",
            ),
            lease=lease,
            what="fetching the previous segment's motion state",
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
    lease.check()  # a render that knows it lost the job uploads nothing more
    checkpoint = in_place(
        lambda: write_segment_checkpoint(
            svc.store,
            job_id=job_id,
            index=segment.index,
            epoch=lease.epoch,
            files={"video.mp4": video, "motion.safetensors": motion_path},
            meta={**binding, "seed": params.seed, "render_seconds": seconds},
        ),
        lease=lease,
        what=f"writing segment {segment.index}'s checkpoint",
    )
    _record(svc, lease, checkpoint, "render-track")
    video.unlink(missing_ok=True)
    return checkpoint


def _record(svc: Services, lease: JobLease, checkpoint: SegmentCheckpoint, actor: str) -> None:
    """Record the segment's checkpoint, fenced by this render's epoch (``EpochSuperseded``
    raised as the lease loss it is)."""

    def record() -> None:
        with svc.sessions() as session:
            record_segment_done(
                session=session,
                job_id=checkpoint.job_id,
                index=checkpoint.index,
                checkpoint_uri=svc.store.uri(checkpoint.prefix + MANIFEST),
                manifest_sha256=checkpoint.manifest_sha256,
                render_seconds=float(checkpoint.manifest.get("render_seconds", 0.0)),
                actor=actor,
                epoch=lease.epoch,
            )

    try:
        in_place(record, lease=lease, what=f"recording segment {checkpoint.index}")
    except EpochSuperseded as error:
        lease.fenced(error)


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


def segment_binding(
    job: JobRecord,
    plan: SegmentPlan,
    segment: PlannedSegment,
    params: JobParams,
    config: EMOConfig,
    weights_sha256: str | None,
    previous: SegmentCheckpoint | None,
) -> dict[str, Any]:
    """Everything a segment's frames depend on; its checkpoint must match all of it to count."""
    return {
        "image_sha256": job.image_sha256,
        "audio_sha256": job.audio_sha256,
        "plan_sha256": plan.sha256,
        "fps": plan.fps,
        "sample_rate": plan.sample_rate,
        "clip_frames": config.clip_frames,
        "motion_frames": config.motion_frames,
        "frames": [segment.frame_start, segment.frame_end],
        "samples": [segment.sample_start, segment.sample_end],
        "clips": [segment.clip_start, segment.clip_start + segment.clip_count],
        "weights_sha256": weights_sha256,
        "params": params.to_dict(),
        "previous_manifest_sha256": previous.manifest_sha256 if previous else None,
    }


def _recorded(svc: Services, job_id: str) -> dict[int, tuple[str, str]]:
    """Segment index -> (manifest key, manifest sha256) as the database records them."""
    with svc.sessions() as session:
        return {
            s.index: (svc.store.key_of(s.checkpoint_uri), s.manifest_sha256)
            for s in list_segments(session=session, job_id=job_id)
            if s.checkpoint_uri and s.manifest_sha256
        }


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def assemble(
    svc: Services,
    lease: JobLease,
    job_id: str,
    checkpoints: list[SegmentCheckpoint],
    inputs: JobInputs,
    params: JobParams,
    plan: SegmentPlan,
) -> tuple[Path, str]:
    """Concatenate the segments (stream copy), mux the track, check the result, export, and
    upload it under this render's epoch (unpublished until the job's fenced commit)."""
    videos = [
        in_place(
            lambda c=c: svc.store.get_file(
                c.key("video.mp4"), inputs.scratch / f"final-{c.index:05d}.mp4"
            ),
            lease=lease,
            what=f"fetching segment {c.index}",
        )
        for c in checkpoints
    ]
    final = media.concat_videos(videos, inputs.scratch / "final.mp4", audio=inputs.audio_path)
    for video in videos:
        video.unlink(missing_ok=True)
    check_assembled(final, plan)
    if params.format == "mov":
        final = media.to_prores(final, inputs.scratch / "final.mov")
    elif params.format == "png":
        frames = media.to_png_sequence(final, inputs.scratch / "final_png")
        archive = shutil.make_archive(str(inputs.scratch / "final_png"), "zip", frames[0].parent)
        final = Path(archive)
    key = f"{output_prefix(job_id, lease.epoch)}{final.name}"
    in_place(lambda: svc.store.put_file(key, final), lease=lease, what="uploading the video")
    return final, key


def output_prefix(job_id: str, epoch: int) -> str:
    """Where the render of one epoch puts the final video, QC report and sidecar; the job row
    (output_uri) names the prefix that counts."""
    return f"jobs/{job_id}/output/e{epoch:06d}/"


def check_assembled(video: Path, plan: SegmentPlan) -> None:
    """The final video has exactly ceil(samples / samples per frame) frames and the audio's
    duration; anything else (a segment of another plan spliced in) fails the job."""
    info = media.probe(video)
    audio = info.first("audio")
    seconds = plan.total_samples / plan.sample_rate
    problems = []
    if info.video_frames != plan.total_frames:
        problems.append(f"{info.video_frames} frames, the track needs {plan.total_frames}")
    if audio is None or abs(audio.duration - seconds) > media.TRUNCATION_TOLERANCE_SECONDS:
        found = "no audio" if audio is None else f"{audio.duration:.3f} s of audio"
        problems.append(f"{found}, the track lasts {seconds:.3f} s")
    if problems:
        raise MediaError(f"assembled video {video.name} is wrong: {'; '.join(problems)}")


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
    with JobLease(svc, job_id) as lease, _SigtermNoted() as sigterm:
        try:
            job = in_place(lambda: _begin(svc, lease, job_id), lease=lease, what="starting")
            if job is None:
                log.warning("job %s is cancelled; nothing to render", job_id)
                return {"job_id": job_id, "status": JobStatus.CANCELLED.value}
            return _render_job(svc, lease, job, output, started)
        except JobCancelled:
            log.warning("job %s cancelled; verified segments are kept", job_id)
            return {"job_id": job_id, "status": JobStatus.CANCELLED.value}
        except (TerminationSignal, KeyboardInterrupt) as stop:
            _stopped(svc, lease, job_id, stop)
            raise
        except LeaseHeld as lost:  # lapsed (database unreachable) or taken over: not a failure
            _stopped(svc, lease, job_id, lost)
            raise
        except BaseException as error:
            if sigterm.received:  # a library turned the signal into its own error
                _stopped(svc, lease, job_id, TerminationSignal(signal.SIGTERM))
            else:
                _mark_failed(svc, lease, job_id, error)
            raise


class _SigtermNoted:
    """Notes whether a SIGTERM arrived, then lets the handler in place (Prefect's) act on it.

    Prefect turns a SIGTERM into an exception in the main thread; a C extension running at
    that moment (safetensors loading weights) may turn that into an error of its own, which
    would read as a failure of the job's work. A render outside the main thread (tests) has no
    signals to note."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def __enter__(self) -> _SigtermNoted:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._note)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _note(self, number: int, frame: Any) -> None:
        self.received = True
        if callable(self._previous):
            self._previous(number, frame)
        elif self._previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _begin(svc: Services, lease: JobLease, job_id: str) -> JobRecord | None:
    """Make the job running for this render (None: it was cancelled); what the job is."""
    with svc.sessions() as session:
        if job_status(session=session, job_id=job_id) is JobStatus.CANCELLED:
            return None
        row = begin_run(session=session, job_id=job_id, actor=lease.owner)
        return JobRecord(
            job_id=job_id,
            name=row.name,
            batch_name=row.batch.name,
            options=dict(row.params),
            image_sha256=row.image_sha256,
            audio_sha256=row.audio_sha256,
            weights_sha256=row.weights_sha256,
        )


def _stopped(svc: Services, lease: JobLease, job_id: str, stop: BaseException) -> None:
    """The render was told to stop (SIGTERM: a cancel from Prefect, a drain, an eviction, a
    spot reclaim; Ctrl-C), or lost its lease (it could not renew it while the database was
    unreachable). A cancel makes the job cancelled; anything else requeues it with its attempt
    given back, since its own work did not fail. Fenced by the epoch like every write (a render
    that was taken over writes nothing); the lease and its GPU slot are released on the way
    out. Nothing happens to a job that is not running (a stop before it started)."""
    cancel = isinstance(stop, TerminationSignal) and _cancel_requested()
    if isinstance(stop, LeaseHeld):
        what = f"losing its lease ({stop})"
    elif isinstance(stop, TerminationSignal):
        what = "SIGTERM"
    else:
        what = "an interrupt (Ctrl-C)"
    to = JobStatus.CANCELLED if cancel else JobStatus.QUEUED
    reason = (
        "cancelled in Prefect; verified segments are kept"
        if cancel
        else f"stopped by {what} before finishing; requeued (the attempt is given back)"
    )
    try:
        with svc.sessions() as session:
            stop_job(
                session=session,
                job_id=job_id,
                epoch=lease.epoch,
                to=to,
                actor=lease.owner,
                reason=reason,
            )
        log.warning("job %s: %s", job_id, reason)
    except EpochSuperseded:
        log.error("job %s: lease lost; leaving its state to the render that holds it", job_id)
    except Exception as failure:  # noqa: BLE001 (unreachable: the sweep finds the job later)
        log.error("job %s: cannot record the stop (%s); the sweep will find it", job_id, failure)


def _cancel_requested() -> bool:
    """Whether the SIGTERM is Prefect cancelling this run (the UI's Cancel, on the run or on
    its batch), rather than the machine going away: the runner says so directly (a process
    worker), otherwise the run's state does (CANCELLING, set before a worker kills the pod)."""
    from prefect._internal import control_listener
    from prefect.client.orchestration import get_client

    if control_listener.get_intent() == "cancel":
        return True
    if flow_run.id is None:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
    except Exception:  # noqa: BLE001 (Prefect unreachable: not a cancel we can see)
        return False
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


def _mark_failed(svc: Services, lease: JobLease, job_id: str, error: BaseException) -> None:
    """Record the failure, fenced by this render's epoch: a render that lost the job leaves
    its state to the render that holds it."""
    try:
        with svc.sessions() as session:
            fail_job(
                session=session,
                job_id=job_id,
                epoch=lease.epoch,
                actor=lease.owner,
                reason=(str(error) or type(error).__name__)[:2000],
            )
    except EpochSuperseded:
        log.error("job %s: lease lost; leaving its state to the render that holds it", job_id)
    except Exception as failure:  # noqa: BLE001 (unreachable: the sweep finds the job later)
        log.error("job %s: cannot record its failure (%s); it stays running", job_id, failure)


def _render_job(
    svc: Services, lease: JobLease, job: JobRecord, output: str | None, started: float
) -> dict[str, Any]:
    # One GPU slot for the whole job, taken before the model is loaded onto the device: the
    # render holds its device from first to last segment.
    slot = GpuSlot(
        svc,
        lease,
        wait_seconds=svc.settings.slot_wait_seconds,
        grace_seconds=svc.settings.heartbeat_seconds,
        on_wait=lambda: _check_cancelled(svc, job.job_id),
    )
    with slot:
        work = _render_segments(svc, lease, job)
    return _finish(svc, lease, work, job, output, started)


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


def _render_segments(svc: Services, lease: JobLease, job: JobRecord) -> RenderedSegments:
    """Load the model and inputs, then render (or resume) every segment in order."""
    job_id = job.job_id
    pipeline = in_place(
        lambda: load_model(svc, job.weights_sha256), lease=lease, what="loading the weights"
    )
    lease.mark_progress()  # work done while holding the slot counts as progress to waiters
    config = pipeline.config
    params = resolve_params(
        job.options,
        job_id=job_id,
        settings=svc.settings,
        model_steps=config.steps,
        model_guidance=config.guidance_scale,
    )
    inputs = load_inputs(svc, job, params, config.resolution)
    plan = plan_job(svc, lease, job_id, inputs.audio, params, config.clip_frames)
    progress_id = create_progress_artifact(
        progress=0.0,
        key=f"job-{job_id[:12]}-progress",
        description=f"{job.batch_name}/{job.name}: segments done",
    )
    checkpoints: list[SegmentCheckpoint] = []
    rendered = 0
    weights_sha256 = pipeline.bundle.sha256 if pipeline.bundle else None
    recorded = in_place(lambda: _recorded(svc, job_id), lease=lease, what="reading segments")
    for segment in plan.segments:
        lease.mark_progress()
        # Still the job's holder, still holding its GPU slot, and the job not cancelled.
        in_place(lease.verify, lease=lease, what="checking the lease")
        in_place(lambda: _check_cancelled(svc, job_id), lease=lease, what="reading the job")
        previous = checkpoints[-1] if checkpoints else None
        binding = segment_binding(job, plan, segment, params, config, weights_sha256, previous)
        key, sha = recorded.get(segment.index, (None, None))
        checkpoint = in_place(
            partial(
                read_segment_checkpoint,
                svc.store,
                job_id=job_id,
                index=segment.index,
                expect=binding,
                recorded_key=key,
            ),
            lease=lease,
            what=f"reading segment {segment.index}'s checkpoints",
        )
        if checkpoint is not None and checkpoint.manifest_sha256 != sha:
            # A render that died (or was displaced) after writing this attempt: adopt it.
            _record(svc, lease, checkpoint, f"render-track (adopted epoch {_epoch(checkpoint)})")
        if checkpoint is None:
            label = (
                f"segment {segment.index:03d} "
                f"[{segment.start_seconds:.1f}-{segment.end_seconds:.1f} s]"
            )
            checkpoint = render_segment_task.with_options(name=label)(
                svc, lease, job_id, pipeline, inputs, plan, segment, params, previous, binding
            )
            rendered += 1
        checkpoints.append(checkpoint)
        progress.segment_done(segment.index, len(plan.segments))
        update_progress_artifact(
            progress_id, progress=100.0 * len(checkpoints) / len(plan.segments)
        )
    return RenderedSegments(job_id, pipeline, params, inputs, plan, checkpoints, rendered)


def _epoch(checkpoint: SegmentCheckpoint) -> object:
    return checkpoint.manifest.get("epoch", "?")


def _finish(
    svc: Services,
    lease: JobLease,
    work: RenderedSegments,
    job: JobRecord,
    output: str | None,
    started: float,
) -> dict[str, Any]:
    """Assemble, QC and sidecar under this epoch; mark the job succeeded (fenced); then
    publish the user's output and the UI's artifacts."""
    job_id, pipeline, params, inputs, plan = (
        work.job_id,
        work.pipeline,
        work.params,
        work.inputs,
        work.plan,
    )
    checkpoints, rendered, config = work.checkpoints, work.rendered, work.pipeline.config
    key = f"job-{job_id[:12]}"
    final, final_key = assemble(svc, lease, job_id, checkpoints, inputs, params, plan)
    qc = quality(svc, final, inputs, plan)
    sidecar = {
        "job_id": job_id,
        "name": job.name,
        "batch": job.batch_name,
        "seed": params.seed,
        "params": params.to_dict(),
        "inputs": {"image_sha256": job.image_sha256, "audio_sha256": job.audio_sha256},
        "weights_sha256": pipeline.bundle.sha256 if pipeline.bundle else None,
        "model_config": config.name,
        "face_region": {"box_in_portrait": inputs.face_box, "source": inputs.face_source},
        "frames": plan.total_frames,
        "fps": svc.settings.fps,
        "plan_sha256": plan.sha256,
        "lease_epoch": lease.epoch,
        "segments": [
            {
                "index": c.index,
                "manifest_sha256": c.manifest_sha256,
                "epoch": c.manifest.get("epoch"),
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
    prefix = output_prefix(job_id, lease.epoch)
    reports = {
        f"{prefix}qc.json": json.dumps(qc, indent=2).encode(),
        f"{prefix}sidecar.json": json.dumps(sidecar, indent=2, sort_keys=True).encode(),
    }
    for report_key, data in reports.items():
        in_place(
            lambda k=report_key, d=data: svc.store.put_bytes(k, d), lease=lease, what="uploading"
        )
    output_uri = svc.store.uri(final_key)
    in_place(lease.verify, lease=lease, what="checking the lease")  # only the holder finishes

    def finish() -> None:
        with svc.sessions() as session:
            try:
                finish_job(
                    session=session,
                    job_id=job_id,
                    epoch=lease.epoch,
                    output_uri=output_uri,
                    qc=qc,
                    actor=lease.owner,
                    reason=f"{rendered} segment(s) rendered this run",
                )
            except JobStateError:
                # A retry after a commit whose answer was lost finds the job finished by us.
                row = get_job(session=session, job_id=job_id)
                if row.status is not JobStatus.SUCCEEDED or row.output_uri != output_uri:
                    raise

    try:
        in_place(finish, lease=lease, what="finishing the job")
    except EpochSuperseded as error:
        lease.fenced(error)
    target = _publish_output(final, Path(output), sidecar) if output else None
    create_table_artifact(
        key=f"{key}-qc",
        table=[{"measure": k, "value": str(v)} for k, v in qc.items() if k != "thresholds"],
        description=f"QC of {job.batch_name}/{job.name}",
    )
    create_link_artifact(
        key=f"{key}-video",
        link=svc.store.url_for(final_key, expires_seconds=svc.settings.link_seconds),
        link_text=f"{job.name}{final.suffix}",
        description=f"final video of {job.batch_name}/{job.name}",
    )
    shutil.rmtree(inputs.scratch, ignore_errors=True)
    return {
        "job_id": job_id,
        "status": JobStatus.SUCCEEDED.value,
        "flow_run_id": sidecar["prefect_flow_run"],
        "qc_uri": svc.store.uri(f"{prefix}qc.json"),
        "sidecar_uri": svc.store.uri(f"{prefix}sidecar.json"),
        "output_uri": output_uri,
        "output": str(target) if target else None,
        "qc": qc,
        "rendered": rendered,
        "segments": len(plan.segments),
    }


if __name__ == "__main__":
    import sys

    render_track(sys.argv[1])
