"""GPU slots counted in the job database, on PostgreSQL and SQLite."""

from __future__ import annotations

import multiprocessing
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from db.batches import JobSpec, register_batch
from db.engine import make_engine, session_factory
from db.gpu_slots import (
    gpu_limit,
    gpu_slot_holders,
    release_gpu_slot,
    set_gpu_limit,
    take_gpu_slot,
)
from db.leases import acquire_lease
from db.models import Event, Lease, utcnow
from emo.errors import JobStateError


def alive(owner: str) -> bool:
    return False  # no holder is known dead


def _jobs(session, count: int) -> list[str]:
    specs = [JobSpec(name=f"j{i}", image_uri="i.png", audio_uri="a.wav") for i in range(count)]
    batch, _ = register_batch(
        session=session, name="gpu", manifest_sha256=f"{count:064x}", jobs=specs, actor="tester"
    )
    return [job.id for job in batch.jobs]


def _lease(session, job_id: str, owner: str, at, ttl: float = 60) -> None:
    assert acquire_lease(session=session, job_id=job_id, owner=owner, ttl_seconds=ttl, now=at)


def _take(session, job_id: str, owner: str, at, is_dead=alive, slots: int = 1):
    return take_gpu_slot(
        session=session,
        job_id=job_id,
        owner=owner,
        default_slots=slots,
        is_dead=is_dead,
        now=at,
    )


def test_slots_are_granted_up_to_the_limit_and_freed_on_release(session) -> None:
    jobs, now = _jobs(session, 3), utcnow()
    for n, job_id in enumerate(jobs):
        _lease(session, job_id, f"farm-{n}:1:x", now)
    assert gpu_limit(session=session) is None

    first = _take(session, jobs[0], "farm-0:1:x", now, slots=2)
    assert first.acquired and first.slots == 2 and len(first.holders) == 1
    assert _take(session, jobs[1], "farm-1:1:x", now, slots=2).acquired
    waiting = _take(session, jobs[2], "farm-2:1:x", now, slots=2)
    assert not waiting.acquired
    assert sorted(h.title for h in waiting.holders) == ["gpu/j0", "gpu/j1"]
    assert gpu_limit(session=session) == 2  # created by the first render, then left alone
    assert _take(session, jobs[0], "farm-0:1:x", now, slots=5).acquired  # asking again keeps it
    assert gpu_limit(session=session) == 2

    assert release_gpu_slot(session=session, job_id=jobs[0], owner="farm-0:1:x")
    assert not release_gpu_slot(session=session, job_id=jobs[0], owner="farm-0:1:x")
    assert _take(session, jobs[2], "farm-2:1:x", now).acquired
    holders = gpu_slot_holders(session=session, now=now)
    assert sorted(h.job_id for h in holders) == sorted([jobs[1], jobs[2]])

    assert set_gpu_limit(session=session, slots=3, actor="ops") == 2
    assert _take(session, jobs[0], "farm-0:1:x", now).acquired


def test_expired_dead_and_displaced_holders_free_their_slots(session) -> None:
    jobs, start = _jobs(session, 3), utcnow()
    _lease(session, jobs[0], "farm-0:1:x", start, ttl=60)
    _lease(session, jobs[1], "farm-1:1:x", start, ttl=3600)
    assert _take(session, jobs[0], "farm-0:1:x", start).acquired
    assert not _take(session, jobs[1], "farm-1:1:x", start + timedelta(seconds=59)).acquired

    # Expired: the holder's lease lapsed (its host is gone), so its slot is free.
    later = start + timedelta(seconds=61)
    assert _take(session, jobs[1], "farm-1:1:x", later).acquired

    # Dead: a holder known to have exited frees its slot before its lease expires.
    _lease(session, jobs[2], "farm-2:1:x", later, ttl=3600)
    assert not _take(session, jobs[2], "farm-2:1:x", later).acquired
    dead = _take(session, jobs[2], "farm-2:1:x", later, is_dead=lambda o: o == "farm-1:1:x")
    assert dead.acquired

    # Displaced: taking a job's lease over takes none of the old holder's slot with it.
    taken = acquire_lease(
        session=session,
        job_id=jobs[2],
        owner="farm-3:1:x",
        ttl_seconds=60,
        now=later,
        stale_owner="farm-2:1:x",
    )
    assert taken is not None and taken.gpu_since is None
    assert gpu_slot_holders(session=session, now=later) == []

    query = select(Event.reason).where(Event.kind == "gpu.reclaimed").order_by(Event.id)
    reasons = list(session.scalars(query))
    assert len(reasons) == 2
    assert "expired" in reasons[0] and "no longer running" in reasons[1]


def test_only_the_lease_holder_may_take_a_slot(session) -> None:
    job_id, now = _jobs(session, 1)[0], utcnow()
    with pytest.raises(JobStateError, match="lease of job .* is lost"):
        _take(session, job_id, "nobody:1:x", now)
    _lease(session, job_id, "farm-0:1:x", now)
    with pytest.raises(JobStateError, match="lease of job .* is lost"):
        _take(session, job_id, "farm-9:1:x", now)


def _race_for_a_slot(url: str, job_id: str, owner: str, start, results) -> None:
    """Worker process body: take the job's lease, then ask for a slot when all are ready."""
    sessions = session_factory(make_engine(url))
    with sessions() as session:
        _lease(session, job_id, owner, utcnow(), ttl=600)
    start.wait()
    with sessions() as session:
        results.put(_take(session, job_id, owner, utcnow(), slots=2).acquired)


@pytest.mark.slow  # processes racing for slots
def test_racing_renders_never_exceed_the_limit_on_postgresql(pg_url: str) -> None:
    with session_factory(make_engine(pg_url))() as session:
        jobs = _jobs(session, 6)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(len(jobs)), context.Queue()
    processes = [
        context.Process(target=_race_for_a_slot, args=(pg_url, job, f"w{n}:1:x", start, results))
        for n, job in enumerate(jobs)
    ]
    for process in processes:
        process.start()
    granted = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert sorted(granted) == [False] * 4 + [True] * 2


def test_a_holder_renewing_while_judged_keeps_its_slot_on_postgresql(pg_url: str) -> None:
    """A heartbeat that commits while a waiter judges its lease expired wins: the waiter
    waits for it, sees the renewed lease, and gets no slot (the limit is 1)."""
    sessions = session_factory(make_engine(pg_url))
    start = utcnow()
    with sessions() as session:
        jobs = _jobs(session, 2)
        _lease(session, jobs[0], "farm-0:1:x", start, ttl=60)
        assert _take(session, jobs[0], "farm-0:1:x", start).acquired
        _lease(session, jobs[1], "farm-1:1:x", start, ttl=3600)
    late = start + timedelta(seconds=61)  # the holder's lease has just expired

    heartbeat = sessions()  # the holder's renewal, caught between its lock and its commit
    lease = heartbeat.scalar(select(Lease).where(Lease.job_id == jobs[0]).with_for_update())
    outcome = {}

    def waiter() -> None:
        with sessions() as session:
            outcome["count"] = _take(session, jobs[1], "farm-1:1:x", late)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), "the waiter judged the holder without waiting for its heartbeat"
    lease.expires_at = late + timedelta(seconds=60)
    heartbeat.commit()
    heartbeat.close()
    thread.join(timeout=30)
    assert not outcome["count"].acquired
    with sessions() as session:
        assert [h.job_id for h in gpu_slot_holders(session=session, now=late)] == [jobs[0]]
