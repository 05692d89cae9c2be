"""Tiny EMO models for the model tests (CPU, seeded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emo.models.components import EMOComponents, build_components
from emo.models.config import TINY
from emo.pipeline import EMOPipeline

ZERO_INIT = (
    "audio_projection.proj_out",
    "audio_embedding.linear_2",
    "face_locator.conv_out",
    "speed_attention.to_out",
)


def like_trained(components: EMOComponents, seed: int = 7) -> EMOComponents:
    """Give the layers EMO zero-initialises random weights, as training would.

    A freshly initialised model ignores audio, speed and the face mask by construction; tests
    that check those inputs matter need those layers to carry weight.
    """
    generator = torch.Generator().manual_seed(seed)
    for component, module in components.modules().items():
        for name, parameter in module.named_parameters():
            if any(f"{component}.{name}".find(z) >= 0 for z in ZERO_INIT):
                with torch.no_grad():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return components


@pytest.fixture(scope="module")
def tiny_components() -> EMOComponents:
    return like_trained(build_components(TINY, seed=0))


@pytest.fixture(scope="module")
def pipeline(tiny_components: EMOComponents) -> EMOPipeline:
    return EMOPipeline(tiny_components, TINY, TINY.scheduler)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """A 64x64 'portrait': smooth colours, deterministic."""
    y, x = np.mgrid[0:64, 0:64] / 64
    image = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), 0.5 + 0.3 * x * y], -1)
    return (image * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def vocal() -> np.ndarray:
    """3 s of syllable-like audio at 16 kHz (7 clips of 12 frames at 25 fps)."""
    t = np.arange(48000) / 16000
    wave = np.sin(2 * np.pi * 180 * t) * np.abs(np.sin(2 * np.pi * 3 * t))
    return (0.3 * wave).astype(np.float32)
