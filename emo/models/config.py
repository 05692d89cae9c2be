"""One configuration describes a whole EMO model: every component's shape and the clip layout.

``full`` has the paper's sizes (SD1.5 UNet and VAE, AnimateDiff v2-style motion modules,
wav2vec2-base, 512x512, f = 12, n = 4, m = 2). ``tiny`` runs the same code paths with a few
million parameters, for tests and laptops. A bundle records the configuration it was built
with, including component shapes read from the weights it was initialised from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from emo.errors import InputError

# SD1.5 UNet (diffusers layout); its text cross-attention becomes EMO's audio-attention.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# AnimateDiff v2 motion modules (mm_sd_v15_v2), diffusers MotionAdapter layout.
ANIMATEDIFF_V2: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280, 1280],
    "motion_layers_per_block": 2,
    "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
WAV2VEC2_BASE: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class EMOConfig:
    """Everything that fixes a model's shapes and its clip layout."""

    name: str
    resolution: int  # pixels, square frames
    clip_frames: int = 12  # f: frames generated per clip
    motion_frames: int = 4  # n: frames of the previous clip fed back as motion frames
    audio_window: int = 2  # m: frame i sees audio (and speed) of frames i-m..i+m
    audio_layers: tuple[int, ...] = (4, 8, 12)  # wav2vec2 hidden states used (0 = embeddings)
    audio_context_seconds: float = 1.0  # audio either side of a clip fed to wav2vec2
    # Log band energies per frame appended to the wav2vec2 features (0 = none). A pretrained
    # wav2vec2 needs none; a random one (demo) layer-normalises loudness away per frame.
    audio_energy_bands: int = 0
    # Each frame's audio tokens also offset its timestep embedding (every ResNet block hears
    # the audio, not only audio-attention). Not in the paper; it gave a small model its lip
    # sync (docs/training.md), so ``demo`` uses it.
    audio_time_embedding: bool = False
    speed_centers: tuple[float, ...] = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16)  # rad/frame
    speed_radii: tuple[float, ...] = (0.005, 0.01, 0.01, 0.02, 0.04, 0.08)
    speed_dim: int = 320  # width of speed tokens
    face_locator_channels: tuple[int, ...] = (16, 32, 96, 256)
    steps: int = 40
    guidance_scale: float = 3.5
    # Below 1, a clip that continues another keeps its latents outside the mouth at the
    # previous clip's last frame (noised to each step's level) for the first (1 - this) of
    # the schedule, so pose and colours carry across clip boundaries; the mouth denoises
    # freely. 1.0: every clip from pure noise (the paper). The demo bundle ships with 0.5.
    continuation_strength: float = 1.0
    # The Backbone denoises the residual (frame latents - reference latents) instead of the
    # frame latents: small models then spend no capacity on re-drawing the identity.
    residual_to_reference: bool = False
    unet: dict[str, Any] = field(default_factory=lambda: dict(SD15_UNET))
    motion: dict[str, Any] = field(default_factory=lambda: dict(ANIMATEDIFF_V2))
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD15_VAE))
    wav2vec2: dict[str, Any] = field(default_factory=lambda: dict(WAV2VEC2_BASE))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER))

    @property
    def pixel_shuffle(self) -> bool:
        """True when the 'VAE' is the fixed pixel unshuffle (``demo``), not AutoencoderKL."""
        return self.vae.get("kind") == "pixel_shuffle"

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD's VAE, the factor of a pixel unshuffle)."""
        if self.pixel_shuffle:
            return int(self.vae["factor"])
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale

    @property
    def audio_tokens(self) -> int:
        """Audio (and speed) tokens each frame attends to: the window i-m..i+m."""
        return 2 * self.audio_window + 1

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EMOConfig:
        values = dict(data)
        for name in ("audio_layers", "speed_centers", "speed_radii", "face_locator_channels"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def with_components(self, **components: dict[str, Any]) -> EMOConfig:
        """A copy whose component shapes come from given weights (e.g. a real SD1.5 UNet)."""
        return replace(self, **components)


FULL = EMOConfig(name="full", resolution=512)

TINY = EMOConfig(
    name="tiny",
    resolution=64,
    audio_layers=(1, 2),
    audio_context_seconds=0.5,
    audio_time_embedding=True,  # tests exercise every code path
    speed_dim=32,
    face_locator_channels=(8, 8, 16, 16),
    steps=4,
    guidance_scale=2.0,
    unet={
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    motion={
        "block_out_channels": [32, 64],
        "motion_layers_per_block": 1,
        "motion_num_attention_heads": 2,
        "motion_norm_num_groups": 8,
        "motion_max_seq_length": 24,
        "use_motion_mid_block": True,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 8, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    },
    wav2vec2={
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": [16] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
    },
)

# The shipped demo model: EMO's networks and code paths at 64x64 on a fixed pixel unshuffle
# (16x16x48 "latents"), sized so that stages 1-3 train in CPU-hours (issue "Demo model").
DEMO = EMOConfig(
    name="demo",
    resolution=64,
    audio_layers=(0, 1),  # no pretrained wav2vec2 here: the shallow features carry loudness
    audio_energy_bands=8,  # ... only weakly (per-frame layer norm): give it loudness directly
    audio_time_embedding=True,
    audio_context_seconds=0.5,
    speed_dim=64,
    face_locator_channels=(16, 32, 48),  # two halvings: 64 -> 16
    steps=20,
    guidance_scale=1.5,
    unet={
        "sample_size": 16,
        "in_channels": 48,
        "out_channels": 48,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [64, 128, 128],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    },
    motion={
        "block_out_channels": [64, 128, 128],
        "motion_layers_per_block": 1,
        "motion_num_attention_heads": 4,
        "motion_norm_num_groups": 16,
        "motion_max_seq_length": 32,
        "use_motion_mid_block": True,
    },
    vae={"kind": "pixel_shuffle", "factor": 4, "latent_channels": 48, "scaling_factor": 1.0},
    wav2vec2={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "conv_dim": [32] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
    },
    scheduler={
        **SD15_SCHEDULER,
        "timestep_spacing": "trailing",  # few steps (10-20) reach the clean end
        "prediction_type": "sample",
    },
)

CONFIGS = {config.name: config for config in (FULL, TINY, DEMO)}


def get_config(name: str) -> EMOConfig:
    """The named configuration; raises a clear error for unknown names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise InputError(
            f"unknown model configuration {name!r}; choose one of {', '.join(sorted(CONFIGS))}"
        ) from None
