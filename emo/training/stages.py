"""Which parameters each of the paper's three training stages trains.

- Stage 1 (image pre-training): the Backbone's spatial layers, ReferenceNet and the Face
  Locator. The Backbone's temporal modules and audio-attention layers are not used yet.
- Stage 2 (video training): temporal modules and audio layers (the Backbone's audio-attention,
  its audio time embedding if any, and the audio projection); the stage-1 modules too unless
  switched off.
- Stage 3 (speed): speed layers (speed encoder, speed attention) and temporal modules only.

The VAE and wav2vec2 never train. A parameter's role comes from its name (diffusers' stable
attribute names: ``motion_modules``, ``attn2``), so the rule reads in one screen.
"""

from __future__ import annotations

from torch import nn

from emo.models.components import EMOComponents

STAGES = (1, 2, 3)


def role(component: str, name: str) -> str:
    """'spatial', 'temporal', 'audio', 'speed' or 'frozen' for one named parameter."""
    if component in ("vae", "wav2vec2"):
        return "frozen"
    if component in ("reference_net", "face_locator"):
        return "spatial"
    if component == "audio_projection" or name.startswith("audio_embedding."):
        return "audio"
    if component == "speed_encoder" or ".speed_attention." in name:
        return "speed"
    if "motion_modules" in name:
        return "temporal"
    if ".attn2." in name or (".transformer_blocks." in name and ".norm2." in name):
        return "audio"  # audio-attention and its pre-norm (ResNet blocks have a norm2 too)
    return "spatial"


def trained_roles(stage: int, *, stage1_modules_in_stage2: bool = True) -> set[str]:
    if stage == 1:
        return {"spatial"}
    if stage == 2:
        return {"temporal", "audio"} | ({"spatial"} if stage1_modules_in_stage2 else set())
    if stage == 3:
        return {"temporal", "speed"}
    raise ValueError(f"stage must be one of {STAGES}, not {stage}")


def select_trainable(
    components: EMOComponents, stage: int, *, stage1_modules_in_stage2: bool = True
) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` for ``stage``; returns the trained parameters by full name."""
    roles = trained_roles(stage, stage1_modules_in_stage2=stage1_modules_in_stage2)
    trained = {}
    for component, module in components.modules().items():
        for name, parameter in module.named_parameters():
            train = role(component, name) in roles
            parameter.requires_grad_(train)
            if train:
                trained[f"{component}.{name}"] = parameter
    return trained
