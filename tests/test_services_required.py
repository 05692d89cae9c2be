"""Under CI=true a test whose service is missing fails; elsewhere it is skipped, never passed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent
NEEDS_POSTGRES = "tests/db/test_engine.py::test_pooled_connection_killed_by_the_server_is_replaced"


@pytest.mark.slow  # a pytest process per case
@pytest.mark.parametrize(("ci", "code", "outcome"), [("true", 1, "1 error"), ("", 0, "1 skipped")])
def test_missing_postgres(ci: str, code: int, outcome: str) -> None:
    env = {
        **os.environ,
        "CI": ci,
        "EMO_TEST_PG_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", NEEDS_POSTGRES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == code and outcome in result.stdout, result.stdout
    assert "PostgreSQL is not reachable" in result.stdout
