"""Job leases: at most one live owner renders a job; an expired lease may be taken over.

A lease is a row (owner, expiry, heartbeat). The owner renews it while it works (heartbeat)
and releases it when done. Acquisition locks the row (``FOR UPDATE`` on PostgreSQL; SQLite
transactions are single-writer), so two runs never both believe they hold one job.

Every acquisition increments the job's ``lease_epoch`` (a fencing token; ``Lease.epoch`` reads
it). A render may still be running after its lease passed to another (a network partition,
a paused process); ``require_epoch`` is how its writes are refused: segment records and the
job's result are committed only in a transaction that finds the writer's epoch current.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.events import record_event
from db.models import Job, Lease, utcnow
from emo.errors import EpochSuperseded, JobStateError, NotFound


def _lock_lease(session: Session, job_id: str) -> Lease | None:
    query = select(Lease).where(Lease.job_id == job_id).with_for_update()
    return session.scalar(query)


def take_lease(
    *,
    session: Session,
    job_id: str,
    owner: str,
    ttl_seconds: float,
    now: datetime | None = None,
    stale_owner: str | None = None,
) -> Lease | None:
    """Acquire the job's lease inside the caller's transaction (no commit); None if held.

    ``stale_owner`` names a holder known to be dead (a process on this host that no longer
    exists); its lease is taken over before it expires.
    """
    now = now or utcnow()
    expires = now + timedelta(seconds=ttl_seconds)
    job = _lock_job(session, job_id)  # lock order everywhere: the job row, then its lease
    lease = _lock_lease(session, job_id)
    if lease is None:
        lease = Lease(
            job_id=job_id,
            owner=owner,
            acquired_at=now,
            heartbeat_at=now,
            expires_at=expires,
        )
        try:
            with session.begin_nested():
                session.add(lease)
        except IntegrityError:  # another owner inserted it between our select and insert
            return None
        job.lease_epoch += 1
        record_event(
            session=session,
            actor=owner,
            kind="lease.acquired",
            job_id=job_id,
            detail={"epoch": job.lease_epoch},
        )
        return lease
    if lease.owner != owner and lease.expires_at > now and lease.owner != stale_owner:
        return None
    if lease.owner != owner:
        record_event(
            session=session,
            actor=owner,
            kind="lease.taken_over",
            job_id=job_id,
            reason=f"lease of {lease.owner!r} expired at {lease.expires_at.isoformat()}"
            if lease.owner != stale_owner
            else f"holder {lease.owner!r} is no longer running",
        )
        lease.acquired_at = now
        # The old holder's GPU slot dies with its lease; the new owner takes one of its own.
        lease.gpu_since = lease.progress_at = lease.gpu_wanted_at = None
    else:
        record_event(session=session, actor=owner, kind="lease.reacquired", job_id=job_id)
    lease.owner, lease.heartbeat_at, lease.expires_at = owner, now, expires
    job.lease_epoch += 1
    return lease


def _lock_job(session: Session, job_id: str) -> Job:
    job = session.scalar(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if job is None:
        raise NotFound(f"no job with id {job_id!r}")
    return job


def require_epoch(*, session: Session, job_id: str, epoch: int) -> Job:
    """Lock the job row and return it if ``epoch`` is still its lease epoch; else raise
    ``EpochSuperseded`` (after rolling back). Call it first in a transaction whose writes only
    the current holder may make: the row lock keeps a take-over from committing in between."""
    job = _lock_job(session, job_id)
    if job.lease_epoch != epoch:
        current = job.lease_epoch
        session.rollback()
        raise EpochSuperseded(
            f"job {job_id}: this render holds lease epoch {epoch}, but the job is at epoch "
            f"{current} (another render took it over); its writes are refused"
        )
    return job


def acquire_lease(
    *,
    session: Session,
    job_id: str,
    owner: str,
    ttl_seconds: float,
    now: datetime | None = None,
    stale_owner: str | None = None,
) -> Lease | None:
    """Acquire the job's lease for ``owner``; None if another owner holds a live lease."""
    lease = take_lease(
        session=session,
        job_id=job_id,
        owner=owner,
        ttl_seconds=ttl_seconds,
        now=now,
        stale_owner=stale_owner,
    )
    if lease is None:
        session.rollback()
        return None
    session.commit()
    return lease


def current_lease(*, session: Session, job_id: str) -> Lease | None:
    """The job's lease row, if any (live or expired)."""
    return session.get(Lease, job_id, populate_existing=True)


def renew_lease(
    *,
    session: Session,
    job_id: str,
    owner: str,
    ttl_seconds: float,
    now: datetime | None = None,
    progress_at: datetime | None = None,
) -> Lease:
    """Heartbeat: extend the lease; raises ``JobStateError`` if ``owner`` no longer holds it,
    or if its lease has expired: from its expiry a sweep or another render may have taken the
    job, so a late heartbeat never brings an expired lease back to life.

    ``progress_at`` is when the owner's model last progressed (kept if None).
    """
    now = now or utcnow()
    lease = _lock_lease(session, job_id)
    if lease is None or lease.owner != owner:
        holder = "nobody" if lease is None else repr(lease.owner)
        session.rollback()
        raise JobStateError(f"lease of job {job_id} is lost: held by {holder}, not {owner!r}")
    if lease.expires_at <= now:
        expired = lease.expires_at
        session.rollback()
        raise JobStateError(
            f"lease of job {job_id} expired at {expired:%H:%M:%S} UTC before this heartbeat; "
            "stopped so that another render can resume the job"
        )
    lease.heartbeat_at = now
    lease.expires_at = now + timedelta(seconds=ttl_seconds)
    if progress_at is not None:
        lease.progress_at = progress_at
    record_event(
        session=session,
        actor=owner,
        kind="lease.renewed",
        job_id=job_id,
        detail={"expires_at": lease.expires_at.isoformat()},
    )
    session.commit()
    return lease


def release_lease(*, session: Session, job_id: str, owner: str) -> bool:
    """Give the lease up; False if ``owner`` did not hold it (nothing changes then)."""
    result = session.execute(delete(Lease).where(Lease.job_id == job_id, Lease.owner == owner))
    if result.rowcount == 0:
        session.rollback()
        return False
    record_event(session=session, actor=owner, kind="lease.released", job_id=job_id)
    session.commit()
    return True
