"""What the flows share: the database, the store, the settings, and a job's lease.

``JobLease`` takes a job's lease (or raises ``LeaseHeld`` naming the holder), renews it from a
heartbeat thread while the render runs, and releases it at the end. A holder on this host
whose process no longer exists (a killed render) is taken over at once instead of waiting
for its lease to expire; the GPU slot it held lives on the lease and is freed with it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

from prefect._internal import control_listener
from prefect.exceptions import TerminationSignal
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, session_factory
from db.jobs import job_status
from db.leases import acquire_lease, current_lease, release_lease, renew_lease
from db.models import JobStatus, utcnow
from emo.errors import EmoError, JobStateError
from emo.settings import Settings, get_settings
from emo.store import ObjectStore, open_store
from flows.heartbeat import Heartbeat

log = logging.getLogger(__name__)
ACTOR = "emo"
_SLOT_GIVEN_AWAY = (
    "the GPU slot of job {job_id} was given to another render while this one could not "
    "renew its lease; resume the job to continue from its last checkpoint"
)


class JobCancelled(EmoError):
    """The job was cancelled (``emo cancel``) while this render held it."""


class LeaseHeld(EmoError):
    """Another live render holds the job; the message names it."""

    exit_code = 1


@dataclass
class Services:
    """Database sessions, the object store and the settings of one process."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore


@functools.cache
def _services(key: tuple[str, str]) -> Services:
    settings = get_settings()
    ensure_schema(key[0])
    return Services(
        settings=settings,
        sessions=session_factory(make_engine(key[0])),
        store=open_store(settings=settings),
    )


def ensure_schema(url: str) -> None:
    """The embedded SQLite database migrates itself; others must be at the newest revision
    (production runs ``emo db upgrade`` as a Kubernetes Job before workers start)."""
    from db import migrate

    if url.startswith("sqlite"):
        migrate.upgrade(url)
        return
    current, head = migrate.current_revision(url), migrate.head_revision()
    if current != head:
        raise EmoError(
            f"the database is at revision {current or 'none'}, this code needs {head}; "
            "run `emo db upgrade` (EMO_DATABASE_URL)"
        )


def services() -> Services:
    """This process's services for the current settings (created once)."""
    settings = get_settings()
    return _services((settings.resolved_database_url, settings.resolved_store_url))


def lease_owner() -> str:
    """host:pid:random, so a holder on this host can be checked for liveness."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def dead_local_owner(owner: str) -> bool:
    """True if ``owner`` was a process on this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobLease:
    """Context manager: hold a job's lease with a heartbeat for the duration."""

    def __init__(
        self, svc: Services, job_id: str, owner: str | None = None, wait_seconds: float = 0.0
    ) -> None:
        self.svc, self.job_id = svc, job_id
        self.wait_seconds = wait_seconds  # how long a lease held by another may be waited for
        self.owner = owner or lease_owner()
        self.lost = threading.Event()
        self.cancelled = threading.Event()  # set by the heartbeat when the job is cancelled
        self.lost_reason = f"lease of job {job_id} is lost to another render"
        self.progress_at: datetime | None = None
        self._gpu_held = False  # set by GpuSlot while this render holds a GPU slot
        self._gpu_changes = 0  # how often it changed: the heartbeat's reading is of one state
        self.epoch = 0  # the job's lease epoch this render acquired: its fencing token
        self._renewed = time.monotonic()  # when the lease last surely ran for another ttl
        self._heartbeat: Heartbeat | None = None
        self.stop_signal: int | None = None  # a SIGTERM noted by JobOutcome: stop at next check

    @property
    def gpu_held(self) -> bool:
        return self._gpu_held

    @gpu_held.setter
    def gpu_held(self, held: bool) -> None:
        self._gpu_held = held
        self._gpu_changes += 1

    def __enter__(self) -> JobLease:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                self._acquire()
                break
            except LeaseHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, self.wait_seconds))
        self._heartbeat = Heartbeat(
            self._renew, self.svc.settings.heartbeat_seconds, f"lease-{self.job_id[:8]}"
        ).start()
        return self

    def _acquire(self) -> None:
        ttl = self.svc.settings.lease_seconds
        self._renewed = time.monotonic()
        with self.svc.sessions() as session:
            holder = current_lease(session=session, job_id=self.job_id)
            stale = holder.owner if holder and dead_local_owner(holder.owner) else None
            lease = acquire_lease(
                session=session,
                job_id=self.job_id,
                owner=self.owner,
                ttl_seconds=ttl,
                stale_owner=stale,
            )
            if lease is None:
                holder = current_lease(session=session, job_id=self.job_id)
                name = holder.owner if holder else "another render"
                raise LeaseHeld(
                    f"job {self.job_id} is being rendered by {name}; not starting a second render"
                )
            self.epoch = lease.epoch

    def mark_progress(self) -> None:
        """The model progressed (a denoising step); the next heartbeat records when, so renders
        waiting for a GPU slot can tell a working holder from a stuck one."""
        self.progress_at = utcnow()

    def _renew(self) -> bool:
        """One heartbeat; False once the lease is lost (the heartbeat then stops)."""
        if self.lost.is_set():
            return False
        started = time.monotonic()
        changes = self._gpu_changes  # a slot taken or given during this beat is not a loss
        try:
            with self.svc.sessions() as session:
                lease = renew_lease(
                    session=session,
                    job_id=self.job_id,
                    owner=self.owner,
                    ttl_seconds=self.svc.settings.lease_seconds,
                    progress_at=self.progress_at,
                )
                if job_status(session=session, job_id=self.job_id) is JobStatus.CANCELLED:
                    self.cancelled.set()  # the render stops at its next denoising step
            if self.gpu_held and self._gpu_changes == changes and lease.gpu_since is None:
                raise JobStateError(_SLOT_GIVEN_AWAY.format(job_id=self.job_id))
            self._renewed = started
        except JobStateError as error:
            log.error("%s; stopping after this step", error)
            self.lost_reason = str(error)
            self.lost.set()
            return False
        except Exception as error:  # noqa: BLE001 (database blip: retry next beat)
            log.warning("lease heartbeat for job %s failed: %s", self.job_id, error)
        return True

    def check(self) -> None:
        """Raise ``TerminationSignal`` if the render was sent a SIGTERM; raise ``JobCancelled``
        if the heartbeat saw the job cancelled; raise ``LeaseHeld`` if the lease was lost
        (another render took the job over), or has surely expired because no heartbeat got
        through for its whole time to live (the database was unreachable): another render may
        take the job and its GPU slot from then on.

        The SIGTERM is raised again here because the exception its handler raised can be lost:
        Python swallows an exception raised in a finalizer or weakref callback ("Exception
        ignored in ..."), and a signal handled while one runs raises it there. A process
        worker's cancel says so before it sends the signal (the runner's intent), which also
        covers a signal lost before ``JobOutcome`` began to note it.

        Cheap (no database round trip): the render calls it at every denoising step.
        """
        if self.stop_signal is not None or control_listener.get_intent() == "cancel":
            raise TerminationSignal(signal=self.stop_signal or signal.SIGTERM)
        if self.lost.is_set():
            raise LeaseHeld(self.lost_reason)
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled")
        ttl = self.svc.settings.lease_seconds
        if time.monotonic() - self._renewed > ttl:
            self.lost_reason = (
                f"lease of job {self.job_id} could not be renewed for {ttl:.0f} s "
                "(database unreachable); stopped so that another render can resume the job"
            )
            self.lost.set()
            raise LeaseHeld(self.lost_reason)

    def verify(self) -> None:
        """Raise ``LeaseHeld`` unless the database still names this render as the owner (and,
        while it holds a GPU slot, still shows that slot on its lease).

        Called before every change a holder makes (segment rows, the final state), so a
        render that lost its lease while the database was unreachable stops instead of
        overwriting the state of the render that took the job over.
        """
        self.check()
        with self.svc.sessions() as session:
            lease = current_lease(session=session, job_id=self.job_id)
            epoch = lease.epoch if lease is not None else None
        holder = lease.owner if lease is not None else None
        if holder != self.owner or epoch != self.epoch:
            self.lost_reason = f"lease of job {self.job_id} is lost: held by {holder!r}" + (
                f" at epoch {epoch}, this render's is {self.epoch}" if lease else ""
            )
        elif self.gpu_held and lease.gpu_since is None:
            self.lost_reason = _SLOT_GIVEN_AWAY.format(job_id=self.job_id)
        else:
            return
        self.lost.set()
        raise LeaseHeld(self.lost_reason)

    def fenced(self, error: EmoError) -> None:
        """A write was refused because the job's epoch moved on: stop as a lost lease."""
        try:
            holder = repr(self.holder())
        except Exception:  # noqa: BLE001 (the message is best effort; the refusal stands)
            holder = "another render"
        self.lost_reason = f"{error}; the job is held by {holder} now"
        self.lost.set()
        raise LeaseHeld(self.lost_reason) from error

    def holder(self) -> str | None:
        """Who the database says holds the job's lease now (None: nobody)."""
        with self.svc.sessions() as session:
            lease = current_lease(session=session, job_id=self.job_id)
        return lease.owner if lease is not None else None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        try:
            with self.svc.sessions() as session:
                release_lease(session=session, job_id=self.job_id, owner=self.owner)
        except Exception as failure:
            if error is None:
                raise
            # Never mask the render's own exception; the lease expires by itself.
            log.warning("releasing the lease of job %s failed: %s", self.job_id, failure)
