"""GPU sizing of the full configuration, computed from the model code (estimates).

For each GPU class emo knows (``EMO_GPU_CLASS``): the memory a render needs (``emo.sizing``:
weights and peak activations traced on the meta device, bf16, fused attention; a lower bound)
against the GPU's, and the time per 12-frame clip at 40 guided steps (``emo.cost``: FLOPs
counted from the code over the class's bf16 peak at 40 %), with what a minute of video costs.

    python bench/sizing.py [--config full] [--steps 40]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emo.cost import MEMORY_GIB, PEAK_FLOPS, UTILISATION, gpu_seconds  # noqa: E402
from emo.models.config import get_config  # noqa: E402
from emo.sizing import gpu_memory  # noqa: E402

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="full")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    config = get_config(args.config)
    memory = gpu_memory(config)
    clips_per_minute = 60 * 25 / config.clip_frames
    print(
        f"{config.name} ({config.resolution}x{config.resolution}, {config.clip_frames}-frame "
        f"clips, {args.steps} guided steps, bf16): weights {memory.weights / GIB:.1f} GiB, "
        f"denoising step peak {memory.step / GIB:.1f} GiB, VAE decode peak (4 frames) "
        f"{memory.decode / GIB:.1f} GiB; needs at least {memory.total / GIB:.1f} GiB"
    )
    print("| GPU | memory | fits | s per clip | GPU-minutes per minute of video |")
    print("|---|---|---|---|---|")
    for gpu in PEAK_FLOPS:
        if gpu == "cpu":
            continue
        seconds = gpu_seconds(1, args.steps, config, gpu)
        fits = "yes" if MEMORY_GIB[gpu] * GIB >= memory.total * 1.2 else "no"  # 20 % headroom
        minutes = seconds * clips_per_minute / 60
        print(f"| {gpu} | {MEMORY_GIB[gpu]} GiB | {fits} | {seconds:.1f} | {minutes:.1f} |")
    print(f"(time at {UTILISATION:.0%} of each GPU's dense bf16 peak; estimates, not measured)")


if __name__ == "__main__":
    main()
