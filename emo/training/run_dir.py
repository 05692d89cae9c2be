"""A training run's directory: what the run is, its log and its resumable checkpoint.

``run.json`` records the run's identity (stage, data, init bundle hash, training config); the
same command continues the run, and a different one on the same directory is refused.
``checkpoint/`` holds accelerate's state (model, optimizer, scheduler, RNG), the EMA and the
step, written beside the last one and swapped in, so a kill at any moment leaves one intact.
``log.jsonl`` has one line per logged step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from emo.bundle import BundleInfo
from emo.errors import InputError
from emo.training.config import TrainConfig


def run_identity(stage: int, data: Path, init: BundleInfo, train: TrainConfig) -> dict:
    return {
        "stage": stage,
        "data": str(data.resolve()),
        "init_sha256": init.sha256,
        "train": train.to_dict(),
    }


def open_run(run_dir: Path, identity: dict, *, write: bool = True) -> None:
    path = run_dir / "run.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != identity:
            changed = sorted(k for k in identity if recorded.get(k) != identity[k])
            raise InputError(
                f"run directory {run_dir} belongs to another run (differs in "
                f"{', '.join(changed)}); pass a new --run-dir or the same arguments to resume"
            )
    if write:  # the main process only, on several GPUs
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=2))


def save_checkpoint(
    accelerator: Accelerator, ema: EMAModel | None, run_dir: Path, step: int
) -> None:
    """Write the state beside the last checkpoint, then swap it in (main process)."""
    staging = run_dir / "checkpoint.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=False)  # every process takes part
    if accelerator.is_main_process:
        if ema is not None:
            torch.save(ema.state_dict(), staging / "ema.pt")
        (staging / "step.json").write_text(json.dumps({"step": step}))
        final, old = run_dir / "checkpoint", run_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, ema: EMAModel | None, run_dir: Path) -> int:
    final = run_dir / "checkpoint"
    if not (final / "step.json").is_file():  # a crash mid-swap leaves the previous one
        final = run_dir / "checkpoint.old"
    if not (final / "step.json").is_file():
        return 0
    accelerator.load_state(str(final))
    if ema is not None and (final / "ema.pt").is_file():
        ema.load_state_dict(torch.load(final / "ema.pt", weights_only=False))
    return int(json.loads((final / "step.json").read_text())["step"])


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    """One logged step, as a line of ``log.jsonl``."""
    with (run_dir / "log.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
