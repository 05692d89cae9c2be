"""Faults a render rides out or reports truthfully: a SIGTERM (a drain, an eviction) requeues
the job with its attempt given back; a cancel from Prefect cancels it for good; database
connections dropped and a store outage longer than the store's own retries are retried in
place. Each fault is made to happen: a real signal, real connections terminated by the
PostgreSQL server, the real S3 server stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from db.engine import make_engine, session_factory
from db.events import job_events
from db.models import Job, JobStatus, Lease, Segment, SegmentStatus
from flows.render_track import render_track
from flows.submit_batch import submit_batch
from flows.sweep import sweep
from tests.flows.conftest import (
    Studio,
    clear_caches,
    environment,
    make_studio,
    manifest,
)
from tests.services import WeedServer

pytestmark = pytest.mark.slow  # service outages during whole renders


def _render_process(studio: Studio, api: str, job_id: str) -> subprocess.Popen:
    """render-track for one job in a process of its own, as a worker starts it."""
    code = f"from flows.render_track import render_track; render_track(job_id={job_id!r})"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=environment(studio, api),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_steps(studio: Studio, job_id: str, process: subprocess.Popen) -> None:
    """Until the render holds the job and has reported a denoising step through its lease."""
    sessions = session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the render never took a step"
        with sessions() as session:
            lease = session.get(Lease, job_id)
            if lease is not None and lease.progress_at is not None and lease.gpu_since:
                return
        time.sleep(0.2)


def _job(studio: Studio, job_id: str) -> tuple[Job, list[str], bool]:
    """The job, the reasons of its status events, and whether a lease row is left."""
    with session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))() as session:
        job = session.get(Job, job_id)
        reasons = [e.reason or "" for e in job_events(session=session, job_id=job_id)]
        leased = session.get(Lease, job_id) is not None
        session.expunge(job)
    return job, reasons, leased


def test_a_sigterm_requeues_the_job_and_gives_its_attempt_back(
    studio: Studio, prefect_server: str, tmp_path: Path
) -> None:
    # One segment of 3 s (7 clips) at 12 steps, 84 in all: long enough to be stopped inside
    # it, short enough to render again.
    path = manifest(tmp_path / "drain.yaml", studio, ["drain"], steps=12, segment_seconds=10)
    job_id = submit_batch(manifest=str(path), render=False)["jobs"]["drain"]
    process = _render_process(studio, prefect_server, job_id)
    _wait_for_steps(studio, job_id, process)
    process.send_signal(signal.SIGTERM)  # a node drain: no cancel in Prefect
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0, output

    job, reasons, leased = _job(studio, job_id)
    assert (job.status, job.attempt) == (JobStatus.QUEUED, 0), output[-3000:]
    assert any("stopped by SIGTERM" in r for r in reasons)
    assert not leased  # lease and GPU slot released on the way out
    done = render_track(job_id=job_id)  # the next dispatch renders it, as attempt 1
    assert done["status"] == "succeeded"
    assert _job(studio, job_id)[0].attempt == 1


def test_a_cancel_from_prefect_cancels_the_job_for_good(
    studio: Studio, prefect_server: str, tmp_path: Path
) -> None:
    """What the UI's Cancel does to a running render: the run goes to Cancelling, and its
    worker sends the process a SIGTERM."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId
    from prefect.states import Cancelling

    path = manifest(tmp_path / "ui.yaml", studio, ["ui"], steps=40, segment_seconds=10)
    job_id = submit_batch(manifest=str(path), render=False)["jobs"]["ui"]
    process = _render_process(studio, prefect_server, job_id)
    _wait_for_steps(studio, job_id, process)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)
            )
        )
        (run,) = [r for r in runs if r.parameters.get("job_id") == job_id]
        client.set_flow_run_state(run.id, Cancelling(message="cancelled in the UI"), force=True)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)

    job, reasons, leased = _job(studio, job_id)
    assert (job.status, job.attempt) == (JobStatus.CANCELLED, 1), output[-3000:]
    assert any("cancelled in Prefect" in r for r in reasons) and not leased
    assert sweep(retry_failed=True)["retried"] == {}  # nightly never renders it again
    assert _job(studio, job_id)[0].status is JobStatus.CANCELLED


def _ended_by_prefect(studio: Studio, job_id: str) -> list[BaseException]:
    """Render the job in a thread and, once it holds its slot, end the run as Prefect's
    runtime does: its CancelledError sent into the thread by its ``_send_exception_to_thread``.
    Returns what the render raised."""
    from prefect._internal.concurrency.cancellation import (
        CancelledError,
        _send_exception_to_thread,
    )

    ended: list[BaseException] = []

    def render() -> None:
        try:
            render_track(job_id=job_id)
        except BaseException as error:  # noqa: BLE001 (what the run ended with is the point)
            ended.append(error)

    thread = threading.Thread(target=render)
    thread.start()
    sessions = session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))
    deadline = time.monotonic() + 240
    while True:  # until the render holds its slot
        assert thread.is_alive() and time.monotonic() < deadline, ended
        with sessions() as session:
            lease = session.get(Lease, job_id)
            if lease is not None and lease.gpu_since:
                break
        time.sleep(0.2)
    _send_exception_to_thread(thread, CancelledError)
    thread.join(timeout=120)
    assert not thread.is_alive()
    return ended


def test_a_run_that_prefect_ends_itself_requeues_the_job(
    studio: Studio, prefect_server: str, tmp_path: Path
) -> None:
    """Prefect ends a run by raising its CancelledError in the flow's thread when the run's
    deployment concurrency lease cannot be renewed (the server released it: a zombie-run
    automation marked the run Crashed while it waited for a slot). That is Prefect's doing,
    not a failure of the job: it is requeued with its attempt given back, as a SIGTERM is;
    but the third time since it last failed it fails, so a lease that can never be renewed does not
    requeue the job for ever."""
    from db.jobs import requeue_job

    path = manifest(tmp_path / "lease.yaml", studio, ["lease"], steps=6)  # three segments
    job_id = submit_batch(manifest=str(path), render=False)["jobs"]["lease"]
    for _ in range(2):
        ended = _ended_by_prefect(studio, job_id)
        job, reasons, leased = _job(studio, job_id)
        assert (job.status, job.attempt) == (JobStatus.QUEUED, 0), (job.error, reasons, ended)
        assert any("stopped by Prefect ending its run" in r for r in reasons), reasons
        assert not leased  # lease and GPU slot released on the way out
    _ended_by_prefect(studio, job_id)
    job, _, leased = _job(studio, job_id)
    assert (job.status, job.attempt) == (JobStatus.FAILED, 1) and not leased
    assert "Prefect ended this job's render run 3 times since it last" in job.error
    with session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))() as session:
        requeue_job(session=session, job_id=job_id, actor="test", reason="emo resume")
    assert render_track(job_id=job_id)["status"] == "succeeded"  # the next dispatch renders it


class _SignalledFinalizer:
    """An object whose finalizer is running when the SIGTERM arrives, as a weakref callback of
    SQLAlchemy's was in a CI run: Python runs the handler inside the finalizer and swallows
    the exception it raises ("Exception ignored in ...")."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs between these bytecodes, in here
            pass


def test_a_sigterm_swallowed_by_a_finalizer_still_stops_the_render(
    studio: Studio, prefect_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's SIGTERM handler raises an exception; one raised inside a finalizer is lost,
    and the render went on to deliver a job its worker had cancelled. The render's lease keeps
    the signal, and its next check (every denoising step, every upload) raises it again."""
    from prefect.exceptions import TerminationSignal
    from prefect.utilities.engine import capture_sigterm

    from flows.context import JobLease, services
    from flows.job_run import JobOutcome, start_job

    path = manifest(tmp_path / "gc.yaml", studio, ["gc"], segment_seconds=10)
    job_id = submit_batch(manifest=str(path), render=False)["jobs"]["gc"]
    swallowed: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_value))
    with (
        capture_sigterm(),  # Prefect's own handler, as in a flow run
        pytest.raises(TerminationSignal) as stopped,
        JobLease(services(), job_id) as lease,
        JobOutcome(lease),
    ):
        start_job(lease)
        _SignalledFinalizer()  # dropped at once: the finalizer runs and the signal with it
        lease.check()  # what the render does at its next denoising step
    assert [type(e) for e in swallowed] == [TerminationSignal]  # lost in the finalizer
    assert stopped.traceback[-1].name == "check"  # and raised again by the lease
    job, reasons, leased = _job(studio, job_id)
    assert (job.status, job.attempt) == (JobStatus.QUEUED, 0), reasons
    assert any("stopped by SIGTERM" in r for r in reasons) and not leased


def _database_outage(url: str, seconds: float) -> int:
    """Refuse every connection to the test's database for ``seconds`` and end the open ones,
    as a PostgreSQL restart or failover does to its clients; the number of connections ended."""
    database = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            ended = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": database},
            ).scalar_one()
            time.sleep(seconds)
            connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        return ended
    finally:
        admin.dispose()


def _done(url: str) -> int:
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            query = select(func.count()).select_from(Segment)
            return session.scalar(query.where(Segment.status == SegmentStatus.DONE)) or 0
    finally:
        engine.dispose()


def test_a_database_outage_is_ridden_out_in_place(
    studio: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 s without the database, longer than a connection's own retries (about 7.5 s) and
    shorter than the lease (30 s here): the render waits, then goes on."""
    monkeypatch.setenv("EMO_LEASE_SECONDS", "30")
    clear_caches()
    url = studio.env["EMO_DATABASE_URL"]
    path = manifest(tmp_path / "db.yaml", studio, ["blip"], steps=6)
    job_id = submit_batch(manifest=str(path), render=False)["jobs"]["blip"]
    ended: list[int] = []

    def outage() -> None:
        while _done(url) < 1:
            time.sleep(0.05)
        ended.append(_database_outage(url, 12.0))

    thread = threading.Thread(target=outage)
    thread.start()
    try:
        outcome = render_track(job_id=job_id)
    finally:
        thread.join(60)
    assert ended and ended[0] > 0  # the render's connections were really ended
    assert outcome["status"] == "succeeded" and outcome["rendered"] == outcome["segments"]
    job, _, _ = _job(studio, job_id)
    assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 1)


def test_a_store_outage_longer_than_its_retries_is_ridden_out(
    prefect_server: str, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 server stops for 8 s after the first checkpoint, longer than the store's own
    retries (0.5 s); the render retries in place and every segment's checkpoint is there."""
    from emo.store.checkpoint import read_segment_checkpoint

    server = WeedServer(tmp_path / "weed")
    server.start()
    stop = threading.Event()  # ends the outage thread early when the render has ended
    restarted = threading.Event()
    done_at_stop: list[int] = []

    def outage() -> None:
        while _done(pg_url) < 1:
            if stop.wait(0.05):
                return
        server.stop()
        done_at_stop.append(_done(pg_url))
        if stop.wait(8.0):
            return  # the render is over: the server stays stopped, and the test fails below
        server.start(wait=False)
        restarted.set()

    thread = threading.Thread(target=outage)
    try:
        studio = make_studio(tmp_path, pg_url, server, monkeypatch, seconds=4.0)
        monkeypatch.setenv("EMO_STORE_RETRIES", "1")  # the store alone gives up in 0.5 s
        clear_caches()
        path = manifest(tmp_path / "s3.yaml", studio, ["outage"], steps=6)
        job_id = submit_batch(manifest=str(path), render=False)["jobs"]["outage"]
        thread.start()
        outcome = render_track(job_id=job_id)
        assert restarted.is_set(), "the render ended before the S3 server came back"
        assert done_at_stop and done_at_stop[0] < outcome["segments"]  # stopped mid-render
        assert outcome["status"] == "succeeded" and outcome["rendered"] == outcome["segments"]
        job, _, _ = _job(studio, job_id)
        assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 1)
        for index in range(outcome["segments"]):
            assert read_segment_checkpoint(studio.store, job_id=job_id, index=index)
    finally:
        # The thread is stopped before the server, so it cannot start the server again after.
        stop.set()
        if thread.is_alive():
            thread.join(timeout=120)
        assert not thread.is_alive(), "the outage thread is stuck"
        server.stop()
        clear_caches()


def test_an_unreachable_store_is_not_a_bad_manifest(studio: Studio, tmp_path: Path) -> None:
    """Inputs that cannot be fetched because the S3 server does not answer are a service
    failure (nightly keeps the manifest for the next night), not a problem of the job."""
    from emo.errors import StoreUnavailable
    from emo.manifest import parse_manifest
    from flows.context import services
    from flows.submit_batch import fetch_inputs
    from tests.services import free_port

    svc = services()
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = svc.settings.model_copy(update={"s3_endpoint": closed, "store_retries": 0})
    data = (
        b"name: far\njobs:\n  - {name: a, image: s3://elsewhere/p.png, audio: s3://elsewhere/v.wav"
        b", face_box: [0.2, 0.15, 0.8, 0.85]}\n"
    )
    parsed, _ = parse_manifest(data, source="far.yaml")
    with pytest.raises(StoreUnavailable):
        fetch_inputs.fn(settings, parsed, tmp_path / "scratch", str(tmp_path))
