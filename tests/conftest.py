"""Shared fixtures: isolated settings, real PostgreSQL databases, a real S3 server, media."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from db import migrate
from db.engine import make_engine, session_factory
from emo.settings import get_settings
from tests.services import (
    WeedServer,
    pg_create_database,
    pg_drop_database,
)


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own EMO_HOME and no EMO_* from the developer's shell."""
    import os

    for name in list(os.environ):
        if name.startswith("EMO_") and name != "EMO_TEST_PG_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("EMO_HOME", str(tmp_path / "emo-home"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# -- databases ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A PostgreSQL database migrated to head, copied for each test that needs one."""
    url = pg_create_database()
    migrate.upgrade(url)
    yield url
    pg_drop_database(url)


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    from sqlalchemy.engine import make_url

    url = pg_create_database(template=make_url(pg_template).database)
    yield url
    pg_drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh, migrated SQLite database for one test."""
    url = f"sqlite:///{tmp_path / 'emo.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database on each backend."""
    name = "pg_url" if request.param == "postgresql" else "sqlite_url"
    return request.getfixturevalue(name)


@pytest.fixture
def session(db_url: str):
    """A session on a fresh database of each backend."""
    engine = make_engine(db_url)
    with session_factory(engine)() as session:
        yield session
    engine.dispose()


# -- object store --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """One SeaweedFS S3 server for the session."""
    server = WeedServer(tmp_path_factory.mktemp("weed"))
    server.start()
    yield server
    server.stop()


# -- media ---------------------------------------------------------------------------------


def tone(seconds: float, sample_rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    """A voiced-sounding test tone (fundamental plus harmonics), float32 in [-0.5, 0.5]."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = sum(np.sin(2 * np.pi * freq * k * t) / k for k in range(1, 5))
    return (0.5 * wave / np.max(np.abs(wave))).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = 16000) -> Path:
    """Write float mono audio as 16-bit PCM wav."""
    import soundfile

    soundfile.write(path, audio, sample_rate, subtype="PCM_16")
    return path


@contextlib.contextmanager
def process_state_restored() -> Iterator[None]:
    """Put back what running the CLI in-process changes for the whole process: the
    environment (``emo`` sets defaults for Prefect and the native libraries), the loggers
    quiet mode silences (``setLevel`` also clears their children's cached levels) and the
    settings cache."""
    import logging
    import os

    import emo.quiet

    names = ("prefect.flow_runs", "prefect.task_runs", *emo.quiet.OWN_LOGGERS)
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.propagate, logger.level) for logger in loggers]
    environment = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environment)
        get_settings.cache_clear()
        for logger, (propagate, level) in zip(loggers, saved, strict=True):
            logger.propagate = propagate
            logger.setLevel(level)
        emo.quiet._quiet = False


def emo_in_process(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run an ``emo`` command in this process through the console script's own entry point
    (``emo.cli.run``), with ``env`` added to the environment, and return what a user would
    see: the exit code, stdout and stderr. For what only a process shows (signals, kill -9,
    native libraries writing to the terminal), use ``run_emo``."""
    import io
    import os

    from emo.cli import run

    out, err = io.StringIO(), io.StringIO()
    with process_state_restored():
        os.environ.update(env or {})
        get_settings.cache_clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run(list(args))
    return subprocess.CompletedProcess(["emo", *args], code, out.getvalue(), err.getvalue())


def run_emo(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``emo`` console script as a user would (killed after ``timeout`` s,
    so a hang fails the test that caused it rather than the whole session)."""
    import os

    command = Path(sys.executable).with_name("emo")
    return subprocess.run(
        [str(command), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=timeout,
    )
