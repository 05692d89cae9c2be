"""Backbone: the denoising UNet of EMO, SD1.5-shaped with AnimateDiff temporal modules.

Built from diffusers' ``UNetMotionModel`` (SD UNet blocks + motion modules); EMO changes:

- every spatial self-attention becomes *reference-attention*: keys and values are the frame's
  own tokens concatenated with ReferenceNet's tokens of the same layer;
- the text cross-attention that follows it becomes *audio-attention*: its context is each
  frame's window of projected wav2vec2 features (``encoder_hidden_states``, (B*F, K, D));
- every temporal module is an EMO ``TemporalModule`` (motion frames + speed attention).

Latents are (B, C, F, H, W). Reference, motion and speed conditioning arrive as one
``Conditioning`` per forward.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin, UNetMotionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

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


class Backbone(ModelMixin, ConfigMixin):
    """EMO's denoiser; ``unet_config`` configures a ``UNetMotionModel`` (SD + motion)."""

    @register_to_config
    def __init__(self, unet_config: dict[str, Any], speed_dim: int) -> None:
        super().__init__()
        self.slot = ConditioningSlot()
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
        try:
            return self.unet(
                sample, timestep, encoder_hidden_states=audio_tokens, return_dict=False
            )[0]
        finally:
            self.slot.value = None
