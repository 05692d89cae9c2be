"""EMO's temporal module: an AnimateDiff motion module that also sees the motion frames and
attends to head-speed tokens.

Input features (B*F, C, H, W) are reshaped to sequences along frames; the n motion-frame
features from ReferenceNet (zeros for the first clip) are concatenated in front, so the
sequence is n + F long; self-attention runs along it (AnimateDiff's module, with its sinusoidal
positions); the n motion positions are dropped again. Then each frame attends to its window of
speed tokens (cross-attention, output projection zero-initialised so a new module starts as
the identity).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from emo.models.conditioning import ConditioningSlot, repeat_batch
from emo.models.speed import SpeedAttention


class TemporalModule(nn.Module):
    """AnimateDiff motion module + motion frames + speed attention, as one Backbone layer."""

    def __init__(
        self, temporal: nn.Module, *, name: str, speed_dim: int, slot: ConditioningSlot
    ) -> None:
        super().__init__()
        self.temporal = temporal  # diffusers AnimateDiffTransformer3D
        self.name, self.slot = name, slot
        channels = temporal.in_channels
        self.speed_attention = SpeedAttention(channels, speed_dim, temporal.num_attention_heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        timestep: Any = None,
        class_labels: Any = None,
        num_frames: int = 1,
        cross_attention_kwargs: Any = None,
    ) -> torch.Tensor:
        """(B*F, C, H, W) -> (B*F, C, H, W); signature of the module it wraps."""
        conditioning = self.slot.value
        if conditioning is not None and not conditioning.temporal:
            return hidden_states
        n = conditioning.motion_frames if conditioning else 0
        if n:
            x = rearrange(hidden_states, "(b f) c h w -> b f c h w", f=num_frames)
            motion = conditioning.motion.get(self.name) if conditioning.motion else None
            if motion is None:  # first clip: zero motion features
                frames = x.new_zeros(x.shape[0], n, *x.shape[2:])
            else:  # (Bm * n, C, H, W) -> (B, n, C, H, W)
                motion = rearrange(motion, "(b n) c h w -> b n c h w", n=n)
                frames = repeat_batch(motion, x.shape[0])
            x = torch.cat([frames, x], dim=1)  # (B, n + F, C, H, W)
            x = self.temporal(rearrange(x, "b f c h w -> (b f) c h w"), num_frames=n + num_frames)
            x = rearrange(x, "(b f) c h w -> b f c h w", f=n + num_frames)[:, n:]
            hidden_states = rearrange(x, "b f c h w -> (b f) c h w")
        else:
            hidden_states = self.temporal(hidden_states, num_frames=num_frames)
        if conditioning is not None and conditioning.speed is not None:
            speed = conditioning.speed
            batch = hidden_states.shape[0] // num_frames
            speed = repeat_batch(speed, batch)  # guidance batch shares the speed
            hidden_states = hidden_states + self.speed_attention(hidden_states, speed)
        return hidden_states
