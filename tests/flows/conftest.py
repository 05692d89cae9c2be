"""A studio for flow tests: real PostgreSQL, a real S3 server, a Prefect test server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from emo.settings import get_settings
from emo.store import S3Store
from tests.conftest import process_state_restored, write_wav
from tests.services import WeedServer

ASSETS = Path(__file__).resolve().parents[2] / "emo" / "assets"


_TINY_WEIGHTS: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny bundle for every flow test: they test orchestration, so they must
    not depend on (or wait for) whichever demo model the package ships."""
    from emo.bundle import save_bundle
    from emo.models.components import build_components
    from emo.models.config import TINY

    path = tmp_path_factory.mktemp("weights") / "tiny"
    save_bundle(build_components(TINY, seed=0), TINY, path)
    _TINY_WEIGHTS[:] = [path]
    return path


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One Prefect test server for the session (about 20 s to start)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def console_state() -> Iterator[None]:
    """For a test that runs the CLI in-process: what it changes for the process is put back
    (``tests.conftest.process_state_restored``)."""
    with process_state_restored():
        yield


@dataclass
class Studio:
    """Settings (as environment), store and inputs of one test's production setup."""

    home: Path
    env: dict[str, str]
    store: S3Store
    portrait: Path
    vocal: Path
    seconds: float


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = np.abs(np.sin(2 * np.pi * 2.7 * t)) * (rng.random() * 0.2 + 0.8)
    return (0.3 * envelope * np.sin(2 * np.pi * 160 * t)).astype(np.float32)


def clear_caches() -> None:
    from emo.render import load_pipeline
    from flows.context import _services

    get_settings.cache_clear()
    _services.cache_clear()
    load_pipeline.cache_clear()


def make_studio(
    tmp_path: Path, pg_url: str, weed: WeedServer, monkeypatch, *, seconds: float = 3.0
) -> Studio:
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = weed.s3_store(prefix="studio")

    store.ensure_bucket()
    env = {
        "EMO_HOME": str(tmp_path / "home"),
        "EMO_DATABASE_URL": pg_url,
        "EMO_STORE_URL": f"s3://{store.bucket}/studio",
        "EMO_S3_ENDPOINT": weed.endpoint,
        "EMO_S3_ACCESS_KEY": weed.access_key,
        "EMO_S3_SECRET_KEY": weed.secret_key,
        "EMO_S3_SECURE": "false",
        "EMO_SEGMENT_SECONDS": "1.0",
        "EMO_WEIGHTS": str(_TINY_WEIGHTS[0]),
        "EMO_LEASE_SECONDS": "6",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    clear_caches()
    vocal = write_wav(tmp_path / "vocal.wav", speech(seconds))
    return Studio(
        home=tmp_path / "home",
        env=env,
        store=store,
        portrait=ASSETS / "demo_portrait.png",
        vocal=vocal,
        seconds=seconds,
    )


@pytest.fixture
def studio(
    prefect_server: str,
    pg_url: str,
    weed: WeedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Studio]:
    yield make_studio(tmp_path, pg_url, weed, monkeypatch)
    clear_caches()


def manifest(path: Path, studio: Studio, names: list[str], **options) -> Path:
    """A YAML manifest of jobs over the studio's portrait and vocal."""
    import yaml

    jobs = [
        {
            "name": n,
            "image": str(studio.portrait),
            "audio": str(studio.vocal),
            "face_box": [0.2, 0.15, 0.8, 0.85],
            **options,
        }
        for n in names
    ]
    path.write_text(yaml.safe_dump({"name": path.stem, "jobs": jobs}))
    return path


def environment(studio: Studio, api_url: str) -> dict[str, str]:
    """Environment for an `emo` subprocess that shares this test's services."""
    return {**os.environ, **studio.env, "PREFECT_API_URL": api_url}


def hold_gpu_slot(studio: Studio, job_id: str, owner: str) -> None:
    """Make ``owner`` hold the job's lease (for an hour) and a GPU slot (limit 1), as a render
    on another host, or a killed one on this host, leaves them in the job database."""
    from db.engine import make_engine, session_factory
    from db.gpu_slots import take_gpu_slot
    from db.leases import acquire_lease

    with session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))() as session:
        assert acquire_lease(session=session, job_id=job_id, owner=owner, ttl_seconds=3600)
        assert take_gpu_slot(
            session=session,
            job_id=job_id,
            owner=owner,
            default_slots=1,
            is_dead=lambda owner: False,
        ).acquired
