"""Retry in place: a render rides out a database restart or a store outage instead of failing.

A render's writes and reads of the job database and the object store are retried, with
backoff, for as long as the render still holds its job (``JobLease.check``: the lease has not
lapsed and the job was not cancelled) and at most ``EMO_TRANSIENT_RETRY_SECONDS``. Only errors
that say the service did not answer are retried; a refused write (a superseded epoch), a
missing object or a bad input fails at once. Everything retried is idempotent: a checkpoint
attempt has a name of its own, and recording a segment or finishing a job twice is refused
or harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from emo.errors import StoreUnavailable
from flows.context import JobLease

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT: tuple[type[BaseException], ...] = (StoreUnavailable, OperationalError, InterfaceError)
FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 10.0


def in_place(call: Callable[[], T], *, lease: JobLease, what: str) -> T:
    """``call()``, retried while the database or the store is unreachable (see the module)."""
    limit = lease.svc.settings.transient_retry_seconds
    started = time.monotonic()
    delay = FIRST_DELAY_SECONDS
    while True:
        try:
            return call()
        except TRANSIENT as error:
            lease.check()  # stops (LeaseHeld, JobCancelled) once the job is no longer ours
            waited = time.monotonic() - started
            if waited + delay > limit:
                raise
            log.warning(
                "%s failed (%s); retrying in %.1f s (%.0f s so far, the lease holds)",
                what,
                _first_line(error),
                delay,
                waited,
            )
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_SECONDS)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
