"""What the flows share: the database, the store, the settings, and a job's lease.

``JobLease`` takes a job's lease (or raises ``LeaseHeld`` naming the holder), renews it from a
heartbeat thread while the render runs, and releases it at the end. A holder on this host
whose process no longer exists (a killed render) is taken over at once instead of waiting
for its lease to expire.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, session_factory
from db.leases import (
    acquire_lease,
    current_lease,
    record_gpu_slot,
    release_lease,
    renew_lease,
)
from emo.errors import EmoError, JobStateError
from emo.settings import Settings, get_settings
from emo.store import ObjectStore, open_store
from flows.heartbeat import Heartbeat

log = logging.getLogger(__name__)
ACTOR = "emo"


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

    def __init__(self, svc: Services, job_id: str, owner: str | None = None) -> None:
        self.svc, self.job_id = svc, job_id
        self.owner = owner or lease_owner()
        self.lost = threading.Event()
        self.lost_reason = f"lease of job {job_id} is lost to another render"
        self._heartbeat: Heartbeat | None = None

    def __enter__(self) -> JobLease:
        ttl = self.svc.settings.lease_seconds
        with self.svc.sessions() as session:
            holder = current_lease(session=session, job_id=self.job_id)
            stale = holder.owner if holder and dead_local_owner(holder.owner) else None
            orphan = holder.gpu_slot if holder and holder.owner != self.owner else None
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
        if orphan is not None:
            self._free_orphaned_slot(orphan)
        self._heartbeat = Heartbeat(
            self._renew, self.svc.settings.heartbeat_seconds, f"lease-{self.job_id[:8]}"
        ).start()
        return self

    @staticmethod
    def _free_orphaned_slot(slot_id: str) -> None:
        """The previous holder died holding a GPU slot: give it back now, not at its expiry."""
        from flows.gpu_slot import release_gpu_slot

        try:
            release_gpu_slot(slot_id)
            log.info("released GPU slot %s left by the previous holder", slot_id)
        except Exception as error:  # noqa: BLE001 (it expires on its own; only slower)
            log.warning("could not release orphaned GPU slot %s: %s", slot_id, error)

    def record_gpu_slot(self, slot_id: str | None) -> None:
        """Remember the GPU slot this render holds, so a takeover can free it."""
        with self.svc.sessions() as session:
            record_gpu_slot(session=session, job_id=self.job_id, owner=self.owner, slot_id=slot_id)

    def _renew(self) -> bool:
        """One heartbeat; False once the lease is lost (the heartbeat then stops)."""
        try:
            with self.svc.sessions() as session:
                renew_lease(
                    session=session,
                    job_id=self.job_id,
                    owner=self.owner,
                    ttl_seconds=self.svc.settings.lease_seconds,
                )
        except JobStateError as error:
            log.error("%s; stopping after this step", error)
            self.lost_reason = str(error)
            self.lost.set()
            return False
        except Exception as error:  # noqa: BLE001 (database blip: retry next beat)
            log.warning("lease heartbeat for job %s failed: %s", self.job_id, error)
        return True

    def check(self) -> None:
        """Raise if the lease was lost (another render took the job over)."""
        if self.lost.is_set():
            raise LeaseHeld(self.lost_reason)

    def verify(self) -> None:
        """Raise ``LeaseHeld`` unless the database still names this render as the owner.

        Called before every change a holder makes (segment rows, the final state), so a
        render that lost its lease while the database was unreachable stops instead of
        overwriting the state of the render that took the job over.
        """
        self.check()
        with self.svc.sessions() as session:
            holder = current_lease(session=session, job_id=self.job_id)
        if holder is None or holder.owner != self.owner:
            name = repr(holder.owner) if holder else "nobody"
            self.lost_reason = f"lease of job {self.job_id} is lost: held by {name}"
            self.lost.set()
            raise LeaseHeld(self.lost_reason)

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
