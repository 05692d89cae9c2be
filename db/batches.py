"""Batches: idempotent registration of a manifest and its jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.events import record_event
from db.models import Batch, Job, JobStatus


@dataclass(frozen=True)
class JobSpec:
    """What a manifest says about one job, as the database stores it."""

    name: str
    image_uri: str
    audio_uri: str
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 3
    id: str | None = None  # chosen by the caller (derived from the batch's content and name)
    image_sha256: str | None = None
    audio_sha256: str | None = None
    weights_sha256: str | None = None  # the bundle the job is pinned to


def find_batch(*, session: Session, manifest_sha256: str) -> Batch | None:
    """The batch registered under this key, if any (``manifest_sha256`` holds the batch's
    content key: the manifest's hash and its inputs', see ``emo.job.batch_key``)."""
    return session.scalar(select(Batch).where(Batch.manifest_sha256 == manifest_sha256))


def recent_batches(*, session: Session, limit: int = 50) -> list[Batch]:
    """The ``limit`` most recently registered batches, newest first (``emo status``)."""
    return list(session.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(limit)))


def batch_count(*, session: Session) -> int:
    """How many batches are registered."""
    return session.scalar(select(func.count()).select_from(Batch)) or 0


def batch_by_prefix(*, session: Session, prefix: str) -> Batch | None:
    """The batch whose id starts with ``prefix`` (the first found when several do)."""
    return session.scalar(select(Batch).where(Batch.id.startswith(prefix)).limit(1))


@dataclass(frozen=True)
class BatchShare:
    """How a batch shares the GPUs (``db.fair_share``)."""

    priority: int = 0
    weight: float = 1.0
    max_concurrent: int | None = None
    tenant: str | None = None


def register_batch(
    *,
    session: Session,
    name: str,
    manifest_sha256: str,
    jobs: list[JobSpec],
    actor: str,
    share: BatchShare | None = None,
    output_dir: str | None = None,
) -> tuple[Batch, bool]:
    """Register a batch and its queued jobs; the same manifest again returns the same batch.

    Returns ``(batch, created)``. Safe under concurrent submission of one manifest: the unique
    manifest hash decides, and the loser returns the winner's batch.
    """
    existing = find_batch(session=session, manifest_sha256=manifest_sha256)
    if existing is not None:
        return existing, False
    share = share or BatchShare()
    batch = Batch(
        name=name,
        manifest_sha256=manifest_sha256,
        submitted_by=actor,
        priority=share.priority,
        weight=share.weight,
        max_concurrent=share.max_concurrent,
        tenant=share.tenant,
        output_dir=output_dir,
    )
    batch.jobs = [
        Job(
            **({"id": spec.id} if spec.id else {}),
            name=spec.name,
            image_uri=spec.image_uri,
            audio_uri=spec.audio_uri,
            params=spec.params,
            priority=spec.priority,
            max_attempts=spec.max_attempts,
            image_sha256=spec.image_sha256,
            audio_sha256=spec.audio_sha256,
            weights_sha256=spec.weights_sha256,
            status=JobStatus.QUEUED,
        )
        for spec in jobs
    ]
    session.add(batch)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        winner = find_batch(session=session, manifest_sha256=manifest_sha256)
        if winner is None:
            raise
        return winner, False
    record_event(
        session=session,
        actor=actor,
        kind="batch.registered",
        batch_id=batch.id,
        detail={"name": name, "manifest_sha256": manifest_sha256, "jobs": len(jobs)},
    )
    for job in batch.jobs:
        record_event(
            session=session,
            actor=actor,
            kind="job.created",
            batch_id=batch.id,
            job_id=job.id,
            to_status=JobStatus.QUEUED.value,
            reason=f"registered with batch {name!r}",
        )
    session.commit()
    return batch, True


def set_share(
    *, session: Session, batch_id: str, actor: str, **changes: int | float | str | None
) -> Batch:
    """Change how a batch shares the GPUs (priority, weight, max_concurrent, tenant); takes
    effect at the next dispatch and the next free slot. Recorded as a ``batch.share`` event."""
    batch = session.get(Batch, batch_id, with_for_update=True)
    before = {key: getattr(batch, key) for key in changes}
    for key, value in changes.items():
        setattr(batch, key, value)
    record_event(
        session=session,
        actor=actor,
        kind="batch.share",
        batch_id=batch_id,
        detail={"before": before, "after": changes},
    )
    session.commit()
    return batch


def set_output_dir(*, session: Session, batch_id: str, output_dir: str) -> None:
    """Note the folder a submit asked the batch's videos for (the latest submit's counts)."""
    session.execute(update(Batch).where(Batch.id == batch_id).values(output_dir=output_dir))
    session.commit()


def batch_named(*, session: Session, reference: str) -> Batch | None:
    """The batch with this id prefix, or else the latest one with this name."""
    return batch_by_prefix(session=session, prefix=reference) or session.scalar(
        select(Batch).where(Batch.name == reference).order_by(Batch.created_at.desc()).limit(1)
    )


@dataclass(frozen=True)
class ShareRow:
    """One batch with work left, as `emo share` shows it."""

    batch: Batch
    active: int  # dispatched and not yet rendered: holding or about to ask for a GPU
    held: int  # queued, never dispatched: waiting its turn


def share_rows(*, session: Session) -> list[ShareRow]:
    """Batches with queued or running jobs, highest priority first, with their counts."""
    waiting = Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))
    active = func.count().filter(Job.dispatched_at.is_not(None), Job.rendered_at.is_(None))
    held = func.count().filter(Job.dispatched_at.is_(None))
    rows = session.execute(
        select(Batch, active, held)
        .join(Job, Job.batch_id == Batch.id)
        .where(waiting)
        .group_by(Batch.id)
        .order_by(Batch.priority.desc(), Batch.created_at)
    )
    return [ShareRow(batch, a, h) for batch, a, h in rows]
