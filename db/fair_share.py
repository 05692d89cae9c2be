"""Fair sharing of the GPUs between batches: who is dispatched next, and who gets a free slot.

The policy (``fair_picks``) is one function, used at both points where GPUs are handed out:

- **admission** (``admit_jobs``): a job gets a render run only when the GPUs can take it. Jobs
  that hold or will soon hold a slot (dispatched, not yet rendered) are at most the GPU slots
  plus a look-ahead (``EMO_DISPATCH_LOOKAHEAD``: runs that load their inputs and model while
  the slots render, so a freed slot is taken at once); the rest stay queued, undispatched, in
  the job database, where their order can still change, not in Prefect's first-come queue;
- **the slot** (``db.gpu_slots.take_gpu_slot``): a freed slot goes to the waiting render that
  fair sharing picks, not to whichever polls first.

Picking, one unit at a time: the highest batch priority first ("rush this batch"); between
batches of one priority, the batch holding the least per unit of weight ("this client gets a
third of the farm": weight 1 against 2), so a batch with work and nothing running always comes
next; never more than a batch's ``max_concurrent``; then the job's own priority; then age.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from db.dispatch import mark_dispatched
from db.models import Batch, Job, JobStatus, Lease, utcnow

WAITING = (JobStatus.QUEUED, JobStatus.RUNNING)
REASON = "its turn (fair share)"


@dataclass(frozen=True)
class Share:
    """How a batch shares the GPUs."""

    priority: int = 0
    weight: float = 1.0
    max_concurrent: int | None = None  # None: no cap

    @classmethod
    def of(cls, batch: Batch) -> Share:
        return cls(batch.priority, batch.weight, batch.max_concurrent)


@dataclass(frozen=True)
class Claim:
    """A job that wants a unit of GPU capacity (a dispatch, or a slot)."""

    job_id: str
    batch_id: str
    share: Share
    job_priority: int
    since: datetime  # its age: created (admission) or waiting since (slot)


def _claim_key(claim: Claim) -> tuple[int, datetime, str]:
    return (-claim.job_priority, claim.since, claim.job_id)


def fair_picks(claims: Iterable[Claim], held: Mapping[str, int], free: int) -> list[str]:
    """The job ids to serve, in order, with ``free`` units to give; ``held``: units each batch
    holds already. See the module's docstring for the order."""
    queues: dict[str, list[Claim]] = {}
    for claim in sorted(claims, key=_claim_key):
        queues.setdefault(claim.batch_id, []).append(claim)
    counts = Counter(held)
    picks: list[str] = []
    while len(picks) < free:
        open_batches = [
            queue[0]
            for queue in queues.values()
            if queue
            and (
                queue[0].share.max_concurrent is None
                or counts[queue[0].batch_id] < queue[0].share.max_concurrent
            )
        ]
        if not open_batches:
            break
        head = min(
            open_batches,
            key=lambda c: (
                -c.share.priority,
                counts[c.batch_id] / c.share.weight,
                c.since,
                c.batch_id,
            ),
        )
        queues[head.batch_id].pop(0)
        counts[head.batch_id] += 1
        picks.append(head.job_id)
    return picks


def active_by_batch(*, session: Session) -> Counter[str]:
    """Dispatched jobs not yet rendered, by batch: those holding, or about to ask for, a GPU."""
    rows = session.execute(
        select(Job.batch_id, func.count())
        .where(Job.status.in_(WAITING), Job.dispatched_at.is_not(None), Job.rendered_at.is_(None))
        .group_by(Job.batch_id)
    )
    return Counter({batch_id: count for batch_id, count in rows})


def held_claims(*, session: Session) -> list[Claim]:
    """Queued jobs never dispatched, as claims for admission (unlocked: admissions take turns
    on the GPU limit row, and each pick is locked and checked again when it is dispatched)."""
    rows = session.execute(
        select(Job, Batch)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.status == JobStatus.QUEUED, Job.dispatched_at.is_(None))
        .order_by(Job.id)
    )
    return [
        Claim(job.id, batch.id, Share.of(batch), job.priority, job.created_at)
        for job, batch in rows
    ]


def in_wings_by_batch(*, session: Session) -> Counter[str]:
    """Dispatched jobs not yet rendered and not holding a GPU slot, by batch: those loading,
    or loaded and waiting for a slot."""
    holder = and_(Lease.job_id == Job.id, Lease.gpu_since.is_not(None))
    rows = session.execute(
        select(Job.batch_id, func.count())
        .outerjoin(Lease, holder)
        .where(
            Job.status.in_(WAITING),
            Job.dispatched_at.is_not(None),
            Job.rendered_at.is_(None),
            Lease.job_id.is_(None),
        )
        .group_by(Job.batch_id)
    )
    return Counter({batch_id: count for batch_id, count in rows})


def wings_picks(
    claims: list[Claim],
    active: Mapping[str, int],
    in_wings: Mapping[str, int],
    picks: list[str],
    room: int,
) -> list[str]:
    """Beyond the places: the next job of each batch with none in the wings (every job it has
    dispatched holds a slot, or it has none), up to ``room`` of them, in the fair order. Such
    a job loads while the GPUs render and waits for a slot, which fair sharing gives it when
    its batch is next; so a batch submitted behind a long one waits for the next free slot,
    not for a place and then a slot, and a batch that holds a slot has its next job ready when
    that slot is given back, rather than losing it to a batch that had one waiting."""
    taken = set(picks)
    served = {claim.batch_id for claim in claims if claim.job_id in taken}
    heads: dict[str, Claim] = {}
    for claim in sorted(claims, key=_claim_key):
        if in_wings.get(claim.batch_id, 0) == 0 and claim.batch_id not in served:
            heads.setdefault(claim.batch_id, claim)
    return fair_picks(heads.values(), active, room)


def admit_jobs(
    *,
    session: Session,
    capacity: int,
    actor: str,
    now: datetime | None = None,
    first_room: int = 0,
) -> list[tuple[str, int]]:
    """Dispatch, in the fair order, as many held jobs as ``capacity`` (GPU slots plus the
    look-ahead) leaves room for, and beyond it the next job of batches with none in the
    wings while fewer than ``first_room`` such jobs are over it (``wings_picks``);
    commits. Returns ``(job id, dispatch generation)`` of each: the caller makes their render
    runs (a dispatch whose run is never made is made by the sweep, as any other). The caller
    holds the GPU limit row locked, so admissions take turns."""
    now = now or utcnow()
    active = active_by_batch(session=session)
    claims = held_claims(session=session)
    picks = fair_picks(claims, active, capacity - sum(active.values()))
    over = sum(active.values()) + len(picks) - capacity
    in_wings = in_wings_by_batch(session=session)
    picks += wings_picks(claims, active, in_wings, picks, first_room - max(0, over))
    admitted = []
    for job_id in picks:
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job.status is not JobStatus.QUEUED or job.dispatched_at is not None:
            continue  # cancelled or dispatched since it was read
        mark_dispatched(session=session, job=job, actor=actor, reason=REASON, now=now)
        admitted.append((job.id, job.dispatch_generation))
    session.commit()
    return admitted


def mark_rendered(*, session: Session, job_id: str, epoch: int) -> bool:
    """Note that the job's render gave its GPU back after its last segment (fenced: only the
    render of the current epoch); False if the epoch moved on."""
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.lease_epoch != epoch:
        session.rollback()
        return False
    job.rendered_at = utcnow()
    session.commit()
    return True
