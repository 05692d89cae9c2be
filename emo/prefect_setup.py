"""``emo deploy``: register emo with a Prefect server (work pools, deployments, automations).

What a studio runs once per Prefect server and again after every upgrade (the
``emo-prefect-setup`` Job in k8s/ does exactly this). Every step creates or updates, so
running it twice changes nothing:

1. the ``gpu`` and ``cpu`` work pools (type ``kubernetes``) with the base job templates in
   ``k8s/work-pools/<pool>.json``;
2. the deployments of ``prefect.yaml`` (``prefect deploy --all``), with ``EMO_IMAGE``,
   ``EMO_NIGHTLY_TIMEZONE`` and ``EMO_NAMESPACE`` filled in;
3. the automations of ``k8s/automations/*.yaml``, replaced by name.

With ``farm=True`` (a render farm of workstations, no Kubernetes) the pools are ``gpu-local``
and ``cpu-local`` of type ``process``, served by ``emo worker``; the deployments are the same,
with no Kubernetes job variables, and run from the checkout at ``project`` on every
workstation (as the image's /opt/emo is in the cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from emo.errors import EmoError, InputError, SettingsError

POOLS_DIR = Path("k8s/work-pools")
AUTOMATIONS_DIR = Path("k8s/automations")
FARM_POOLS = {"gpu": "gpu-local", "cpu": "cpu-local"}  # prefect.yaml's pool -> the farm's
# Flow runs' heartbeat, as the Kubernetes pools set it: k8s/automations/zombie-flow-runs.yaml
# marks a run Crashed after 90 s without one.
HEARTBEAT_ENV, HEARTBEAT_SECONDS = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"


@dataclass(frozen=True)
class DeployReport:
    """What ``deploy`` registered, by name."""

    pools: list[str]
    deployments: list[str]
    automations: list[str]


def check_project(project: Path) -> None:
    """The folder must hold prefect.yaml and the work-pool templates (a checkout or /opt/emo)."""
    if not (project / "prefect.yaml").is_file():
        raise InputError(
            f"no prefect.yaml in {project}; run emo deploy in the emo checkout "
            "(or the image's /opt/emo), or pass --project"
        )
    if not sorted((project / POOLS_DIR).glob("*.json")):
        raise InputError(f"no work-pool templates in {project / POOLS_DIR}")


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(
            f"EMO_NIGHTLY_TIMEZONE: {name!r} is not a time zone (e.g. UTC, Europe/London)"
        ) from None
    return name


def wait_for_api(seconds: float) -> None:
    """Wait until the Prefect API answers (the server may still be starting)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    while True:
        try:
            with get_client(sync_client=True) as client:
                if client.api_healthcheck() is None:
                    return
        except Exception:  # noqa: BLE001 (not up yet: retried until the deadline)
            pass
        if time.monotonic() >= deadline:
            url = os.environ.get("PREFECT_API_URL", "the Prefect API (PREFECT_API_URL unset)")
            raise EmoError(f"{url} did not answer within {seconds:.0f} s")
        time.sleep(2)


def ensure_work_pools(project: Path) -> list[str]:
    """Create or update one ``kubernetes`` work pool per template file (name = file stem)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    names = []
    with get_client(sync_client=True) as client:
        for path in sorted((project / POOLS_DIR).glob("*.json")):
            try:
                template = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise InputError(f"{path}: not JSON ({error})") from None
            client.create_work_pool(
                WorkPoolCreate(name=path.stem, type="kubernetes", base_job_template=template),
                overwrite=True,
            )
            names.append(path.stem)
    return names


def ensure_process_pools() -> list[str]:
    """Create or update the farm's pools (type ``process``, Prefect's default template, and
    the runs' heartbeat every ``HEARTBEAT_SECONDS``: Prefect's own default, 180 s, is longer
    than the zombie automation's 90 s, which would mark every run of over 90 s Crashed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    env = template["variables"]["properties"]["env"]
    env["default"] = {**env.get("default", {}), HEARTBEAT_ENV: HEARTBEAT_SECONDS}
    with get_client(sync_client=True) as client:
        for name in FARM_POOLS.values():
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template),
                overwrite=True,
            )
    return list(FARM_POOLS.values())


def farm_config(project: Path) -> dict:
    """prefect.yaml for the farm: its pools, no Kubernetes job variables, code at ``project``."""
    config = yaml.safe_load((project / "prefect.yaml").read_text())
    config["pull"] = [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
    ]
    for deployment in config.get("deployments", []):
        pool = deployment["work_pool"]["name"]
        deployment["work_pool"] = {"name": FARM_POOLS[pool], "job_variables": {}}
    return config


def deploy_all(
    project: Path, *, image: str, timezone: str, namespace: str, farm: bool = False
) -> list[str]:
    """``prefect deploy --all`` in ``project``; returns the deployment names of prefect.yaml."""
    env = {
        **os.environ,
        "EMO_IMAGE": image,
        "EMO_NIGHTLY_TIMEZONE": timezone,
        "EMO_NAMESPACE": namespace,
    }
    if farm:
        config = farm_config(project)
    else:
        config = yaml.safe_load((project / "prefect.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="emo-deploy-") as folder:
        prefect_file = Path(folder) / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefect",
                "deploy",
                "--all",
                "--no-prompt",
                "--prefect-file",
                str(prefect_file if farm else project / "prefect.yaml"),
            ],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise EmoError(f"prefect deploy --all failed in {project}:\n{tail}")
    return [d["name"] for d in config.get("deployments", [])]


def ensure_automations(project: Path) -> list[str]:
    """Create each automation of k8s/automations/*.yaml, replacing any of the same name."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    names = []
    with get_client(sync_client=True) as client:
        for path in sorted((project / AUTOMATIONS_DIR).glob("*.yaml")):
            for spec in yaml.safe_load(path.read_text()).get("automations", []):
                automation = AutomationCore.model_validate(spec)
                for old in client.read_automations_by_name(automation.name):
                    client.delete_automation(old.id)
                client.create_automation(automation)
                names.append(automation.name)
    return names


def deploy(
    project: Path,
    *,
    image: str,
    timezone: str,
    namespace: str,
    wait_seconds: float = 0,
    farm: bool = False,
) -> DeployReport:
    """Register everything; see the module docstring."""
    check_project(project)
    check_timezone(timezone)
    wait_for_api(wait_seconds)
    pools = ensure_process_pools() if farm else ensure_work_pools(project)
    deployments = deploy_all(
        project, image=image, timezone=timezone, namespace=namespace, farm=farm
    )
    automations = ensure_automations(project)
    return DeployReport(pools=pools, deployments=deployments, automations=automations)
