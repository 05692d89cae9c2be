"""What the job database references in the object store: the input of ``emo gc``."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.models import Job, Lease, utcnow


@dataclass(frozen=True)
class JobReferences:
    """One job's references to stored objects, and whether a render holds it now."""

    job_id: str
    status: str
    live: bool  # a live lease: a render may be writing, so leave everything of the job alone
    image_uri: str
    audio_uri: str
    output_uri: str | None
    weights_sha256: str | None
    image_sha256: str | None
    audio_sha256: str | None
    recorded: dict[int, str]  # segment index -> checkpoint manifest URI recorded as done


def job_references(*, session: Session, job_ids: list[str] | None = None) -> list[JobReferences]:
    """Every job's references (or those of ``job_ids``)."""
    now = utcnow()
    query = select(Job).options(selectinload(Job.segments))
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    leases = {
        lease.job_id: lease.expires_at > now
        for lease in session.scalars(select(Lease))
        if job_ids is None or lease.job_id in job_ids
    }
    return [
        JobReferences(
            job_id=job.id,
            status=job.status.value,
            live=leases.get(job.id, False),
            image_uri=job.image_uri,
            audio_uri=job.audio_uri,
            output_uri=job.output_uri,
            weights_sha256=job.weights_sha256,
            image_sha256=job.image_sha256,
            audio_sha256=job.audio_sha256,
            recorded={s.index: s.checkpoint_uri for s in job.segments if s.checkpoint_uri},
        )
        for job in session.scalars(query)
    ]
