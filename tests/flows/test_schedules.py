"""The scheduled deployments get runs from a real ``prefect server start``.

The sweep (every 600 s) and the nightly (02:00) only exist as runs if the server's scheduler
service creates them. Prefect's test harness runs no scheduler, so this starts the server the
farm runs and registers the project as ``emo deploy --farm`` does. With SQLAlchemy 2.1 the
scheduler failed on every loop (``Can't evaluate bulk DML statement``), so no schedule ever
fired while every test of the deployments' settings passed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.farm_harness import PrefectServer
from tests.conftest import run_emo

pytestmark = pytest.mark.slow  # a Prefect server as a process, with its scheduler

ROOT = Path(__file__).resolve().parents[2]
SCHEDULED = ("sweep/sweep", "nightly/nightly")


def _scheduled_runs(server: PrefectServer) -> dict[str, int]:
    """How many SCHEDULED runs the server holds for each deployment of ``SCHEDULED``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    counts = {}
    settings = {PREFECT_API_URL: server.api, PREFECT_API_AUTH_STRING: server.auth_string}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        for name in SCHEDULED:
            deployment = client.read_deployment_by_name(name)
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )
                ),
            )
            counts[name] = len(runs)
    return counts


def test_the_server_schedules_runs_of_the_sweep_and_the_nightly(tmp_path: Path) -> None:
    server = PrefectServer(tmp_path / "prefect", f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}")
    server.start()
    try:
        env = {"PREFECT_API_URL": server.api, "PREFECT_API_AUTH_STRING": server.auth_string}
        done = run_emo("deploy", "--farm", "--project", str(ROOT), env=env, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        # The scheduler looks at recently changed deployments every 5 s (all of them every
        # 60 s); give it two of its long loops.
        deadline = time.monotonic() + 150
        counts = _scheduled_runs(server)
        while min(counts.values()) == 0 and time.monotonic() < deadline:
            time.sleep(2)
            counts = _scheduled_runs(server)
        log = (tmp_path / "prefect" / "server.log").read_text(errors="replace")
    finally:
        server.stop()
    assert "bulk DML" not in log, log[-3000:]
    assert all(counts.values()), f"deployments without a scheduled run: {counts}"
