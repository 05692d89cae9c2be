"""The console a CLI user sees: one line for a bad input; Prefect's run logs (tracebacks
included) go to the Prefect API, where the UI shows them, not to the terminal."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_emo

ASSETS = Path(__file__).resolve().parents[2] / "emo" / "assets"


@pytest.mark.slow  # two emo processes: only a process shows what native libraries print
def test_a_portrait_without_a_face_is_one_line_naming_it(tmp_path: Path) -> None:
    portrait = tmp_path / "cat.png"
    Image.new("RGB", (128, 128), (200, 120, 80)).save(portrait)
    command = ("render", str(portrait), str(ASSETS / "demo_vocal.wav"), "-o", "out.mp4")
    result = run_emo(*command, timeout=240)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: no face found in {portrait.name}; give a face box, use the full_frame face "
        "policy, or choose a portrait with a visible face"
    ]
    assert result.stdout == ""
    # -v shows what happened underneath: Prefect's task and flow logs with the traceback.
    verbose = run_emo("-v", *command, timeout=240)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


@pytest.fixture
def quiet(console_state: None) -> None:
    import emo.quiet

    emo.quiet.quiet_console()


def test_quiet_run_logs_still_reach_the_prefect_api(
    prefect_server: str, quiet: None, capfd: pytest.CaptureFixture[str]
) -> None:
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    marker = f"rendering-{uuid.uuid4().hex[:8]}"

    @flow(name="quiet-check")
    def logs_a_line() -> str:
        from prefect.runtime import flow_run

        get_run_logger().warning(marker)
        return str(flow_run.id)

    run_id = logs_a_line()
    APILogHandler().flush()  # logs are sent in batches
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            if marker in [log.message for log in logs] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert marker in [log.message for log in logs]  # the UI shows it
    assert marker not in capfd.readouterr().err  # the terminal does not


def test_a_render_option_problem_names_the_option_not_emos_manifest() -> None:
    from emo.cli_jobs import user_problems

    problems = [
        "job 'out' (row 1), speed: speed is a level from 0 to 1",
        "job 'out' (row 1): no face found in cat.png; give a face box",
    ]
    assert user_problems(problems) == (
        "--speed: speed is a level from 0 to 1; no face found in cat.png; give a face box"
    )
