"""Speed layers: head rotation speed per frame -> bucket activations -> speed tokens, and the
attention through which each temporal module's frames read them.

Speed w (radians per frame) activates d buckets with centres c_d and radii r_d as
s_d = tanh(3 (w - c_d) / r_d) (paper, Sec. 3.3); frame i takes the buckets of frames i-m..i+m,
and an MLP turns each into a token; in each temporal module, frame i attends to its tokens
(``SpeedAttention``, output projection zero-initialised so a new layer starts as the identity).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

Speed = float | Sequence[float] | Sequence[Sequence[float]] | np.ndarray


def speed_schedule(speed: Speed, frames: int, fps: int) -> np.ndarray:
    """Head speed per frame, (frames,) float32, from one level, a per-frame array (padded with
    its last value), or (seconds, level) points, an (n, 2) table (linear between, held beyond
    the ends; interpolated in float64, as a manifest's points always were)."""
    table = np.asarray(speed, dtype=np.float64)
    if table.ndim == 2 and table.shape[1] == 2:  # (seconds, level) points
        order = np.lexsort((table[:, 1], table[:, 0]))
        times = np.arange(frames) / fps
        return np.interp(times, table[order, 0], table[order, 1]).astype(np.float32)
    values = np.array(speed, dtype=np.float32).ravel()  # a copy: the caller's array is theirs
    if values.size < frames:
        values = np.concatenate([values, np.full(frames - values.size, values[-1], np.float32)])
    return values[:frames]


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


class SpeedAttention(nn.Module):
    """Frame i of every spatial position attends to frame i's K speed tokens."""

    def __init__(self, channels: int, speed_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(num_groups=_groups(channels), num_channels=channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(speed_dim, channels, bias=False)
        self.to_v = nn.Linear(speed_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
        """x: (B*F, C, H, W); speed: (B, F, K, D) -> residual (B*F, C, H, W)."""
        b, f = speed.shape[:2]
        h, w = x.shape[-2:]
        q = self.to_q(rearrange(self.norm(x), "(b f) c h w -> b f (h w) c", b=b))  # (B,F,P,C)
        k, v = self.to_k(speed), self.to_v(speed)  # (B, F, K, C)
        q = rearrange(q, "b f p (n d) -> (b f) n p d", n=self.heads)
        k = rearrange(k, "b f k (n d) -> (b f) n k d", n=self.heads)
        v = rearrange(v, "b f k (n d) -> (b f) n k d", n=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B*F, heads, P, d)
        out = self.to_out(rearrange(out, "bf n p d -> bf p (n d)"))
        return rearrange(out, "bf (h w) c -> bf c h w", h=h, w=w)


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
