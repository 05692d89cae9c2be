"""nightly: inbox manifests processed exactly once; failed jobs retried. CLI status/cancel."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from db.engine import make_engine, session_factory
from db.events import job_events
from db.jobs import transition_job
from db.leases import acquire_lease, current_lease
from db.models import Batch, Job, JobStatus
from flows.nightly import nightly
from flows.submit_batch import submit_batch
from tests.conftest import run_emo
from tests.flows.conftest import Studio, clear_caches, environment, manifest

pytestmark = pytest.mark.slow  # nightly runs killed as processes


def _inbox_manifest(studio: Studio, name: str) -> bytes:
    jobs = [
        {
            "name": f"{name}-job",
            "image": "portrait.png",
            "audio": "vocal.wav",
            "face_box": [0.2, 0.15, 0.8, 0.85],
            "steps": 2,
        }
    ]
    return yaml.safe_dump({"name": name, "jobs": jobs}).encode()


def test_inbox_manifests_are_processed_once_each(studio: Studio) -> None:
    store = studio.store
    store.put_file("inbox/portrait.png", studio.portrait)  # inputs beside the manifests
    store.put_file("inbox/vocal.wav", studio.vocal)
    store.put_bytes("inbox/monday.yaml", _inbox_manifest(studio, "monday"))
    first = nightly(inbox="inbox/")
    store.put_bytes("inbox/tuesday.yaml", _inbox_manifest(studio, "tuesday"))
    second = nightly(inbox="inbox/")
    third = nightly(inbox="inbox/")

    assert [s["batch"] for s in first["submitted"]] == ["monday"]
    assert [s["batch"] for s in second["submitted"]] == ["tuesday"]
    assert third["submitted"] == [] and third["rejected"] == []
    inbox = [i.key for i in store.list("inbox/")]
    assert inbox == ["inbox/portrait.png", "inbox/vocal.wav"]
    processed = [i.key for i in store.list("processed/")]
    assert len(processed) == 2 and all(
        k.endswith(("monday.yaml", "tuesday.yaml")) for k in processed
    )
    with session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))() as session:
        assert sorted(b.name for b in session.scalars(select(Batch))) == ["monday", "tuesday"]
        assert {j.status for j in session.scalars(select(Job))} == {JobStatus.SUCCEEDED}


def test_an_inbox_manifest_may_read_only_files_beside_it(studio: Studio) -> None:
    """A manifest dropped in the inbox that names a file of the host running nightly (here the
    studio's portrait, by absolute path) is rejected with a note; nothing is registered."""
    store = studio.store
    store.put_file("inbox/vocal.wav", studio.vocal)
    jobs = [{"name": "peek", "image": str(studio.portrait), "audio": "vocal.wav"}]
    store.put_bytes("inbox/peek.yaml", yaml.safe_dump({"name": "peek", "jobs": jobs}).encode())
    report = nightly(inbox="inbox/")
    [rejected] = report["rejected"]
    assert "job 'peek' (row 1): image" in rejected["error"]
    assert "is outside the folders inputs may come from" in rejected["error"]
    [note] = [i.key for i in store.list("rejected/") if i.key.endswith(".error.txt")]
    assert "EMO_INPUT_ROOTS" in store.get_bytes(note).decode()
    with session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))() as session:
        assert list(session.scalars(select(Batch))) == []


def test_nightly_retries_failed_jobs_under_their_limit(studio: Studio, tmp_path: Path) -> None:
    result = submit_batch(
        manifest=str(manifest(tmp_path / "retry.yaml", studio, ["flaky"], steps=2)), render=False
    )
    job_id = result["jobs"]["flaky"]
    url = studio.env["EMO_DATABASE_URL"]
    with session_factory(make_engine(url))() as session:
        transition_job(session=session, job_id=job_id, to=JobStatus.RUNNING, actor="test")
        transition_job(
            session=session,
            job_id=job_id,
            to=JobStatus.FAILED,
            actor="test",
            reason="GPU node preempted",
        )
    report = nightly(inbox="inbox/")
    assert report["retried"] == {job_id: "succeeded"}
    with session_factory(make_engine(url))() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.SUCCEEDED and job.attempt == 2


def test_nightly_resumes_crashed_jobs_and_leaves_live_ones(studio: Studio, tmp_path: Path) -> None:
    """A job still `running` whose holder died (lease expired: its pod or node is gone) is
    marked failed (the crash counts as an attempt) and rendered again; a job whose holder is
    alive (live lease) is left to it."""
    result = submit_batch(
        manifest=str(manifest(tmp_path / "crash.yaml", studio, ["lost", "busy"], steps=2)),
        render=False,
    )
    lost, busy = result["jobs"]["lost"], result["jobs"]["busy"]
    url = studio.env["EMO_DATABASE_URL"]
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with session_factory(make_engine(url))() as session:
        for job_id in (lost, busy):
            transition_job(session=session, job_id=job_id, to=JobStatus.RUNNING, actor="test")
        acquire_lease(
            session=session, job_id=lost, owner="gpu-pod-7:1", ttl_seconds=60, now=an_hour_ago
        )
        acquire_lease(session=session, job_id=busy, owner="gpu-pod-8:1", ttl_seconds=3600)
    report = nightly(inbox="inbox/")
    assert report["crashed"] == [lost] and report["retried"] == {lost: "succeeded"}
    with session_factory(make_engine(url))() as session:
        job = session.get(Job, lost)
        assert job.status is JobStatus.SUCCEEDED and job.attempt == 2
        reasons = [e.reason or "" for e in job_events(session=session, job_id=lost)]
        assert any(
            r.startswith("crashed: the render stopped") and "gpu-pod-7:1" in r for r in reasons
        )
        assert session.get(Job, busy).status is JobStatus.RUNNING
        assert current_lease(session=session, job_id=busy).owner == "gpu-pod-8:1"


def test_cli_status_and_cancel(studio: Studio, tmp_path: Path, prefect_server: str) -> None:
    result = submit_batch(
        manifest=str(manifest(tmp_path / "cli.yaml", studio, ["x", "y"])), render=False
    )
    env = environment(studio, prefect_server)
    listing = run_emo("status", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)[0]["queued"] == 2
    job_id = result["jobs"]["y"]
    cancelled = run_emo("cancel", job_id[:10], env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    shown = json.loads(run_emo("status", job_id, "--json", env=env).stdout)
    assert shown[0]["status"] == "cancelled"
    batch = json.loads(run_emo("status", result["batch_id"][:8], "--json", env=env).stdout)
    assert {row["job"]: row["status"] for row in batch} == {"x": "queued", "y": "cancelled"}
    again = run_emo("cancel", job_id, env=env)
    assert again.returncode == 1 and "cannot go from cancelled" in again.stderr
    unknown = run_emo("status", "nosuchjob", env=env)
    assert unknown.returncode == 2 and "no single job" in unknown.stderr


# Between registering and filing (copied, not yet deleted), and between filing and dispatching.
@pytest.mark.parametrize("point", ["nightly.copied", "nightly.filed"])
def test_a_nightly_killed_anywhere_loses_no_manifest_and_makes_no_second_batch(
    studio: Studio, prefect_server: str, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of a nightly at each step between finding a manifest and rendering its jobs:
    the manifest is in the inbox or filed (never in neither place), and the next nightly
    finishes the work with the same batch."""
    store = studio.store
    store.put_file("inbox/portrait.png", studio.portrait)
    store.put_file("inbox/vocal.wav", studio.vocal)
    store.put_bytes("inbox/friday.yaml", _inbox_manifest(studio, "friday"))
    killed = subprocess.run(
        [sys.executable, "-c", "from flows.nightly import nightly; nightly()"],
        env={**environment(studio, prefect_server), "EMO_FAULT_POINT": point},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    places = [i.key for i in store.list("") if i.key.endswith("friday.yaml")]
    assert places, f"killed at {point}: the manifest is nowhere"
    assert ("inbox/friday.yaml" in places) == (point in ("nightly.registered", "nightly.copied"))

    # The next night: long past the grace the sweep leaves a dispatcher (made 0 here).
    monkeypatch.setenv("EMO_SWEEP_GRACE_SECONDS", "0")
    clear_caches()
    report = nightly(inbox="inbox/")
    assert [s["batch"] for s in report["submitted"]] == (
        ["friday"] if point in ("nightly.registered", "nightly.copied") else []
    )
    filed = [i.key for i in store.list("") if i.key.endswith("friday.yaml")]
    assert len(filed) == 1 and filed[0].startswith("processed/")
    with session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))() as session:
        (batch,) = session.scalars(select(Batch)).all()
        assert [(j.status, j.attempt) for j in batch.jobs] == [(JobStatus.SUCCEEDED, 1)]
