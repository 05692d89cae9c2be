"""The demo configuration: EMO's networks on a fixed pixel unshuffle, bundled and exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from emo.bundle import load_bundle
from emo.models.config import DEMO
from emo.models.pixel_vae import PixelShuffleVAE
from emo.pipeline import EMOPipeline
from tests.conftest import run_emo


def test_pixel_unshuffle_is_exactly_invertible() -> None:
    vae = PixelShuffleVAE()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    z = vae.encode(x).latent_dist.sample()
    assert z.shape == (3, 48, 16, 16) and torch.equal(vae.decode(z).sample, x)
    assert DEMO.latent_size == 16 and DEMO.vae_scale == 4


def test_new_and_exported_demo_bundles_render(tmp_path: Path) -> None:
    made = run_emo("weights", "new", "--config", "demo", "-o", str(tmp_path / "new"))
    assert made.returncode == 0, made.stderr
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"lip_sync_r": 0.5, "per_video": [1, 2]}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  steps: 1\n")
    exported = run_emo(
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
    shown = run_emo("weights", "info", str(tmp_path / "half"))
    assert "configuration demo: 64x64" in shown.stdout
    assert "recipe.yaml (text recorded in emo.json)" in shown.stdout
    assert "lip_sync_r 0.500" in shown.stdout

    pipeline = EMOPipeline.from_bundle(tmp_path / "half")
    portrait = np.full((64, 64, 3), 128, np.uint8)
    audio = np.zeros(16000, np.float32)
    out = pipeline(portrait, audio, clips=range(0, 1), steps=2, seed=1)
    assert out.frames.shape == (12, 64, 64, 3)
