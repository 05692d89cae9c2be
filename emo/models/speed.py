"""Speed layers' input: head rotation speed per frame -> bucket activations -> speed tokens.

Speed w (radians per frame) activates d buckets with centres c_d and radii r_d as
s_d = tanh(3 (w - c_d) / r_d) (paper, Sec. 3.3); frame i takes the buckets of frames i-m..i+m,
and an MLP turns each into a token the temporal modules attend to.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


def speed_windows(speeds: torch.Tensor, *, start: int, frames: int, window: int) -> torch.Tensor:
    """Per-frame windows of a track's speed schedule (T,): (frames, 2*window + 1).

    Frames before the first and after the last take the nearest frame's speed.
    """
    index = torch.arange(start - window, start + frames + window, device=speeds.device)
    padded = speeds[index.clamp(0, speeds.shape[0] - 1)]  # (frames + 2m,)
    return padded.unfold(0, 2 * window + 1, 1)  # (frames, K)


class SpeedEncoder(ModelMixin, ConfigMixin):
    """(B, F, K) speeds -> (B, F, K, dim) speed tokens."""

    @register_to_config
    def __init__(
        self, centers: tuple[float, ...], radii: tuple[float, ...], tokens: int, dim: int
    ) -> None:
        super().__init__()
        if len(centers) != len(radii):
            raise ValueError("speed bucket centres and radii differ in number")
        # Non-persistent: the config holds them; the state dict holds only learned weights.
        self.register_buffer("bucket_centers", torch.tensor(centers), persistent=False)
        self.register_buffer("bucket_radii", torch.tensor(radii), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(len(centers), dim), nn.SiLU(), nn.Linear(dim, dim))
        self.position = nn.Parameter(torch.randn(tokens, dim) * 0.02)

    def buckets(self, speeds: torch.Tensor) -> torch.Tensor:
        """s_d = tanh(3 (w - c_d) / r_d): (...,) -> (..., d)."""
        return torch.tanh(3 * (speeds[..., None] - self.bucket_centers) / self.bucket_radii)

    def forward(self, speeds: torch.Tensor) -> torch.Tensor:
        activations = self.buckets(speeds.to(self.bucket_centers.dtype)).to(self.dtype)
        return self.mlp(activations) + self.position
