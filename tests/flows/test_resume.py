"""Crash and resume with a real `emo render` process; a dead lease holder taken over.
(The S3 server going away mid-job is in test_faults.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from db.engine import make_engine, session_factory
from db.models import Job, JobStatus, Segment, SegmentStatus
from emo.cli import app
from emo.media import iter_frames
from flows.context import lease_owner
from flows.render_track import render_track
from flows.submit_batch import submit_batch
from tests.conftest import run_emo
from tests.flows.conftest import clear_caches, environment, hold_gpu_slot, make_studio, manifest
from tests.services import WeedServer

pytestmark = pytest.mark.slow  # kill -9 of a render process and whole renders

RENDER_OPTIONS = ["--seed", "5", "--steps", "10", "--face-box", "0.2,0.15,0.8,0.85"]


def _frames(video: Path) -> np.ndarray:
    return np.concatenate(list(iter_frames(video, 64, 64)))


def _emo_render(studio, api: str, output: Path) -> subprocess.Popen:
    command = [
        str(Path(sys.executable).with_name("emo")),
        "render",
        str(studio.portrait),
        str(studio.vocal),
        "-o",
        str(output),
        *RENDER_OPTIONS,
    ]
    return subprocess.Popen(
        command,
        env=environment(studio, api),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _done_segments(url: str) -> int:
    with session_factory(make_engine(url))() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(Segment)
                .where(Segment.status == SegmentStatus.DONE)
            )
            or 0
        )


def test_killed_render_resumes_from_its_last_checkpoint(
    console_state: None,
    prefect_server: str,
    pg_url: str,
    pg_template: str,
    weed: WeedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    studio = make_studio(tmp_path / "crash", pg_url, weed, monkeypatch, seconds=4.0)
    process = _emo_render(studio, prefect_server, tmp_path / "crash.mp4")
    deadline = time.monotonic() + 240
    while _done_segments(pg_url) < 2:  # segments 0 and 1 checkpointed; 2 is rendering
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the render never reached segment 2"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()

    with session_factory(make_engine(pg_url))() as session:
        job = session.scalar(select(Job))
        assert job.status is JobStatus.RUNNING  # the killed run could not record anything
        total = len(job.segments)
        done_before = sum(1 for s in job.segments if s.status is SegmentStatus.DONE)
    assert total >= 4 and done_before in (2, 3)

    resumed = run_emo(
        "resume",
        job.id,
        "-o",
        str(tmp_path / "resumed.mp4"),
        env=environment(studio, prefect_server),
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"segments rendered this run: {total - done_before}/{total}" in resumed.stdout
    # Resuming it again renders nothing: exit 0, and -o copies the finished video.
    again = CliRunner().invoke(app, ["resume", job.id[:12], "-o", str(tmp_path / "again.mp4")])
    assert again.exit_code == 0, again.output
    assert "had already succeeded" in again.output
    assert (tmp_path / "again.mp4").read_bytes() == (tmp_path / "resumed.mp4").read_bytes()

    # The same job rendered without interruption, on fresh services, gives the same frames.
    from tests.services import pg_create_database, pg_drop_database

    clean_db = pg_create_database(template=pg_template.rsplit("/", 1)[1])
    try:
        clean = make_studio(tmp_path / "clean", clean_db, weed, monkeypatch, seconds=4.0)
        clean.vocal.write_bytes(studio.vocal.read_bytes())
        uninterrupted = run_emo(
            "render",
            str(studio.portrait),
            str(studio.vocal),
            "-o",
            str(tmp_path / "clean.mp4"),
            *RENDER_OPTIONS,
            env=environment(clean, prefect_server),
        )
        assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr
    finally:
        clear_caches()
        pg_drop_database(clean_db)
    a, b = _frames(tmp_path / "resumed.mp4"), _frames(tmp_path / "clean.mp4")
    assert a.shape == b.shape == (100, 64, 64, 3)
    assert np.array_equal(a, b)


def test_dead_lease_holder_on_this_host_is_taken_over(studio, tmp_path: Path) -> None:
    """A holder whose process is gone blocks neither the job nor the GPU slot it held."""
    from db.gpu_slots import gpu_slot_holders

    result = submit_batch(
        manifest=str(manifest(tmp_path / "dead.yaml", studio, ["dead"])), render=False
    )
    job_id = result["jobs"]["dead"]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    ghost = lease_owner().split(":")
    ghost[1] = str(child.pid)
    ghost_owner = ":".join(ghost)
    # The dead holder has the job and the only GPU slot, on an hour-long lease.
    hold_gpu_slot(studio, job_id, ghost_owner)

    started = time.monotonic()
    assert render_track(job_id=job_id)["status"] == "succeeded"
    assert time.monotonic() - started < 60, "the render waited for the dead holder"
    with session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))() as session:
        assert gpu_slot_holders(session=session) == []
