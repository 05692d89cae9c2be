"""A killed render on the embedded defaults, resumed as a user would: a new process, a new
ephemeral Prefect server, the same command (or `emo resume JOB`).

Nothing is shared between the killed process and the one that resumes it but EMO_HOME (SQLite,
the local store, Prefect's files): the killed process's ephemeral Prefect server stops with
it (its watchdog sees to that), as after a reboot or an OOM kill. The resumed render must take
the job and its GPU slot over within seconds, finish in bounded time and give frames identical
to an uninterrupted render."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from db.engine import make_engine, session_factory
from db.models import Event, Job, JobStatus, Segment
from emo.media import frame_md5s
from flows.submit_batch import submit_batch
from tests.conftest import run_emo, write_wav
from tests.flows.conftest import ASSETS, clear_caches, speech

pytestmark = pytest.mark.slow  # kill -9 of emo processes

SECONDS = 6.0
OPTIONS = {"steps": 4, "segment_seconds": 1.0, "face_box": [0.2, 0.15, 0.8, 0.85]}
RENDER_FLAGS = ["--steps", "4", "--segment-seconds", "1", "--face-box", "0.2,0.15,0.8,0.85"]
RESUME_LIMIT = 240.0  # seconds a resumed render may take, ephemeral server start included
TAKEOVER_LIMIT = timedelta(seconds=5)  # from taking the job over to holding its GPU slot
ORPHAN_LIMIT = 15.0  # seconds a killed command's ephemeral Prefect server may outlive it


def _manifest(path: Path, track: Path, seeds: dict[str, int]) -> Path:
    jobs = [
        {"name": name, "image": str(ASSETS / "demo_portrait.png"), "audio": str(track),
         "seed": seed, **OPTIONS}
        for name, seed in seeds.items()
    ]  # fmt: skip
    path.write_text(yaml.safe_dump({"name": "two-jobs", "jobs": jobs}))
    return path


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wav(tmp_path_factory.mktemp("track") / "vocal.wav", speech(SECONDS, seed=3))


@pytest.fixture(scope="module")
def references(
    prefect_server: str, tiny_weights: Path, track: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, list[str]]:
    """Frame hashes of uninterrupted renders with seeds 3 and 4 (in this process)."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("EMO_")]:
            patch.delenv(name)
        patch.setenv("EMO_HOME", str(folder / "home"))
        patch.setenv("EMO_WEIGHTS", str(tiny_weights))
        clear_caches()
        try:
            manifest = _manifest(folder / "reference.yaml", track, {"a": 3, "b": 4})
            submit_batch(manifest=str(manifest), output_dir=str(folder / "out"), render=True)
        finally:
            clear_caches()
    return {3: frame_md5s(folder / "out" / "a.mp4"), 4: frame_md5s(folder / "out" / "b.mp4")}


def _embedded_env(home: Path, weights: Path) -> dict[str, str]:
    """The embedded defaults: no Prefect server, no database or store settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EMO_"))}
    return {**env, "EMO_HOME": str(home), "EMO_WEIGHTS": str(weights)}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def kill_after_first_checkpoint() -> Iterator[Callable[[list[str], dict[str, str], Path], None]]:
    """Run ``emo ARGS`` and kill -9 it once a segment checkpoint exists.

    Only the emo process is killed, as ``kill -9 PID`` does; its ephemeral Prefect server (in
    its process group) must then stop by itself within seconds, not run on as an orphan
    beside the next command's server.
    """
    groups: list[int] = []

    def run(args: list[str], env: dict[str, str], log: Path) -> None:
        home = Path(env["EMO_HOME"])
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(Path(sys.executable).with_name("emo")), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        groups.append(process.pid)
        try:
            deadline = time.monotonic() + 240
            while not list(home.glob("store/jobs/*/segments/*/*/manifest.json")):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        deadline = time.monotonic() + ORPHAN_LIMIT
        while _group_alive(process.pid):
            assert time.monotonic() < deadline, "the killed command's Prefect server runs on"
            time.sleep(0.2)

    yield run
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _sessions(home: Path):
    return session_factory(make_engine(f"sqlite:///{home / 'emo.db'}"))


def _interrupted(home: Path) -> dict[str, tuple[int, int]]:
    """Per job name: (segments checkpointed, segments planned), checked to be a real
    interruption. Checkpoints are counted in the store (a manifest is written last): the kill
    may land between a checkpoint and its database row, which the resume then adopts."""
    with _sessions(home)() as session:
        jobs = list(session.scalars(select(Job)))
        counts = {}
        for job in jobs:
            planned = session.scalars(select(Segment).where(Segment.job_id == job.id)).all()
            found = home.glob(f"store/jobs/{job.id}/segments/*/*/manifest.json")
            counts[job.name] = (len({path.parent.parent.name for path in found}), len(planned))
        running = [j.name for j in jobs if j.status is JobStatus.RUNNING]
    assert len(running) == 1, f"one job must have been killed mid-render: {counts}"
    done, total = counts[running[0]]
    assert 1 <= done < total, counts
    return counts


def _slot_taken_within_seconds(home: Path) -> None:
    """The resumed render held the GPU slot right after taking the killed one's lease."""
    with _sessions(home)() as session:
        events = list(session.scalars(select(Event).order_by(Event.id)))
    takeover = next(e for e in events if e.kind == "lease.taken_over")
    acquired = next(e for e in events if e.kind == "gpu.acquired" and e.actor == takeover.actor)
    assert acquired.at - takeover.at < TAKEOVER_LIMIT, (takeover.at, acquired.at)


def _resume(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = run_emo(*args, env=env, timeout=RESUME_LIMIT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < RESUME_LIMIT
    return done


@pytest.mark.parametrize("again", ["same command", "emo resume"])
def test_killed_render_is_resumed(
    again: str,
    home: Path,
    tiny_weights: Path,
    track: Path,
    references: dict[int, list[str]],
    kill_after_first_checkpoint,
    tmp_path: Path,
) -> None:
    env = _embedded_env(home, tiny_weights)
    output = tmp_path / "out.mp4"
    command = ["render", str(ASSETS / "demo_portrait.png"), str(track), "-o", str(output),
               "--seed", "3", *RENDER_FLAGS]  # fmt: skip
    kill_after_first_checkpoint(command, env, tmp_path / "killed.log")
    ((done, total),) = _interrupted(home).values()
    if again == "emo resume":
        with _sessions(home)() as session:
            job_id = session.scalar(select(Job.id))
        command = ["resume", job_id[:12], "-o", str(output)]

    resumed = _resume(command, env)
    assert f"segments rendered this run: {total - done}/{total}" in resumed.stdout
    _slot_taken_within_seconds(home)
    assert frame_md5s(output) == references[3]


def test_killed_submit_wait_of_two_jobs_is_resumed_by_the_same_command(
    home: Path,
    tiny_weights: Path,
    track: Path,
    references: dict[int, list[str]],
    kill_after_first_checkpoint,
    tmp_path: Path,
) -> None:
    env = _embedded_env(home, tiny_weights)
    manifest = _manifest(tmp_path / "batch.yaml", track, {"a": 3, "b": 4})
    outputs = tmp_path / "videos"
    command = ["submit", str(manifest), "--wait", "--output-dir", str(outputs)]
    kill_after_first_checkpoint(command, env, tmp_path / "killed.log")
    _interrupted(home)

    resumed = _resume(command, env)
    assert "already registered" in resumed.stdout
    with _sessions(home)() as session:
        jobs = {j.name: j.status for j in session.scalars(select(Job))}
    assert jobs == {"a": JobStatus.SUCCEEDED, "b": JobStatus.SUCCEEDED}
    _slot_taken_within_seconds(home)
    assert frame_md5s(outputs / "a.mp4") == references[3]
    assert frame_md5s(outputs / "b.mp4") == references[4]
