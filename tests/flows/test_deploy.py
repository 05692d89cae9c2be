"""`emo deploy` against a real Prefect server: the work pools from k8s/work-pools, the three
deployments of prefect.yaml (`prefect deploy --all`) with their pools, schedule, parameters
and concurrency limits, and the zombie-run automation; twice, to show it is idempotent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_emo

pytestmark = pytest.mark.slow  # emo deploy against a Prefect server, as processes

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example.com/studio/emo:0.1.0"


def test_emo_deploy_registers_pools_deployments_schedule_and_automation(
    prefect_server: str,
) -> None:
    from prefect.client.orchestration import get_client

    env = {
        "PREFECT_API_URL": prefect_server,
        "EMO_IMAGE": IMAGE,
        "EMO_NIGHTLY_TIMEZONE": "Europe/London",
        "EMO_NAMESPACE": "emo-dev",
    }
    for _ in range(2):  # the second run updates what the first made
        done = run_emo("deploy", "--project", str(ROOT), env=env, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "deployments: render-track, finish-job, submit-batch, nightly" in done.stdout
    assert "nightly runs at 02:00 Europe/London" in done.stdout

    with get_client(sync_client=True) as client:
        pools = {name: client.read_work_pool(name) for name in ("gpu", "cpu")}
        render = client.read_deployment_by_name("render-track/render-track")
        finish = client.read_deployment_by_name("finish-job/finish-job")
        submit = client.read_deployment_by_name("submit-batch/submit-batch")
        nightly = client.read_deployment_by_name("nightly/nightly")
        automations = client.read_automations_by_name("emo-crash-zombie-flow-runs")

    for name, pool in pools.items():
        assert pool.type == "kubernetes"
        template = json.loads((ROOT / "k8s" / "work-pools" / f"{name}.json").read_text())
        assert pool.base_job_template == template
    assert (render.work_pool_name, submit.work_pool_name, nightly.work_pool_name) == (
        "gpu",
        "cpu",
        "cpu",
    )
    assert render.job_variables["image"] == IMAGE and render.job_variables["gpu_count"] == 1
    # Finishing (assembly, QC, publishing) runs on the CPU pool, with no GPU asked for.
    assert finish.work_pool_name == "cpu" and "gpu_count" not in finish.job_variables
    assert set(finish.parameter_openapi_schema["properties"]) == {"job_id", "output"}
    assert nightly.job_variables["image"] == IMAGE
    for deployment in (render, submit, nightly):  # Jobs go to the workers' namespace
        assert deployment.job_variables["namespace"] == "emo-dev"
    limits = [d.global_concurrency_limit for d in (render, submit, nightly)]
    assert [limit.limit for limit in limits] == [16, 4, 1]
    strategies = [d.concurrency_options.collision_strategy.value for d in (render, nightly)]
    assert strategies == ["ENQUEUE", "CANCEL_NEW"]
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "Europe/London" and schedule.active
    assert nightly.parameters == {"inbox": "inbox/", "retry_failed": True}
    assert not render.schedules and not submit.schedules
    assert set(render.parameter_openapi_schema["properties"]) == {"job_id", "output"}
    assert render.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/emo"}}
    ]

    (automation,) = automations  # replaced, not duplicated, by the second run
    assert automation.trigger.posture == "Proactive" and automation.trigger.within.seconds == 90
    assert automation.actions[0].type == "change-flow-run-state"
    assert automation.actions[0].state.value == "CRASHED"
    spec = yaml.safe_load((ROOT / "k8s" / "automations" / "zombie-flow-runs.yaml").read_text())
    assert spec["automations"][0]["name"] == automation.name


def test_emo_deploy_names_a_bad_time_zone_and_a_missing_project(
    prefect_server: str, tmp_path: Path
) -> None:
    env = {"PREFECT_API_URL": prefect_server, "EMO_NIGHTLY_TIMEZONE": "Mars/Olympus"}
    done = run_emo("deploy", "--project", str(ROOT), env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "EMO_NIGHTLY_TIMEZONE: 'Mars/Olympus' is not a time zone" in done.stderr + done.stdout
    done = run_emo("deploy", "--project", str(tmp_path), env={"PREFECT_API_URL": prefect_server})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"no prefect.yaml in {tmp_path}" in done.stderr + done.stdout


def test_every_pool_gives_runs_the_heartbeat_the_zombie_automation_expects(
    prefect_server: str,
) -> None:
    """The automation crashes a run after ``within`` s without a heartbeat. Prefect's own
    heartbeat default (180 s) is longer, so a pool that left it would see every run of over
    90 s marked Crashed while it still renders (found on the farm benchmark)."""
    from prefect.client.orchestration import get_client

    from emo.prefect_setup import HEARTBEAT_ENV, ensure_process_pools

    spec = yaml.safe_load((ROOT / "k8s" / "automations" / "zombie-flow-runs.yaml").read_text())
    within = spec["automations"][0]["trigger"]["within"]
    assert ensure_process_pools() == ["gpu-local", "cpu-local"]
    with get_client(sync_client=True) as client:
        farm = [client.read_work_pool(n).base_job_template for n in ("gpu-local", "cpu-local")]
    k8s = [json.loads(p.read_text()) for p in sorted((ROOT / "k8s" / "work-pools").glob("*.json"))]
    beats = [t["variables"]["properties"]["env"]["default"][HEARTBEAT_ENV] for t in farm + k8s]
    assert len(beats) == 4
    for beat in beats:
        assert 3 * float(beat) <= within  # a live run beats three times in the window
