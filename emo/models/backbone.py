"""Backbone: the denoising UNet of EMO, SD1.5-shaped with AnimateDiff temporal modules.

Built from diffusers' ``UNetMotionModel`` (SD UNet blocks + motion modules); EMO changes:

- every spatial self-attention becomes *reference-attention*: keys and values are the frame's
  own tokens concatenated with ReferenceNet's tokens of the same layer;
- the text cross-attention that follows it becomes *audio-attention*: its context is each
  frame's window of projected wav2vec2 features (``encoder_hidden_states``, (B*F, K, D));
- every temporal module is an EMO ``TemporalModule`` (motion frames + speed attention);
- optionally (``audio_embedding_tokens``, the ``demo`` configuration), each frame's audio
  tokens also enter its timestep embedding through a zero-initialised MLP, so every ResNet
  block hears the audio too (what gave a small model its lip sync; docs/training.md).

Latents are (B, C, F, H, W). Reference, motion and speed conditioning arrive as one
``Conditioning`` per forward.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin, UNetMotionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from emo.models.conditioning import Conditioning, ConditioningSlot, repeat_batch
from emo.models.temporal import TemporalModule


class ReferenceAttnProcessor:
    """Self-attention whose keys/values also cover ReferenceNet's tokens of the same layer."""

    def __init__(self, name: str, slot: ConditioningSlot) -> None:
        self.name, self.slot = name, slot
        self.attention = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        conditioning = self.slot.value
        reference = (
            conditioning.reference.get(self.name)
            if conditioning and conditioning.reference
            else None
        )
        if reference is not None:
            reference = repeat_batch(reference, hidden_states.shape[0])  # (B*F, L, C)
            encoder_hidden_states = torch.cat([hidden_states, reference], dim=1)  # (B*F, 2L, C)
        return self.attention(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def temporal_module_names(unet: UNetMotionModel) -> list[tuple[torch.nn.ModuleList, int, str]]:
    """(module list, index, name) of every motion module, named as in the state dict."""
    found = []
    for kind in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, kind)):
            for j in range(len(getattr(block, "motion_modules", []))):
                found.append((block.motion_modules, j, f"{kind}.{i}.motion_modules.{j}"))
    for j in range(len(getattr(unet.mid_block, "motion_modules", []))):
        found.append((unet.mid_block.motion_modules, j, f"mid_block.motion_modules.{j}"))
    return found


class AudioTimeEmbedding(nn.Module):
    """A frame's audio tokens (K, D) -> an offset to its timestep embedding (E,).

    The last layer starts at zero: a new (or upgraded) model behaves exactly as without it.
    """

    def __init__(self, in_features: int, embedding_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, embedding_dim)
        self.linear_2 = nn.Linear(embedding_dim, embedding_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, audio_tokens: torch.Tensor) -> torch.Tensor:
        """(B*F, K, D) -> (B*F, E)."""
        return self.linear_2(torch.nn.functional.silu(self.linear_1(audio_tokens.flatten(1))))


class Backbone(ModelMixin, ConfigMixin):
    """EMO's denoiser; ``unet_config`` configures a ``UNetMotionModel`` (SD + motion)."""

    @register_to_config
    def __init__(
        self, unet_config: dict[str, Any], speed_dim: int, audio_embedding_tokens: int = 0
    ) -> None:
        super().__init__()
        self.slot = ConditioningSlot()
        self._frame_embedding: torch.Tensor | None = None  # (B*F, E) during a forward
        self.unet = UNetMotionModel.from_config(unet_config)
        self.unet.set_attn_processor(
            {
                name: ReferenceAttnProcessor(name.removesuffix(".processor"), self.slot)
                if ".attentions." in name and name.endswith("attn1.processor")
                else AttnProcessor2_0()
                for name in self.unet.attn_processors
            }
        )
        for modules, index, name in temporal_module_names(self.unet):
            modules[index] = TemporalModule(
                modules[index], name=name, speed_dim=speed_dim, slot=self.slot
            )
        self.audio_embedding: AudioTimeEmbedding | None = None
        if audio_embedding_tokens:
            self.audio_embedding = AudioTimeEmbedding(
                audio_embedding_tokens * unet_config["cross_attention_dim"],
                self.unet.time_embedding.linear_2.out_features,
            )
            for module in self.unet.modules():
                if isinstance(module, ResnetBlock2D):
                    module.register_forward_pre_hook(self._add_frame_embedding, with_kwargs=True)

    def _add_frame_embedding(
        self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        """ResNet pre-hook: temb (B*F, E) += this forward's per-frame audio embedding."""
        if self._frame_embedding is None:  # silently adding nothing would corrupt gradients
            raise RuntimeError(
                "a Backbone ResNet ran outside Backbone.forward (gradient checkpointing "
                "recomputes blocks during backward); the audio time embedding does not "
                "support that"
            )
        if "temb" in kwargs:  # diffusers' motion blocks pass input_tensor=, temb=
            kwargs = {**kwargs, "temb": kwargs["temb"] + self._frame_embedding}
        else:  # positional (diffusers' gradient-checkpointing calls)
            args = (args[0], args[1] + self._frame_embedding, *args[2:])
        return args, kwargs

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        audio_tokens: torch.Tensor,
        conditioning: Conditioning,
    ) -> torch.Tensor:
        """Predict the denoising target for latents (B, C, F, H, W) at ``timestep``.

        audio_tokens: (B*F, K, D), each frame's window of projected audio features.
        """
        self.slot.value = conditioning
        if self.audio_embedding is not None:
            self._frame_embedding = self.audio_embedding(audio_tokens)
        try:
            return self.unet(
                sample, timestep, encoder_hidden_states=audio_tokens, return_dict=False
            )[0]
        finally:
            self.slot.value = None
            self._frame_embedding = None
