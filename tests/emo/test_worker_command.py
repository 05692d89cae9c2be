"""`emo worker`: the Prefect process worker it becomes (in process; the ``os.execv`` that would
replace the test process with the worker is caught, and what it would run is read)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import emo_in_process

FARM = {
    "PREFECT_API_URL": "http://farm:4200/api",
    "EMO_DATABASE_URL": "postgresql+psycopg://postgres@farm/emo",
    "EMO_STORE_URL": "s3://emo/studio",
    "EMO_S3_ENDPOINT": "farm:9000",
}


class Execed(Exception):
    """What ``os.execv`` was asked to run, and the environment it would run with."""

    def __init__(self, command: list[str]) -> None:
        super().__init__(command)
        self.command, self.env = command, dict(os.environ)


def _exec(path: str, command: list[str]) -> None:
    raise Execed(command)


def test_a_worker_polls_for_runs_every_two_seconds_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "execv", _exec)
    monkeypatch.delenv("PREFECT_WORKER_QUERY_SECONDS", raising=False)
    with pytest.raises(Execed) as started:
        emo_in_process("worker", "--pool", "gpu-local", "--limit", "2", env=FARM)
    assert started.value.command[1:5] == ["-m", "prefect", "worker", "start"]
    assert started.value.command[5:7] == ["--pool", "gpu-local"]
    assert started.value.command[-2:] == ["--limit", "2"]
    # Renders are dispatched as GPUs free up: a run starts within seconds of being made.
    assert started.value.env["PREFECT_WORKER_QUERY_SECONDS"] == "2"
    assert started.value.env["EMO_DISPATCH"] == "deployment"

    with pytest.raises(Execed) as told:
        emo_in_process(
            "worker", "--pool", "cpu-local", env={**FARM, "PREFECT_WORKER_QUERY_SECONDS": "15"}
        )
    assert told.value.env["PREFECT_WORKER_QUERY_SECONDS"] == "15"


def test_a_worker_without_the_farm_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "execv", _exec)
    for name in ("PREFECT_API_URL", "EMO_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    store = {"EMO_STORE_URL": "s3://x/y", "EMO_S3_ENDPOINT": "farm:9000"}
    done = emo_in_process("worker", "--pool", "gpu-local", env=store)
    assert done.returncode != 0
    assert "PREFECT_API_URL, EMO_DATABASE_URL not set" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
