"""The GPU only renders: a render hands its job to a finish-job run on the CPU pool and ends.

Both deployments are registered on the real Prefect test server with no worker serving them,
so the finish-job run the render makes stays scheduled until the test runs the flow itself,
as a CPU worker would (the farm benchmark, bench/farm.py, shows the same with real workers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import make_engine, session_factory
from db.events import job_events
from db.models import Job, JobStatus, Lease, Segment
from flows.finish_job import finish_job
from flows.render_track import render_track
from flows.submit_batch import submit_batch
from flows.sweep import sweep
from tests.flows.conftest import Studio, clear_caches, manifest

pytestmark = pytest.mark.slow  # whole renders through a Prefect server


@pytest.fixture
def deployed(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> Studio:
    """render-track and finish-job on the Prefect test server, with no worker."""
    render_track.to_deployment(name="render-track").apply()
    finish_job.to_deployment(name="finish-job").apply()
    monkeypatch.setenv("EMO_DISPATCH", "deployment")
    clear_caches()
    return studio


def _session(studio: Studio):
    return session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))()


def _flow_run(run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        return run, client.read_deployment(run.deployment_id).name


def _task_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
    return [t.name.rsplit("-", 1)[0] for t in sorted(tasks, key=lambda t: t.start_time)]


def test_a_render_hands_its_job_to_a_finish_run_and_frees_its_gpu(
    deployed: Studio, tmp_path: Path
) -> None:
    studio = deployed
    registered = submit_batch(
        manifest=str(manifest(tmp_path / "handoff.yaml", studio, ["solo"], steps=2)),
        render=False,
    )
    job_id = registered["jobs"]["solo"]

    rendered = render_track(job_id=job_id, output=str(tmp_path / "out" / "solo.mp4"))
    assert rendered["status"] == "rendered" and rendered["rendered"] == rendered["segments"] == 3
    run, deployment = _flow_run(rendered["finish_run"])
    assert deployment == "finish-job" and run.state.is_scheduled()
    assert run.parameters == {"job_id": job_id, "output": str(tmp_path / "out" / "solo.mp4")}
    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.RUNNING and job.rendered_at is not None
        assert job.flow_run_id == rendered["finish_run"]  # the sweep asks about this run now
        assert session.get(Lease, job_id) is None  # the render ended: lease and slot given back
        kinds = [e.kind for e in job_events(session=session, job_id=job_id)]
    assert kinds.index("gpu.released") > max(i for i, k in enumerate(kinds) if k == "segment.done")
    assert "job.output" not in kinds  # nothing assembled or published by the render
    assert sweep()["alive"] == [job_id]  # its finish run waits for a CPU worker

    finished = finish_job(job_id=job_id, output=str(tmp_path / "out" / "solo.mp4"))
    assert finished["status"] == "succeeded" and finished["rendered"] == 0
    assert (tmp_path / "out" / "solo.mp4").is_file()
    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.SUCCEEDED and job.attempt == 1 and job.lease_epoch == 2
        epochs = set(session.scalars(select(Segment.epoch).where(Segment.job_id == job_id)))
        assert epochs == {1}  # every segment is the render's: none rendered again
        resumed = [
            e.reason for e in job_events(session=session, job_id=job_id) if e.kind == "job.resumed"
        ]
    assert resumed == ["finishing on the CPU pool (its segments are rendered)"]
    steps = _task_names(finished_flow_run_id(job_id, studio))
    assert steps[:3] == ["read model card", "load inputs", "plan"], steps
    assert steps[3:] == ["assemble", "qc", "write reports", "finish", "deliver"], steps


def finished_flow_run_id(job_id: str, studio: Studio):
    """The finish-job run that finished the job (the one named batch/job on finish-job)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["finish-job"]))
        )
    (run,) = [r for r in runs if r.parameters.get("job_id") == job_id and r.state.is_completed()]
    return run.id


def test_a_segment_lost_before_finishing_fails_the_job_naming_it(
    deployed: Studio, tmp_path: Path
) -> None:
    studio = deployed
    registered = submit_batch(
        manifest=str(manifest(tmp_path / "lost.yaml", studio, ["gap"], steps=2)), render=False
    )
    job_id = registered["jobs"]["gap"]
    assert render_track(job_id=job_id)["status"] == "rendered"
    for item in studio.store.list(f"jobs/{job_id}/segments/00001/"):
        studio.store.delete(item.key)
    with pytest.raises(
        Exception, match=r"segment 1 of job .*`emo resume [0-9a-f]{12}` renders it again"
    ):
        finish_job(job_id=job_id)
    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.FAILED and "segment 1" in job.error


def test_without_a_finish_deployment_the_render_finishes_the_job(
    deployed: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMO_FINISH_DEPLOYMENT", "finish-job/not-deployed")
    clear_caches()
    registered = submit_batch(
        manifest=str(manifest(tmp_path / "here.yaml", deployed, ["here"], steps=2)), render=False
    )
    job_id = registered["jobs"]["here"]
    assert render_track(job_id=job_id)["status"] == "succeeded"


def test_a_finish_run_that_died_is_replaced_by_another_finish_run(
    deployed: Studio, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    studio = deployed
    registered = submit_batch(
        manifest=str(manifest(tmp_path / "again.yaml", studio, ["again"], steps=2)), render=False
    )
    job_id = registered["jobs"]["again"]
    first = render_track(job_id=job_id)["finish_run"]
    with get_client(sync_client=True) as client:  # its pod was lost before it took the job
        client.set_flow_run_state(first, Crashed(message="node lost"), force=True)
    swept = sweep()
    assert swept["crashed"] == [job_id]
    second = swept["runs"][job_id]
    run, deployment = _flow_run(second)
    assert second != first and deployment == "finish-job"  # not a render: nothing to render
    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.QUEUED and job.attempt == 1 and job.rendered_at
    assert finish_job(job_id=job_id)["status"] == "succeeded"
