"""The audio time embedding (EMOConfig.audio_time_embedding) and `emo weights upgrade`, which
adds it to a bundle trained before it existed without losing that bundle's training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from emo.bundle import content_hash, load_bundle, read_bundle_info, save_bundle
from emo.models.components import build_components
from emo.models.conditioning import Conditioning
from emo.models.config import TINY
from tests.conftest import emo_in_process
from tests.emo.models.conftest import like_trained

F, K, D, LATENT = TINY.clip_frames, TINY.audio_tokens, TINY.unet["cross_attention_dim"], 8


def _forward(backbone: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)
    latents = torch.randn(1, 4, F, LATENT, LATENT)
    conditioning = Conditioning(reference=None, motion=None, motion_frames=0, speed=None)
    with torch.no_grad():
        return backbone(latents, torch.tensor([400]), tokens, conditioning)


def test_each_frame_s_audio_offsets_the_time_embedding_of_every_resnet() -> None:
    backbone = like_trained(build_components(TINY, seed=0)).backbone
    resnets = [m for m in backbone.unet.modules() if isinstance(m, ResnetBlock2D)]
    seen: list[torch.Tensor] = []
    for resnet in resnets:  # registered after the Backbone's own hook: sees its result
        resnet.register_forward_pre_hook(
            lambda _m, _a, kwargs: seen.append(kwargs["temb"]), with_kwargs=True
        )
    tokens = torch.randn(F, K, D)
    _forward(backbone, tokens)
    with_audio, seen[:] = list(seen), []
    _forward(backbone, torch.zeros_like(tokens))
    silent = list(seen)

    assert len(with_audio) == len(resnets) >= 5  # down, mid and up blocks all hear it
    with torch.no_grad():
        offset = backbone.audio_embedding(tokens) - backbone.audio_embedding(0 * tokens)  # (F, E)
    assert offset.abs().amin(dim=1).max() > 0 and not torch.allclose(offset[0], offset[1])
    for heard, quiet in zip(with_audio, silent, strict=True):
        torch.testing.assert_close(heard - quiet, offset)  # frame i gets its own audio's offset


def test_audio_attention_alone_still_hears_the_audio() -> None:
    """The embedding is an extra path: with it silenced, audio-attention still listens."""
    backbone = like_trained(build_components(TINY, seed=0)).backbone
    torch.nn.init.zeros_(backbone.audio_embedding.linear_2.weight)
    torch.nn.init.zeros_(backbone.audio_embedding.linear_2.bias)
    tokens = torch.randn(F, K, D)
    assert not torch.allclose(_forward(backbone, tokens), _forward(backbone, 2 * tokens))


def test_a_resnet_run_outside_the_forward_is_refused() -> None:
    """Gradient checkpointing would re-run ResNets in backward without the embedding."""
    backbone = build_components(TINY, seed=0).backbone
    resnet = next(m for m in backbone.unet.modules() if isinstance(m, ResnetBlock2D))
    with pytest.raises(RuntimeError, match="outside Backbone.forward"):
        resnet(torch.randn(F, 32, LATENT, LATENT), torch.randn(F, 128))


def _bundle_from_before_the_field(path: Path) -> Path:
    """A trained-looking tiny bundle as written before audio_time_embedding existed."""
    old = replace(TINY, audio_time_embedding=False)
    save_bundle(
        like_trained(build_components(old, seed=2)),
        old,
        path,
        meta={"made_by": "emo train", "history": [{"stage": 2, "steps": 9}], "evaluation": {}},
    )
    document = json.loads((path / "emo.json").read_text())
    del document["config"]["audio_time_embedding"]
    document["sha256"] = content_hash(path, document["config"])
    (path / "emo.json").write_text(json.dumps(document))
    return path


def test_upgrade_adds_the_embedding_at_zero_and_keeps_everything_trained(tmp_path: Path) -> None:
    source = _bundle_from_before_the_field(tmp_path / "old")
    result = emo_in_process("weights", "upgrade", str(source), "-o", str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    assert "audio_time_embedding=True; 4 new tensors" in result.stdout

    old, _ = load_bundle(source)
    new, info = load_bundle(tmp_path / "new")
    assert info.config == TINY
    assert info.meta["history"] == [{"stage": 2, "steps": 9}] and "evaluation" not in info.meta
    upgraded = info.meta["upgraded"]
    assert upgraded["from_sha256"] == read_bundle_info(source).sha256
    assert sorted(upgraded["new_tensors"]) == [
        f"backbone.audio_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")
    ]
    for name, module in old.modules().items():  # every trained tensor survives, bit for bit
        new_state = getattr(new, name).state_dict()
        for key, tensor in module.state_dict().items():
            assert torch.equal(new_state[key], tensor), f"{name}.{key}"
    tokens = torch.randn(F, K, D)
    torch.testing.assert_close(_forward(new.backbone, tokens), _forward(old.backbone, tokens))


def test_a_current_bundle_is_copied_unchanged(tmp_path: Path) -> None:
    """So a recipe can upgrade whatever its earlier stages left (make demo-model does)."""
    save_bundle(
        like_trained(build_components(TINY, seed=4)), TINY, tmp_path / "a", meta={"evaluation": 1}
    )
    result = emo_in_process("weights", "upgrade", str(tmp_path / "a"), "-o", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert "already current; 0 new tensors" in result.stdout
    (old, _), (new, info) = load_bundle(tmp_path / "a"), load_bundle(tmp_path / "b")
    assert info.config == TINY and info.meta["evaluation"] == 1
    for name, module in old.modules().items():
        for key, tensor in module.state_dict().items():
            assert torch.equal(getattr(new, name).state_dict()[key], tensor), f"{name}.{key}"


def test_upgrade_refuses_what_it_cannot_do_in_one_line(tmp_path: Path) -> None:
    source = _bundle_from_before_the_field(tmp_path / "old")
    (tmp_path / "taken").mkdir()
    out, taken = str(tmp_path / "out"), str(tmp_path / "taken")
    cases = [
        ((str(source), "--config", "demo", "-o", out), "is a 'tiny' model; upgrade it with"),
        ((str(source), "-o", taken), "already exists"),
        ((str(tmp_path / "nowhere"), "-o", out), "nowhere"),
    ]
    for args, message in cases:
        result = emo_in_process("weights", "upgrade", *args)
        assert result.returncode != 0
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists() and not any((tmp_path / "taken").iterdir())
