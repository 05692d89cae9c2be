"""ReferenceNet: the SD UNet's 2-D structure run on clean reference latents (no temporal layers).

It exposes (1) the hidden states entering every self-attention (``tokens``), which the
Backbone's reference-attention concatenates to its own keys and values, and (2) the output of
every (resnet [, attention]) layer at the positions where the Backbone has temporal modules
(``maps``), which carry the motion frames into those modules. Run once per call for the
reference image and once per clip for the motion frames, never per denoising step.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from emo.models.conditioning import ReferenceFeatures


class CaptureProcessor:
    """Self-attention that records its (normalised) input tokens under the layer's name."""

    def __init__(self, name: str, store: dict[str, torch.Tensor]) -> None:
        self.name, self.store = name, store
        self.attention = AttnProcessor2_0()

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        self.store[self.name] = hidden_states  # (B, L, C)
        return self.attention(attn, hidden_states, *args, **kwargs)


def motion_positions(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layer whose output feeds each temporal module, named like the module it feeds.

    In AnimateDiff blocks the temporal module j follows layer j's attention (or its resnet in
    blocks without attention); the 2-D UNet has the same layers without the temporal modules.
    """
    positions: dict[str, torch.nn.Module] = {}
    for kind in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, kind)):
            layers = getattr(block, "attentions", None) or block.resnets
            for j, layer in enumerate(layers):
                positions[f"{kind}.{i}.motion_modules.{j}"] = layer
    for j, layer in enumerate(getattr(unet.mid_block, "attentions", [])):
        positions[f"mid_block.motion_modules.{j}"] = layer
    return positions


class ReferenceNet(ModelMixin, ConfigMixin):
    """SD-shaped 2-D UNet whose intermediate features condition the Backbone."""

    @register_to_config
    def __init__(self, unet_config: dict[str, Any]) -> None:
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(unet_config)
        self._tokens: dict[str, torch.Tensor] = {}
        self._maps: dict[str, torch.Tensor] = {}
        self.unet.set_attn_processor(
            {
                name: CaptureProcessor(name.removesuffix(".processor"), self._tokens)
                if name.endswith("attn1.processor")
                else AttnProcessor2_0()
                for name in self.unet.attn_processors
            }
        )
        for name, layer in motion_positions(self.unet).items():
            layer.register_forward_hook(self._map_hook(name))

    def _map_hook(self, name: str):
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            self._maps[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def forward(self, latents: torch.Tensor) -> ReferenceFeatures:
        """Features of clean latents (B, C, H, W), taken at timestep 0."""
        batch = latents.shape[0]
        context = latents.new_zeros(batch, 1, self.unet.config.cross_attention_dim)  # no text
        timestep = torch.zeros(batch, device=latents.device, dtype=torch.long)
        self._tokens.clear()
        self._maps.clear()
        self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)
        features = ReferenceFeatures(tokens=dict(self._tokens), maps=dict(self._maps))
        self._tokens.clear()
        self._maps.clear()
        return features
