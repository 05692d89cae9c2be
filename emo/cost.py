"""What a render costs: FLOPs counted from the model code, turned into GPU time.

The FLOPs of one clip are counted on PyTorch's meta device (shapes only, no weights, no
arithmetic) for the loaded bundle's own configuration: the ReferenceNet over the reference and
the motion frames, wav2vec2 over the clip's audio window, the Backbone once per denoising step
with guidance (batch 2), and the VAE decode. GPU time is that count over a device class's dense
bf16 peak at ``UTILISATION`` (what a well-fed diffusion UNet reaches; bench/model.py measures
this machine's own figure). It is an estimate for budgeting a batch, not a promise.
"""

from __future__ import annotations

import functools
import json

# Dense bf16 tensor-core peaks (vendor datasheets), FLOP/s; "cpu" is a nominal 0.5 TFLOP/s.
PEAK_FLOPS = {
    "b200": 2250e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "a6000": 155e12,
    "rtx4090": 165e12,
    "a10g": 125e12,
    "l4": 121e12,
    "cpu": 0.5e12,
}
# Memory of one GPU of each class, GiB (vendor datasheets; a100: the 80 GB model).
MEMORY_GIB = {
    "b200": 180,
    "h200": 141,
    "h100": 80,
    "a100": 80,
    "l40s": 48,
    "a6000": 48,
    "rtx4090": 24,
    "a10g": 24,
    "l4": 24,
    "cpu": 0,
}
UTILISATION = 0.4


@functools.cache
def _clip_flops(config_json: str) -> dict[str, float]:
    import torch
    from accelerate import init_empty_weights
    from torch.utils.flop_counter import FlopCounterMode

    from emo.models.components import build_components
    from emo.models.conditioning import Conditioning
    from emo.models.config import EMOConfig

    config = EMOConfig.from_dict(json.loads(config_json))
    with torch.random.fork_rng(), init_empty_weights(include_buffers=True):
        parts = build_components(config)  # seeds the RNG: the caller's stream is kept
    latent, frames, n = config.latent_size, config.clip_frames, config.motion_frames
    channels = config.unet["in_channels"]  # 4 for SD1.5's VAE, 48 for the demo's pixel shuffle
    meta = {"device": "meta"}

    def count(call) -> tuple[float, object]:
        with FlopCounterMode(display=False) as counter:
            out = call()
        return float(counter.get_total_flops()), out

    with torch.no_grad():
        reference_flops, reference = count(
            lambda: parts.reference_net(torch.randn(1, channels, latent, latent, **meta))
        )
        motion_flops, motion = count(
            lambda: parts.reference_net(torch.randn(max(n, 1), channels, latent, latent, **meta))
        )
        seconds = (frames + 2 * (config.audio_window + 25)) / 25  # the clip's audio window
        audio_flops, _ = count(lambda: parts.wav2vec2(torch.randn(1, int(seconds * 16000), **meta)))
        speed = torch.zeros(1, frames, config.audio_tokens, config.speed_dim, **meta)
        width = config.unet["cross_attention_dim"]
        tokens = torch.zeros(2 * frames, config.audio_tokens, width, **meta)
        conditioning = Conditioning(reference.tokens, motion.maps, n, speed)
        sample = torch.randn(2, channels, frames, latent, latent, **meta)
        step_flops, _ = count(
            lambda: parts.backbone(sample, torch.tensor([500], **meta), tokens, conditioning)
        )
        decode_flops, _ = count(
            lambda: parts.vae.decode(torch.randn(1, channels, latent, latent, **meta))
        )
    return {
        "reference": reference_flops,
        "motion": motion_flops if n else 0.0,
        "audio": audio_flops,
        "step": step_flops,
        "decode": decode_flops * frames,
    }


def clip_flops(config, steps: int) -> dict[str, float]:
    """FLOPs of one clip of ``config`` at ``steps`` guided steps, by part (the ``step`` entry
    is all steps). Counted once per configuration in a process (a few seconds for ``full``)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    parts = dict(_clip_flops(key))
    parts["step"] *= steps
    return parts


def gpu_seconds(clips: int, steps: int, config, device: str) -> float:
    """Estimated seconds of one ``device``-class GPU to render ``clips`` clips."""
    per_clip = sum(clip_flops(config, steps).values())
    return clips * per_clip / (UTILISATION * PEAK_FLOPS[device])
