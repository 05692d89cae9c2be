"""The sweep: a job whose render run is gone is dispatched again under a new key; a run that
is alive is left to itself; a run cancelled in Prefect cancels its job.

The render deployment is registered on the real Prefect test server with no worker serving
it, so its runs stay scheduled until the test moves them, as a worker, a crashed pod or a
user in the UI would (the farm test and the chaos run show the same with real workers).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Crashed

from db.dispatch import DispatchView, begin_dispatch
from db.engine import make_engine, session_factory
from db.jobs import transition_job
from db.leases import acquire_lease
from db.models import Job, JobStatus, Lease
from flows.context import services
from flows.dispatch import RunInfo, Verdict, judge, render_key
from flows.submit_batch import dispatch, submit_batch
from flows.sweep import sweep
from tests.flows.conftest import Studio, manifest

pytestmark = pytest.mark.slow  # whole renders dispatched through a Prefect server

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
GRACE = 120.0


def _view(status: JobStatus = JobStatus.QUEUED, *, live: bool = False, age: float = 3600):
    return DispatchView(
        job_id="j",
        title="b/j",
        status=status,
        generation=1,
        flow_run_id="r",
        dispatched_at=NOW - timedelta(seconds=age),
        created_at=NOW - timedelta(hours=2),
        lease_owner="host:1:x" if live else None,
        lease_live=live,
    )


def _unrun(age: float = 3600) -> DispatchView:
    """A job dispatched ``age`` seconds ago whose run was never recorded."""
    return replace(_view(age=age), flow_run_id=None)


def _fresh(age: float = 10) -> DispatchView:
    """A job registered ``age`` seconds ago and never dispatched."""
    return replace(
        _view(), flow_run_id=None, dispatched_at=None, created_at=NOW - timedelta(seconds=age)
    )


def _done() -> DispatchView:
    """A running job whose segments are rendered, with no lease: its render has ended."""
    return replace(_view(JobStatus.RUNNING), rendered=True)


def _run(state: StateType | None, age: float = 3600) -> RunInfo:
    return RunInfo(state, NOW - timedelta(seconds=age) if state else None)


@pytest.mark.parametrize(
    ("view", "run", "eager", "verdict"),
    [
        (_view(live=True), _run(StateType.CRASHED), False, Verdict.ALIVE),  # someone renders
        (_view(), _run(StateType.SCHEDULED), False, Verdict.ALIVE),  # waits for a worker
        (_view(), _run(StateType.PAUSED), False, Verdict.ALIVE),
        (_view(), _run(StateType.PENDING, age=10), False, Verdict.ALIVE),  # starting
        (_view(), _run(StateType.RUNNING, age=10), False, Verdict.ALIVE),
        (_view(), _run(StateType.RUNNING), False, Verdict.GONE),  # started long ago, no lease
        (_view(), _run(StateType.PENDING, age=600), False, Verdict.ALIVE),  # a pod scheduled
        (_view(), _run(StateType.PENDING), False, Verdict.GONE),
        (_view(), _run(StateType.CRASHED), False, Verdict.GONE),
        (_view(), _run(StateType.FAILED), False, Verdict.GONE),
        (_view(), _run(StateType.COMPLETED), False, Verdict.GONE),
        (_view(), _run(None), False, Verdict.GONE),  # Prefect has no such run
        (_view(age=10), _run(None), False, Verdict.GONE),  # recent, but Prefect lost it
        (_unrun(age=10), _run(None), False, Verdict.GONE),  # issued again under its key
        (_fresh(), _run(None), False, Verdict.ALIVE),  # a submit is about to dispatch it
        (_fresh(), _run(None), True, Verdict.GONE),  # ... unless it is that submit
        (_fresh(age=3600), _run(None), False, Verdict.GONE),  # a submit died before it
        (_view(), _run(StateType.CANCELLED), False, Verdict.CANCELLED),
        (_view(), _run(StateType.CANCELLING, age=10), False, Verdict.ALIVE),  # stopping
        (_view(), _run(StateType.CANCELLING), False, Verdict.CANCELLED),
        (_view(JobStatus.RUNNING), _run(StateType.RUNNING, age=10), False, Verdict.GONE),
        (_view(JobStatus.RUNNING), _run(StateType.CANCELLED), False, Verdict.CANCELLED),
        (_view(JobStatus.RUNNING, live=True), _run(StateType.CRASHED), False, Verdict.ALIVE),
        # A cancel the render never heard of (its worker dead): cancelled, lease or not.
        (_view(JobStatus.RUNNING, live=True), _run(StateType.CANCELLED), False, Verdict.CANCELLED),
        # Rendered and handed to a finish-job run: that run is judged, not the missing lease.
        (_done(), _run(StateType.SCHEDULED), False, Verdict.ALIVE),  # waits for a CPU worker
        (_done(), _run(StateType.PENDING, age=600), False, Verdict.ALIVE),  # its pod starts
        (_done(), _run(StateType.RUNNING, age=10), False, Verdict.ALIVE),  # taking the lease
        (_done(), _run(StateType.RUNNING), False, Verdict.GONE),  # no lease long after
        (_done(), _run(StateType.CRASHED), False, Verdict.GONE),
        (_done(), _run(StateType.COMPLETED), False, Verdict.GONE),  # ended without finishing
        (_done(), None, False, Verdict.GONE),  # inline: nothing is handed over
        (_view(JobStatus.RUNNING), _run(StateType.SCHEDULED), False, Verdict.GONE),  # unrendered
        (_view(), None, False, Verdict.GONE),  # inline: no run to ask, dispatched long ago
        (_view(age=10), None, False, Verdict.ALIVE),
        (_view(age=10), None, True, Verdict.GONE),  # inline: a user's command renders now
    ],
)
def test_judge(view: DispatchView, run: RunInfo | None, eager: bool, verdict: Verdict) -> None:
    assert judge(view, run, now=NOW, grace_seconds=GRACE, eager=eager) is verdict


def test_a_cancelled_batch_cancels_its_jobs_however_they_run() -> None:
    for view in (_view(), _view(JobStatus.RUNNING, live=True), _fresh()):
        for run in (_run(StateType.SCHEDULED), _run(StateType.RUNNING, age=10), _run(None)):
            cancelled = _run(StateType.CANCELLED, age=1)
            assert judge(view, run, now=NOW, grace_seconds=GRACE, batch_run=cancelled) is (
                Verdict.CANCELLED
            )
            alive = _run(StateType.RUNNING, age=1)
            assert judge(view, run, now=NOW, grace_seconds=GRACE, batch_run=alive) is judge(
                view, run, now=NOW, grace_seconds=GRACE
            )


@pytest.fixture
def deployed(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> str:
    """The render deployment on the Prefect test server, with no worker: runs stay put."""
    from flows.render_track import render_track

    render_track.to_deployment(name="render-track").apply()
    monkeypatch.setenv("EMO_DISPATCH", "deployment")
    monkeypatch.setenv("EMO_SWEEP_GRACE_SECONDS", "30")
    from tests.flows.conftest import clear_caches

    clear_caches()
    return "render-track/render-track"


def _job(studio: Studio, job_id: str) -> Job:
    with session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def _set_state(run_id: str, state) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state, force=True)


def _run_key(run_id: str) -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).idempotency_key


def test_a_dead_run_is_never_handed_back(studio: Studio, deployed: str, tmp_path: Path) -> None:
    registered = submit_batch(
        manifest=str(manifest(tmp_path / "gone.yaml", studio, ["solo"], steps=2)), render=False
    )
    job_id = registered["jobs"]["solo"]
    first = dispatch_once(job_id)
    job = _job(studio, job_id)
    assert (job.dispatch_generation, job.flow_run_id) == (1, first)
    assert _run_key(first) == render_key(job_id, job.weights_sha256, 1)

    # Alive (scheduled, no worker yet): the sweep and a second submit both leave it.
    assert sweep()["alive"] == [job_id]
    assert dispatch_once(job_id) == first

    # The run crashes before the render took the job (a pod never scheduled, an image pull
    # failure): the sweep dispatches it again, under a new key.
    _set_state(first, Crashed(message="pod never started"))
    swept = sweep()
    second = swept["runs"][job_id]
    assert second != first and _job(studio, job_id).dispatch_generation == 2
    assert _run_key(second).endswith(":g2")
    assert dispatch_once(job_id) == second  # a retried submit gets the new run, not the dead one

    # Prefect forgets the run (a server rebuilt without its database): dispatched again.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.delete_flow_run(second)
    third = sweep()["runs"][job_id]
    assert third not in (first, second) and _job(studio, job_id).dispatch_generation == 3

    # A dispatcher that died inside run_deployment (generation taken, run never recorded): the
    # sweep issues the same key again and gets the run that dispatcher made, not a second one.
    url = studio.env["EMO_DATABASE_URL"]
    with session_factory(make_engine(url))() as session:
        generation = begin_dispatch(
            session=session, job_id=job_id, generation=3, actor="x", reason=""
        )
    from prefect.deployments import run_deployment

    made = run_deployment(
        deployed,
        parameters={"job_id": job_id, "output": None},
        idempotency_key=render_key(job_id, job.weights_sha256, generation),
        timeout=0,
    )
    assert sweep()["runs"][job_id] == str(made.id)
    assert _job(studio, job_id).dispatch_generation == generation == 4

    # Two sweeps that saw the same generation: only one dispatches.
    with session_factory(make_engine(url))() as session:
        assert begin_dispatch(session=session, job_id=job_id, generation=4, actor="a", reason="")
    with session_factory(make_engine(url))() as session:
        assert (
            begin_dispatch(session=session, job_id=job_id, generation=4, actor="b", reason="")
            is None
        )
    assert _job(studio, job_id).attempt == 0  # no render ever started: no attempt used


def dispatch_once(job_id: str) -> str:
    """What submit-batch does for a job, without waiting for its run: the run it is given."""
    from flows.dispatch import settle

    (outcome,) = settle(services(), [job_id], actor="test", eager=True)
    assert outcome.flow_run_id is not None, outcome
    return outcome.flow_run_id


def test_a_crashed_render_is_failed_requeued_and_dispatched(
    studio: Studio, deployed: str, tmp_path: Path
) -> None:
    registered = submit_batch(
        manifest=str(manifest(tmp_path / "crash.yaml", studio, ["lost"], steps=2)), render=False
    )
    job_id = registered["jobs"]["lost"]
    first = dispatch_once(job_id)
    url = studio.env["EMO_DATABASE_URL"]
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with session_factory(make_engine(url))() as session:  # its render took it, then died
        transition_job(session=session, job_id=job_id, to=JobStatus.RUNNING, actor="gpu-pod")
        acquire_lease(
            session=session, job_id=job_id, owner="gpu-pod:1", ttl_seconds=60, now=an_hour_ago
        )
    _set_state(first, Crashed(message="node lost"))
    swept = sweep()
    assert swept["crashed"] == [job_id] and swept["runs"][job_id] != first
    job = _job(studio, job_id)
    assert job.status is JobStatus.QUEUED and job.attempt == 1  # the crash counted
    with session_factory(make_engine(url))() as session:
        assert session.get(Lease, job_id) is None  # revoked


def test_a_run_cancelled_in_prefect_cancels_its_job_for_good(
    studio: Studio, deployed: str, tmp_path: Path
) -> None:
    registered = submit_batch(
        manifest=str(manifest(tmp_path / "ui.yaml", studio, ["drop", "keep"], steps=2)),
        render=False,
    )
    drop, keep = registered["jobs"]["drop"], registered["jobs"]["keep"]
    runs = {job_id: dispatch_once(job_id) for job_id in (drop, keep)}
    _set_state(runs[drop], Cancelled(message="cancelled in the UI"))
    swept = sweep(retry_failed=True)
    assert swept["cancelled"] == [drop] and swept["alive"] == [keep]
    assert _job(studio, drop).status is JobStatus.CANCELLED
    assert sweep(retry_failed=True)["retried"] == {}  # never retried
    assert dispatch(services(), "ui", [drop], None) == {}  # nor dispatched by a resubmit

    # Cancel the batch (its submit-batch run) in the UI: its other job is cancelled too, even
    # one being rendered (its render stops at its next heartbeat) or dispatched again.
    from prefect.deployments import run_deployment

    from db.dispatch import record_submit_run

    submit_run = run_deployment(deployed, parameters={"job_id": keep, "output": None}, timeout=0)
    url = studio.env["EMO_DATABASE_URL"]
    with session_factory(make_engine(url))() as session:
        record_submit_run(
            session=session, batch_id=registered["batch_id"], flow_run_id=str(submit_run.id)
        )
        transition_job(session=session, job_id=keep, to=JobStatus.RUNNING, actor="gpu-pod")
        acquire_lease(session=session, job_id=keep, owner="gpu-pod:2", ttl_seconds=3600)
    _set_state(str(submit_run.id), Cancelled(message="batch cancelled in the UI"))
    assert sweep()["cancelled"] == [keep]
    assert _job(studio, keep).status is JobStatus.CANCELLED
