"""``emo weights init`` from tiny SD1.5 / AnimateDiff / wav2vec2 directories in the real layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import Wav2Vec2Model

from emo.errors import InputError
from emo.models.conditioning import Conditioning
from emo.models.config import TINY
from emo.weights_init import init_components
from tests.conftest import emo_in_process
from tests.emo.models.sources import (
    tiny_animatediff_ckpt,
    tiny_animatediff_dir,
    tiny_motion_adapter,
    tiny_sd15,
    tiny_wav2vec2,
)

F, LATENT = TINY.clip_frames, TINY.latent_size


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    ckpt, _ = tiny_animatediff_ckpt(folder / "mm_tiny.ckpt")
    return {
        "sd15": tiny_sd15(folder / "sd15"),
        "adapter": tiny_animatediff_dir(folder / "motion-adapter"),
        "ckpt": ckpt,
        "wav2vec2": tiny_wav2vec2(folder / "wav2vec2"),
    }


@pytest.mark.parametrize("layout", ["adapter", "ckpt"])
def test_every_source_tensor_lands_in_its_target(sources: dict[str, Path], layout: str) -> None:
    components, config, report = init_components(
        sd15=sources["sd15"],
        animatediff=sources[layout],
        wav2vec2=sources["wav2vec2"],
        vae=None,
        base=TINY,
    )
    assert report.as_expected, "\n".join(report.lines())
    emo_layers = (".speed_attention.", "backbone:audio_embedding.")  # new in EMO, not in SD
    assert all(any(layer in name for layer in emo_layers) for name in report.unfilled_targets)
    if layout == "ckpt":  # the original's positional tables are recomputed, and checked
        assert report.unused_sources and all("pos_encoder.pe" in s for s in report.unused_sources)
    else:
        assert report.unused_sources == []

    sd = UNet2DConditionModel.from_pretrained(sources["sd15"] / "unet").state_dict()
    adapter = tiny_motion_adapter().state_dict()  # what both layouts were written from
    backbone = components.backbone.state_dict()
    reference = components.reference_net.state_dict()
    for key, value in sd.items():
        assert torch.equal(reference[f"unet.{key}"], value), key
        assert torch.equal(backbone[f"unet.{key}"], value), key
    for key, value in adapter.items():
        block, _, rest = key.partition(".motion_modules.")
        index, _, tail = rest.partition(".")
        assert torch.equal(
            backbone[f"unet.{block}.motion_modules.{index}.temporal.{tail}"], value
        ), key
    w2v = Wav2Vec2Model.from_pretrained(sources["wav2vec2"]).state_dict()
    assert all(torch.equal(components.wav2vec2.state_dict()[k], v) for k, v in w2v.items())
    assert config.unet["block_out_channels"] == TINY.unet["block_out_channels"]


def _zero_conditioning() -> Conditioning:
    return Conditioning(reference=None, motion=None, motion_frames=0, speed=None)


def test_backbone_reproduces_sd_and_animatediff(sources: dict[str, Path]) -> None:
    """With no reference, zero audio and no speed, the Backbone is SD UNet + AnimateDiff."""
    components, _, _ = init_components(
        sd15=sources["sd15"],
        animatediff=sources["adapter"],
        wav2vec2=sources["wav2vec2"],
        vae=None,
        base=TINY,
    )
    sd_unet = UNet2DConditionModel.from_pretrained(sources["sd15"] / "unet")
    adapter = MotionAdapter.from_pretrained(sources["adapter"])
    reference_model = UNetMotionModel.from_unet2d(sd_unet, adapter).eval()
    torch.manual_seed(0)
    latents = torch.randn(1, 4, F, LATENT, LATENT)
    t = torch.tensor([321])
    silence = torch.zeros(F, TINY.audio_tokens, TINY.unet["cross_attention_dim"])
    # What a fresh audio projection produces: zeros, whatever the audio.
    assert components.audio_projection(torch.randn(1, F, TINY.audio_tokens, 64)).abs().max() == 0
    with torch.no_grad():
        ours = components.backbone(latents, t, silence, _zero_conditioning())
        theirs = reference_model(latents, t, encoder_hidden_states=silence).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # AnimateDiff's own initialisation (zero output projections) leaves the plain SD UNet.
    for name, parameter in components.backbone.named_parameters():
        if ".temporal." in name and "proj_out" in name:
            torch.nn.init.zeros_(parameter)
    with torch.no_grad():
        ours = components.backbone(latents, t, silence, _zero_conditioning())
        frames = latents[0].permute(1, 0, 2, 3)  # (F, C, h, w): each frame alone
        plain = sd_unet(frames, t, encoder_hidden_states=silence).sample
    torch.testing.assert_close(ours[0].permute(1, 0, 2, 3), plain, rtol=1e-5, atol=1e-5)


def test_cli_init_and_info(sources: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "tiny-bundle"
    result = emo_in_process(
        "weights",
        "init",
        "--sd15",
        str(sources["sd15"]),
        "--animatediff",
        str(sources["ckpt"]),
        "--wav2vec2",
        str(sources["wav2vec2"]),
        "--config",
        "tiny",
        "-o",
        str(bundle),
    )
    assert result.returncode == 0, result.stderr
    assert "source tensors not used: 14" in result.stdout
    assert "pos_encoder.pe" in result.stdout
    assert "target tensors not filled: 53" in result.stdout  # 49 speed attention, 4 audio time
    assert "speed_attention" in result.stdout and "audio_embedding" in result.stdout
    info = emo_in_process("weights", "info", str(bundle))
    assert info.returncode == 0, info.stderr
    assert "configuration tiny" in info.stdout and "backbone" in info.stdout
    assert "sha256" in info.stdout and "total" in info.stdout
    env_info = emo_in_process("weights", "info", env={"EMO_WEIGHTS": str(bundle)})
    assert env_info.stdout == info.stdout


def test_weights_info_without_a_bundle_names_the_default(tmp_path: Path) -> None:
    """With EMO_WEIGHTS unset, info describes the weights a render would use."""
    from emo.store.weights import SHIPPED_DEMO

    result = emo_in_process("weights", "info")
    assert result.returncode == 0, result.stderr
    if (SHIPPED_DEMO / "emo.json").is_file():  # the trained demo model ships in the package
        assert f"bundle        {SHIPPED_DEMO}" in result.stdout
        assert "configuration demo" in result.stdout and "evaluation" in result.stdout
    else:
        home = Path(os.environ["EMO_HOME"])
        assert f"bundle        {home / 'weights'}" in result.stdout
        assert "configuration tiny" in result.stdout and "untrained" in result.stdout


def test_bad_sources_give_clear_errors(sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--sd15"):
        init_components(
            sd15=tmp_path / "nothing",
            animatediff=sources["adapter"],
            wav2vec2=sources["wav2vec2"],
            vae=None,
            base=TINY,
        )
    junk = tmp_path / "junk.ckpt"
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, junk)
    with pytest.raises(InputError, match="not an AnimateDiff"):
        init_components(
            sd15=sources["sd15"],
            animatediff=junk,
            wav2vec2=sources["wav2vec2"],
            vae=None,
            base=TINY,
        )
    result = emo_in_process(
        "weights",
        "init",
        "--sd15",
        str(tmp_path),
        "--animatediff",
        str(junk),
        "--wav2vec2",
        str(tmp_path),
        "-o",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
