"""Fair sharing of the GPUs: the order, admission of held jobs, and who gets a freed slot.

On PostgreSQL and SQLite (the ``session`` fixture), with real batches, jobs and leases.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from db.batches import BatchShare, JobSpec, register_batch, set_share
from db.fair_share import Claim, Share, admit_jobs, fair_picks, mark_rendered
from db.gpu_slots import release_gpu_slot, take_gpu_slot, yield_gpu_slot
from db.jobs import transition_job
from db.leases import acquire_lease
from db.models import Event, Job, JobStatus, Lease, utcnow

T0 = datetime(2026, 12, 7, 12, tzinfo=UTC)


def _claims(batch: str, count: int, share: Share, start: int = 0) -> list[Claim]:
    return [
        Claim(f"{batch}{i}", batch, share, 0, T0 + timedelta(seconds=start + i))
        for i in range(count)
    ]


def test_equal_batches_alternate_and_a_new_batch_is_served_next() -> None:
    big = _claims("a", 12, Share())
    late = _claims("b", 3, Share(), start=100)
    # Batch a holds three units already: b, holding none, gets the next one, then they alternate.
    assert fair_picks(big + late, {"a": 3}, 5) == ["b0", "b1", "b2", "a0", "a1"]
    assert fair_picks(big + late, {"a": 1, "b": 1}, 4) == ["a0", "b0", "a1", "b1"]


def test_weights_split_the_slots_in_proportion() -> None:
    third = _claims("client", 20, Share(weight=1.0))
    rest = _claims("others", 20, Share(weight=2.0))
    picks = fair_picks(third + rest, {}, 9)
    assert sum(p.startswith("client") for p in picks) == 3  # a third of the farm
    assert sum(p.startswith("others") for p in picks) == 6


def test_priority_comes_first_and_max_concurrent_caps_a_batch() -> None:
    normal = _claims("n", 5, Share())
    rush = _claims("r", 5, Share(priority=10, max_concurrent=2), start=50)
    assert fair_picks(normal + rush, {}, 4) == ["r0", "r1", "n0", "n1"]
    assert fair_picks(normal + rush, {"r": 2}, 2) == ["n0", "n1"]  # r is at its cap
    assert fair_picks(rush, {"r": 2}, 3) == []  # nothing else: the cap still holds


def test_within_a_batch_job_priority_then_age() -> None:
    share = Share()
    claims = [
        Claim("old", "a", share, 0, T0),
        Claim("urgent", "a", share, 5, T0 + timedelta(hours=1)),
        Claim("new", "a", share, 0, T0 + timedelta(minutes=1)),
    ]
    assert fair_picks(claims, {}, 3) == ["urgent", "old", "new"]


def _batch(session, name: str, count: int, share: BatchShare | None = None) -> list[str]:
    specs = [JobSpec(name=f"{name}{i}", image_uri="i.png", audio_uri="a.wav") for i in range(count)]
    key = name.encode().hex().ljust(64, "0")
    batch, _ = register_batch(
        session=session, name=name, manifest_sha256=key, jobs=specs, actor="t", share=share
    )
    jobs = sorted(batch.jobs, key=lambda job: (job.created_at, job.id))  # the order served
    return [job.id for job in jobs]


def _admitted(session, capacity: int) -> list[str]:
    return [job_id for job_id, _ in admit_jobs(session=session, capacity=capacity, actor="t")]


def test_admission_holds_jobs_back_and_lets_a_later_batch_in_at_the_next_free_place(
    session,
) -> None:
    big = _batch(session, "big", 12)
    first = _admitted(session, capacity=4)
    assert first == big[:4]  # the GPUs' worth plus the look-ahead; eight stay held
    assert _admitted(session, capacity=4) == []  # full
    job = session.get(Job, big[0])
    assert job.dispatch_generation == 1 and job.dispatched_at is not None

    small = _batch(session, "small", 3)
    assert _admitted(session, capacity=4) == []  # no place free yet: nothing jumps the queue
    transition_job(session=session, job_id=big[0], to=JobStatus.RUNNING, actor="t")
    acquire_lease(session=session, job_id=big[0], owner="r:1", ttl_seconds=60)
    epoch = session.get(Job, big[0], populate_existing=True).lease_epoch
    assert mark_rendered(session=session, job_id=big[0], epoch=epoch)
    assert not mark_rendered(session=session, job_id=big[0], epoch=epoch - 1)  # fenced
    assert _admitted(session, capacity=4) == [small[0]]  # its place goes to the batch with none

    # Both have work: places alternate between them as they free up.
    for job_id in big[1:3]:
        transition_job(session=session, job_id=job_id, to=JobStatus.CANCELLED, actor="t")
    assert _admitted(session, capacity=4) == [big[4], small[1]]  # equal: the older batch first
    reasons = {e.reason for e in session.query(Event).filter(Event.kind == "job.dispatched").all()}
    assert reasons == {"its turn (fair share)"}


def test_a_rush_and_a_cap_take_effect_at_the_next_admission(session) -> None:
    slow = _batch(session, "slow", 6)
    capped = _batch(session, "capped", 6, BatchShare(max_concurrent=1))
    assert _admitted(session, capacity=3) == [slow[0], capped[0], slow[1]]
    for job_id in (slow[0], slow[1], capped[0]):
        transition_job(session=session, job_id=job_id, to=JobStatus.CANCELLED, actor="t")
    batch_id = session.get(Job, slow[2]).batch_id
    set_share(session=session, batch_id=batch_id, actor="producer", priority=10)
    assert _admitted(session, capacity=3) == slow[2:5]  # rushed: served before the other
    event = session.query(Event).filter(Event.kind == "batch.share").one()
    assert event.detail == {"before": {"priority": 0}, "after": {"priority": 10}}


def _lease(session, job_id: str, owner: str) -> None:
    transition_job(session=session, job_id=job_id, to=JobStatus.RUNNING, actor=owner)
    assert acquire_lease(session=session, job_id=job_id, owner=owner, ttl_seconds=600)


def _take(session, job_id: str, owner: str, at: datetime) -> bool:
    return take_gpu_slot(
        session=session,
        job_id=job_id,
        owner=owner,
        default_slots=2,
        is_dead=lambda owner: False,
        now=at,
    ).acquired


def test_a_freed_slot_goes_to_the_waiter_fair_sharing_picks(session) -> None:
    a = _batch(session, "a", 3)
    (b,) = _batch(session, "b", 1)
    for n, job_id in enumerate([*a, b]):
        _lease(session, job_id, f"r{n}:1")
    now = utcnow()
    assert _take(session, a[0], "r0:1", now) and _take(session, a[1], "r1:1", now)
    assert not _take(session, a[2], "r2:1", now)  # waits first
    assert not _take(session, b, "r3:1", now + timedelta(seconds=5))  # waits later

    assert release_gpu_slot(session=session, job_id=a[1], owner="r1:1")
    later = now + timedelta(seconds=10)
    # a still holds one slot and b none: the slot is b's, though a's waiter asks first.
    assert not _take(session, a[2], "r2:1", later)
    assert _take(session, b, "r3:1", later)
    assert release_gpu_slot(session=session, job_id=a[0], owner="r0:1")
    assert _take(session, a[2], "r2:1", later)  # one each now


def test_a_waiter_that_lost_its_lease_does_not_hold_a_free_slot_back(session) -> None:
    a = _batch(session, "a", 3)
    (b,) = _batch(session, "b", 1)
    for n, job_id in enumerate(a):
        _lease(session, job_id, f"r{n}:1")
    transition_job(session=session, job_id=b, to=JobStatus.RUNNING, actor="gone")
    long_ago = utcnow() - timedelta(hours=1)
    assert acquire_lease(session=session, job_id=b, owner="gone:1", ttl_seconds=60, now=long_ago)
    assert _take(session, a[0], "r0:1", long_ago) and _take(session, a[1], "r1:1", long_ago)
    assert not _take(session, b, "gone:1", long_ago)  # it waited, then died with its lease
    assert release_gpu_slot(session=session, job_id=a[1], owner="r1:1")
    assert _take(session, a[2], "r2:1", utcnow())  # b's claim lapsed with its lease


def test_a_host_never_holds_more_slots_than_its_gpus(session) -> None:
    jobs = _batch(session, "ws", 3)
    owners = ["ws1:10:a", "ws1:11:b", "ws2:10:c"]
    for job_id, owner in zip(jobs, owners, strict=True):
        _lease(session, job_id, owner)
    now = utcnow()

    def take(n: int):
        return take_gpu_slot(
            session=session,
            job_id=jobs[n],
            owner=owners[n],
            default_slots=3,
            is_dead=lambda owner: False,
            now=now,
            host_slots=1,
        )

    assert take(0).acquired
    refused = take(1)  # ws1's one GPU is busy, though the farm has free slots
    assert not refused.acquired and refused.host_full
    assert session.get(Lease, jobs[1], populate_existing=True).gpu_wanted_at is None
    assert take(2).acquired  # ws1's waiting run holds nothing back on ws2
    assert release_gpu_slot(session=session, job_id=jobs[0], owner=owners[0])
    assert take(1).acquired


def test_a_batch_with_nothing_dispatched_gets_its_first_job_beyond_the_places(session) -> None:
    big = _batch(session, "big", 12)
    assert _admitted(session, capacity=4) == big[:4]
    small = _batch(session, "small", 3)
    tiny = _batch(session, "tiny", 1)

    def admit(room: int) -> list[str]:
        picked = admit_jobs(session=session, capacity=4, actor="t", first_room=room)
        return [job_id for job_id, _ in picked]

    # Full, but small and tiny have nothing dispatched: one job each loads and waits for the
    # next slot, at most ``first_room`` over the places; no batch's second job goes over.
    assert admit(room=1) == [small[0]]
    assert admit(room=1) == []  # one over already
    assert admit(room=2) == [tiny[0]]
    assert admit(room=5) == []  # every batch has a job dispatched


def test_a_batch_whose_jobs_all_hold_slots_gets_its_next_job_beyond_the_places(session) -> None:
    a = _batch(session, "a", 4)
    b = _batch(session, "b", 4)

    def admit(room: int) -> list[str]:
        picked = admit_jobs(session=session, capacity=3, actor="t", first_room=room)
        return [job_id for job_id, _ in picked]

    assert admit(room=2) == [a[0], b[0], a[1]]  # two slots and one look-ahead, in turn
    now = utcnow()
    for n, job_id in enumerate((a[0], b[0])):
        _lease(session, job_id, f"r{n}:1")
        assert _take(session, job_id, f"r{n}:1", now)
    # a has a[1] loading for when a slot frees; b has nothing ready, so when b[0] gives its
    # slot back, a's waiter would take it. b's next job loads beyond the places...
    assert admit(room=0) == []  # (not with no room: Kubernetes' look-ahead 0)
    assert admit(room=2) == [b[1]]
    assert admit(room=2) == []  # ...one per batch: each has a job in the wings now

    # Both loaded and waiting when b[0] gives its slot back: b holds none, so it is b[1]'s,
    # though a[1] asked first; then b's next job loads again.
    for n, job_id in ((2, a[1]), (3, b[1])):
        _lease(session, job_id, f"r{n}:1")
    assert not _take(session, a[1], "r2:1", now)
    assert not _take(session, b[1], "r3:1", now + timedelta(seconds=1))
    assert release_gpu_slot(session=session, job_id=b[0], owner="r1:1")
    transition_job(session=session, job_id=b[0], to=JobStatus.SUCCEEDED, actor="t")
    later = now + timedelta(seconds=2)
    assert not _take(session, a[1], "r2:1", later)
    assert _take(session, b[1], "r3:1", later)
    assert admit(room=2) == [b[2]]


def _give_way(session, job_id: str, owner: str, at: datetime) -> str | None:
    given = yield_gpu_slot(
        session=session, job_id=job_id, owner=owner, is_dead=lambda owner: False, now=at
    )
    return None if given is None else given.job_id


def test_between_segments_a_batch_gives_a_slot_to_a_batch_owed_one_and_no_more(session) -> None:
    a = _batch(session, "a", 3)
    (b,) = _batch(session, "b", 1)
    owners = {job_id: f"r{n}:1" for n, job_id in enumerate([*a, b])}
    for job_id, owner in owners.items():
        _lease(session, job_id, owner)
    now = utcnow()
    assert _take(session, a[0], owners[a[0]], now) and _take(session, a[1], owners[a[1]], now)
    assert not _take(session, a[2], owners[a[2]], now)  # a's own waiter
    # No other batch waits: a's holders keep their slots (a batch never yields to itself).
    assert _give_way(session, a[0], owners[a[0]], now) is None

    assert not _take(session, b, owners[b], now)  # b loaded a job: it holds no slot
    # a holds both: the first of its renders to reach a segment boundary gives b one...
    assert _give_way(session, a[0], owners[a[0]], now) == b
    lease = session.get(Lease, a[0], populate_existing=True)
    assert lease.gpu_since is None and lease.gpu_wanted_at is not None  # it waits again
    event = session.query(Event).filter(Event.kind == "gpu.released").one()
    assert event.job_id == a[0] and "gave way to b/b0" in event.reason
    later = now + timedelta(seconds=2)
    assert not _take(session, a[0], owners[a[0]], later)  # ...which goes to b, not back
    assert not _take(session, a[2], owners[a[2]], later)
    assert _take(session, b, owners[b], later)
    # One slot each: nothing moves again, either way.
    assert _give_way(session, a[1], owners[a[1]], later) is None
    assert _give_way(session, b, owners[b], later) is None
    # A third batch is owed a slot no more than a and b hold one each: it waits for a job's
    # end, not a segment's (slots would move at every segment otherwise).
    (c,) = _batch(session, "c", 1)
    _lease(session, c, "r9:1")
    assert not _take(session, c, "r9:1", later)
    assert _give_way(session, a[1], owners[a[1]], later) is None
    assert _give_way(session, b, owners[b], later) is None


def test_a_rush_batch_takes_a_slot_at_the_next_segment_boundary(session) -> None:
    a = _batch(session, "a", 2)
    rush = _batch(session, "rush", 2, share=BatchShare(priority=10))
    owners = {job_id: f"r{n}:1" for n, job_id in enumerate([*a, *rush])}
    for job_id, owner in owners.items():
        _lease(session, job_id, owner)
    now = utcnow()
    assert _take(session, rush[0], owners[rush[0]], now)
    assert _take(session, a[0], owners[a[0]], now)
    assert not _take(session, rush[1], owners[rush[1]], now)
    # The rush batch holds one slot already; priority comes before the share, so a's render
    # gives way to its second job, and the rush batch's renders never give way to a.
    assert _give_way(session, rush[0], owners[rush[0]], now) is None
    assert _give_way(session, a[0], owners[a[0]], now) == rush[1]


def test_a_render_that_gave_way_is_first_of_its_batch_to_get_a_slot_again(session) -> None:
    a = _batch(session, "a", 2)
    (b,) = _batch(session, "b", 1)
    (rush,) = _batch(session, "rush", 1, share=BatchShare(priority=10))
    owners = {job_id: f"r{n}:1" for n, job_id in enumerate([*a, b, rush])}
    for job_id, owner in owners.items():
        _lease(session, job_id, owner)
    now = utcnow()
    assert _take(session, a[0], owners[a[0]], now) and _take(session, b, owners[b], now)
    assert not _take(session, a[1], owners[a[1]], now + timedelta(seconds=1))
    assert not _take(session, rush, owners[rush], now + timedelta(seconds=2))
    assert _give_way(session, a[0], owners[a[0]], now + timedelta(seconds=3)) == rush
    assert _take(session, rush, owners[rush], now + timedelta(seconds=4))
    assert release_gpu_slot(session=session, job_id=rush, owner=owners[rush])
    # a[1] asked before a[0] gave way, but a[0] waits as from when it took its slot: the
    # half-rendered job goes on first.
    later = now + timedelta(seconds=5)
    assert not _take(session, a[1], owners[a[1]], later)
    assert _take(session, a[0], owners[a[0]], later)


def test_with_host_caps_a_render_gives_way_only_to_a_waiter_of_its_own_host(session) -> None:
    """Each workstation has one GPU (EMO_HOST_GPU_SLOTS=1) and the farm two slots. Batch a
    renders on both; b's job loads on ws1, whose GPU is busy. b stays a waiter (ws1's render
    owes it the GPU), ws1's render gives way to it, and ws2's does not (b cannot use ws2's
    GPU from ws1)."""
    a = _batch(session, "a", 2)
    (b,) = _batch(session, "b", 1)
    owners = {a[0]: "ws1:10:x", a[1]: "ws2:10:y", b: "ws1:11:z"}
    for job_id, owner in owners.items():
        _lease(session, job_id, owner)
    now = utcnow()

    def take(job_id: str, seconds: int):
        return take_gpu_slot(
            session=session,
            job_id=job_id,
            owner=owners[job_id],
            default_slots=2,
            is_dead=lambda owner: False,
            now=now + timedelta(seconds=seconds),
            host_slots=1,
        )

    def give_way(job_id: str, seconds: int) -> str | None:
        given = yield_gpu_slot(
            session=session,
            job_id=job_id,
            owner=owners[job_id],
            is_dead=lambda owner: False,
            now=now + timedelta(seconds=seconds),
            host_slots=1,
        )
        return None if given is None else given.job_id

    assert take(a[0], 0).acquired and take(a[1], 0).acquired
    refused = take(b, 1)
    assert refused.host_full and not refused.acquired
    assert session.get(Lease, b, populate_existing=True).gpu_wanted_at is not None
    assert give_way(a[1], 2) is None  # ws2's GPU is no use to a render on ws1
    assert give_way(a[0], 3) == b
    assert take(b, 4).acquired
    assert not take(a[0], 5).acquired  # ws1's GPU is b's now; a[0] waits for it
