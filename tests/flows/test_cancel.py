"""`emo cancel` of a rendering job stops it between denoising steps, not after the segment."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from db.engine import make_engine, session_factory
from db.events import job_events
from db.models import Job, JobStatus
from emo.cli import app
from flows.render_track import render_track
from flows.submit_batch import submit_batch
from tests.flows.conftest import Studio, manifest

pytestmark = pytest.mark.slow  # a render cancelled mid-job


def test_a_cancelled_render_stops_within_its_segment_and_stays_cancelled(
    studio: Studio, tmp_path: Path
) -> None:
    import flows.segments as flow

    # One 3 s segment (7 clips) of 60 steps: 420 denoising steps, over ten seconds here.
    path = manifest(tmp_path / "c.yaml", studio, ["long"], steps=60, segment_seconds=10)
    job_id = submit_batch(manifest=str(path), render=False)["jobs"]["long"]
    sessions = session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))
    stepped = threading.Event()
    steps: list[int] = []
    original = flow.render_segment

    def counting(pipeline, **kwargs):
        callback = kwargs["callback"]

        def step(clip: int, done: int, total: int) -> None:
            steps.append(done)
            stepped.set()
            callback(clip, done, total)

        return original(pipeline, **{**kwargs, "callback": step})

    flow.render_segment = counting
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(render_track(job_id=job_id)))
    try:
        thread.start()
        assert stepped.wait(120), "the render never took a denoising step"
        cancelled = CliRunner().invoke(app, ["cancel", job_id])
        assert cancelled.exit_code == 0, cancelled.output
        at_cancel = time.monotonic()
        thread.join(120)
    finally:
        flow.render_segment = original
    stopped_after = time.monotonic() - at_cancel
    assert outcome["status"] == "cancelled"
    heartbeat = float(studio.env["EMO_LEASE_SECONDS"]) / 3
    assert stopped_after < heartbeat + 5, stopped_after  # a heartbeat and a step, not a segment
    assert len(steps) < 200  # of the 420 the segment needs
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.CANCELLED
        assert [s.status.value for s in job.segments] == ["pending"]  # the segment never landed
        kinds = [e.kind for e in job_events(session=session, job_id=job_id)]
    assert "lease.released" in kinds
