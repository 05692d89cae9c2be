"""Waiting for a GPU slot is visible and bounded; slots of dead holders are reclaimed.

The holders here are leases written into the real job database (PostgreSQL) by the test, as a
render on another workstation ("farm-7") or a killed one on this host would leave them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from db.engine import make_engine, session_factory
from db.gpu_slots import gpu_slot_holders, release_gpu_slot
from db.leases import renew_lease
from db.models import Event, Job, JobStatus, utcnow
from emo.cli import app
from flows.context import lease_owner
from flows.render_track import render_track
from flows.submit_batch import submit_batch
from tests.conftest import write_wav
from tests.flows.conftest import Studio, clear_caches, hold_gpu_slot, manifest, speech

pytestmark = pytest.mark.slow  # renders waiting for GPU slots

FARM_OWNER = "farm-7:4242:0a1b2c3d"  # a render on another host: never presumed dead


def _jobs(studio: Studio, tmp_path: Path, names: list[str]) -> dict[str, str]:
    path = manifest(tmp_path / "slots.yaml", studio, names, steps=2)
    return submit_batch(manifest=str(path), render=False)["jobs"]


def _sessions(studio: Studio):
    return session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))


@pytest.fixture
def held(studio: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Jobs "holder" and "waiter": the holder (on another host) has the only GPU slot, and
    renders give up after 6 s without progress (the least the studio's 6 s leases allow)."""
    jobs = _jobs(studio, tmp_path, ["holder", "waiter"])
    hold_gpu_slot(studio, jobs["holder"], FARM_OWNER)
    monkeypatch.setenv("EMO_SLOT_WAIT_SECONDS", "6")
    clear_caches()
    return jobs


def test_a_waiting_render_names_the_holders_and_gives_up(
    studio: Studio, held: dict[str, str]
) -> None:
    jobs = held
    started = time.monotonic()
    result = CliRunner().invoke(app, ["resume", jobs["waiter"]])
    waited = time.monotonic() - started
    message = f"waiting for a GPU slot (1 of 1 in use: jobs slots/holder ({jobs['holder'][:8]}))"
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "gave up after 6 s without progress (EMO_SLOT_WAIT_SECONDS)" in result.output
    assert 6 <= waited < 30
    with _sessions(studio)() as session:
        job = session.get(Job, jobs["waiter"])
        assert job.status is JobStatus.FAILED and message in job.error
        # The holder still holds its slot; the waiter left nothing behind.
        assert [h.job_id for h in gpu_slot_holders(session=session)] == [jobs["holder"]]


def test_a_holder_that_progresses_keeps_a_render_waiting_until_it_frees_the_slot(
    studio: Studio, held: dict[str, str]
) -> None:
    jobs = held
    busy_seconds = 14.0  # well past the waiter's 6 s: only the holder's progress keeps it

    def holder_renders_then_finishes() -> None:
        with _sessions(studio)() as session:
            deadline = time.monotonic() + busy_seconds
            while time.monotonic() < deadline:
                renew_lease(
                    session=session,
                    job_id=jobs["holder"],
                    owner=FARM_OWNER,
                    ttl_seconds=3600,
                    progress_at=utcnow(),
                )
                time.sleep(1.0)
            release_gpu_slot(session=session, job_id=jobs["holder"], owner=FARM_OWNER)

    holder = threading.Thread(target=holder_renders_then_finishes)
    started = time.monotonic()
    holder.start()
    try:
        outcome = render_track(job_id=jobs["waiter"])
    finally:
        holder.join()
    assert outcome["status"] == "succeeded"
    assert time.monotonic() - started >= busy_seconds


def test_a_dead_holder_on_this_host_frees_its_slot_at_once(studio: Studio, tmp_path: Path) -> None:
    """A killed render of another job (its process gone) blocks no one, though its lease has
    an hour to run."""
    jobs = _jobs(studio, tmp_path, ["killed", "next"])
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host, _, rest = lease_owner().split(":", 2)
    hold_gpu_slot(studio, jobs["killed"], f"{host}:{child.pid}:{rest}")

    started = time.monotonic()
    assert render_track(job_id=jobs["next"])["status"] == "succeeded"
    assert time.monotonic() - started < 60  # far from the hour the dead holder's lease had
    with _sessions(studio)() as session:
        reclaimed = session.scalar(
            select(Event).where(Event.kind == "gpu.reclaimed", Event.job_id == jobs["killed"])
        )
        assert reclaimed is not None and "no longer running" in reclaimed.reason
        assert gpu_slot_holders(session=session) == []


def test_emo_slots_shows_the_holders_and_sets_the_limit(studio: Studio, tmp_path: Path) -> None:
    jobs = _jobs(studio, tmp_path, ["holder"])
    runner = CliRunner()
    assert "not set yet" in runner.invoke(app, ["slots"]).output
    hold_gpu_slot(studio, jobs["holder"], FARM_OWNER)

    shown = runner.invoke(app, ["slots"])
    assert shown.exit_code == 0, shown.output
    assert "GPU slots: 1 of 1 in use" in shown.output
    assert "slots/holder" in shown.output and FARM_OWNER in shown.output

    changed = runner.invoke(app, ["slots", "--set", "3"])
    assert changed.exit_code == 0, changed.output
    assert "GPU limit: 1 -> 3" in changed.output and "1 of 3 in use" in changed.output
    refused = runner.invoke(app, ["slots", "--set", "0"])
    assert refused.exit_code == 2 and "--set" in refused.output


def test_a_render_whose_slot_was_given_away_stops(studio: Studio, tmp_path: Path) -> None:
    """Its lease lapsed (a closed laptop lid, a database outage) and a waiting render took the
    slot: the next heartbeat notices, and the render stops at its next check."""
    from sqlalchemy import update

    from db.models import Lease
    from flows.context import JobLease, LeaseHeld, services
    from flows.gpu_slot import GpuSlot

    jobs = _jobs(studio, tmp_path, ["lidded"])
    svc = services()
    with JobLease(svc, jobs["lidded"]) as lease, GpuSlot(svc, lease, wait_seconds=60):
        lease.check()
        with _sessions(studio)() as session:  # what the waiter's reclaim wrote
            session.execute(update(Lease).values(gpu_since=None))
            session.commit()
        deadline = time.monotonic() + 5 * svc.settings.heartbeat_seconds
        while not lease.lost.is_set():
            assert time.monotonic() < deadline, "the heartbeat did not notice"
            time.sleep(0.2)
        with pytest.raises(LeaseHeld, match="was given to another render"):
            lease.check()


def test_a_render_gives_its_slot_to_another_batch_between_segments(
    studio: Studio, tmp_path: Path
) -> None:
    """Fair sharing at segment boundaries. Batch "slots" holds both GPU slots ("long", rendered
    here, and "mate", on another workstation); a render of batch "other" starts waiting. At
    its next segment boundary "long" gives its slot to it, waits for one again with its model
    and motion state kept, and finishes. The other workstation's renders are leases and slot
    requests written by the test, as such renders make them."""
    from db.gpu_slots import set_gpu_limit, take_gpu_slot
    from db.leases import acquire_lease

    vocal = write_wav(tmp_path / "long.wav", speech(8.0))  # eight segments
    path = manifest(tmp_path / "slots.yaml", studio, ["long", "mate"], steps=2, audio=str(vocal))
    jobs = submit_batch(manifest=str(path), render=False)["jobs"]
    long, mate = jobs["long"], jobs["mate"]
    other_path = manifest(tmp_path / "other.yaml", studio, ["short"], steps=2)
    (short,) = submit_batch(manifest=str(other_path), render=False)["jobs"].values()
    with _sessions(studio)() as session:
        set_gpu_limit(session=session, slots=2, actor="test")
        for job_id, owner in ((mate, "farm-8:4243:0a1b2c3d"), (short, FARM_OWNER)):
            assert acquire_lease(session=session, job_id=job_id, owner=owner, ttl_seconds=600)
        assert take_gpu_slot(
            session=session,
            job_id=mate,
            owner="farm-8:4243:0a1b2c3d",
            default_slots=2,
            is_dead=lambda owner: False,
        ).acquired
    took: list[float] = []

    def other_batch_waits_then_renders() -> None:
        with _sessions(studio)() as session:
            deadline = time.monotonic() + 120
            while len(gpu_slot_holders(session=session)) < 2:  # long took the other slot
                assert time.monotonic() < deadline, "the long render never took its slot"
                time.sleep(0.1)
            while not take_gpu_slot(
                session=session,
                job_id=short,
                owner=FARM_OWNER,
                default_slots=2,
                is_dead=lambda owner: False,
            ).acquired:
                assert time.monotonic() < deadline, "no render gave way"
                renew_lease(session=session, job_id=short, owner=FARM_OWNER, ttl_seconds=600)
                time.sleep(0.2)
            took.append(time.monotonic())
            time.sleep(2.0)  # renders its segments, then its job is done
            release_gpu_slot(session=session, job_id=short, owner=FARM_OWNER)

    other = threading.Thread(target=other_batch_waits_then_renders)
    other.start()
    try:
        outcome = render_track(job_id=long)
    finally:
        other.join()
    assert outcome["status"] == "succeeded" and took
    with _sessions(studio)() as session:
        kinds = [
            (e.job_id, e.kind)
            for e in session.scalars(
                select(Event)
                .where(Event.kind.in_(("gpu.acquired", "gpu.released")))
                .order_by(Event.at, Event.id)
            )
        ]
        gave_way = session.scalar(
            select(Event).where(Event.kind == "gpu.released", Event.job_id == long)
        )
    # long takes the slot, gives it to short at a segment boundary, gets it back when short
    # is done, and releases it after its last segment; mate holds its slot throughout.
    names = {long: "long", short: "short", mate: "mate"}
    assert [(names[job_id], kind) for job_id, kind in kinds] == [
        ("mate", "gpu.acquired"),
        ("long", "gpu.acquired"),
        ("long", "gpu.released"),
        ("short", "gpu.acquired"),
        ("short", "gpu.released"),
        ("long", "gpu.acquired"),
        ("long", "gpu.released"),
    ]
    assert f"gave way to other/short ({short[:8]}) (fair share)" in gave_way.reason


def test_a_slot_taken_during_a_heartbeat_is_not_read_as_lost(
    studio: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render that gave way takes a slot again while its heartbeat is between reading the
    lease (no slot) and judging it: that reading is of the state before the take, not a slot
    given away. The interleaving is forced: the real renewal runs, then the take's effect on
    the render (``gpu_held``) lands before the heartbeat judges."""
    from flows import context
    from flows.context import JobLease, services

    jobs = _jobs(studio, tmp_path, ["retaken"])
    real = context.renew_lease
    with JobLease(services(), jobs["retaken"]) as lease:

        def renew_then_take(**kwargs):
            renewed = real(**kwargs)  # reads the lease as holding no slot...
            lease.gpu_held = True  # ...and meanwhile the render's take() succeeds
            return renewed

        monkeypatch.setattr(context, "renew_lease", renew_then_take)
        assert lease._renew()
        assert not lease.lost.is_set()
        lease.gpu_held = False
