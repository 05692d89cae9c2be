"""Tiny random weights in the real on-disk formats of SD1.5, AnimateDiff and wav2vec2."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from transformers import Wav2Vec2Config, Wav2Vec2Model

from emo.models.config import SD15_SCHEDULER, TINY


def tiny_sd15(folder: Path, seed: int = 1) -> Path:
    """An SD1.5-layout directory (unet/, vae/, scheduler/) with tiny random weights."""
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY.unet).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY.vae).save_pretrained(folder / "vae")
    DDIMScheduler(**SD15_SCHEDULER).save_pretrained(folder / "scheduler")
    return folder


def tiny_motion_adapter(seed: int = 2) -> MotionAdapter:
    torch.manual_seed(seed)
    adapter = MotionAdapter(**TINY.motion)
    for name, parameter in adapter.named_parameters():  # AnimateDiff zero-inits proj_out
        if "proj_out" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return adapter


def tiny_animatediff_dir(folder: Path, seed: int = 2) -> Path:
    """A diffusers MotionAdapter directory."""
    tiny_motion_adapter(seed).save_pretrained(folder)
    return folder


def to_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter keys -> the original AnimateDiff ``.ckpt`` keys."""
    out = {}
    for key, value in state.items():
        if key.endswith("pos_embed.pe"):
            for block in (0, 1):  # the original keeps one table per attention block
                out[
                    key.replace("pos_embed.pe", f"attention_blocks.{block}.pos_encoder.pe").replace(
                        ".transformer_blocks.", ".temporal_transformer.transformer_blocks."
                    )
                ] = value.clone()
            continue
        head, _, tail = key.partition(".motion_modules.")
        index, _, rest = tail.partition(".")
        rest = (
            rest.replace(".norm1", ".norms.0")
            .replace(".norm2", ".norms.1")
            .replace(".norm3", ".ff_norm")
            .replace(".attn1", ".attention_blocks.0")
            .replace(".attn2", ".attention_blocks.1")
        )
        out[f"{head}.motion_modules.{index}.temporal_transformer.{rest}"] = value
    return out


def tiny_animatediff_ckpt(path: Path, seed: int = 2) -> tuple[Path, MotionAdapter]:
    """An original-layout AnimateDiff checkpoint (torch.save of a state dict)."""
    adapter = tiny_motion_adapter(seed)
    torch.save({"state_dict": to_original_layout(adapter.state_dict())}, path)
    return path, adapter


def tiny_wav2vec2(folder: Path, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    Wav2Vec2Model(Wav2Vec2Config(**TINY.wav2vec2)).save_pretrained(folder)
    return folder


def standard_positions(channels: int, length: int) -> torch.Tensor:
    return SinusoidalPositionalEmbedding(channels, length).pe
