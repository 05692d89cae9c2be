"""A job's segments in order: reuse a verified checkpoint, or render the segment and record it.

A segment's checkpoint counts only if its manifest matches everything the frames depend on
(``segment_binding``: inputs, plan, frame layout, weights, parameters and the previous
segment's manifest, so a chain is never spliced). The attempt the database records is taken
first; an attempt that fits but was never recorded (its render died after writing it) is
adopted. Otherwise the segment is rendered from the previous segment's motion state, written
as a new attempt under this render's epoch (manifest last) and recorded, fenced by the epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from db.segments import list_segments, record_segment_done
from emo import media, progress
from emo.errors import EpochSuperseded
from emo.job import JobParams
from emo.models.config import EMOConfig
from emo.pipeline import EMOPipeline, MotionState
from emo.plan import PlannedSegment, SegmentPlan
from emo.render import render_segment
from emo.store.checkpoint import (
    MANIFEST,
    SegmentCheckpoint,
    read_segment_checkpoint,
    write_segment_checkpoint,
)
from flows.context import JobLease
from flows.job_run import JobRecord, check_cancelled
from flows.render_inputs import JobInputs, ModelCard
from flows.retry import in_place


@dataclass(frozen=True)
class RenderedJob:
    """A job whose segments all have verified checkpoints: what assembly and QC work from."""

    job: JobRecord
    params: JobParams
    inputs: JobInputs
    plan: SegmentPlan
    checkpoints: list[SegmentCheckpoint]
    rendered: int  # segments rendered by this run (the rest were reused)
    weights_sha256: str | None
    model_config: str


@dataclass(frozen=True)
class JobSetup:
    """What every segment of a job renders with (``pipeline``: None where nothing renders,
    as in a finishing run, which only checks the segments)."""

    model: ModelCard
    params: JobParams
    inputs: JobInputs
    plan: SegmentPlan
    pipeline: EMOPipeline | None = None


@dataclass
class SegmentLedger:
    """The job's verified segments so far, what the database records, and the UI's progress."""

    lease: JobLease
    job: JobRecord
    setup: JobSetup
    recorded: dict[int, tuple[str, str]]  # index -> (manifest key, manifest sha256)
    progress_id: UUID
    checkpoints: list[SegmentCheckpoint] = field(default_factory=list)
    reused: int = 0
    # The last segment's end state when this run rendered it (None: reused, or none yet): the
    # next segment starts from it without fetching it back from the store.
    motion: MotionState | None = None

    @classmethod
    def open(cls, lease: JobLease, job: JobRecord, setup: JobSetup) -> SegmentLedger:
        progress_id = create_progress_artifact(
            progress=0.0,
            key=f"job-{job.job_id[:12]}-progress",
            description=f"{job.batch_name}/{job.name}: segments done",
        )
        recorded = in_place(lambda: _recorded(lease), lease=lease, what="reading segments")
        return cls(lease, job, setup, recorded, progress_id)

    @property
    def weights_sha256(self) -> str | None:
        return self.setup.model.weights_sha256

    @property
    def previous(self) -> SegmentCheckpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def rendered(self) -> int:
        """Segments this run rendered (the others were reused)."""
        return len(self.checkpoints) - self.reused

    def binding(self, segment: PlannedSegment) -> dict[str, Any]:
        """What the segment's checkpoint must match, chained to the previous segment."""
        setup = self.setup
        return segment_binding(
            self.job,
            setup.plan,
            segment,
            setup.params,
            setup.model.config,
            self.weights_sha256,
            self.previous,
        )

    def reusable(
        self, segment: PlannedSegment, binding: dict[str, Any]
    ) -> SegmentCheckpoint | None:
        """The segment's verified checkpoint, if one fits (adopted into the database if it
        was never recorded); None: render it. First, the render must still hold the job and
        its GPU slot, and the job must not be cancelled."""
        lease = self.lease
        lease.mark_progress()
        in_place(lease.verify, lease=lease, what="checking the lease")
        in_place(lambda: check_cancelled(lease), lease=lease, what="reading the job")
        key, sha = self.recorded.get(segment.index, (None, None))
        checkpoint = in_place(
            partial(
                read_segment_checkpoint,
                lease.svc.store,
                job_id=lease.job_id,
                index=segment.index,
                expect=binding,
                recorded_key=key,
            ),
            lease=lease,
            what=f"reading segment {segment.index}'s checkpoints",
        )
        if checkpoint is None:
            return None
        if checkpoint.manifest_sha256 != sha:  # written by a render that died: adopt it
            epoch = checkpoint.manifest.get("epoch", "?")
            record_segment(lease, checkpoint, f"render-track (adopted epoch {epoch})")
        self.reused += 1
        return checkpoint

    def done(self) -> RenderedJob:
        """Every segment verified: the job, ready to assemble."""
        setup = self.setup
        return RenderedJob(
            job=self.job,
            params=setup.params,
            inputs=setup.inputs,
            plan=setup.plan,
            checkpoints=list(self.checkpoints),
            rendered=self.rendered,
            weights_sha256=self.weights_sha256,
            model_config=setup.model.config.name,
        )

    def add(self, checkpoint: SegmentCheckpoint, motion: MotionState | None = None) -> None:
        """The next verified segment; ``motion``: its end state, if this run rendered it."""
        self.checkpoints.append(checkpoint)
        self.motion = motion
        done, total = len(self.checkpoints), len(self.setup.plan.segments)
        segment = self.setup.plan.segments[checkpoint.index]
        clips = range(segment.clip_start, segment.clip_start + segment.clip_count)
        progress.segment_done(checkpoint.index, total, clips, self.setup.plan.total_clips)
        update_progress_artifact(self.progress_id, progress=100.0 * done / total)


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


@dataclass(frozen=True)
class RenderedSegment:
    """A segment this run rendered: its recorded checkpoint, and its end state in memory."""

    checkpoint: SegmentCheckpoint
    motion: MotionState


@task(name="render segment", cache_policy=NO_CACHE, task_run_name=_segment_run_name)
def render_segment_task(
    lease: JobLease,
    setup: JobSetup,
    segment: PlannedSegment,
    previous: SegmentCheckpoint | None,
    binding: dict[str, Any],
    motion: MotionState | None = None,
) -> RenderedSegment:
    """Render one segment from the previous one's motion state (``motion``, as this run
    rendered it; else fetched from the previous checkpoint, as a resume does), write it as a
    new attempt under this render's epoch (manifest last), and record it (fenced by the
    epoch)."""
    svc, inputs = lease.svc, setup.inputs
    started = time.perf_counter()
    if previous is not None and motion is None:
        path = in_place(
            lambda: svc.store.get_file(
                previous.key("motion.safetensors"),
                inputs.scratch / f"motion-in-{segment.index:05d}.safetensors",
            ),
            lease=lease,
            what="fetching the previous segment's motion state",
        )
        motion = MotionState.load(path)
    model_started = time.perf_counter()
    frames, state = _render(lease, setup, segment, motion)
    model_seconds = time.perf_counter() - model_started
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
            job_id=lease.job_id,
            index=segment.index,
            epoch=lease.epoch,
            files={"video.mp4": video, "motion.safetensors": motion_path},
            meta={
                **binding,
                "seed": setup.params.seed,
                "render_seconds": seconds,
                "model_seconds": model_seconds,
            },
        ),
        lease=lease,
        what=f"writing segment {segment.index}'s checkpoint",
    )
    record_segment(lease, checkpoint, "render-track")
    video.unlink(missing_ok=True)
    return RenderedSegment(checkpoint, state)


def _render(
    lease: JobLease, setup: JobSetup, segment: PlannedSegment, motion: MotionState | None
) -> tuple[Any, MotionState]:
    """The model's frames for one segment; between denoising steps, stop once the job is no
    longer this render's, and mark progress for renders waiting for a GPU slot."""
    report = progress.reporter(setup.plan.total_clips)

    def on_step(clip: int, step: int, steps: int) -> None:
        lease.check()
        lease.mark_progress()
        if report is not None:
            report(clip, step, steps)

    inputs = setup.inputs
    if setup.pipeline is None:
        raise RuntimeError("a setup without a model cannot render")  # a finishing run's
    return render_segment(
        setup.pipeline,
        portrait=inputs.portrait,
        face_box=inputs.face_box,
        audio=inputs.audio,
        speeds=inputs.speeds,
        plan=setup.plan,
        segment=segment,
        params=setup.params,
        motion_state=motion,
        callback=on_step,
    )


def record_segment(lease: JobLease, checkpoint: SegmentCheckpoint, actor: str) -> None:
    """Record the segment's checkpoint, fenced by this render's epoch (``EpochSuperseded``
    raised as the lease loss it is)."""
    svc = lease.svc

    def record() -> None:
        with svc.sessions() as session:
            record_segment_done(
                session=session,
                job_id=checkpoint.job_id,
                index=checkpoint.index,
                checkpoint_uri=svc.store.uri(checkpoint.prefix + MANIFEST),
                manifest_sha256=checkpoint.manifest_sha256,
                render_seconds=float(checkpoint.manifest.get("render_seconds", 0.0)),
                model_seconds=checkpoint.manifest.get("model_seconds"),
                actor=actor,
                epoch=lease.epoch,
            )

    try:
        in_place(record, lease=lease, what=f"recording segment {checkpoint.index}")
    except EpochSuperseded as error:
        lease.fenced(error)


def _recorded(lease: JobLease) -> dict[int, tuple[str, str]]:
    """Segment index -> (manifest key, manifest sha256) as the database records them."""
    with lease.svc.sessions() as session:
        return {
            s.index: (lease.svc.store.key_of(s.checkpoint_uri), s.manifest_sha256)
            for s in list_segments(session=session, job_id=lease.job_id)
            if s.checkpoint_uri and s.manifest_sha256
        }
