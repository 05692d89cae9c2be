"""Training throughput per stage (tiny configuration, this machine), to plan training runs.

Builds a small synthetic corpus and dataset, then runs each stage for a few steps from a tiny
random bundle and prints seconds per step, samples (stage 1: frames; stages 2-3: clips of
n + f frames) per second, and the hours 10,000 steps would take.

    .venv/bin/python bench/train.py [--steps 12] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emo.bundle import save_bundle  # noqa: E402
from emo.models.components import build_components  # noqa: E402
from emo.models.config import TINY  # noqa: E402
from emo.synthetic.corpus import make_corpus  # noqa: E402
from emo.training.config import load_train_config  # noqa: E402
from emo.training.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from emo.training.trainer import train_stage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_corpus(root / "videos", videos=4, seconds=3.0, size=TINY.resolution, workers=2)
        prepare_dataset(root / "videos", root / "data", PrepareOptions(TINY.resolution))
        save_bundle(build_components(TINY, seed=0), TINY, root / "init")
        print(
            f"tiny configuration ({TINY.resolution}x{TINY.resolution}), batch {args.batch}, "
            f"{args.steps} steps per stage (first step excluded)"
        )
        print("stage  s/step  samples/s  frames/s  hours per 10k steps")
        for stage in (1, 2, 3):
            train = load_train_config(
                None,
                {
                    "steps": args.steps,
                    "batch_size": args.batch,
                    "log_every": 1,
                    "checkpoint_every": 10**6,
                },
            )
            run = root / f"run{stage}"
            started = time.perf_counter()
            train_stage(
                stage=stage,
                data=root / "data",
                init=root / "init",
                output=root / f"out{stage}",
                train=train,
                run_dir=run,
            )
            total = time.perf_counter() - started
            records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            rate = sum(r["samples_per_second"] for r in records[1:]) / (len(records) - 1)
            per_step = args.batch / rate
            frames = 1 if stage == 1 else TINY.clip_frames + TINY.motion_frames
            print(
                f"{stage:>5}  {per_step:6.2f}  {rate:9.2f}  {rate * frames:8.1f}  "
                f"{per_step * 10_000 / 3600:19.1f}   (stage wall time {total:.1f} s)"
            )


if __name__ == "__main__":
    main()
