"""Jobs: the state machine, requeue with an attempt limit, and claiming the next job.

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled            (a studio withdraws a job before it starts)
    failed -> queued               (requeue; bounded by max_attempts)
    failed -> cancelled            (a studio gives up on a failed job: nightly leaves it)
    running -> queued              (released: the render was stopped, by a SIGTERM or Ctrl-C,
                                    not failed; its attempt is given back)

Every transition locks the job row, checks the edge, and writes an event in the same
transaction. ``attempt`` counts the runs a job has started and not given back: only a failure
of the job's own work (or a crash, which cannot be told from one) uses an attempt up.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.events import record_event
from db.leases import require_epoch, take_lease
from db.models import Job, JobStatus, Lease, utcnow
from emo.errors import JobStateError, NotFound

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def get_job(*, session: Session, job_id: str, lock: bool = False) -> Job:
    """The job with this id; raises ``NotFound``."""
    query = select(Job).where(Job.id == job_id)
    job = session.scalar(query.with_for_update() if lock else query)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}")
    return job


def all_jobs(*, session: Session) -> list[Job]:
    """Every job, oldest first."""
    return list(session.scalars(select(Job).order_by(Job.created_at, Job.id)))


def jobs_named(*, session: Session, reference: str, limit: int = 2) -> list[Job]:
    """Jobs a user's ``reference`` may mean: those whose id starts with it, else those with
    that name; at most ``limit`` (two are enough to tell the reference is ambiguous)."""
    by_id = list(session.scalars(select(Job).where(Job.id.startswith(reference)).limit(limit)))
    return by_id or list(session.scalars(select(Job).where(Job.name == reference).limit(limit)))


def job_status(*, session: Session, job_id: str) -> JobStatus:
    """The job's status as the database has it now (no lock)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise NotFound(f"no job with id {job_id!r}")
    return status


def job_statuses(*, session: Session, job_ids: list[str]) -> dict[str, JobStatus]:
    """Each job's status as the database has it now (no lock); unknown ids are left out."""
    if not job_ids:
        return {}
    return dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())


def _apply(job: Job, to: JobStatus, *, session: Session, actor: str, reason: str | None) -> None:
    """Check and apply one edge of the state machine, with its event (no commit)."""
    if to not in ALLOWED[job.status]:
        allowed = ", ".join(sorted(ALLOWED[job.status])) or "none (final state)"
        raise JobStateError(
            f"job {job.name!r} ({job.id}) cannot go from {job.status.value} to {to.value}; "
            f"allowed from {job.status.value}: {allowed}"
        )
    now = utcnow()
    previous = job.status
    job.status = to
    job.updated_at = now
    if previous is JobStatus.RUNNING and to is JobStatus.QUEUED:
        job.attempt = max(job.attempt - 1, 0)  # released, not failed: the attempt is given back
    elif to is JobStatus.RUNNING:
        job.attempt += 1
        job.started_at = now
        job.finished_at = None
        job.error = None
    elif to in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        job.finished_at = now
        if to is JobStatus.FAILED:
            job.error = reason
    record_event(
        session=session,
        actor=actor,
        kind="job.status",
        batch_id=job.batch_id,
        job_id=job.id,
        from_status=previous.value,
        to_status=to.value,
        reason=reason,
        detail={"attempt": job.attempt},
    )


def transition_job(
    *, session: Session, job_id: str, to: JobStatus, actor: str, reason: str | None = None
) -> Job:
    """Move a job along one allowed edge; raises ``JobStateError`` for any other."""
    job = get_job(session=session, job_id=job_id, lock=True)
    try:
        _apply(job, to, session=session, actor=actor, reason=reason)
    except JobStateError:
        session.rollback()
        raise
    session.commit()
    return job


def requeue_job(*, session: Session, job_id: str, actor: str, reason: str) -> Job:
    """failed -> queued, refused once the job has used ``max_attempts`` attempts, and for a
    job in any other state (a running one is stopped only by its render, ``stop_job``)."""
    job = get_job(session=session, job_id=job_id, lock=True)
    if job.status is not JobStatus.FAILED:
        session.rollback()
        raise JobStateError(
            f"job {job.name!r} ({job.id}) is {job.status.value}; only a failed job is requeued"
        )
    if job.attempt >= job.max_attempts:
        session.rollback()
        raise JobStateError(
            f"job {job.name!r} ({job.id}) has used {job.attempt} of {job.max_attempts} "
            "attempts; raise its max_attempts to requeue it"
        )
    try:
        _apply(job, JobStatus.QUEUED, session=session, actor=actor, reason=reason)
    except JobStateError:
        session.rollback()
        raise
    session.commit()
    return job


def fail_crashed_job(
    *, session: Session, job_id: str, actor: str, now: datetime | None = None
) -> bool:
    """running -> failed for a job nobody renders any more: no lease, or an expired one (its
    pod, node or process died). The crash then counts as an attempt, so ``requeue_job``
    retries it only while attempts are left. Its lease is revoked (deleted, and the job's epoch
    moved on), so a holder that was only paused stops at its next heartbeat or write. False
    (nothing changed) for any other job."""
    job = get_job(session=session, job_id=job_id, lock=True)
    lease = session.get(Lease, job_id, populate_existing=True)
    now = now or utcnow()
    if job.status is not JobStatus.RUNNING or (lease is not None and lease.expires_at > now):
        session.rollback()
        return False
    holder = (
        f"holder {lease.owner}, lease expired {lease.expires_at:%Y-%m-%d %H:%M:%S} UTC"
        if lease is not None
        else "no lease"
    )
    reason = f"crashed: the render stopped without finishing ({holder})"
    _apply(job, JobStatus.FAILED, session=session, actor=actor, reason=reason)
    # Revoke the lease: a holder that is only paused (not dead) can neither renew it nor,
    # its epoch superseded, record anything when it wakes up.
    if lease is not None:
        session.delete(lease)
    job.lease_epoch += 1
    session.commit()
    return True


def begin_run(*, session: Session, job_id: str, actor: str, reason: str | None = None) -> Job:
    """Make a job running for a render that holds its lease.

    queued -> running; failed -> queued -> running (a resume, counting an attempt); a job
    already running (its previous run crashed, the lease passed to ``actor``) stays running
    with a ``job.resumed`` event. Finished and cancelled jobs are refused.
    """
    job = get_job(session=session, job_id=job_id, lock=True)
    try:
        if job.status is JobStatus.FAILED:
            if job.attempt >= job.max_attempts:
                raise JobStateError(
                    f"job {job.name!r} ({job.id}) has used {job.attempt} of "
                    f"{job.max_attempts} attempts; raise its max_attempts to resume it"
                )
            _apply(job, JobStatus.QUEUED, session=session, actor=actor, reason="resume")
        if job.status is JobStatus.QUEUED:
            _apply(job, JobStatus.RUNNING, session=session, actor=actor, reason="render")
        elif job.status is JobStatus.RUNNING:
            record_event(
                session=session,
                actor=actor,
                kind="job.resumed",
                batch_id=job.batch_id,
                job_id=job.id,
                reason=reason or "previous run ended without finishing",
            )
        else:
            raise JobStateError(
                f"job {job.name!r} ({job.id}) is {job.status.value}; nothing to render"
            )
    except JobStateError:
        session.rollback()
        raise
    session.commit()
    return job


def finish_job(
    *, session: Session, job_id: str, epoch: int, output_uri: str, qc: dict, actor: str, reason: str
) -> Job:
    """running -> succeeded with the job's output and QC, in one transaction that commits only
    while ``epoch`` is the job's lease epoch (``EpochSuperseded`` otherwise, nothing written).
    Outputs are published after this commit, so only the current holder ever publishes."""
    job = require_epoch(session=session, job_id=job_id, epoch=epoch)
    job.output_uri, job.qc = output_uri, qc
    record_event(
        session=session,
        actor=actor,
        kind="job.output",
        batch_id=job.batch_id,
        job_id=job.id,
        detail={"output_uri": output_uri, "qc_warnings": qc.get("warnings", []), "epoch": epoch},
    )
    try:
        _apply(job, JobStatus.SUCCEEDED, session=session, actor=actor, reason=reason)
    except JobStateError:
        session.rollback()
        raise
    session.commit()
    return job


def fail_job(*, session: Session, job_id: str, epoch: int, actor: str, reason: str) -> bool:
    """running -> failed for the render holding ``epoch``; False (nothing written) if the job
    is not running. Raises ``EpochSuperseded`` if another render took the job over: a displaced
    render never fails the job its successor is rendering."""
    job = require_epoch(session=session, job_id=job_id, epoch=epoch)
    if job.status is not JobStatus.RUNNING:
        session.rollback()
        return False
    _apply(job, JobStatus.FAILED, session=session, actor=actor, reason=reason)
    session.commit()
    return True


def stop_job(
    *, session: Session, job_id: str, epoch: int, to: JobStatus, actor: str, reason: str
) -> bool:
    """running -> cancelled (a cancel reached the render) or running -> queued (the render was
    told to stop: a drain, an eviction, Ctrl-C; the attempt is given back), for the render
    holding ``epoch``. False (nothing written) if the job is not running; ``EpochSuperseded``
    if another render took it over."""
    if to not in (JobStatus.CANCELLED, JobStatus.QUEUED):
        raise ValueError(f"stop_job moves a job to cancelled or queued, not {to.value}")
    job = require_epoch(session=session, job_id=job_id, epoch=epoch)
    if job.status is not JobStatus.RUNNING:
        session.rollback()
        return False
    _apply(job, to, session=session, actor=actor, reason=reason)
    session.commit()
    return True


def repin_weights(*, session: Session, job_id: str, weights_sha256: str, actor: str) -> Job:
    """Pin a failed or queued job to another weights bundle and start it over: its plan and
    segment records go (the new bundle may cut clips differently), its attempts restart, and
    it is queued. Earlier checkpoints stay in the store, unreferenced, until ``emo gc``."""
    job = get_job(session=session, job_id=job_id, lock=True)
    if job.status not in (JobStatus.FAILED, JobStatus.QUEUED):
        session.rollback()
        raise JobStateError(
            f"job {job.name!r} ({job.id}) is {job.status.value}; only a failed or queued job "
            "can be rendered again with new weights"
        )
    lease = session.get(Lease, job_id, populate_existing=True)
    if lease is not None and lease.expires_at > utcnow():
        session.rollback()
        raise JobStateError(f"job {job.name!r} ({job.id}) is being rendered by {lease.owner}")
    previous = job.weights_sha256
    if lease is not None:  # expired: its holder, should it wake up, can renew nothing
        session.delete(lease)
    for segment in list(job.segments):
        session.delete(segment)
    job.weights_sha256, job.plan, job.plan_sha256 = weights_sha256, None, None
    job.attempt, job.output_uri, job.qc = 0, None, None
    job.lease_epoch += 1  # fences any render of the old pin still running somewhere
    if job.status is JobStatus.FAILED:
        _apply(job, JobStatus.QUEUED, session=session, actor=actor, reason="new weights")
    record_event(
        session=session,
        actor=actor,
        kind="job.weights_repinned",
        batch_id=job.batch_id,
        job_id=job.id,
        reason=f"weights {str(previous)[:12]} -> {weights_sha256[:12]}; rendered from scratch",
        detail={"from": previous, "to": weights_sha256},
    )
    session.commit()
    return job


def claim_next_job(*, session: Session, worker: str, lease_seconds: float) -> Job | None:
    """Claim the next queued job (highest priority, then oldest) for ``worker``.

    The job becomes running and ``worker`` takes its lease, in one transaction. On PostgreSQL
    the candidate row is selected ``FOR UPDATE SKIP LOCKED`` so concurrent workers claim
    different jobs without waiting; on SQLite the transaction is ``BEGIN IMMEDIATE`` (one
    writer at a time). Returns None when nothing is queued.
    """
    now = utcnow()
    live_lease = select(Lease.job_id).where(Lease.job_id == Job.id, Lease.expires_at > now)
    query = (
        select(Job)
        .where(Job.status == JobStatus.QUEUED, ~live_lease.exists())
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    job = session.scalar(query)
    if job is None:
        session.rollback()
        return None
    _apply(job, JobStatus.RUNNING, session=session, actor=worker, reason="claimed")
    lease = take_lease(
        session=session, job_id=job.id, owner=worker, ttl_seconds=lease_seconds, now=now
    )
    if lease is None:  # a run leased it between our select and now; let the caller retry
        session.rollback()
        return None
    session.commit()
    return job
