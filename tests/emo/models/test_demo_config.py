"""The demo configuration: EMO's networks on a fixed pixel unshuffle, bundled and exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emo.bundle import load_bundle, read_bundle_info
from emo.models.audio import band_edges, band_energies, clip_audio_features
from emo.models.components import build_components
from emo.models.config import DEMO
from emo.models.pixel_vae import PixelShuffleVAE
from emo.pipeline import EMOPipeline
from tests.conftest import emo_in_process


def test_pixel_unshuffle_is_exactly_invertible() -> None:
    vae = PixelShuffleVAE()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    z = vae.encode(x).latent_dist.sample()
    assert z.shape == (3, 48, 16, 16) and torch.equal(vae.decode(z).sample, x)
    assert DEMO.latent_size == 16 and DEMO.vae_scale == 4


@pytest.mark.slow  # demo bundles made and rendered
def test_new_and_exported_demo_bundles_render(tmp_path: Path) -> None:
    made = emo_in_process("weights", "new", "--config", "demo", "-o", str(tmp_path / "new"))
    assert made.returncode == 0, made.stderr
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"lip_sync_r": 0.5, "per_video": [1, 2]}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  steps: 1\n")
    exported = emo_in_process(
        "weights",
        "export",
        str(tmp_path / "new"),
        "-o",
        str(tmp_path / "half"),
        "--recipe",
        str(recipe),
        "--eval",
        str(report),
    )
    assert exported.returncode == 0, exported.stderr
    components, info = load_bundle(tmp_path / "half")
    assert components.backbone.dtype == torch.float32  # loaded in the asked dtype
    assert info.meta["recipe"]["text"] == recipe.read_text()
    assert info.meta["evaluation"] == {"lip_sync_r": 0.5}
    size = sum(f.stat().st_size for f in (tmp_path / "half").rglob("*") if f.is_file())
    assert size < 40e6  # ships inside the package
    shown = emo_in_process("weights", "info", str(tmp_path / "half"))
    assert "configuration demo: 64x64" in shown.stdout
    assert "recipe.yaml (text recorded in emo.json)" in shown.stdout
    assert "lip_sync_r 0.500" in shown.stdout
    second = tmp_path / "continue.yaml"
    second.write_text("stage2:\n  steps: 2\n")
    both = emo_in_process(
        "weights", "export", str(tmp_path / "new"), "-o", str(tmp_path / "both"),
        "--recipe", str(recipe), "--recipe", str(second), "--steps", "12", "--guidance", "1.2",
        "--continuation-strength", "0.7",
    )  # fmt: skip
    assert both.returncode == 0, both.stderr
    shipped = read_bundle_info(tmp_path / "both").config  # what renders default to
    assert (shipped.steps, shipped.guidance_scale, DEMO.steps) == (12, 1.2, 20)
    assert (shipped.continuation_strength, DEMO.continuation_strength) == (0.7, 1.0)
    assert [r["text"] for r in read_bundle_info(tmp_path / "both").meta["recipe"]] == [
        recipe.read_text(),
        second.read_text(),
    ]
    shown = emo_in_process("weights", "info", str(tmp_path / "both"))
    assert "recipe.yaml then continue.yaml (texts recorded in emo.json)" in shown.stdout
    assert "12 steps, guidance 1.2, continuation strength 0.7" in shown.stdout
    refused = emo_in_process(
        "weights", "export", str(tmp_path / "new"), "-o", str(tmp_path / "never"),
        "--continuation-strength", "0",
    )  # fmt: skip
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "--continuation-strength must be above 0" in refused.stderr
    assert not (tmp_path / "never").exists()

    pipeline = EMOPipeline.from_bundle(tmp_path / "half")
    portrait = np.full((64, 64, 3), 128, np.uint8)
    audio = np.zeros(16000, np.float32)
    out = pipeline(portrait, audio, clips=range(0, 1), steps=2, seed=1)
    assert out.frames.shape == (12, 64, 64, 3)


def test_band_energies_carry_loudness_per_frame() -> None:
    """The demo's random wav2vec2 normalises loudness away; the energy bands must keep it:
    silence lowest, a louder frame higher, a low tone in a low band, a high tone in a high."""
    sr, spf, frames = 16000, 640, 8
    t = np.arange(spf) / sr
    low, high = np.sin(2 * np.pi * 150 * t), np.sin(2 * np.pi * 4000 * t)
    parts = [0 * t, 0.1 * low, 0.4 * low, 0.4 * high, 0 * t, 0.1 * low, 0.4 * low, 0.4 * high]
    x = torch.from_numpy(np.concatenate(parts).astype(np.float32))
    x = (x - x.mean()) / x.std()
    energy = band_energies(x, frames, 8)  # (frames, bands)
    assert energy.shape == (frames, 8)
    total = energy.exp().sum(-1)
    assert total[0] < total[1] < total[2] and torch.allclose(energy[:4], energy[4:])
    assert energy[2].argmax() < 4 <= energy[3].argmax()
    assert band_edges(321, 8) == sorted(set(band_edges(321, 8)))  # no empty band


def test_demo_audio_features_hold_the_energy_bands() -> None:
    components = build_components(DEMO)
    samples = np.random.default_rng(0).normal(size=(12 + 2 * 15) * 640).astype(np.float32)
    features = clip_audio_features(
        components.wav2vec2,
        samples,
        layers=DEMO.audio_layers,
        clip_frames=12,
        window=DEMO.audio_window,
        context=13,
        energy_bands=DEMO.audio_energy_bands,
    )
    width = len(DEMO.audio_layers) * DEMO.wav2vec2["hidden_size"] + DEMO.audio_energy_bands
    assert features.shape == (12, DEMO.audio_tokens, width)
    assert components.audio_projection.config.in_features == width
