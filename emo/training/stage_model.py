"""The training forward pass of one stage: the EMO components as one module for accelerate.

From a batch of windows (motion frames + clip frames of one video, its reference frame, face
boxes, head speeds and audio), the stage's model encodes the frames to latents, noises the
clip's, conditions the Backbone on the reference (ReferenceNet), the motion frames, the audio
and (stage 3) the speed, and returns the denoising loss of the stage's target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers import DDPMScheduler
from torch import nn

from emo.face import FACE_EXPAND, expand_box, face_mask
from emo.models.audio import clip_audio_features, context_frames
from emo.models.components import EMOComponents
from emo.models.conditioning import Conditioning
from emo.models.config import EMOConfig
from emo.models.speed import SpeedEncoder
from emo.training.config import TrainConfig
from emo.training.objective import denoising_loss, target, timestep_weights


@dataclass
class Batch:
    """One step's inputs on the device."""

    frames: torch.Tensor  # (B, T, R, R, 3) uint8
    reference: torch.Tensor  # (B, R, R, 3) uint8
    boxes: torch.Tensor  # (B, T, 4)
    speeds: torch.Tensor  # (B, T, K)
    audio: torch.Tensor  # (B, samples) float32


class StageModel(nn.Module):
    """The components as one module for accelerate, and the stage's training forward."""

    def __init__(
        self, components: EMOComponents, config: EMOConfig, train: TrainConfig, stage: int, fps: int
    ) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(components.modules())
        self.config, self.train_config, self.stage, self.fps = config, train, stage, fps
        self.motion_frames = 0 if stage == 1 else (train.motion_frames or config.motion_frames)
        self.clip_frames = 1 if stage == 1 else (train.clip_frames or config.clip_frames)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, R, R, 3) uint8 -> (N, C, h, w) VAE latents (frozen VAE)."""
        vae = self.parts["vae"]
        x = pixels.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1.0
        return vae.encode(x).latent_dist.sample() * vae.config.scaling_factor

    def audio_tokens(self, audio: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, samples) -> (B*f, K, D) tokens for the clip frames; some zeroed (dropout)."""
        cfg, batch = self.config, audio.shape[0]
        width = self.parts["audio_projection"].config.out_features
        if self.stage == 1:
            return audio.new_zeros(batch * self.clip_frames, cfg.audio_tokens, width)
        frames = self.motion_frames + self.clip_frames
        with torch.no_grad():
            features = torch.stack(
                [
                    clip_audio_features(
                        self.parts["wav2vec2"],
                        sample.cpu().numpy(),
                        layers=cfg.audio_layers,
                        energy_bands=cfg.audio_energy_bands,
                        clip_frames=frames,
                        window=cfg.audio_window,
                        context=context_frames(cfg.audio_context_seconds, self.fps),
                    )[self.motion_frames :]
                    for sample in audio
                ]
            )  # (B, f, K, L*H)
        tokens = self.parts["audio_projection"](features.to(audio.device))  # (B*f, K, D)
        keep = torch.rand(batch, generator=generator) >= self.train_config.audio_dropout
        keep = keep.to(tokens.device).repeat_interleave(self.clip_frames)
        return tokens * keep[:, None, None]

    def forward(
        self, batch: Batch, scheduler: DDPMScheduler, generator: torch.Generator
    ) -> torch.Tensor:
        cfg, train, parts = self.config, self.train_config, self.parts
        b, n, f = batch.frames.shape[0], self.motion_frames, self.clip_frames
        size = cfg.resolution
        reference_latents = self.latents(batch.reference)  # (B, C, h, w)
        latents = self.latents(batch.frames.flatten(0, 1)).unflatten(0, (b, n + f))  # (B,T,C,h,w)
        clean = latents[:, n:].permute(0, 2, 1, 3, 4)  # (B, C, f, h, w)
        if cfg.residual_to_reference:
            clean = clean - reference_latents[:, :, None]
        motion = None
        first_clip = bool(torch.rand((), generator=generator) < train.motion_dropout)
        if n and not first_clip:  # the first n frames play the previous clip's last frames
            motion = parts["reference_net"](latents[:, :n].flatten(0, 1)).maps
        # else: zero motion features, exactly what the first clip of a render sees
        conditioning = Conditioning(
            reference=parts["reference_net"](reference_latents).tokens,
            motion=motion,
            motion_frames=n,
            speed=parts["speed_encoder"](batch.speeds[:, n:].float()) if self.stage == 3 else None,
            temporal=self.stage != 1,
        )
        boxes = batch.boxes[:, n:]  # (B, f, 4)
        union = torch.cat([boxes[..., :2].amin(1), boxes[..., 2:].amax(1)], dim=-1)  # (B, 4)
        grown = [expand_box(tuple(box.tolist()), FACE_EXPAND) for box in union.cpu()]
        masks = torch.stack(  # grown as renders grow the portrait's face box
            [torch.from_numpy(face_mask(box, size, size)) for box in grown]
        ).to(clean.device)
        located = parts["face_locator"](masks[:, None])[:, :, None]  # (B, C, 1, h, w)

        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), generator=generator).to(clean.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = parts["backbone"](
            noisy + located, timesteps, self.audio_tokens(batch.audio, generator), conditioning
        )
        wanted = target(scheduler, train.prediction, clean, noise, timesteps)
        weights = timestep_weights(scheduler, train.prediction, timesteps, train.min_snr_gamma)
        return denoising_loss(
            prediction, wanted, weights=weights, boxes=boxes, mouth_weight=train.mouth_weight
        )


def stage_config(config: EMOConfig, train: TrainConfig, stage: int, index: dict) -> EMOConfig:
    """The model config this stage trains and exports (residual flag, clip layout, speed
    buckets)."""
    config = replace(
        config,
        residual_to_reference=train.residual_to_reference,
        clip_frames=train.clip_frames or config.clip_frames,
        motion_frames=train.motion_frames or config.motion_frames,
    )
    if stage == 3:  # speed layers are added: buckets from the dataset's speed distribution
        config = replace(
            config,
            speed_centers=tuple(index["speed_centers"]),
            speed_radii=tuple(index["speed_radii"]),
        )
    return config


def rebuild_speed_encoder(components: EMOComponents, config: EMOConfig) -> None:
    old = components.speed_encoder
    new = SpeedEncoder(
        centers=config.speed_centers,
        radii=config.speed_radii,
        tokens=config.audio_tokens,
        dim=config.speed_dim,
    )
    new.load_state_dict(old.state_dict())
    components.speed_encoder = new.to(device=old.device)  # float32, as built
