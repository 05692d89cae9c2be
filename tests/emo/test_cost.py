"""GPU-time estimates from FLOPs counted in the model code (emo/cost.py)."""

from __future__ import annotations

import pytest

from emo.bundle import read_bundle_info
from emo.cost import PEAK_FLOPS, UTILISATION, clip_flops, gpu_seconds
from emo.models.config import FULL, TINY
from tests.flows.test_validate import ASSETS

DEMO = read_bundle_info(ASSETS.parent / "weights" / "demo").config


def test_only_the_denoising_steps_scale_with_steps() -> None:
    ten, twenty = clip_flops(TINY, 10), clip_flops(TINY, 20)
    assert twenty["step"] == 2 * ten["step"] > 0
    assert {k: v for k, v in ten.items() if k != "step"} == {
        k: v for k, v in twenty.items() if k != "step"
    }


@pytest.mark.slow  # counts the full configuration's FLOPs (about 12 s)
def test_the_loaded_configuration_is_what_is_counted() -> None:
    full, demo = gpu_seconds(1, 40, FULL, "h100"), gpu_seconds(1, 40, DEMO, "h100")
    # The full configuration at 512 px: about 1,360 TFLOP a clip at 40 steps, 3.4 s on one H100
    # at 40 % of its dense bf16 peak (bench/model.py prints the parts).
    assert full == pytest.approx(3.44, rel=0.05)
    assert demo < full / 100  # the demo model is tiny; it used to be estimated as full
    assert gpu_seconds(7, 40, FULL, "h100") == pytest.approx(7 * full)


def test_device_classes_scale_by_their_peaks() -> None:
    h100, l4 = gpu_seconds(3, 20, TINY, "h100"), gpu_seconds(3, 20, TINY, "l4")
    assert l4 / h100 == pytest.approx(PEAK_FLOPS["h100"] / PEAK_FLOPS["l4"])
    flops = sum(clip_flops(TINY, 20).values())
    assert h100 == pytest.approx(3 * flops / (UTILISATION * PEAK_FLOPS["h100"]))


def test_memory_is_the_weights_and_the_peak_of_live_tensors() -> None:
    import torch

    from emo.models.components import build_components
    from emo.models.config import TINY
    from emo.sizing import _peak, gpu_memory

    def two_then_one() -> object:
        a = torch.empty(1000, device="meta")  # 4,000 bytes
        b = torch.empty(500, device="meta")  # 2,000 bytes: 6,000 alive
        del a
        return b + 1  # a is gone: 4,000 alive

    assert _peak(two_then_one, scale=1.0) == 6000
    estimate = gpu_memory(TINY)
    parts = build_components(TINY, seed=0)
    modules = [m for m in vars(parts).values() if isinstance(m, torch.nn.Module)]
    assert estimate.weights == 2 * sum(p.numel() for m in modules for p in m.parameters())
    guided = 2 * TINY.unet["in_channels"] * TINY.clip_frames * TINY.latent_size**2 * 2  # bf16
    assert estimate.step > guided  # the step holds at least its own input
    frames = 4 * 3 * TINY.resolution**2 * 2  # a decoded chunk of 4 frames
    assert estimate.decode >= frames and estimate.total > estimate.weights
