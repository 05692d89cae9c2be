"""Face Locator: light convolutions encoding the face-region mask to latent size.

The mask is the union of the clip's face boxes, (B, 1, H, W) at pixel resolution; the output
(B, C, H/s, W/s) is added to every frame's noisy latents. The last convolution starts at zero,
so a new Face Locator adds nothing until trained.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class FaceLocator(ModelMixin, ConfigMixin):
    """One stride-2 stage per channel step: len(channels) - 1 halvings (3 for SD's 8x VAE)."""

    @register_to_config
    def __init__(
        self, channels: tuple[int, ...] = (16, 32, 96, 256), latent_channels: int = 4
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_in, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(c_in, c_out, 3, padding=1, stride=2),
                nn.SiLU(),
            ]
        self.encoder = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(channels[-1], latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, latent_channels, H / 2**(len-1), W / 2**(len-1))."""
        return self.conv_out(self.encoder(mask.to(self.dtype)))
