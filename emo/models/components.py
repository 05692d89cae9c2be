"""All networks of one EMO model, built from a configuration (random weights)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from emo.models.audio import AudioProjection
from emo.models.backbone import Backbone
from emo.models.config import EMOConfig
from emo.models.face_locator import FaceLocator
from emo.models.pixel_vae import PixelShuffleVAE
from emo.models.reference_net import ReferenceNet
from emo.models.speed import SpeedEncoder


@dataclass
class EMOComponents:
    """The networks of one model. Field names are the bundle's subfolder names."""

    backbone: Backbone
    reference_net: ReferenceNet
    face_locator: FaceLocator
    audio_projection: AudioProjection
    speed_encoder: SpeedEncoder
    vae: AutoencoderKL | PixelShuffleVAE
    wav2vec2: Wav2Vec2Model

    def modules(self) -> dict[str, nn.Module]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> EMOComponents:
        """Move every network; wav2vec2 and the VAE too (all run on the same device)."""
        for module in self.modules().values():
            if module.dtype == dtype:  # diffusers warns about dtype casts it did not do itself
                module.to(device=device)
            else:
                module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> EMOComponents:
        for module in self.modules().values():
            module.eval()
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}


def motion_unet_config(unet: dict[str, Any], motion: dict[str, Any]) -> dict[str, Any]:
    """The ``UNetMotionModel`` config of an SD UNet config plus a MotionAdapter config."""
    with init_empty_weights():
        unet2d = UNet2DConditionModel.from_config(unet)
        adapter = MotionAdapter.from_config(motion)
        model = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False)
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def new_emo_layers(config: EMOConfig) -> dict[str, nn.Module]:
    """The networks EMO adds to SD/AnimateDiff/wav2vec2, freshly initialised."""
    wav2vec2 = Wav2Vec2Config(**config.wav2vec2)
    cross_dim = config.unet["cross_attention_dim"]
    return {
        "face_locator": FaceLocator(
            channels=config.face_locator_channels, latent_channels=config.vae["latent_channels"]
        ),
        "audio_projection": AudioProjection(
            in_features=len(config.audio_layers) * wav2vec2.hidden_size + config.audio_energy_bands,
            tokens=config.audio_tokens,
            out_features=cross_dim,
        ),
        "speed_encoder": SpeedEncoder(
            centers=config.speed_centers,
            radii=config.speed_radii,
            tokens=config.audio_tokens,
            dim=config.speed_dim,
        ),
    }


def new_backbone(config: EMOConfig) -> Backbone:
    """The Backbone of ``config``, randomly initialised (its EMO layers zero where they add)."""
    return Backbone(
        unet_config=motion_unet_config(config.unet, config.motion),
        speed_dim=config.speed_dim,
        audio_embedding_tokens=config.audio_tokens if config.audio_time_embedding else 0,
    )


def vae_class(config: EMOConfig) -> type[nn.Module]:
    """AutoencoderKL, or the fixed pixel unshuffle of the ``demo`` configuration."""
    return PixelShuffleVAE if config.pixel_shuffle else AutoencoderKL


def vae_settings(config: EMOConfig) -> dict[str, Any]:
    """The VAE's own constructor settings (the config's ``kind`` key is ours)."""
    return {k: v for k, v in config.vae.items() if k != "kind"}


def build_components(config: EMOConfig, seed: int = 0) -> EMOComponents:
    """Every network of ``config`` with random weights (seeded)."""
    torch.manual_seed(seed)
    return EMOComponents(
        backbone=new_backbone(config),
        reference_net=ReferenceNet(unet_config=config.unet),
        vae=vae_class(config).from_config(vae_settings(config)),
        wav2vec2=Wav2Vec2Model(Wav2Vec2Config(**config.wav2vec2)),
        **new_emo_layers(config),  # type: ignore[arg-type]
    ).eval()
