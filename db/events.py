"""The event log: every state change is one row saying who, when, what and why."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Event


def record_event(
    *,
    session: Session,
    actor: str,
    kind: str,
    batch_id: str | None = None,
    job_id: str | None = None,
    segment_index: int | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Event:
    """Add an event to the session's transaction (the caller commits it with the change)."""
    row = Event(
        actor=actor,
        kind=kind,
        batch_id=batch_id,
        job_id=job_id,
        segment_index=segment_index,
        from_status=from_status,
        to_status=to_status,
        reason=reason,
        detail=detail or {},
    )
    session.add(row)
    return row


def job_events(*, session: Session, job_id: str) -> list[Event]:
    """A job's events, oldest first."""
    query = select(Event).where(Event.job_id == job_id).order_by(Event.id)
    return list(session.scalars(query))
