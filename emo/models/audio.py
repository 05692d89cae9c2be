"""Audio conditioning: wav2vec2 features per frame, windowed i-m..i+m, projected to tokens.

For clip k (frames [kf, kf + f)), the audio of frames [kf - m - c, kf + f + m + c) is cut from
the track (zeros beyond its ends; c frames of context either side), normalised, and run
through wav2vec2. The hidden states of the configured blocks are concatenated, resampled from
wav2vec2's 50 Hz to the video rate, and frame i keeps rows i-m..i+m. The features of clip k
therefore depend on the track and k only, never on which clips a call renders.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from transformers import Wav2Vec2Model


def clip_audio(
    audio: np.ndarray, *, clip: int, clip_frames: int, spf: int, window: int, context: int
) -> np.ndarray:
    """Samples of frames [clip*f - window - context, (clip+1)*f + window + context), zero-padded."""
    return frames_audio(
        audio, start=clip * clip_frames, frames=clip_frames, spf=spf, window=window, context=context
    )


def frames_audio(
    audio: np.ndarray, *, start: int, frames: int, spf: int, window: int, context: int
) -> np.ndarray:
    """Samples of frames [start - window - context, start + frames + window + context), as
    ``clip_audio`` cuts them for a clip, for any first frame (training windows)."""
    first = (start - window - context) * spf
    length = (frames + 2 * (window + context)) * spf
    out = np.zeros(length, dtype=np.float32)
    lo, hi = max(first, 0), min(first + length, audio.shape[0])
    if hi > lo:
        out[lo - first : hi - first] = audio[lo:hi]
    return out


@torch.no_grad()
def clip_audio_features(
    wav2vec2: Wav2Vec2Model,
    samples: np.ndarray,
    *,
    layers: tuple[int, ...],
    clip_frames: int,
    window: int,
    context: int,
    energy_bands: int = 0,
) -> torch.Tensor:
    """wav2vec2 features of one clip's audio (from ``clip_audio``), plus ``energy_bands`` log
    band energies per frame: (F, K, len(layers) * H + energy_bands)."""
    device, dtype = wav2vec2.device, wav2vec2.dtype
    x = torch.from_numpy(samples).to(device=device, dtype=torch.float32)
    x = (x - x.mean()) / torch.sqrt(x.var() + 1e-7)  # what Wav2Vec2FeatureExtractor does
    out = wav2vec2(x[None].to(dtype), output_hidden_states=True)
    hidden = torch.cat([out.hidden_states[i] for i in layers], dim=-1)  # (1, T, L*H)
    frames = clip_frames + 2 * (window + context)
    hidden = F.interpolate(
        hidden.transpose(1, 2).float(), size=frames, mode="linear", align_corners=False
    ).transpose(1, 2)[0]  # (frames, L*H)
    if energy_bands:
        hidden = torch.cat([hidden, band_energies(x, frames, energy_bands)], dim=-1)
    hidden = hidden[context : context + clip_frames + 2 * window]  # (F + 2m, L*H)
    return hidden.unfold(0, 2 * window + 1, 1).transpose(1, 2).contiguous()  # (F, K, L*H)


def band_energies(samples: torch.Tensor, frames: int, bands: int) -> torch.Tensor:
    """Log power of each frame's samples in ``bands`` log-spaced frequency bands: (frames, bands).

    ``samples`` (frames * spf,) is the normalised clip audio, so the energies are relative to
    the clip's loudness, as wav2vec2's input is. Values are ln(power + 1e-4) / 4, about -2..1.
    """
    spectrum = torch.fft.rfft(samples.reshape(frames, -1).float(), dim=-1)  # (frames, bins)
    power = spectrum.abs().square() / samples.shape[0] * frames  # per-sample power density
    edges = band_edges(power.shape[-1], bands)
    sums = torch.stack([power[:, a:b].mean(-1) for a, b in pairwise(edges)], dim=-1)
    return torch.log(sums + 1e-4) / 4  # (frames, bands)


def band_edges(bins: int, bands: int) -> list[int]:
    """Rfft bin edges of ``bands`` log-spaced bands over bins 1..bins (DC left out)."""
    if bins - 1 < bands:
        raise ValueError(f"{bands} energy bands need at least {bands + 1} frequency bins")
    edges = [int(round(e)) for e in np.geomspace(1, bins, bands + 1)]
    for i in range(1, len(edges)):  # at least one bin per band
        edges[i] = max(edges[i], edges[i - 1] + 1)
    for i in range(len(edges) - 2, -1, -1):
        edges[i] = min(edges[i], edges[i + 1] - 1)
    return edges


def context_frames(seconds: float, fps: int) -> int:
    """Frames of audio context either side of a clip."""
    return math.ceil(seconds * fps)


class AudioProjection(ModelMixin, ConfigMixin):
    """Per-frame windows of wav2vec2 features -> audio-attention tokens (B*F, K, D).

    The last layer starts at zero, so a new model's audio-attention context is zero (its
    contribution is then a constant) until training teaches it what to listen to.
    """

    @register_to_config
    def __init__(self, in_features: int, tokens: int, out_features: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_features, out_features)
        self.position = nn.Parameter(torch.zeros(tokens, out_features))  # window offset
        self.norm = nn.LayerNorm(out_features)
        self.proj_out = nn.Linear(out_features, out_features)
        nn.init.normal_(self.position, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, K, in_features) -> (B*F, K, out_features)."""
        x = self.proj_in(features) + self.position  # (B, F, K, D)
        x = self.proj_out(F.silu(self.norm(x)))
        return x.flatten(0, 1)
