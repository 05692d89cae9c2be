"""nightly: inbox manifests processed exactly once; failed jobs retried. CLI status/cancel."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from sqlalchemy import select

from db.engine import make_engine, session_factory
from db.events import job_events
from db.jobs import transition_job
from db.leases import acquire_lease, current_lease
from db.models import Batch, Job, JobStatus, Lease
from flows.context import services
from flows.nightly import nightly
from flows.submit_batch import submit_batch
from tests.conftest import run_emo
from tests.flows.conftest import Studio, environment, manifest


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


def test_deployment_dispatch_keys_follow_attempts(studio: Studio, tmp_path: Path) -> None:
    """The run key of a running job is the one it was dispatched with (a retried submit-batch
    gets the same run back); a crashed job gets a new attempt and key, until none are left."""
    from flows.submit_batch import _dispatch_key

    result = submit_batch(
        manifest=str(manifest(tmp_path / "keys.yaml", studio, ["solo"], steps=2)), render=False
    )
    job_id = result["jobs"]["solo"]
    svc = services()
    url = studio.env["EMO_DATABASE_URL"]
    with session_factory(make_engine(url))() as session:
        pin = session.get(Job, job_id).weights_sha256[:12]  # the job's bundle names its runs
    assert _dispatch_key(svc, job_id) == f"{job_id}:{pin}:attempt-1"
    with session_factory(make_engine(url))() as session:
        transition_job(session=session, job_id=job_id, to=JobStatus.RUNNING, actor="test")
        acquire_lease(session=session, job_id=job_id, owner="gpu-pod-1:1", ttl_seconds=3600)
    assert _dispatch_key(svc, job_id) == f"{job_id}:{pin}:attempt-1"  # rendering: the same run

    def crash(max_attempts: int) -> None:
        with session_factory(make_engine(url))() as session:
            session.get(Lease, job_id).expires_at = datetime.now(UTC) - timedelta(minutes=5)
            session.get(Job, job_id).max_attempts = max_attempts
            session.commit()

    crash(max_attempts=3)
    assert _dispatch_key(svc, job_id) == f"{job_id}:{pin}:attempt-2"
    with session_factory(make_engine(url))() as session:
        assert session.get(Job, job_id).status is JobStatus.QUEUED
        assert session.get(Lease, job_id) is None  # the crashed holder's lease was revoked
        transition_job(session=session, job_id=job_id, to=JobStatus.RUNNING, actor="test")
        acquire_lease(session=session, job_id=job_id, owner="gpu-pod-2:1", ttl_seconds=3600)
    crash(max_attempts=2)
    assert _dispatch_key(svc, job_id) is None  # attempts used up
    with session_factory(make_engine(url))() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.FAILED and job.error.startswith("crashed")


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
    assert unknown.returncode == 1 and "no single job" in unknown.stderr
