"""Dispatch records: which render run each job was last given, and the jobs a sweep looks at.

A job is dispatched by bumping its ``dispatch_generation`` (compare-and-set on the locked
row: of two sweeps or submits that saw the same generation, one dispatches and the other
learns the job is taken care of). The render run's idempotency key carries the generation, so
a retried dispatch of the same generation gets the same run back, and a run that died is never
handed back once the job has been dispatched again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.events import record_event
from db.jobs import get_job
from db.models import Batch, Job, JobStatus, Lease, utcnow

WAITING = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True)
class DispatchView:
    """What a sweep needs to know about one queued or running job."""

    job_id: str
    title: str  # batch/job
    status: JobStatus
    generation: int
    flow_run_id: str | None
    dispatched_at: datetime | None
    created_at: datetime
    lease_owner: str | None
    lease_live: bool  # a lease that has not expired: someone renders (or waits for a slot)
    batch_run_id: str | None = None  # the submit-batch run that submitted the batch
    rendered: bool = False  # its segments are rendered: its run finishes it (or hands it on)


def waiting_jobs(*, session: Session, now: datetime | None = None) -> list[DispatchView]:
    """Every queued or running job with its latest dispatch and its lease, oldest first."""
    now = now or utcnow()
    rows = session.execute(
        select(Job, Batch.name, Lease.owner, Lease.expires_at, Batch.submit_run_id)
        .join(Batch, Batch.id == Job.batch_id)
        .outerjoin(Lease, Lease.job_id == Job.id)
        .where(Job.status.in_(WAITING))
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
    ).all()
    return [
        DispatchView(
            job_id=job.id,
            title=f"{batch}/{job.name}",
            status=job.status,
            generation=job.dispatch_generation,
            flow_run_id=job.flow_run_id,
            dispatched_at=job.dispatched_at,
            created_at=job.created_at,
            lease_owner=owner,
            lease_live=expires is not None and expires > now,
            batch_run_id=batch_run,
            rendered=job.rendered_at is not None,
        )
        for job, batch, owner, expires, batch_run in rows
    ]


def retryable_failed(*, session: Session) -> list[str]:
    """Ids of failed jobs with attempts left, oldest first (nightly retries them)."""
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.status == JobStatus.FAILED, Job.attempt < Job.max_attempts)
            .order_by(Job.created_at, Job.id)
        )
    )


def begin_dispatch(
    *,
    session: Session,
    job_id: str,
    generation: int,
    actor: str,
    reason: str,
    rendered: bool = False,
) -> int | None:
    """Claim the next dispatch of a queued or running job: its generation goes from
    ``generation`` to the next, returned. None (nothing written) if the job moved on meanwhile
    (another sweep or submit dispatched it, or it is no longer waiting)."""
    job = get_job(session=session, job_id=job_id, lock=True)
    if job.dispatch_generation != generation or job.status not in WAITING:
        session.rollback()
        return None
    rendered_at = job.rendered_at
    mark_dispatched(session=session, job=job, actor=actor, reason=reason)
    if rendered:  # a finishing run: the job still needs no GPU
        job.rendered_at = rendered_at
    session.commit()
    return job.dispatch_generation


def hold_again(*, session: Session, job_id: str, generation: int, actor: str, reason: str) -> bool:
    """Put a waiting job whose run is gone back among the held jobs (undispatched), so
    admission gives it its next run in the fair order; False (nothing written) if the job
    moved on meanwhile (compare-and-set on its generation, as ``begin_dispatch``)."""
    job = get_job(session=session, job_id=job_id, lock=True)
    if job.dispatch_generation != generation or job.status not in WAITING:
        session.rollback()
        return False
    job.flow_run_id = job.dispatched_at = job.rendered_at = None
    record_event(
        session=session,
        actor=actor,
        kind="job.held",
        batch_id=job.batch_id,
        job_id=job.id,
        reason=reason,
        detail={"generation": job.dispatch_generation},
    )
    session.commit()
    return True


def mark_dispatched(
    *, session: Session, job: Job, actor: str, reason: str, now: datetime | None = None
) -> None:
    """The job's next dispatch, in the caller's transaction: its generation goes up, and it
    counts against the GPUs again until its render gives its slot back (``rendered_at``)."""
    job.dispatch_generation += 1
    job.flow_run_id, job.dispatched_at, job.rendered_at = None, now or utcnow(), None
    record_event(
        session=session,
        actor=actor,
        kind="job.dispatched",
        batch_id=job.batch_id,
        job_id=job.id,
        reason=reason,
        detail={"generation": job.dispatch_generation},
    )


def record_submit_run(*, session: Session, batch_id: str, flow_run_id: str) -> None:
    """Note the submit-batch deployment run that submitted the batch (the latest one counts)."""
    session.execute(update(Batch).where(Batch.id == batch_id).values(submit_run_id=flow_run_id))
    session.commit()


def record_run(*, session: Session, job_id: str, generation: int, flow_run_id: str) -> bool:
    """Note the render run a dispatch made; False if a later dispatch replaced it already."""
    return _set_run(session, flow_run_id, Job.id == job_id, Job.dispatch_generation == generation)


def record_finish_run(*, session: Session, job_id: str, epoch: int, flow_run_id: str) -> bool:
    """Note the finish-job run a render handed the job to (the sweep asks Prefect about it from
    now on); False (nothing written) if ``epoch`` is no longer the job's: the lease was lost."""
    return _set_run(session, flow_run_id, Job.id == job_id, Job.lease_epoch == epoch)


def _set_run(session: Session, flow_run_id: str, *conditions: Any) -> bool:
    """Make ``flow_run_id`` the run of the job that ``conditions`` select; whether one was."""
    result = session.execute(update(Job).where(*conditions).values(flow_run_id=flow_run_id))
    session.commit()
    return result.rowcount == 1
