"""Shapes of every component and save/load round trips of bundles (tiny configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emo.bundle import content_hash, load_bundle, read_bundle_info, save_bundle
from emo.errors import InputError
from emo.models.audio import clip_audio, clip_audio_features
from emo.models.components import EMOComponents, build_components
from emo.models.conditioning import Conditioning
from emo.models.config import FULL, TINY, EMOConfig

F, N, K = TINY.clip_frames, TINY.motion_frames, TINY.audio_tokens
LATENT = TINY.latent_size


def test_component_output_shapes(tiny_components: EMOComponents, vocal: np.ndarray) -> None:
    parts = tiny_components
    with torch.no_grad():
        reference = parts.reference_net(torch.randn(1, 4, LATENT, LATENT))
        motion = parts.reference_net(torch.randn(N, 4, LATENT, LATENT))
        samples = clip_audio(vocal, clip=1, clip_frames=F, spf=640, window=2, context=13)
        features = clip_audio_features(
            parts.wav2vec2, samples, layers=TINY.audio_layers, clip_frames=F, window=2, context=13
        )
        tokens = parts.audio_projection(features[None])
        speed = parts.speed_encoder(torch.rand(1, F, K) * 0.05)
        located = parts.face_locator(torch.ones(1, 1, TINY.resolution, TINY.resolution))
        conditioning = Conditioning(
            reference=reference.tokens, motion=motion.maps, motion_frames=N, speed=speed
        )
        out = parts.backbone(
            torch.randn(1, 4, F, LATENT, LATENT), torch.tensor([500]), tokens, conditioning
        )

    assert samples.shape == ((F + 2 * (2 + 13)) * 640,)
    hidden = TINY.wav2vec2["hidden_size"]
    assert features.shape == (F, K, len(TINY.audio_layers) * hidden)
    assert tokens.shape == (F, K, TINY.unet["cross_attention_dim"])
    assert speed.shape == (1, F, K, TINY.speed_dim)
    assert located.shape == (1, 4, LATENT, LATENT)
    assert out.shape == (1, 4, F, LATENT, LATENT)
    # Reference tokens: one entry per spatial self-attention, (B, h*w, C) at its resolution.
    assert reference.tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"].shape == (
        1,
        LATENT * LATENT,
        32,
    )
    assert reference.tokens["mid_block.attentions.0.transformer_blocks.0.attn1"].shape == (
        1,
        (LATENT // 2) ** 2,
        64,
    )
    # Motion maps: one per temporal module of the Backbone, same names.
    temporal = {
        name.rsplit(".temporal", 1)[0]
        for name, _ in parts.backbone.unet.named_modules()
        if name.endswith(".temporal")
    }
    assert set(motion.maps) == temporal
    assert motion.maps["up_blocks.1.motion_modules.1"].shape == (N, 32, LATENT, LATENT)


def test_new_layers_start_as_zero_contributions() -> None:
    fresh = build_components(TINY, seed=0)
    with torch.no_grad():
        assert fresh.face_locator(torch.ones(1, 1, 64, 64)).abs().max() == 0
        assert fresh.audio_projection(torch.randn(1, F, K, 64)).abs().max() == 0
        temporal = fresh.backbone.unet.down_blocks[0].motion_modules[0]
        x = torch.randn(F, 32, LATENT, LATENT)
        assert temporal.speed_attention(x, torch.randn(1, F, K, TINY.speed_dim)).abs().max() == 0


def test_bundle_round_trip_is_bit_identical_and_hash_stable(tmp_path: Path) -> None:
    components = build_components(TINY, seed=3)
    first = save_bundle(components, TINY, tmp_path / "a")
    loaded, info = load_bundle(tmp_path / "a")
    assert info.sha256 == first.sha256 == content_hash(tmp_path / "a", TINY)
    for name, module in components.modules().items():
        original, restored = module.state_dict(), loaded.modules()[name].state_dict()
        assert original.keys() == restored.keys(), name
        for key in original:
            assert torch.equal(original[key], restored[key]), f"{name}.{key}"
    again = save_bundle(loaded, info.config, tmp_path / "b")
    assert again.sha256 == first.sha256
    assert read_bundle_info(tmp_path / "b").config == TINY


def test_edited_bundle_is_refused(tmp_path: Path) -> None:
    save_bundle(build_components(TINY, seed=3), TINY, tmp_path / "a")
    weights = next((tmp_path / "a" / "face_locator").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged or was edited"):
        load_bundle(tmp_path / "a")
    with pytest.raises(InputError, match="not a weights bundle"):
        load_bundle(tmp_path)


def test_bundles_made_before_a_config_field_existed_still_verify(tmp_path: Path) -> None:
    """A field added to EMOConfig later (with a default) must not invalidate shipped bundles;
    a value edited in emo.json's configuration still is refused."""
    save_bundle(build_components(TINY, seed=3), TINY, tmp_path / "a")
    document_path = tmp_path / "a" / "emo.json"
    document = json.loads(document_path.read_text())
    del document["config"]["audio_energy_bands"]  # as written before the field existed
    document["sha256"] = content_hash(tmp_path / "a", document["config"])
    document_path.write_text(json.dumps(document))
    _, info = load_bundle(tmp_path / "a")
    assert info.config == TINY
    document["config"]["steps"] = 50
    document_path.write_text(json.dumps(document))
    with pytest.raises(InputError, match="damaged or was edited"):
        load_bundle(tmp_path / "a")


def test_configurations_round_trip_and_full_has_the_paper_sizes() -> None:
    for config in (FULL, TINY):
        assert EMOConfig.from_dict(config.to_dict()) == config
    assert (FULL.resolution, FULL.clip_frames, FULL.motion_frames, FULL.audio_window) == (
        512,
        12,
        4,
        2,
    )
    assert FULL.latent_size == 64 and FULL.steps == 40
    assert sum(build_components(TINY).parameter_counts().values()) < 5_000_000
