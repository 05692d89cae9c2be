"""Segments: a job's plan is stored once; each segment is recorded done after its checkpoint."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.events import record_event
from db.jobs import get_job
from db.leases import require_epoch
from db.models import Segment, SegmentStatus, utcnow
from emo.errors import JobStateError, NotFound
from emo.plan import SegmentPlan


def store_plan(
    *, session: Session, job_id: str, plan: SegmentPlan, actor: str, epoch: int | None = None
) -> list[Segment]:
    """Store the job's segment plan; the same plan again is a no-op, a different one is refused.

    The plan never changes for a job, because checkpoints and motion state are only valid
    for the segment boundaries they were rendered with. With ``epoch``, only the render holding
    that lease epoch may store it (``EpochSuperseded`` otherwise).
    """
    if epoch is None:
        job = get_job(session=session, job_id=job_id, lock=True)
    else:
        job = require_epoch(session=session, job_id=job_id, epoch=epoch)
    if job.plan_sha256 is not None:
        session.rollback()
        if job.plan_sha256 != plan.sha256:
            raise JobStateError(
                f"job {job.name!r} ({job.id}) already has a different segment plan "
                f"({job.plan_sha256[:12]}); a job's plan never changes: submit a new job instead"
            )
        return list_segments(session=session, job_id=job_id)
    job.plan = plan.to_dict()
    job.plan_sha256 = plan.sha256
    job.updated_at = utcnow()
    session.add_all(
        Segment(
            job_id=job.id,
            index=s.index,
            frame_start=s.frame_start,
            frame_end=s.frame_end,
            sample_start=s.sample_start,
            sample_end=s.sample_end,
            clip_count=s.clip_count,
        )
        for s in plan.segments
    )
    record_event(
        session=session,
        actor=actor,
        kind="job.planned",
        batch_id=job.batch_id,
        job_id=job.id,
        detail={
            "plan_sha256": plan.sha256,
            "segments": len(plan.segments),
            "frames": plan.total_frames,
        },
    )
    session.commit()
    return list_segments(session=session, job_id=job_id)


def list_segments(*, session: Session, job_id: str) -> list[Segment]:
    """The job's segments in order."""
    query = select(Segment).where(Segment.job_id == job_id).order_by(Segment.index)
    return list(session.scalars(query))


def record_segment_done(
    *,
    session: Session,
    job_id: str,
    index: int,
    checkpoint_uri: str,
    manifest_sha256: str,
    render_seconds: float,
    actor: str,
    epoch: int,
    model_seconds: float | None = None,
) -> Segment:
    """Mark a segment done with its checkpoint, if ``epoch`` is still the job's lease epoch.

    This row, not the store's listing, decides which checkpoint attempt of the segment counts.
    Raises ``EpochSuperseded`` (nothing written) for a render whose lease was taken over.
    """
    require_epoch(session=session, job_id=job_id, epoch=epoch)
    query = (
        select(Segment).where(Segment.job_id == job_id, Segment.index == index).with_for_update()
    )
    segment = session.scalar(query)
    if segment is None:
        session.rollback()
        raise NotFound(f"job {job_id} has no planned segment {index}")
    previous = segment.status
    segment.status = SegmentStatus.DONE
    segment.checkpoint_uri = checkpoint_uri
    segment.manifest_sha256 = manifest_sha256
    segment.render_seconds = render_seconds
    segment.epoch = epoch
    segment.completed_at = utcnow()
    record_event(
        session=session,
        actor=actor,
        kind="segment.done",
        job_id=job_id,
        segment_index=index,
        from_status=previous.value,
        to_status=SegmentStatus.DONE.value,
        detail={
            "checkpoint_uri": checkpoint_uri,
            "manifest_sha256": manifest_sha256,
            "render_seconds": render_seconds,
            "model_seconds": model_seconds,  # inside the model (None: not measured)
            "epoch": epoch,
        },
    )
    session.commit()
    return segment
