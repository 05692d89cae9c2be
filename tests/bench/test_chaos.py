"""A short seeded chaos run (bench/chaos.py) on a real farm: every fault kind that finds a
target is injected, and every job is still delivered once with frames identical to a
fault-free render, or cancelled when it was cancelled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a farm of real processes under injected faults

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_chaos_run_delivers_every_job(tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--seed", "7", "--jobs", "3"]
        + ["--faults", "6", "--seconds", "3", "--timeout", "420", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.exists(), done.stdout[-4000:] + done.stderr[-4000:]
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
    assert done.returncode == 0, done.stdout[-4000:]
