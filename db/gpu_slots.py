"""GPU slots: how many renders hold a GPU at once, counted in the job database.

A render holds a slot as a mark on its own job lease (``Lease.gpu_since``). Taking a slot
locks the limit row (``gpu_limits``; ``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), counts the live holders and marks the lease only if one is free, so the limit holds
for every process that shares the database.

A slot needs nothing from the process that holds it to be given back: it lapses with its
lease's expiry, is cleared when the lease is taken over, and is reclaimed at once when its
holder is known to be dead (``is_dead``: a process on this host that no longer exists).
Nothing lives in a Prefect server, so a Prefect server that restarts, or an ephemeral one that
dies with a killed render, can neither leak a slot nor take one from a live render.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.events import record_event
from db.fair_share import Claim, Share, fair_picks
from db.models import Batch, GpuLimit, Job, Lease, utcnow
from emo.errors import JobStateError

POOL = "gpu"  # one limit for now; the column leaves room for more pools


@dataclass(frozen=True)
class SlotHolder:
    """A render that holds a GPU slot."""

    job_id: str
    title: str  # batch/job, as the studio named them
    owner: str
    since: datetime
    progress_at: datetime | None

    def describe(self) -> str:
        return f"{self.title} ({self.job_id[:8]})"


@dataclass(frozen=True)
class SlotCount:
    """The outcome of asking for a slot: whether it was granted, the limit and the holders."""

    acquired: bool
    slots: int
    holders: tuple[SlotHolder, ...]  # live holders (this render among them once acquired)
    host_full: bool = False  # refused because this host's renders hold its GPUs already


def _lock_limit(session: Session, *, default_slots: int, actor: str) -> tuple[GpuLimit, bool]:
    """The limit row, locked, and whether this call created it (with ``default_slots``)."""
    query = select(GpuLimit).where(GpuLimit.name == POOL).with_for_update()
    for _ in range(3):
        row = session.scalar(query)
        if row is not None:
            return row, False
        try:
            with session.begin_nested():
                session.add(GpuLimit(name=POOL, slots=default_slots, updated_by=actor))
        except IntegrityError:  # another process inserted it first: read (and lock) theirs
            continue
        record_event(
            session=session,
            actor=actor,
            kind="gpu.limit",
            reason=f"created: {default_slots} slot(s)",
        )
        return session.scalar(query), True
    raise JobStateError("the GPU limit row could not be created or read; try again")


def _holder_rows(session: Session, *, lock: bool = False) -> list[tuple[Lease, str, str]]:
    """Leases holding a slot, oldest first; ``lock`` locks them (in job id order, so two
    lockers never deadlock), so a holder's heartbeat cannot renew one while it is judged."""
    query = (
        select(Lease, Job.name, Batch.name)
        .join(Job, Job.id == Lease.job_id)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Lease.gpu_since.is_not(None))
        .order_by(Lease.job_id)
    )
    if lock:
        query = query.with_for_update(of=Lease)
    rows = [(lease, job, batch) for lease, job, batch in session.execute(query)]
    return sorted(rows, key=lambda row: row[0].gpu_since)


def _as_holder(lease: Lease, job: str, batch: str) -> SlotHolder:
    return SlotHolder(
        job_id=lease.job_id,
        title=f"{batch}/{job}",
        owner=lease.owner,
        since=lease.gpu_since,
        progress_at=lease.progress_at,
    )


def _gone(
    lease: Lease, now: datetime, is_dead: Callable[[str], bool], grace: timedelta
) -> str | None:
    """Why this holder's slot is free for others (None: it is held).

    An expired lease counts as gone only ``grace`` after its expiry: a holder that cannot
    renew stops itself at its expiry (``flows.context.JobLease``), so it is gone before its
    slot is given to another render.
    """
    if lease.expires_at + grace <= now:
        return f"lease of {lease.owner!r} expired at {lease.expires_at.isoformat()}"
    if is_dead(lease.owner):
        return f"holder {lease.owner!r} is no longer running"
    return None


def _reclaim(
    session: Session,
    *,
    now: datetime,
    is_dead: Callable[[str], bool],
    grace: timedelta,
    actor: str,
) -> list[SlotHolder]:
    """Clear the slots of expired or dead holders (in the caller's transaction); the rest.

    The holders' leases are locked while judged, so none is renewed between being read as
    expired and losing its slot.
    """
    live = []
    for lease, job, batch in _holder_rows(session, lock=True):
        reason = _gone(lease, now, is_dead, grace)
        if reason is None:
            live.append(_as_holder(lease, job, batch))
            continue
        lease.gpu_since = None
        record_event(
            session=session, actor=actor, kind="gpu.reclaimed", job_id=lease.job_id, reason=reason
        )
    return live


def take_gpu_slot(
    *,
    session: Session,
    job_id: str,
    owner: str,
    default_slots: int,
    is_dead: Callable[[str], bool],
    grace_seconds: float = 0.0,
    now: datetime | None = None,
    host_slots: int | None = None,
) -> SlotCount:
    """Give ``owner`` (the holder of the job's lease) a GPU slot if one is free; commits.

    ``host_slots``: the GPUs of the owner's host (``EMO_HOST_GPU_SLOTS``): never more holders
    on that host (the host is the owner's first field, as ``flows.context.lease_owner`` makes
    it); a render waiting for its own host's GPU does not count as a waiter meanwhile.

    Slots of dead holders, and of holders whose lease expired ``grace_seconds`` ago, are
    reclaimed first. Raises ``JobStateError`` if ``owner`` no longer holds the job's lease.
    Asking again while holding a slot keeps it.

    Locks, always in this order: the limit row (serialises every taker), this job's lease,
    the holders' leases by job id. Heartbeats and take-overs lock one lease row each.
    """
    now = now or utcnow()
    limit, _ = _lock_limit(session, default_slots=default_slots, actor=owner)
    own = session.scalar(select(Lease).where(Lease.job_id == job_id).with_for_update())
    if own is None or own.owner != owner:
        session.rollback()
        raise JobStateError(f"lease of job {job_id} is lost; cannot take a GPU slot for it")
    grace = timedelta(seconds=grace_seconds)
    live = _reclaim(session, now=now, is_dead=is_dead, grace=grace, actor=owner)
    others = [h for h in live if h.job_id != job_id]
    host = owner.partition(":")[0]
    on_host = sum(1 for h in others if h.owner.partition(":")[0] == host)
    host_full = host_slots is not None and on_host >= host_slots
    if own.gpu_since is None:
        # A waiter whose host's GPUs are all held stays out of the claims (it could not take
        # a slot freed elsewhere), unless a render of its own host holds a slot that fair
        # sharing owes it: then it stays a waiter, so that render gives way to it.
        visible = not host_full or _owed_on_host(session, job_id, others, host)
        own.gpu_wanted_at = (own.gpu_wanted_at or now) if visible else None
    free = 0 if host_full else limit.slots - len(others)
    if (
        own.gpu_since is None
        and free > 0
        and _my_turn(session, own, others, free, now, is_dead, grace)
    ):
        own.gpu_since = own.progress_at = now
        own.gpu_wanted_at = None
        record_event(
            session=session,
            actor=owner,
            kind="gpu.acquired",
            job_id=job_id,
            detail={"in_use": len(others) + 1, "slots": limit.slots},
        )
    acquired = own.gpu_since is not None
    session.commit()
    if acquired:
        job = session.get(Job, job_id)
        mine = SlotHolder(job_id, f"{job.batch.name}/{job.name}", owner, own.gpu_since, now)
        return SlotCount(acquired=True, slots=limit.slots, holders=(*others, mine))
    return SlotCount(acquired=False, slots=limit.slots, holders=tuple(others), host_full=host_full)


def _waiting_claims(
    session: Session, own_id: str, now: datetime, is_dead: Callable[[str], bool], grace: timedelta
) -> list[Claim]:
    """Renders waiting for a slot they could take, as claims (waiters gone as a holder would
    be do not count; ``own_id``'s always does)."""
    rows = session.execute(
        select(Lease, Job, Batch)
        .join(Job, Job.id == Lease.job_id)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Lease.gpu_wanted_at.is_not(None), Lease.gpu_since.is_(None))
    ).all()
    return [
        Claim(job.id, batch.id, Share.of(batch), job.priority, lease.gpu_wanted_at)
        for lease, job, batch in rows
        if lease.job_id == own_id or _gone(lease, now, is_dead, grace) is None
    ]


def _held_by_batch(session: Session, holders: list[SlotHolder]) -> Counter[str]:
    holding = [h.job_id for h in holders]
    return Counter(
        session.scalars(select(Job.batch_id).where(Job.id.in_(holding))) if holding else []
    )


def _my_turn(
    session: Session,
    own: Lease,
    holders: list[SlotHolder],
    free: int,
    now: datetime,
    is_dead: Callable[[str], bool],
    grace: timedelta,
) -> bool:
    """Whether fair sharing gives one of the ``free`` slots to ``own`` rather than to another
    waiting render (``db.fair_share``)."""
    claims = _waiting_claims(session, own.job_id, now, is_dead, grace)
    return own.job_id in fair_picks(claims, _held_by_batch(session, holders), free)


def _claim_of(session: Session, job_id: str, since: datetime) -> Claim:
    job = session.get(Job, job_id)
    return Claim(job.id, job.batch_id, Share.of(job.batch), job.priority, since)


def _host_of(session: Session, job_id: str) -> str:
    return session.get(Lease, job_id).owner.partition(":")[0]


def _owed_on_host(session: Session, job_id: str, others: list[SlotHolder], host: str) -> bool:
    """Whether a holder on ``host`` would give way to this job (``_owed_more``)."""
    held = _held_by_batch(session, others)
    me = _claim_of(session, job_id, utcnow())
    for holder in others:
        if holder.owner.partition(":")[0] != host:
            continue
        theirs = _claim_of(session, holder.job_id, holder.since)
        if _owed_more(me, theirs, held - Counter({theirs.batch_id: 1})):
            return True
    return False


def _owed_more(waiter: Claim, holder: Claim, held: Counter[str]) -> bool:
    """Whether the waiter's batch comes strictly before the holder's for a slot (priority,
    then slots held per unit of weight, the holder's own slot not counted). A tie keeps the
    slot where it is: slots never move back and forth between batches owed alike."""

    def standing(claim: Claim) -> tuple[int, float]:
        return (-claim.share.priority, held[claim.batch_id] / claim.share.weight)

    return waiter.batch_id != holder.batch_id and standing(waiter) < standing(holder)


def yield_gpu_slot(
    *,
    session: Session,
    job_id: str,
    owner: str,
    is_dead: Callable[[str], bool],
    grace_seconds: float = 0.0,
    now: datetime | None = None,
    host_slots: int | None = None,
) -> SlotHolder | None:
    """Give the slot of ``owner`` to a waiting render of another batch if fair sharing would
    pick that render over it for this slot; commits. Returns the render it gave way to, or
    None (the slot is kept).

    A render asks between its segments, so a batch submitted behind a long one waits for the
    next segment boundary rather than for a whole job, and "rush this batch" or a weight
    change takes effect within a segment. The render becomes a waiter at once, with its
    model and motion state still loaded. It gives way only to a batch strictly owed more
    (``_owed_more``): never within a batch, and with more batches than slots a batch waits
    for a job's end, not a segment's, so slots do not move back and forth at every segment.
    With ``host_slots`` (the farm caps GPUs per host) it gives way only to a render of its own
    host, the only one that can use the GPU it frees; without, never while a slot is free.
    """
    now = now or utcnow()
    # Takers and yielders take turns on the limit row (it exists: this render holds a slot).
    limit = session.scalar(select(GpuLimit).where(GpuLimit.name == POOL).with_for_update())
    own = session.scalar(select(Lease).where(Lease.job_id == job_id).with_for_update())
    if own is None or own.owner != owner or own.gpu_since is None:
        session.rollback()
        return None
    grace = timedelta(seconds=grace_seconds)
    holders = gpu_slot_holders(session=session, is_dead=is_dead, now=now, grace=grace)
    others = [h for h in holders if h.job_id != job_id]
    mine = _claim_of(session, job_id, own.gpu_since)
    waiters = _waiting_claims(session, job_id, now, is_dead, grace)
    host = owner.partition(":")[0]
    if host_slots is not None:  # only a render of this host can use this host's GPU
        waiters = [c for c in waiters if _host_of(session, c.job_id) == host]
    elif len(others) + 1 < limit.slots:
        session.rollback()  # a slot is free already: the waiter takes that one
        return None
    held = _held_by_batch(session, others)
    picks = fair_picks([mine, *waiters], held, 1)
    winner = next((c for c in waiters if picks and c.job_id == picks[0]), None)
    if winner is None or not _owed_more(winner, mine, held):
        session.rollback()
        return None
    to = session.get(Job, winner.job_id)
    given = SlotHolder(winner.job_id, f"{to.batch.name}/{to.name}", "", now, None)
    # It waits as from when it took the slot: first in its batch, ahead of jobs that asked
    # later (a half-rendered job holds its memory until it is done).
    own.gpu_since, own.gpu_wanted_at = None, own.gpu_since
    record_event(
        session=session,
        actor=owner,
        kind="gpu.released",
        job_id=job_id,
        reason=f"gave way to {given.describe()} (fair share)",
    )
    session.commit()
    return given


def lock_gpu_limit(*, session: Session, default_slots: int, actor: str) -> int:
    """The GPU limit, its row locked until the caller's transaction ends (admissions take
    turns on it, as slot takers do)."""
    row, _ = _lock_limit(session, default_slots=default_slots, actor=actor)
    return row.slots


def release_gpu_slot(*, session: Session, job_id: str, owner: str) -> bool:
    """Give the slot back; False if ``owner`` held none (nothing changes then)."""
    result = session.execute(
        update(Lease)
        .where(Lease.job_id == job_id, Lease.owner == owner, Lease.gpu_since.is_not(None))
        .values(gpu_since=None, gpu_wanted_at=None)
    )
    if result.rowcount == 0:
        session.rollback()
        return False
    record_event(session=session, actor=owner, kind="gpu.released", job_id=job_id)
    session.commit()
    return True


def gpu_slot_holders(
    *,
    session: Session,
    is_dead: Callable[[str], bool] = lambda owner: False,
    now: datetime | None = None,
    grace: timedelta = timedelta(0),
) -> list[SlotHolder]:
    """The renders holding a slot now, oldest first (read only: nothing is reclaimed); a
    holder counts until ``grace`` after its lease's expiry, as ``take_gpu_slot`` judges."""
    now = now or utcnow()
    return [
        _as_holder(lease, job, batch)
        for lease, job, batch in _holder_rows(session)
        if _gone(lease, now, is_dead, grace) is None
    ]


def marked_slots(*, session: Session) -> list[str]:
    """Job ids whose lease row still marks a GPU slot, live or lapsed (at rest: none)."""
    return list(session.scalars(select(Lease.job_id).where(Lease.gpu_since.is_not(None))))


def gpu_limit(*, session: Session) -> int | None:
    """The stored limit, or None before the first render created it."""
    row = session.get(GpuLimit, POOL, populate_existing=True)
    return None if row is None else row.slots


def set_gpu_limit(*, session: Session, slots: int, actor: str) -> int | None:
    """Set the limit (renders already holding slots keep them); returns the previous value,
    None if there was none."""
    if slots < 1:
        raise ValueError("a GPU limit needs at least one slot")
    row, created = _lock_limit(session, default_slots=slots, actor=actor)
    previous = None if created else row.slots
    if not created and previous != slots:
        row.slots, row.updated_at, row.updated_by = slots, utcnow(), actor
        record_event(
            session=session, actor=actor, kind="gpu.limit", reason=f"{previous} -> {slots}"
        )
    session.commit()
    return previous
