"""One slot of the Prefect global concurrency limit that caps simultaneous GPU renders.

Prefect's own ``concurrency`` context manager hides the id of the lease it takes, so a render
that is killed leaves its slot occupied until the lease expires (five minutes by default),
and a resumed render waits for it. ``GpuSlot`` takes the slot through the same API but keeps
the lease id, which the render records on its job lease; whoever takes the job over releases
the orphaned slot at once (see ``flows.context.JobLease``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client

from emo.errors import EmoError
from flows.heartbeat import Heartbeat

log = logging.getLogger(__name__)

GPU_LIMIT = "emo-gpu"
MIN_LEASE_SECONDS = 60.0  # the Prefect server refuses shorter concurrency leases
LOCKED = 423


def ensure_gpu_limit(slots: int) -> None:
    """Create or resize the global concurrency limit to ``slots`` (EMO_GPU_SLOTS)."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)


def release_gpu_slot(slot_id: str) -> None:
    """Release a slot lease by id (the server ignores leases it no longer has)."""
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(UUID(slot_id))


class GpuSlotLost(EmoError):
    """The slot's lease expired while the render still ran."""


class GpuSlot:
    """Context manager: wait for a GPU slot, renew its lease while held, release it at exit."""

    def __init__(
        self,
        *,
        lease_seconds: float,
        on_acquired: Callable[[str], None] | None = None,
        waiting: Callable[[], None] | None = None,
    ) -> None:
        self.lease_seconds = max(MIN_LEASE_SECONDS, lease_seconds)
        self.on_acquired, self.waiting = on_acquired, waiting
        self.slot_id: str | None = None
        self.lost = threading.Event()
        self._heartbeat: Heartbeat | None = None

    def _try_acquire(self, client) -> tuple[str | None, float]:  # noqa: ANN001 (Prefect client)
        """(lease id, 0) when acquired, else (None, seconds to wait before asking again)."""
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[GPU_LIMIT], slots=1, mode="concurrency", lease_duration=self.lease_seconds
            )
        except httpx.HTTPStatusError as error:
            if error.response.status_code != LOCKED:
                raise
            return None, min(5.0, float(error.response.headers.get("Retry-After", 1.0)))
        return str(response.json()["lease_id"]), 0.0

    def __enter__(self) -> GpuSlot:
        announced = False
        with get_client(sync_client=True) as client:
            while True:
                slot_id, pause = self._try_acquire(client)
                if slot_id is not None:
                    break
                if not announced:
                    log.info("all %s slots are busy; waiting for one", GPU_LIMIT)
                    announced = True
                if self.waiting is not None:
                    self.waiting()
                time.sleep(pause)
        self.slot_id = slot_id
        if self.on_acquired is not None:
            try:
                self.on_acquired(slot_id)
            except BaseException:
                release_gpu_slot(slot_id)
                raise
        self._heartbeat = Heartbeat(
            lambda: self._renew(slot_id), self.lease_seconds / 3, "gpu-slot"
        ).start()
        return self

    def _renew(self, slot_id: str) -> bool:
        """One renewal; False once the slot has expired (the heartbeat then stops)."""
        try:
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(UUID(slot_id), self.lease_seconds)
        except httpx.HTTPStatusError as error:
            if error.response.status_code in (404, 410):  # expired: the slot is gone
                log.error("GPU slot %s expired before it was renewed", slot_id)
                self.lost.set()
                return False
            log.warning("renewing GPU slot %s failed: %s", slot_id, error)
        except Exception as error:  # noqa: BLE001 (a blip: the next renewal retries)
            log.warning("renewing GPU slot %s failed: %s", slot_id, error)
        return True

    def check(self) -> None:
        """Raise if the slot expired (the Prefect API was unreachable for a whole lease):
        another render may have been given this GPU, so this one must stop."""
        if self.lost.is_set():
            raise GpuSlotLost(
                f"GPU slot {self.slot_id} expired while the Prefect API was unreachable; "
                "resume the job to continue from its last checkpoint"
            )

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.slot_id is not None:
            try:
                release_gpu_slot(self.slot_id)
            except Exception as failure:  # noqa: BLE001 (never mask the render's own outcome)
                log.warning("releasing GPU slot %s failed: %s", self.slot_id, failure)
