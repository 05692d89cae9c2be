"""The denoising objective: noise, targets, and the loss weights small models need.

- ``prediction``: the Backbone predicts the noise (epsilon), the velocity (v) or the clean
  sample; the sampler reads the same choice from the bundle's scheduler config.
- Min-SNR-gamma weighting (Hang et al., 2023) balances timesteps; for sample prediction the
  weight is min(SNR, gamma) floored at 1, so the noisy steps where the audio decides the mouth
  still count (see docs/training.md).
- A mouth weight multiplies the loss inside the mouth region (``emo.face.mouth_box`` of the
  face region), where lip sync lives and which is a small part of the frame.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from emo.face import FACE_EXPAND, mouth_box


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep: (B,)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas / (1.0 - alphas)


def target(
    scheduler: DDPMScheduler,
    prediction: str,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the Backbone should output for latents (B, C, F, h, w)."""
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return clean
    if prediction == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction!r}")


def timestep_weights(
    scheduler: DDPMScheduler, prediction: str, timesteps: torch.Tensor, gamma: float | None
) -> torch.Tensor:
    """Per-sample loss weights (B,); ones without min-SNR weighting."""
    if gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if prediction == "epsilon":
        return clipped / ratio
    if prediction == "v_prediction":
        return clipped / (ratio + 1.0)
    return torch.clamp(clipped, min=1.0)  # sample prediction


def mouth_mask(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, F, 4) face boxes (fractions) -> (B, F, size, size) 1 inside each mouth region: the
    mouth of each frame's face region, the box grown FACE_EXPAND times as renders grow it."""
    centre, half = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]) / 2
    # Not clamped to the frame: a region cut by the crop's edge would move the mouth inward
    # (onto the nose or a cheek); the grid comparison below keeps the mask inside anyway.
    region = torch.cat([centre - half * FACE_EXPAND, centre + half * FACE_EXPAND], -1)
    left, top, right, bottom = mouth_box(tuple(region.unbind(-1)))  # each (B, F)
    grid = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) / size
    inside_x = (grid >= left[..., None]) & (grid <= right[..., None])  # (B, F, size)
    inside_y = (grid >= top[..., None]) & (grid <= bottom[..., None])
    return (inside_y[..., :, None] & inside_x[..., None, :]).float()


def denoising_loss(
    prediction: torch.Tensor,
    wanted: torch.Tensor,
    *,
    weights: torch.Tensor,
    boxes: torch.Tensor,
    mouth_weight: float,
) -> torch.Tensor:
    """Weighted MSE. prediction, wanted: (B, C, F, h, w); weights: (B,); boxes: (B, F, 4)."""
    error = (prediction.float() - wanted.float()) ** 2  # (B, C, F, h, w)
    if mouth_weight != 1.0:
        region = 1.0 + (mouth_weight - 1.0) * mouth_mask(boxes, error.shape[-1])  # (B,F,h,w)
        error = error * region[:, None]
        error = error / region.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1)  # same overall scale
    per_sample = error.mean(dim=(1, 2, 3, 4))
    return (per_sample * weights).mean()
