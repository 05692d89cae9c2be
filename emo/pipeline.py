"""EMO inference: clip-sequential, resumable generation of a talking/singing portrait.

One call renders clips k0..k1 of a track. The reference image goes through the VAE and
ReferenceNet once per call; the motion frames (the previous clip's last n frames, as latents)
go through ReferenceNet once per clip; both are reused at every denoising step. The noise of
clip k depends only on (seed, k), and the motion state returned after the last clip is
exactly what the next clip consumes, so rendering 0..5 in one call or 0..2 then 3..5 (passing
the motion state through a file) gives the same frames on the same device.

Steps of ``__call__``: check inputs -> encode reference -> for each clip (audio tokens, speed
tokens, motion features, initial latents, denoising loop with guidance on audio, decode in
chunks) -> frames and motion state.

Continuation (a strength below 1, for clips that continue another): during the first
(1 - strength) of the schedule, the latents outside the mouth are held to the previous clip's
last frame, noised to each step's level (as inpainting holds the known region), so the clip
starts from the pose and colours it continues; the mouth area denoises freely from the start,
so it follows the audio as in a clip started from noise.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file, save_file

from emo import face
from emo.bundle import BundleInfo, load_bundle, scheduler_config
from emo.errors import InputError, SettingsError
from emo.models.audio import clip_audio, clip_audio_features, context_frames
from emo.models.components import EMOComponents
from emo.models.conditioning import Conditioning
from emo.models.config import EMOConfig
from emo.models.speed import Speed, speed_schedule, speed_windows

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}
ProgressCallback = Callable[[int, int, int], None]  # (clip, step, steps)


@dataclass
class MotionState:
    """The last n frames of clip ``next_clip - 1``, as latents: (n, C, h, w) float32."""

    latents: torch.Tensor
    next_clip: int

    def save(self, path: Path | str) -> None:
        save_file(
            {"latents": self.latents.contiguous().cpu()},
            str(path),
            metadata={"next_clip": str(self.next_clip)},
        )

    @classmethod
    def load(cls, path: Path | str) -> MotionState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            next_clip = int(handle.metadata()["next_clip"])
        return cls(latents=load_file(str(path))["latents"], next_clip=next_clip)


@dataclass
class ClipsOutput:
    """Frames of the rendered clips, (N, H, W, 3) uint8, and the state for the next clip."""

    frames: np.ndarray
    motion_state: MotionState


def clip_seed(seed: int, clip: int) -> int:
    """A 63-bit seed for clip ``clip`` of a job seeded ``seed``, independent of call grouping."""
    digest = hashlib.sha256(f"emo-clip:{seed}:{clip}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def held_states(strength: float, states: int) -> int:
    """How many of a continued clip's ``states`` denoising states are held outside the
    mouth: (1 - strength) of them, rounded half up (float error aside: 0.9 of 5 holds 1)."""
    return int(np.floor((1 - strength) * states + 0.5 + 1e-9))


def _accepts(function: Callable, argument: str) -> bool:
    return argument in inspect.signature(function).parameters


class EMOPipeline:
    """Inference over EMO's networks; see the module docstring for the contract."""

    def __init__(
        self,
        components: EMOComponents,
        config: EMOConfig,
        scheduler_config: dict,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_chunk: int = 4,
        fps: int = 25,
        sample_rate: int = 16000,
    ) -> None:
        self.components = components.to(device, dtype).eval()
        self.config = config
        self.scheduler_config = dict(scheduler_config)
        self.device, self.dtype = torch.device(device), dtype
        self.vae_chunk = vae_chunk
        self.fps, self.sample_rate = fps, sample_rate
        if sample_rate % fps:
            raise SettingsError(f"sample rate {sample_rate} is not a multiple of fps {fps}")
        self.spf = sample_rate // fps
        self.bundle: BundleInfo | None = None

    @classmethod
    def from_bundle(
        cls,
        path: Path | str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> EMOPipeline:
        components, info = load_bundle(path, device=device, dtype=dtype)
        pipeline = cls(
            components, info.config, scheduler_config(info), device=device, dtype=dtype, **kwargs
        )
        pipeline.bundle = info
        return pipeline

    # -- inputs ----------------------------------------------------------------------------

    def clip_count(self, audio: np.ndarray) -> int:
        frames = -(-audio.shape[0] // self.spf)
        return -(-frames // self.config.clip_frames)

    def check_inputs(
        self,
        image: np.ndarray,
        audio: np.ndarray,
        clips: range,
        motion_state: MotionState | None,
        steps: int,
        strength: float = 1.0,
    ) -> None:
        size = self.config.resolution
        if image.dtype != np.uint8 or image.shape != (size, size, 3):
            raise InputError(
                f"reference image must be ({size}, {size}, 3) uint8, "
                f"got {image.dtype} {image.shape}"
            )
        if audio.ndim != 1 or audio.size == 0:
            raise InputError("audio must be a non-empty mono signal")
        total = self.clip_count(audio)
        if not clips or clips.start < 0 or clips.stop > total or clips.step != 1:
            raise InputError(
                f"clips {clips.start}..{clips.stop - 1} outside the track's 0..{total - 1}"
            )
        if clips.start > 0 and (motion_state is None or motion_state.next_clip != clips.start):
            have = "none" if motion_state is None else f"clip {motion_state.next_clip}"
            raise InputError(
                f"clip {clips.start} needs the motion state left by clip "
                f"{clips.start - 1} (have {have})"
            )
        if steps < 1:
            raise InputError("steps must be at least 1")
        if not 0 < strength <= 1:
            raise InputError(
                f"continuation strength must be above 0 and at most 1 (1: every clip from "
                f"pure noise), not {strength}"
            )

    def _scheduler(self, name: str, steps: int) -> SchedulerMixin:
        if name not in SCHEDULERS:
            raise InputError(f"unknown scheduler {name!r}; choose {', '.join(SCHEDULERS)}")
        if name == "pndm" and self.scheduler_config.get("prediction_type") == "sample":
            raise InputError(
                "scheduler pndm cannot sample a model that predicts samples; "
                "use ddim, euler, dpm++ or unipc"
            )
        scheduler = SCHEDULERS[name].from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    # -- encoders --------------------------------------------------------------------------

    @torch.no_grad()
    def encode_reference(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> VAE latents (1, C, h, w)."""
        pixels = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None]
        pixels = pixels.to(self.dtype) / 127.5 - 1.0  # (1, 3, H, W) in [-1, 1]
        vae = self.components.vae
        return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(F, C, h, w) latents -> (F, H, W, 3) uint8, ``vae_chunk`` frames at a time."""
        vae = self.components.vae
        frames = []
        for chunk in latents.split(self.vae_chunk):
            pixels = vae.decode(chunk.to(self.dtype) / vae.config.scaling_factor).sample
            pixels = ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            frames.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(frames)

    @torch.no_grad()
    def audio_tokens(self, audio: np.ndarray, clip: int) -> torch.Tensor:
        """Audio-attention context of one clip: (F, K, D)."""
        cfg = self.config
        context = context_frames(cfg.audio_context_seconds, self.fps)
        samples = clip_audio(
            audio,
            clip=clip,
            clip_frames=cfg.clip_frames,
            spf=self.spf,
            window=cfg.audio_window,
            context=context,
        )
        features = clip_audio_features(
            self.components.wav2vec2,
            samples,
            layers=cfg.audio_layers,
            energy_bands=cfg.audio_energy_bands,
            clip_frames=cfg.clip_frames,
            window=cfg.audio_window,
            context=context,
        )
        return self.components.audio_projection(features[None].to(self.dtype))  # (F, K, D)

    @torch.no_grad()
    def speed_tokens(self, speeds: torch.Tensor, clip: int) -> torch.Tensor:
        """Speed tokens of one clip: (1, F, K, Ds)."""
        cfg = self.config
        windows = speed_windows(
            speeds, start=clip * cfg.clip_frames, frames=cfg.clip_frames, window=cfg.audio_window
        )
        return self.components.speed_encoder(windows[None].to(self.device))

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: np.ndarray,
        audio: np.ndarray,
        *,
        clips: range,
        face_box: Sequence[float] | None = None,
        face_mask: np.ndarray | None = None,
        speed: Speed = 0.02,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str = "ddim",
        motion_state: MotionState | None = None,
        continuation_strength: float | None = None,
        callback: ProgressCallback | None = None,
    ) -> ClipsOutput:
        """Render ``clips`` of the track: frames (N = len(clips) * f) and the motion state."""
        cfg, parts = self.config, self.components
        steps = steps or cfg.steps
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        strength = (
            cfg.continuation_strength if continuation_strength is None else continuation_strength
        )
        self.check_inputs(image, audio, clips, motion_state, steps, strength)

        # 1. Reference: VAE + ReferenceNet once per call.
        reference_latents = self.encode_reference(image)  # (1, C, h, w)
        reference = parts.reference_net(reference_latents).tokens
        # Residual models denoise (frame - reference); their clips are offset back below.
        offset = reference_latents[0].float() if cfg.residual_to_reference else None
        # 2. Face region -> Face Locator features added to every noisy latent.
        if face_mask is not None:
            mask = torch.from_numpy(np.asarray(face_mask, dtype=np.float32))
        else:
            box = tuple(face_box) if face_box is not None else face.FULL_FRAME
            mask = torch.from_numpy(face.face_mask(box, cfg.resolution, cfg.resolution))
        located = parts.face_locator(mask[None, None].to(self.device))[:, :, None]  # (1,C,1,h,w)
        mouth = torch.from_numpy(face.mouth_mask(mask.numpy(), cfg.latent_size)).to(self.device)
        track_frames = self.clip_count(audio) * cfg.clip_frames
        speeds = torch.from_numpy(speed_schedule(speed, track_frames, self.fps))

        motion = None if motion_state is None else motion_state.latents
        frames = []
        for clip in clips:
            start = None  # (the frame this clip continues, as the Backbone denoises it; mouth)
            if strength < 1 and motion is not None and len(motion):
                last = motion[-1].to(self.device) - (0 if offset is None else offset)  # (C, h, w)
                start = (last, mouth)
            latents = self._denoise_clip(
                clip,
                audio,
                reference,
                motion,
                located,
                speeds,
                start,
                seed=seed,
                steps=steps,
                strength=strength,
                guidance=guidance,
                scheduler_name=scheduler,
                callback=callback,
            )
            if offset is not None:
                latents = latents + offset  # (F, C, h, w) + (C, h, w)
            motion = latents[-cfg.motion_frames :].float().cpu() if cfg.motion_frames else None
            frames.append(self.decode(latents))
        state = MotionState(
            latents=motion if motion is not None else torch.zeros(0), next_clip=clips.stop
        )
        return ClipsOutput(frames=np.concatenate(frames), motion_state=state)

    def _denoise_clip(
        self,
        clip: int,
        audio: np.ndarray,
        reference: dict[str, torch.Tensor],
        motion: torch.Tensor | None,
        face: torch.Tensor,
        speeds: torch.Tensor,
        start: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        seed: int,
        steps: int,
        strength: float,
        guidance: float,
        scheduler_name: str,
        callback: ProgressCallback | None,
    ) -> torch.Tensor:
        """Denoise one clip; returns its clean latents (F, C, h, w). ``start``: the frame it
        continues (C, h, w) and the mouth area (h, w), when continuing."""
        cfg, parts = self.config, self.components
        tokens = self.audio_tokens(audio, clip)  # (F, K, D)
        use_guidance = guidance != 1.0
        if use_guidance:  # unconditional half: no audio
            tokens = torch.cat([tokens, torch.zeros_like(tokens)])  # (2F, K, D)
        motion_maps = None
        if motion is not None and cfg.motion_frames:  # ReferenceNet once per clip
            motion_maps = parts.reference_net(motion.to(self.device, self.dtype)).maps
        conditioning = Conditioning(
            reference=reference,
            motion=motion_maps,
            motion_frames=cfg.motion_frames,
            speed=self.speed_tokens(speeds, clip),
        )
        scheduler = self._scheduler(scheduler_name, steps)
        generator = torch.Generator("cpu").manual_seed(clip_seed(seed, clip))
        # Stochastic schedulers draw from the clip's generator; the others take no generator.
        step_kwargs = {"generator": generator} if _accepts(scheduler.step, "generator") else {}
        channels = cfg.vae["latent_channels"]
        shape = (1, channels, cfg.clip_frames, cfg.latent_size, cfg.latent_size)
        noise = torch.randn(shape, generator=generator).to(self.device)  # (1, C, F, h, w)
        latents = noise * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps
        held = 0 if start is None else held_states(strength, len(timesteps))
        if held:  # states 0..held-1 keep the frame continued outside the mouth
            frame, mouth = start[0][None, :, None].expand(shape), start[1]  # (1,C,F,h,w), (h,w)
            latents = torch.lerp(scheduler.add_noise(frame, noise, timesteps[:1]), latents, mouth)
            if hasattr(scheduler, "disable_corrector"):  # UniPC would recompute held states
                scheduler.disable_corrector = list(range(held - 1))
        for step, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if use_guidance else latents
            model_in = scheduler.scale_model_input(model_in, t) + face
            prediction = parts.backbone(model_in.to(self.dtype), t, tokens, conditioning).float()
            if use_guidance:
                cond, uncond = prediction.chunk(2)
                prediction = uncond + guidance * (cond - uncond)
            latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
            if step + 1 < held:  # the next state's level, as inpainting pipelines do
                known = scheduler.add_noise(frame, noise, timesteps[step + 1 : step + 2])
                latents = torch.lerp(known, latents, mouth)
            if callback is not None:
                callback(clip, step + 1, steps)
        return latents[0].permute(1, 0, 2, 3)  # (F, C, h, w)
