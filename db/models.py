"""SQLAlchemy 2.0 models of the job store: batches, jobs, segments, leases, GPU limits, events.

The tables are created by the Alembic revisions in ``migrations/``, never by ``create_all``
in application code. Timestamps are timezone-aware UTC on every backend (SQLite included).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, timezone-aware UTC (the only kind of datetime stored)."""
    return datetime.now(UTC)


def new_id() -> str:
    """A new random identifier (uuid4 hex, 32 characters)."""
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that is always aware UTC in Python, whatever the backend stores."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatus(enum.StrEnum):
    """Job life cycle: queued -> running -> succeeded | failed | cancelled; failed -> queued."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SegmentStatus(enum.StrEnum):
    """A planned segment is pending until its checkpoint is recorded as done."""

    PENDING = "pending"
    DONE = "done"


def _status_enum(cls: type[enum.Enum], name: str) -> Enum:
    # VARCHAR plus a CHECK constraint: portable between PostgreSQL and SQLite, and new values
    # need no ALTER TYPE.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Batch(Base):
    """One submitted manifest. ``manifest_sha256`` is unique: resubmitting is idempotent.

    Since revision 0005 the column holds the batch's content key (the manifest's sha256 and the
    sha256 of every input it names; ``emo.job.batch_key``), so an input edited in place makes
    a new batch. The name is kept to spare a table rewrite.
    """

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    manifest_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    submitted_by: Mapped[str] = mapped_column(String(200))
    # The submit-batch deployment run that last submitted it (cancelling it cancels the batch).
    submit_run_id: Mapped[str | None] = mapped_column(String(36), default=None)
    # How the batch shares the GPUs (``db.fair_share``): the highest priority is served first;
    # batches of one priority split the slots in proportion to their weights, each at most
    # ``max_concurrent`` (None: no cap). ``tenant`` names the studio's client, for reports.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    max_concurrent: Mapped[int | None] = mapped_column(Integer, default=None)
    tenant: Mapped[str | None] = mapped_column(String(200), default=None)
    # The folder the submit asked the videos for (a job dispatched later still publishes there).
    output_dir: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", order_by="Job.created_at")


class Job(Base):
    """One portrait + one vocal track -> one video."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("batch_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(
        _status_enum(JobStatus, "job_status"), default=JobStatus.QUEUED
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    image_uri: Mapped[str] = mapped_column(Text)
    audio_uri: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # What the job is: the sha256 of its input bytes (its id is derived from them), and the
    # weights bundle it is rendered with, pinned at registration (None on rows made before
    # revision 0005: such a job takes the bundle configured when it renders).
    image_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    audio_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    weights_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # Fencing token: incremented by every acquisition of the job's lease. Only the render
    # holding the current epoch may record a segment or finish the job.
    lease_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The latest dispatch: bumped by each (compare-and-set), carried by the render run's
    # idempotency key so a dead run is never handed back; the run it made (None inline).
    dispatch_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    flow_run_id: Mapped[str | None] = mapped_column(String(36), default=None)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    plan_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    output_uri: Mapped[str | None] = mapped_column(Text, default=None)
    qc: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # When its last segment was recorded and its GPU slot given back (cleared by a dispatch):
    # from then on the job finishes on the CPU and no longer counts against the GPUs.
    rendered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    batch: Mapped[Batch] = relationship(back_populates="jobs")
    segments: Mapped[list[Segment]] = relationship(
        back_populates="job", order_by="Segment.index", cascade="all, delete-orphan"
    )


# The claim query walks this index in order (next queued job by priority, then age), so
# it stops at the first row it can lock instead of sorting every queued job.
Index("ix_jobs_claim", Job.status, Job.priority.desc(), Job.created_at, Job.id)


class Segment(Base):
    """One planned segment of a job: a whole number of clips; done once checkpointed."""

    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    frame_start: Mapped[int] = mapped_column(Integer)
    frame_end: Mapped[int] = mapped_column(Integer)  # exclusive
    sample_start: Mapped[int] = mapped_column(Integer)
    sample_end: Mapped[int] = mapped_column(Integer)  # exclusive
    clip_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[SegmentStatus] = mapped_column(
        _status_enum(SegmentStatus, "segment_status"), default=SegmentStatus.PENDING
    )
    checkpoint_uri: Mapped[str | None] = mapped_column(Text, default=None)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    render_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    epoch: Mapped[int | None] = mapped_column(Integer, default=None)  # of the render recording it
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    job: Mapped[Job] = relationship(back_populates="segments")


class Lease(Base):
    """Who may render a job right now. Expired leases may be taken over."""

    __tablename__ = "leases"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Unused since revision 0004 (it held a Prefect concurrency lease id); kept until a later
    # revision drops it, so renders of the previous release keep working during an upgrade.
    gpu_slot: Mapped[str | None] = mapped_column(String(64), default=None)
    # Since when the owner holds a GPU slot (None: it holds none). A slot lives on the lease,
    # so it expires with the lease and is freed when the lease is taken over.
    gpu_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # When the owner last saw its model make progress (a denoising step), written by its
    # heartbeat: renders waiting for a slot give up only when no holder progresses.
    progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # Since when the owner has been asking for a GPU slot (None: it is not waiting for one);
    # a free slot goes to the waiter fair sharing picks.
    gpu_wanted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    job: Mapped[Job] = relationship(viewonly=True)

    @property
    def epoch(self) -> int:
        """The fencing token of this lease's holder: the job's lease epoch (a lease row exists
        only for the current epoch; a take-over or a revocation moves the job's on)."""
        return self.job.lease_epoch


class GpuLimit(Base):
    """How many renders may hold a GPU at once, across every process sharing the database."""

    __tablename__ = "gpu_limits"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200))


class Event(Base):
    """One state change: who (actor), when (at), what (kind, from/to status), why (reason)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(64))
    batch_id: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    job_id: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    segment_index: Mapped[int | None] = mapped_column(Integer, default=None)
    from_status: Mapped[str | None] = mapped_column(String(16), default=None)
    to_status: Mapped[str | None] = mapped_column(String(16), default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
