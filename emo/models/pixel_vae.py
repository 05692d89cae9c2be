"""A fixed, exactly invertible stand-in for the VAE: pixel unshuffle (space to depth).

For the small ``demo`` configuration only. No VAE can be downloaded here and training one
costs hours on these CPUs, while the frames of a 64x64 model are small enough to denoise
directly: a 64x64x3 frame becomes 16x16x48 "latents" (factor 4) and decoding is the exact
inverse. It has the interface of diffusers' ``AutoencoderKL`` that the pipeline and the
trainer use (``encode(x).latent_dist.mode()/sample()``, ``decode(z).sample``,
``config.scaling_factor``, ``config.latent_channels``), and no weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


@dataclass
class _Exact:
    """A 'distribution' that is one point: mode and sample are the latents themselves."""

    latents: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents


@dataclass
class _Encoded:
    latent_dist: _Exact


@dataclass
class _Decoded:
    sample: torch.Tensor


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """(B, 3, H, W) in [-1, 1] <-> (B, 3 * factor^2, H / factor, W / factor)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        factor: int = 4,
        latent_channels: int = 48,
        scaling_factor: float = 1.0,
        sample_size: int = 64,
    ) -> None:
        super().__init__()
        if latent_channels != in_channels * factor**2:
            raise ValueError(f"latent_channels must be {in_channels * factor**2}")
        # A marker buffer: diffusers needs a dtype and device even for a weightless model.
        self.register_buffer("_marker", torch.zeros(1), persistent=True)

    def encode(self, x: torch.Tensor) -> _Encoded:
        return _Encoded(_Exact(F.pixel_unshuffle(x, self.config.factor)))

    def decode(self, z: torch.Tensor) -> _Decoded:
        return _Decoded(F.pixel_shuffle(z, self.config.factor))
