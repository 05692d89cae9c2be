"""Leases and claims under contention, on the real PostgreSQL (and SQLite)."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, select

from db.batches import JobSpec, register_batch
from db.engine import make_engine, session_factory
from db.jobs import claim_next_job
from db.leases import acquire_lease, release_lease, renew_lease
from db.models import Event, JobStatus, Lease, utcnow
from emo.errors import JobStateError
from tests.services import claim_until_empty


def _register(session, count: int, priorities=None) -> list[str]:
    specs = [
        JobSpec(
            name=f"j{i:04d}",
            image_uri="i.png",
            audio_uri="a.wav",
            priority=(priorities[i] if priorities else 0),
        )
        for i in range(count)
    ]
    batch, _ = register_batch(
        session=session, name="load", manifest_sha256=f"{count:064d}", jobs=specs, actor="tester"
    )
    return [job.id for job in batch.jobs]


def _race(url: str, workers: int) -> list[tuple[float, list[str]]]:
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(target=claim_until_empty, args=(url, f"worker-{n}", start, results))
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcomes


@pytest.mark.slow  # eight worker processes racing
def test_eight_workers_claim_200_jobs_exactly_once_on_postgresql(pg_url: str) -> None:
    engine = make_engine(pg_url)
    with session_factory(engine)() as session:
        job_ids = _register(session, 200)
    outcomes = _race(pg_url, workers=8)
    assert sum(1 for _, got in outcomes if got) > 1, "no real contention happened"
    claimed = [job for _, got in outcomes for job in got]
    duplicates = [job for job, n in Counter(claimed).items() if n > 1]
    assert duplicates == []
    assert sorted(claimed) == sorted(job_ids)
    with session_factory(engine)() as session:
        running = session.scalar(
            select(func.count()).where(
                Event.kind == "job.status", Event.to_status == JobStatus.RUNNING.value
            )
        )
        leases = session.scalar(select(func.count()).select_from(Lease))
    assert running == 200 and leases == 200
    engine.dispose()


@pytest.mark.slow  # four worker processes racing
def test_four_workers_claim_exactly_once_on_sqlite(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with session_factory(engine)() as session:
        job_ids = _register(session, 40)
    engine.dispose()
    claimed = [job for _, got in _race(sqlite_url, workers=4) for job in got]
    assert sorted(claimed) == sorted(job_ids)


def test_claim_order_is_priority_then_age(session) -> None:
    ids = _register(session, 4, priorities=[0, 5, 5, 1])
    order = [claim_next_job(session=session, worker="w", lease_seconds=60).id for _ in ids]
    assert order == [ids[1], ids[2], ids[3], ids[0]]
    assert claim_next_job(session=session, worker="w", lease_seconds=60) is None


def test_lease_acquire_renew_release_and_takeover(session) -> None:
    job_id = _register(session, 1)[0]
    now = utcnow()

    def acquire(owner: str, after: float):
        return acquire_lease(
            session=session,
            job_id=job_id,
            owner=owner,
            ttl_seconds=60,
            now=now + timedelta(seconds=after),
        )

    assert acquire("a", 0) is not None
    # Held and live: another owner is refused, the holder may renew.
    assert acquire("b", 30) is None
    lease = renew_lease(
        session=session, job_id=job_id, owner="a", ttl_seconds=60, now=now + timedelta(seconds=40)
    )
    assert lease.expires_at == now + timedelta(seconds=100)
    assert acquire("b", 90) is None
    # Expired: taken over; the old owner's heartbeat now fails loudly.
    taken = acquire("b", 101)
    assert taken is not None and taken.owner == "b"
    with pytest.raises(JobStateError, match="lease of job .* is lost"):
        renew_lease(session=session, job_id=job_id, owner="a", ttl_seconds=60)
    assert release_lease(session=session, job_id=job_id, owner="a") is False
    assert release_lease(session=session, job_id=job_id, owner="b") is True
    kinds = list(
        session.scalars(
            select(Event.kind)
            .where(Event.job_id == job_id, Event.kind.like("lease.%"))
            .order_by(Event.id)
        )
    )
    assert kinds == ["lease.acquired", "lease.renewed", "lease.taken_over", "lease.released"]


def test_claim_skips_jobs_with_a_live_lease_and_takes_expired_ones(session) -> None:
    first, second = _register(session, 2)
    acquire_lease(session=session, job_id=first, owner="render-pod", ttl_seconds=600)
    job = claim_next_job(session=session, worker="w", lease_seconds=60)
    assert job.id == second
    assert claim_next_job(session=session, worker="w", lease_seconds=60) is None
    session.execute(Lease.__table__.update().values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    job = claim_next_job(session=session, worker="w2", lease_seconds=60)
    assert job.id == first
    assert session.get(Lease, first).owner == "w2"


def test_an_expired_lease_is_never_renewed_and_a_swept_one_is_revoked(session) -> None:
    """A holder paused past its lease (a stopped VM, a database outage) must not come back:
    its late heartbeat is refused, and once the sweep has marked the job crashed, the paused
    holder's writes are refused too (its epoch is superseded)."""
    from db.jobs import fail_crashed_job, transition_job
    from db.leases import current_lease
    from db.segments import record_segment_done, store_plan
    from emo.errors import EpochSuperseded
    from emo.plan import plan_segments

    job_id = _register(session, 1)[0]
    plan = plan_segments(
        np.ones(16000, np.float32), sample_rate=16000, fps=25, clip_frames=12, segment_seconds=1
    )
    store_plan(session=session, job_id=job_id, plan=plan, actor="t")
    transition_job(session=session, job_id=job_id, to=JobStatus.RUNNING, actor="paused")
    now = utcnow()
    epoch = acquire_lease(
        session=session, job_id=job_id, owner="paused", ttl_seconds=60, now=now
    ).epoch
    late = now + timedelta(seconds=61)
    with pytest.raises(JobStateError, match="expired at .* before this heartbeat"):
        renew_lease(session=session, job_id=job_id, owner="paused", ttl_seconds=60, now=late)

    assert fail_crashed_job(session=session, job_id=job_id, actor="sweep", now=late)
    assert current_lease(session=session, job_id=job_id) is None
    with pytest.raises(JobStateError, match="held by nobody"):
        renew_lease(session=session, job_id=job_id, owner="paused", ttl_seconds=60)
    with pytest.raises(EpochSuperseded):
        record_segment_done(
            session=session,
            job_id=job_id,
            index=0,
            checkpoint_uri="s3://b/x/manifest.json",
            manifest_sha256="x" * 64,
            render_seconds=1.0,
            actor="paused",
            epoch=epoch,
        )
