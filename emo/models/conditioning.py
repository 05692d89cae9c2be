"""What one denoising forward sees besides the noisy latents: reference and motion features,
speed tokens. The Backbone's attention processors and temporal modules read it from a shared
``ConditioningSlot`` that the Backbone fills for the duration of one forward (the pattern of
diffusers' IP-adapter processors, without threading extra arguments through every block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReferenceFeatures:
    """ReferenceNet's features of some images, keyed by the Backbone layer that uses them."""

    tokens: dict[str, torch.Tensor]  # attn1 name -> (B, L, C): what enters each self-attention
    maps: dict[str, torch.Tensor]  # motion-module name -> (B, C, H, W): temporal-module inputs


@dataclass
class Conditioning:
    """Per-forward conditioning. ``motion=None`` means zero motion features (first clip)."""

    reference: dict[str, torch.Tensor] | None  # attn1 name -> (Br, L, C)
    motion: dict[str, torch.Tensor] | None  # motion-module name -> (Bm * n, C, H, W)
    motion_frames: int  # n
    speed: torch.Tensor | None  # (B, F, K, speed_dim) speed tokens, K = 2m + 1
    temporal: bool = True  # False: temporal modules pass through (stage-1 image training)


class ConditioningSlot:
    """Holds the current forward's ``Conditioning`` for processors and temporal modules."""

    def __init__(self) -> None:
        self.value: Conditioning | None = None


def repeat_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat each row of ``tensor`` (b, ...) ``batch // b`` times in place: (batch, ...).

    Broadcasts per-sample conditioning over the frames of that sample (rows ordered
    ``(b f)``), or one shared row over a whole batch.
    """
    rows = tensor.shape[0]
    if rows == batch:
        return tensor
    if batch % rows:
        raise ValueError(f"cannot broadcast a batch of {rows} to {batch}")
    return tensor.repeat_interleave(batch // rows, dim=0)
