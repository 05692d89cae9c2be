"""Model benchmarks: time per clip, where it goes, what caching saves, and FLOP figures.

Prints, measured in this run on this machine (CPU, float32):
1. seconds per 12-frame clip at 40 steps with guidance, for the tiny and a mid-size
   configuration, and the share of a clip's time spent outside the denoising steps (VAE,
   ReferenceNet, audio encoder);
2. a naive loop that reruns ReferenceNet (reference + motion frames) at every step, divided by
   our pipeline, same configuration and run;
3. achieved FLOP/s of the denoising loop divided by this machine's float32 matmul FLOP/s;
4. from the code alone (meta device, no weights): FLOPs of one clip of the ``full``
   configuration at 512x512, 40 steps, guidance, and the seconds that implies on one H100 at
   40% of its dense bf16 peak (EMO's paper reports about 15 s per clip on its GPU).

    .venv/bin/python bench/model.py [--steps 40] [--skip-mid]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emo.models.components import build_components  # noqa: E402
from emo.models.conditioning import Conditioning  # noqa: E402
from emo.models.config import FULL, TINY, EMOConfig  # noqa: E402
from emo.pipeline import EMOPipeline  # noqa: E402

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM, dense bf16 tensor-core peak
MID = replace(
    TINY,
    name="mid",
    resolution=128,
    speed_dim=128,
    unet={
        **TINY.unet,
        "block_out_channels": [64, 128, 256],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2,
        "cross_attention_dim": 256,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    motion={
        **TINY.motion,
        "block_out_channels": [64, 128, 256],
        "motion_layers_per_block": 2,
        "motion_num_attention_heads": 8,
        "motion_norm_num_groups": 32,
    },
    vae={
        **TINY.vae,
        "block_out_channels": [32, 64, 128, 128],
        "norm_num_groups": 32,
        "sample_size": 128,
    },
    wav2vec2={
        **TINY.wav2vec2,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    audio_layers=(2, 4),
)


def inputs(config: EMOConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    size = config.resolution
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32)
    return image, audio


class Timer:
    """Accumulates the wall time of calls to a module's forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds, self.calls = 0.0, 0
        self.module, self.original = module, module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        module.forward = timed

    def restore(self) -> None:
        self.module.forward = self.original


def run_clips(pipeline: EMOPipeline, steps: int, clips: range) -> float:
    image, audio = inputs(pipeline.config)
    start = time.perf_counter()
    pipeline(image, audio, clips=clips, seed=0, steps=steps)
    return time.perf_counter() - start


def naive(pipeline: EMOPipeline, steps: int, clips: range) -> float:
    """Same generation, but ReferenceNet recomputed inside every denoising step."""
    backbone, reference_net = pipeline.components.backbone, pipeline.components.reference_net
    original = backbone.forward
    reference_latents = pipeline.encode_reference(inputs(pipeline.config)[0])

    def every_step(sample, timestep, audio_tokens, conditioning: Conditioning):
        reference = reference_net(reference_latents).tokens
        motion = conditioning.motion
        if motion is not None:  # recompute from latents of the right shape each step
            n = pipeline.config.motion_frames
            motion = reference_net(reference_latents.repeat(n, 1, 1, 1)).maps
        fresh = Conditioning(
            reference=reference,
            motion=motion,
            motion_frames=conditioning.motion_frames,
            speed=conditioning.speed,
        )
        return original(sample, timestep, audio_tokens, fresh)

    backbone.forward = every_step
    try:
        return run_clips(pipeline, steps, clips)
    finally:
        backbone.forward = original


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def backbone_flops(pipeline: EMOPipeline) -> int:
    """FLOPs of one guided Backbone call (batch 2) of this pipeline's configuration."""
    config, parts = pipeline.config, pipeline.components
    latent, frames, n = config.latent_size, config.clip_frames, config.motion_frames
    with torch.no_grad():
        reference = parts.reference_net(torch.randn(1, 4, latent, latent)).tokens
        motion = parts.reference_net(torch.randn(n, 4, latent, latent)).maps
        speed = parts.speed_encoder(torch.zeros(1, frames, config.audio_tokens))
        tokens = torch.zeros(2 * frames, config.audio_tokens, config.unet["cross_attention_dim"])
        conditioning = Conditioning(reference, motion, n, speed)
        sample = torch.randn(2, 4, frames, latent, latent)
        with FlopCounterMode(display=False) as counter:
            parts.backbone(sample, torch.tensor([500]), tokens, conditioning)
    return counter.get_total_flops()


def measure(config: EMOConfig, steps: int) -> None:
    pipeline = EMOPipeline(build_components(config, seed=0), config, config.scheduler)
    run_clips(pipeline, 1, range(0, 1))  # warm-up
    clips = range(0, 2)
    timer = Timer(pipeline.components.backbone)
    ours = run_clips(pipeline, steps, clips)
    timer.restore()
    naive_seconds = naive(pipeline, steps, clips)
    per_clip = ours / len(clips)
    outside = 1 - timer.seconds / ours
    achieved = backbone_flops(pipeline) * timer.calls / timer.seconds
    peak = matmul_flops()
    print(
        f"{config.name:>5}: {per_clip:7.2f} s/clip at {steps} steps; outside the denoising "
        f"steps {outside:6.1%}; naive (ReferenceNet every step) / ours = "
        f"{naive_seconds / ours:5.2f}x; denoising {achieved / 1e9:6.1f} GFLOP/s = "
        f"{achieved / peak:5.1%} of float32 matmul ({peak / 1e9:.0f} GFLOP/s)"
    )


def full_clip_flops(steps: int) -> dict[str, float]:
    """FLOPs of one clip of the full configuration, counted on the meta device (emo.cost)."""
    from emo.cost import clip_flops

    parts = clip_flops(FULL, steps)
    return {
        "ReferenceNet (reference, once per call)": parts["reference"],
        "ReferenceNet (motion frames, once per clip)": parts["motion"],
        "wav2vec2 (once per clip)": parts["audio"],
        f"Backbone x {steps} steps (guidance batch 2)": parts["step"],
        "VAE decode (12 frames)": parts["decode"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-mid", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    for config in [TINY] if args.skip_mid else [TINY, MID]:
        measure(config, args.steps)
    counts = full_clip_flops(args.steps)
    total = sum(counts.values())
    print(f"full configuration, 512x512, one 12-frame clip, {args.steps} steps with guidance:")
    for name, flops in counts.items():
        print(f"  {name:<44} {flops / 1e12:9.2f} TFLOP ({flops / total:5.1%})")
    seconds = total / (0.4 * H100_BF16_DENSE_FLOPS)
    print(
        f"  {'total':<44} {total / 1e12:9.2f} TFLOP -> {seconds:.1f} s per clip on one H100 "
        f"at 40% of dense bf16 peak (paper: ~15 s on its GPU)"
    )


if __name__ == "__main__":
    main()
