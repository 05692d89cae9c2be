"""A short seeded chaos run (bench/chaos.py) on a real farm: every fault kind that finds a
target is injected, and every job is still delivered once with frames identical to a
fault-free render, or cancelled when it was cancelled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a farm of real processes under injected faults

ROOT = Path(__file__).resolve().parents[2]


def _run_chaos(args: list[str], budget: float) -> tuple[int, str]:
    """Run bench/chaos.py; past ``budget`` seconds (or if this test is stopped), SIGTERM it,
    which tears its farm down (a SIGKILL, as ``subprocess.run`` sends, would leave the farm's
    servers and workers running for the rest of the session)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=budget)
    except KeyboardInterrupt:  # the run got the terminal's SIGINT too, and tears down itself
        process.wait()
        raise
    except BaseException:  # over budget, or pytest-timeout failed the test
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"the chaos run took over {budget:.0f} s and was stopped:\n{output[-8000:]}")
    return process.returncode, output


@pytest.mark.timeout(900)
def test_a_short_chaos_run_delivers_every_job(tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    code, output = _run_chaos(
        ["--seed", "7", "--jobs", "3", "--faults", "6", "--seconds", "3", "--timeout", "420"]
        + ["--json", str(report)],
        budget=720,
    )
    assert report.exists(), output[-8000:]
    result = json.loads(report.read_text())
    summary = json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1)
    assert sum(result["faults"].values()) >= 4, summary  # faults really landed
    jobs = result["jobs"]
    assert jobs["stranded"] == 0, summary
    assert jobs["delivered"] + jobs["cancelled"] == jobs["submitted"] == 3, summary
    assert result["frames_differing"] == 0, summary
    assert result["frames_identical"] == jobs["delivered"], summary
    assert result["manifests_lost"] == 0 and result["batches"] == 1, summary
    assert result["slots_leaked"] == 0 and not result["attempts_over_limit"], summary
    assert result["prefect_auth_required"], summary  # the farm's API refuses strangers
    assert code == 0, output[-4000:]
