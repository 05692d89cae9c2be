"""A render's hold on its job: what the job is, and how the render's end is recorded.

``start_job`` makes the job running for this render and returns what the database says the
job is (``JobRecord``). ``JobOutcome`` wraps the render and records how it ended, fenced by
the render's lease epoch like every write: cancelled (verified segments kept), stopped
(SIGTERM, Ctrl-C, a lost lease, or Prefect ending the run itself: requeued with the attempt
given back), or failed with the reason. A render that lost its lease leaves the job's state
to the render that holds it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

from prefect.client.schemas.objects import StateType
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from db.events import job_events
from db.jobs import begin_run, fail_job, get_job, job_status, stop_job
from db.models import JobStatus
from emo.errors import EpochSuperseded, JobStateError
from flows.context import JobCancelled, JobLease, LeaseHeld

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobRecord:
    """What the database says a job is: the render binds every checkpoint to it."""

    job_id: str
    name: str
    batch_name: str
    options: dict[str, Any]
    image_sha256: str | None  # None: registered before inputs were content-keyed
    audio_sha256: str | None
    weights_sha256: str | None  # None: registered before weights were pinned


def start_job(lease: JobLease, reason: str | None = None) -> JobRecord:
    """Make the job running for this render; what the job is. ``JobCancelled`` if it was
    cancelled before the render began. ``reason``: why a running job is taken up again (the
    event's reason; by default, that its previous run ended without finishing)."""
    with lease.svc.sessions() as session:
        if job_status(session=session, job_id=lease.job_id) is JobStatus.CANCELLED:
            raise JobCancelled(f"job {lease.job_id} is cancelled; nothing to render")
        row = begin_run(session=session, job_id=lease.job_id, actor=lease.owner, reason=reason)
        return JobRecord(
            job_id=lease.job_id,
            name=row.name,
            batch_name=row.batch.name,
            options=dict(row.params),
            image_sha256=row.image_sha256,
            audio_sha256=row.audio_sha256,
            weights_sha256=row.weights_sha256,
        )


def check_cancelled(lease: JobLease) -> None:
    """``JobCancelled`` if the database says the job was cancelled (a fresh read, unlike
    ``lease.check``, which sees what the last heartbeat saw)."""
    with lease.svc.sessions() as session:
        if get_job(session=session, job_id=lease.job_id).status is JobStatus.CANCELLED:
            raise JobCancelled(f"job {lease.job_id} was cancelled")


class JobOutcome:
    """Context manager around a render: records how it ended, then lets the error go on.

    A cancel is the one end that is not an error: it is swallowed and ``result`` says the job
    is cancelled. A SIGTERM is noted while the render runs: Prefect turns it into an exception
    in the main thread, and a C extension running at that moment (safetensors loading weights)
    may turn that into an error of its own, which would read as a failure of the job's work,
    and one that arrives while a finalizer runs is swallowed there (the lease's next check
    raises it again). A render outside the main thread (tests) has no signals to note."""

    def __init__(self, lease: JobLease) -> None:
        self.lease = lease
        self.result: dict[str, Any] = {
            "job_id": lease.job_id,
            "status": JobStatus.CANCELLED.value,
        }
        self.sigterm = False
        self._previous: Any = None

    def __enter__(self) -> JobOutcome:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._note)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _note(self, number: int, frame: Any) -> None:
        self.sigterm = True
        self.lease.stop_signal = number  # the lease's next check raises it again if it is lost
        if callable(self._previous):
            self._previous(number, frame)
        elif self._previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> bool:
        try:
            if error is None:
                if self.sigterm:  # it came while the job's success was being committed
                    log.warning("job %s: a SIGTERM came once it was finished", self.lease.job_id)
                return False
            if isinstance(error, JobCancelled):
                log.warning("%s; verified segments are kept", error)
                return True
            if isinstance(error, STOPS):
                record_stop(self.lease, error)
            elif self.sigterm:  # a library turned the signal into its own error
                record_stop(self.lease, TerminationSignal(signal.SIGTERM))
            else:
                record_failure(self.lease, error)
            return False
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)


# Ends that are not the job's own failure. Prefect's runtime ends a run by raising its
# ``CancelledError`` (an ``asyncio.CancelledError``) in the flow's thread: when the run's
# deployment concurrency lease cannot be renewed (410 once the server released it, as a
# zombie-run automation does), or at a flow timeout.
STOPS = (TerminationSignal, KeyboardInterrupt, LeaseHeld, asyncio.CancelledError)
PREFECT_ENDED = "Prefect ending its run"
# Runs Prefect may end since the job last failed before the next end fails it: a lease that
# can never be renewed (lease storage lost, a server restarting in a loop) must not requeue
# the job for ever, and a failed job is bounded by its attempts (`emo resume`, the nightly).
PREFECT_ENDS_LIMIT = 3


def record_stop(lease: JobLease, stop: BaseException) -> None:
    """The render was told to stop (SIGTERM: a cancel from Prefect, a drain, an eviction, a
    spot reclaim; Ctrl-C), lost its lease (it could not renew it while the database was
    unreachable), or Prefect ended the run. A cancel makes the job cancelled; anything else
    requeues it with its attempt given back, since its own work did not fail. Nothing happens
    to a job that is not running (a stop before it started)."""
    prefect_ended = isinstance(stop, asyncio.CancelledError)
    cancel = isinstance(stop, TerminationSignal) or prefect_ended
    cancel = cancel and cancel_requested()
    if isinstance(stop, LeaseHeld):
        what = f"losing its lease ({stop})"
    elif prefect_ended:
        what = f"{PREFECT_ENDED} (CancelledError: a lost concurrency lease or a timeout)"
        if not cancel and _prefect_ends(lease) + 1 >= PREFECT_ENDS_LIMIT:
            record_failure(
                lease,
                JobStateError(
                    f"Prefect ended this job's render run {PREFECT_ENDS_LIMIT} times since it "
                    "last failed (CancelledError: its deployment concurrency lease could not be "
                    "renewed, or a flow timeout); check the Prefect server, then `emo resume JOB`"
                ),
            )
            return
    elif isinstance(stop, TerminationSignal):
        what = "SIGTERM"
    else:
        what = "an interrupt (Ctrl-C)"
    to = JobStatus.CANCELLED if cancel else JobStatus.QUEUED
    reason = (
        "cancelled in Prefect; verified segments are kept"
        if cancel
        else f"stopped by {what} before finishing; requeued (the attempt is given back)"
    )
    change = partial(
        stop_job, job_id=lease.job_id, epoch=lease.epoch, to=to, actor=lease.owner, reason=reason
    )
    if _record_end(lease, "the stop", change):
        log.warning("job %s: %s", lease.job_id, reason)


def _prefect_ends(lease: JobLease) -> int:
    """Runs of this job that Prefect ended (requeued) since it last failed."""
    count = 0
    with lease.svc.sessions() as session:
        for event in job_events(session=session, job_id=lease.job_id):
            if event.kind != "job.status":
                continue
            if event.to_status == JobStatus.FAILED.value:
                count = 0
            elif (event.reason or "").startswith(f"stopped by {PREFECT_ENDED}"):
                count += 1
    return count


def cancel_requested() -> bool:
    """Whether the SIGTERM is Prefect cancelling this run (the UI's Cancel, on the run or on
    its batch), rather than the machine going away: the runner says so directly (a process
    worker), otherwise the run's state does (CANCELLING, set before a worker kills the pod)."""
    from prefect._internal import control_listener
    from prefect.client.orchestration import get_client

    if control_listener.get_intent() == "cancel":
        return True
    if flow_run.id is None:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
    except Exception:  # noqa: BLE001 (Prefect unreachable: not a cancel we can see)
        return False
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


def record_failure(lease: JobLease, error: BaseException) -> None:
    """Record the failure with its reason, fenced by this render's epoch."""
    reason = (str(error) or type(error).__name__)[:2000]
    change = partial(
        fail_job, job_id=lease.job_id, epoch=lease.epoch, actor=lease.owner, reason=reason
    )
    _record_end(lease, "its failure", change)


def _record_end(lease: JobLease, what: str, change: Callable[..., object]) -> bool:
    """Apply ``change(session=...)``, fenced by the render's epoch; False if it was not
    recorded (or the change said it had nothing to do, as a stop of a job no longer running
    does): a render that lost its lease leaves the job's state to the render that holds it,
    and a job left running while the database is unreachable is found by the sweep."""
    job_id = lease.job_id
    try:
        with lease.svc.sessions() as session:
            return change(session=session) is not False
    except EpochSuperseded:
        log.error("job %s: lease lost; leaving its state to the render that holds it", job_id)
    except Exception as failure:  # noqa: BLE001 (unreachable: the sweep finds the job later)
        log.error("job %s: cannot record %s (%s); the sweep will find it", job_id, what, failure)
    return False
