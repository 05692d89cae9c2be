"""``emo weights init``: a starting bundle from SD1.5, AnimateDiff and wav2vec2, as the paper does.

Backbone and ReferenceNet take the SD UNet's weights (shapes from its own config, so a tiny
SD-layout directory gives a tiny bundle); the Backbone's temporal modules take AnimateDiff's
motion-module weights (diffusers ``MotionAdapter`` directory or the original ``.ckpt``);
wav2vec2 and the VAE are used as given. What EMO adds (speed attention, audio projection,
Face Locator, speed encoder) starts as a zero contribution. Every source tensor that is not
used and every target tensor that is not filled is reported, and the command fails unless
those are exactly the expected ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from safetensors.torch import load_file
from transformers import Wav2Vec2Model

from emo.bundle import BundleInfo, save_bundle
from emo.errors import InputError
from emo.models.components import EMOComponents, new_backbone, new_emo_layers
from emo.models.config import SD15_SCHEDULER, EMOConfig
from emo.models.reference_net import ReferenceNet

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")


@dataclass
class InitReport:
    """Which tensors were not carried over, and whether that is exactly what was expected."""

    unused_sources: list[str] = field(default_factory=list)
    unfilled_targets: list[str] = field(default_factory=list)
    expected_unused: list[str] = field(default_factory=list)
    expected_unfilled: list[str] = field(default_factory=list)
    new_components: list[str] = field(default_factory=list)

    @property
    def as_expected(self) -> bool:
        return sorted(self.unused_sources) == sorted(self.expected_unused) and sorted(
            self.unfilled_targets
        ) == sorted(self.expected_unfilled)

    def lines(self) -> list[str]:
        out = [f"source tensors not used: {len(self.unused_sources)}"]
        out += [f"  {name}" for name in sorted(self.unused_sources)]
        out += [f"target tensors not filled: {len(self.unfilled_targets)}"]
        out += [f"  {name}" for name in sorted(self.unfilled_targets)]
        out += [f"new components (zero contribution at start): {', '.join(self.new_components)}"]
        return out


def _require_dir(path: Path, what: str, option: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{option} {path}: no {what} directory there")
    return path


def _config_dict(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def load_sd_unet(sd15: Path) -> UNet2DConditionModel:
    """The UNet of an SD1.5 directory in diffusers layout (``unet/`` below it, or itself)."""
    folder = sd15 / "unet" if (sd15 / "unet").is_dir() else sd15
    if not (folder / "config.json").is_file():
        raise InputError(f"--sd15 {sd15}: no diffusers UNet (unet/config.json) found")
    return UNet2DConditionModel.from_pretrained(folder)


def _original_motion_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def _adapter_config_from_checkpoint(
    state: dict[str, torch.Tensor], positions: int, heads: int, groups: int
) -> dict[str, Any]:
    """MotionAdapter config of converted AnimateDiff weights, read from tensor shapes."""
    channels, layers = [], 0
    block = 0
    while f"down_blocks.{block}.motion_modules.0.proj_in.weight" in state:
        channels.append(state[f"down_blocks.{block}.motion_modules.0.proj_in.weight"].shape[1])
        block += 1
    while f"down_blocks.0.motion_modules.{layers}.proj_in.weight" in state:
        layers += 1
    if not channels or not positions:
        raise InputError(
            "--animatediff: not an AnimateDiff motion-module checkpoint "
            "(no down_blocks.*.motion_modules.* tensors)"
        )
    return {
        "block_out_channels": channels,
        "motion_layers_per_block": layers,
        "motion_num_attention_heads": heads,
        "motion_norm_num_groups": groups,
        "motion_max_seq_length": positions,
        "use_motion_mid_block": any(k.startswith("mid_block.") for k in state),
    }


def load_motion_adapter(path: Path, base: EMOConfig) -> tuple[MotionAdapter, list[str]]:
    """AnimateDiff weights as a MotionAdapter, and source tensors deliberately not used."""
    if path.is_dir():
        return MotionAdapter.from_pretrained(path), []
    if not path.is_file() or path.suffix not in CHECKPOINT_SUFFIXES:
        raise InputError(
            f"--animatediff {path}: give a MotionAdapter directory or an "
            f"original checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})"
        )
    state = _original_motion_checkpoint(path)
    converted = convert_animatediff_checkpoint_to_diffusers(state)
    positions = [k for k in state if k.endswith("pos_encoder.pe")]
    config = _adapter_config_from_checkpoint(
        converted,
        state[positions[0]].shape[1] if positions else 0,
        base.motion["motion_num_attention_heads"],
        base.motion["motion_norm_num_groups"],
    )
    adapter = MotionAdapter(**config)
    missing, unexpected = adapter.load_state_dict(converted, strict=False)
    if unexpected or any(not k.endswith("pos_embed.pe") for k in missing):
        raise InputError(
            f"--animatediff {path}: layout not understood "
            f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
        )
    # The checkpoint's sinusoidal positions are recomputed by diffusers: check they agree.
    for key in positions:
        table = state[key]
        expected = SinusoidalPositionalEmbedding(table.shape[2], table.shape[1]).pe
        if not torch.allclose(table.float(), expected, atol=1e-4):
            raise InputError(f"--animatediff {path}: {key} is not the standard sinusoid")
    return adapter, [f"animatediff:{k}" for k in positions]


def _load_wav2vec2(path: Path) -> Wav2Vec2Model:
    _require_dir(path, "wav2vec2 (transformers layout)", "--wav2vec2")
    return Wav2Vec2Model.from_pretrained(path)


def _load_vae(sd15: Path, vae: Path | None) -> AutoencoderKL:
    folder = vae or sd15 / "vae"
    _require_dir(folder, "VAE (diffusers AutoencoderKL)", "--vae" if vae else "--sd15 …/vae")
    return AutoencoderKL.from_pretrained(folder)


def _scheduler_config(sd15: Path) -> dict[str, Any]:
    file = sd15 / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return dict(SD15_SCHEDULER)
    return {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}


def _fill(
    target: torch.nn.Module,
    sources: dict[str, tuple[str, torch.Tensor]],
    owner: str,
    report: InitReport,
    used: set[str],
) -> None:
    """Load ``sources`` (target key -> (source name, tensor)) into ``target``; record gaps."""
    state = target.state_dict()
    for key in state:
        if key in sources:
            name, tensor = sources[key]
            if tensor.shape != state[key].shape:
                raise InputError(
                    f"{name} has shape {tuple(tensor.shape)}, {owner} needs "
                    f"{tuple(state[key].shape)} for {key}"
                )
            state[key] = tensor
            used.add(name)
        else:
            report.unfilled_targets.append(f"{owner}:{key}")
    target.load_state_dict(state, strict=True)


def init_components(
    *, sd15: Path, animatediff: Path, wav2vec2: Path, vae: Path | None, base: EMOConfig
) -> tuple[EMOComponents, EMOConfig, InitReport]:
    """Build every network from the given weights; report what was not carried over."""
    _require_dir(sd15, "SD1.5", "--sd15")
    sd_unet = load_sd_unet(sd15)
    adapter, skipped = load_motion_adapter(animatediff, base)
    audio_model = _load_wav2vec2(wav2vec2)
    vae_model = _load_vae(sd15, vae)
    w2v_config = {
        k: v
        for k, v in audio_model.config.to_diff_dict().items()
        if k not in ("transformers_version", "architectures", "dtype", "torch_dtype")
    }
    config = base.with_components(
        unet=_config_dict(sd_unet.config),
        motion=_config_dict(adapter.config),
        vae=_config_dict(vae_model.config),
        wav2vec2=w2v_config,
        scheduler=_scheduler_config(sd15),
    )
    check_config(config)

    report = InitReport(expected_unused=list(skipped))
    unet_state = {k: (f"sd15:{k}", v) for k, v in sd_unet.state_dict().items()}
    motion_state = {k: (f"animatediff:{k}", v) for k, v in adapter.state_dict().items()}
    used: set[str] = set()

    reference_net = ReferenceNet(unet_config=config.unet)
    _fill(
        reference_net,
        {f"unet.{k}": v for k, v in unet_state.items()},
        "reference_net",
        report,
        used,
    )

    backbone = new_backbone(config)
    backbone_sources = {f"unet.{k}": v for k, v in unet_state.items()}
    for key, value in motion_state.items():  # motion_modules.j.X -> motion_modules.j.temporal.X
        block, _, rest = key.partition(".motion_modules.")
        index, _, tail = rest.partition(".")
        backbone_sources[f"unet.{block}.motion_modules.{index}.temporal.{tail}"] = value
    _fill(backbone, backbone_sources, "backbone", report, used)
    report.expected_unfilled = [
        f"backbone:{k}"
        for k in backbone.state_dict()
        if ".speed_attention." in k or k.startswith("audio_embedding.")
    ]
    all_sources = {name for name, _ in unet_state.values()} | {
        name for name, _ in motion_state.values()
    }
    report.unused_sources = sorted(all_sources - used) + list(skipped)

    added = new_emo_layers(config)
    report.new_components = sorted(added)
    components = EMOComponents(
        backbone=backbone, reference_net=reference_net, vae=vae_model, wav2vec2=audio_model, **added
    )  # type: ignore[arg-type]
    return components.eval(), config, report


def check_config(config: EMOConfig) -> None:
    """Refuse configurations whose parts do not fit together, naming the part."""
    layers = config.wav2vec2.get("num_hidden_layers", 12)
    if max(config.audio_layers) > layers:
        raise InputError(
            f"audio_layers {config.audio_layers} ask for wav2vec2 block "
            f"{max(config.audio_layers)}, but the model has {layers}"
        )
    sequence = config.motion["motion_max_seq_length"]
    if config.clip_frames + config.motion_frames > sequence:
        raise InputError(
            f"clip_frames + motion_frames = "
            f"{config.clip_frames + config.motion_frames} exceeds the motion "
            f"modules' {sequence} positions"
        )
    if list(config.unet["block_out_channels"]) != list(config.motion["block_out_channels"]):
        raise InputError(
            "the AnimateDiff motion modules were made for another UNet "
            f"(channels {config.motion['block_out_channels']} vs "
            f"{config.unet['block_out_channels']})"
        )
    downsample = config.vae_scale * 2 ** (len(config.unet["block_out_channels"]) - 1)
    if config.resolution % downsample:
        raise InputError(f"resolution {config.resolution} must be a multiple of {downsample}")


def init_bundle(
    *,
    sd15: Path,
    animatediff: Path,
    wav2vec2: Path,
    vae: Path | None,
    base: EMOConfig,
    output: Path,
) -> tuple[BundleInfo, InitReport]:
    """``emo weights init``: build, check the report, write the bundle."""
    components, config, report = init_components(
        sd15=sd15, animatediff=animatediff, wav2vec2=wav2vec2, vae=vae, base=base
    )
    if not report.as_expected:
        raise InputError("weights did not map as expected:\n" + "\n".join(report.lines()))
    sources = {
        "sd15": str(sd15),
        "animatediff": str(animatediff),
        "wav2vec2": str(wav2vec2),
        "vae": str(vae or sd15 / "vae"),
    }
    info = save_bundle(
        components,
        config,
        output,
        scheduler_config=config.scheduler,
        meta={"made_by": "emo weights init", "sources": sources},
    )
    return info, report
