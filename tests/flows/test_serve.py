"""`emo serve` and deployment dispatch: a batch rendered through a served deployment.

`emo serve` starts a real Prefect server and serves emo's three flows to it; `emo submit
--wait` with EMO_DISPATCH=deployment then renders the job as a run of the `render-track`
deployment (what Kubernetes workers do in production) and reads the run's final state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import run_emo, tone, write_wav
from tests.flows.conftest import ASSETS
from tests.services import free_port

pytestmark = pytest.mark.slow  # a served deployment, as processes

DEPLOYMENTS = ("render-track/render-track", "submit-batch/submit-batch", "nightly/nightly")


def _environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EMO_"))}
    return {**env, "EMO_HOME": str(home), **extra}


def _wait_for(condition, seconds: float, what: str, process: subprocess.Popen) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"emo serve exited early while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def _as_in_a_terminal() -> None:
    """In the child, before exec: Ctrl-C interrupts, as in a terminal. A test run started in
    the background by a shell (CI, `make test &`) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`emo serve` on a free port; yields (API URL, EMO_HOME)."""
    home, port = tmp_path / "home", free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("emo")), "serve", "--port", str(port)],
        env=_environment(home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_as_in_a_terminal,
    )

    def deployed() -> bool:
        try:
            names = [
                f"{d['flow_name']}/{d['name']}"
                for d in _deployments(api)
                if "flow_name" in d and "name" in d
            ]
        except httpx.HTTPError:
            return False
        return all(name in names for name in DEPLOYMENTS)

    try:
        _wait_for(deployed, 180, "the three deployments", process)
        yield api, home
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in its terminal
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        tail = (tmp_path / "serve.log").read_text()[-3000:]
        assert process.returncode != -signal.SIGKILL, f"not stopped 30 s after Ctrl-C:\n{tail}"
        try:  # and its Prefect server with it
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        else:
            raise AssertionError(f"emo serve left a process of its group running:\n{tail}")


def _deployments(api: str) -> list[dict]:
    response = httpx.post(f"{api}/deployments/filter", json={}, timeout=10)
    response.raise_for_status()
    flows = httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()
    names = {f["id"]: f["name"] for f in flows}
    return [{**d, "flow_name": names.get(d["flow_id"])} for d in response.json()]


def test_batch_renders_through_the_served_deployment(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    api, home = served
    vocal = write_wav(tmp_path / "vocal.wav", tone(1.5))
    manifest = tmp_path / "served.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "name": "served",
                "defaults": {"steps": 3, "face_box": [0.2, 0.15, 0.8, 0.85]},
                "jobs": [
                    {
                        "name": "anna",
                        "image": str(ASSETS / "demo_portrait.png"),
                        "audio": str(vocal),
                    }
                ],
            }
        )
    )
    env = _environment(home, EMO_DISPATCH="deployment", PREFECT_API_URL=api)
    out = tmp_path / "out"
    result = run_emo("submit", str(manifest), "--wait", "--output-dir", str(out), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "anna.mp4").stat().st_size > 0

    status = run_emo("status", "anna", "--json", env=env)
    assert json.loads(status.stdout)[0]["status"] == "succeeded"

    # The render ran as a run of the render-track deployment, not in the submitting process.
    render = next(d for d in _deployments(api) if d["flow_name"] == "render-track")
    runs = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"deployment_id": {"any_": [render["id"]]}}},
        timeout=10,
    ).json()
    assert [run["state_type"] for run in runs] == ["COMPLETED"]
    assert "batch:served" in runs[0]["tags"]
