"""Waiting for a GPU slot: visibly, and for a bounded time.

The slots themselves are counted in the job database (``db.gpu_slots``), on the renders' job
leases: a slot whose holder died is reclaimed without it (lease expiry, take-over, or a dead
process on this host), whether the Prefect server that ran the holder is still up or not.

``GpuSlot`` asks for a slot until one is free. While it waits it says so, naming the holders
("waiting for a GPU slot (1 of 1 in use: jobs batch/job (1a2b3c4d))"), on the CLI and in the
flow run's log, and again whenever the holders change. It gives up with that message after
``EMO_SLOT_WAIT_SECONDS`` without progress: no holder finished, started or took a denoising
step (holders report their last step through their lease heartbeat).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType

from db.gpu_slots import SlotCount, release_gpu_slot, take_gpu_slot, yield_gpu_slot
from emo import progress
from emo.errors import EmoError
from emo.settings import SLOT_POLL_SECONDS
from flows.context import JobLease, Services, dead_local_owner

log = logging.getLogger(__name__)
POLL_SECONDS = SLOT_POLL_SECONDS


class GpuSlotTimeout(EmoError):
    """No slot became free, and no holder progressed, for EMO_SLOT_WAIT_SECONDS."""


def waiting_message(count: SlotCount) -> str:
    """What a waiting render says: the limit and who holds the slots."""
    jobs = ", ".join(h.describe() for h in count.holders) or "none known"
    if count.host_full:
        return f"waiting for a GPU of this host (EMO_HOST_GPU_SLOTS, all in use: jobs {jobs})"
    return f"waiting for a GPU slot ({len(count.holders)} of {count.slots} in use: jobs {jobs})"


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (shown in the Prefect UI), or this module's outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _progress_mark(count: SlotCount) -> tuple[frozenset[tuple[str, str, datetime]], datetime]:
    """Changes whenever a holder comes or goes or reports a newer denoising step."""
    holders = frozenset((h.job_id, h.owner, h.since) for h in count.holders)
    latest = max((h.progress_at or h.since for h in count.holders), default=datetime.min)
    return holders, latest


class GpuSlot:
    """Context manager: wait for a GPU slot for the job's lease holder; free it at exit.

    ``grace_seconds``: how long after its lease's expiry a silent holder's slot is taken (it
    stops itself at the expiry). ``on_wait`` runs before every request and may raise to stop
    waiting (a cancelled job). ``lazy``: the slot is taken by ``take()`` (a render whose
    segments are all checkpointed already never takes one), not on entering.
    """

    def __init__(
        self,
        svc: Services,
        lease: JobLease,
        *,
        wait_seconds: float,
        grace_seconds: float = 0.0,
        on_wait: Callable[[], None] = lambda: None,
        poll_seconds: float = POLL_SECONDS,
        lazy: bool = False,
    ) -> None:
        self.svc, self.lease = svc, lease
        self.wait_seconds, self.grace_seconds = wait_seconds, grace_seconds
        self.on_wait, self.poll_seconds = on_wait, poll_seconds
        self.held = False
        self.lazy = lazy  # taken at the first ``take()``, not on entering

    def _ask(self) -> SlotCount:
        with self.svc.sessions() as session:
            return take_gpu_slot(
                session=session,
                job_id=self.lease.job_id,
                owner=self.lease.owner,
                default_slots=self.svc.settings.gpu_slots,
                is_dead=dead_local_owner,
                grace_seconds=self.grace_seconds,
                host_slots=self.svc.settings.host_gpu_slots,
            )

    def __enter__(self) -> GpuSlot:
        if not self.lazy:
            self.take()
        return self

    def take(self) -> None:
        """Wait for a slot, unless this render holds one already."""
        if self.held:
            return
        mark, since = None, time.monotonic()
        while True:
            self.lease.check()
            self.on_wait()  # e.g. the job was cancelled meanwhile: stop waiting
            count = self._ask()
            if count.acquired:
                break
            message = waiting_message(count)
            new_mark = _progress_mark(count)
            if mark is None or new_mark[0] != mark[0]:  # first time, or other holders
                _run_logger().warning(message)
                progress.waiting(message)
            if new_mark != mark:
                mark, since = new_mark, time.monotonic()
            elif time.monotonic() - since >= self.wait_seconds:
                raise GpuSlotTimeout(
                    f"gave up after {self.wait_seconds:.0f} s without progress "
                    f"(EMO_SLOT_WAIT_SECONDS) {message}; resume the job once a slot is free, "
                    "or see the holders with `emo slots`"
                )
            time.sleep(self.poll_seconds)
        self.held = self.lease.gpu_held = True
        self._check_setting(count.slots)

    def give_way(self) -> bool:
        """Between segments: give the slot to a waiting render of another batch if fair
        sharing owes that batch one (``db.gpu_slots.yield_gpu_slot``); the caller then takes
        a slot again (``take``), its model and motion state still loaded. True if given."""
        if not self.held:
            return False
        given = None
        self.lease.gpu_held = False  # the heartbeat must not take the yield for a lost slot
        try:
            with self.svc.sessions() as session:
                given = yield_gpu_slot(
                    session=session,
                    job_id=self.lease.job_id,
                    owner=self.lease.owner,
                    is_dead=dead_local_owner,
                    grace_seconds=self.grace_seconds,
                    host_slots=self.svc.settings.host_gpu_slots,
                )
        except Exception as failure:  # noqa: BLE001 (sharing is not the job's work: keep it)
            log.warning("job %s: could not ask to give way: %s", self.lease.job_id, failure)
        finally:
            self.held = self.lease.gpu_held = given is None
        if given is not None:
            message = f"gave the GPU slot to {given.describe()} (fair share); waiting again"
            _run_logger().info(message)
            progress.waiting(message)
        return given is not None

    def _check_setting(self, stored: int) -> None:
        settings = self.svc.settings
        if "gpu_slots" in settings.model_fields_set and settings.gpu_slots != stored:
            _run_logger().warning(
                "EMO_GPU_SLOTS=%d differs from the job database's GPU limit, %d, which "
                "applies (renders never change it; `emo db upgrade` with EMO_GPU_SLOTS set, "
                "or `emo slots --set N`, do)",
                settings.gpu_slots,
                stored,
            )

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if not self.held:
            return
        self.lease.gpu_held = False
        try:
            with self.svc.sessions() as session:
                release_gpu_slot(session=session, job_id=self.lease.job_id, owner=self.lease.owner)
        except Exception as failure:  # noqa: BLE001 (never mask the render's own outcome)
            log.warning("releasing the GPU slot of job %s failed: %s", self.lease.job_id, failure)
