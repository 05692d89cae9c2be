"""The clip pipeline: resume equivalence, ReferenceNet call counts, conditioning that matters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emo.errors import SettingsError
from emo.models.config import TINY
from emo.pipeline import EMOPipeline, MotionState, clip_seed

F, N = TINY.clip_frames, TINY.motion_frames
RUN = {"seed": 11, "steps": 3, "face_box": (0.25, 0.2, 0.75, 0.8)}


def test_resume_through_a_file_is_bit_identical(
    pipeline: EMOPipeline, portrait, vocal, tmp_path: Path
) -> None:
    whole = pipeline(portrait, vocal, clips=range(0, 6), **RUN)
    first = pipeline(portrait, vocal, clips=range(0, 3), **RUN)
    first.motion_state.save(tmp_path / "motion.safetensors")
    state = MotionState.load(tmp_path / "motion.safetensors")
    assert state.next_clip == 3 and state.latents.shape == (N, 4, 8, 8)
    second = pipeline(portrait, vocal, clips=range(3, 6), motion_state=state, **RUN)
    assert whole.frames.shape == (6 * F, 64, 64, 3) and whole.frames.dtype == np.uint8
    assert np.array_equal(np.concatenate([first.frames, second.frames]), whole.frames)
    assert torch.equal(second.motion_state.latents, whole.motion_state.latents)


def test_reference_net_runs_once_per_call_and_once_per_clip(
    pipeline: EMOPipeline, portrait, vocal, monkeypatch
) -> None:
    calls: list[int] = []
    original = pipeline.components.reference_net.forward

    def counting(latents: torch.Tensor):
        calls.append(latents.shape[0])
        return original(latents)

    monkeypatch.setattr(pipeline.components.reference_net, "forward", counting)
    steps: list[tuple[int, int]] = []
    pipeline(
        portrait,
        vocal,
        clips=range(0, 3),
        seed=1,
        steps=4,
        callback=lambda clip, step, total: steps.append((clip, step)),
    )
    assert len(steps) == 3 * 4  # the callback saw every step of every clip
    assert calls == [1, N, N]  # reference once; motion frames for clips 1 and 2; never per step


def test_first_clip_sees_zero_motion_features(pipeline: EMOPipeline, portrait, vocal) -> None:
    seen: list[torch.Tensor] = []
    module = pipeline.components.backbone.unet.down_blocks[0].motion_modules[0]
    hook = module.temporal.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        pipeline(portrait, vocal, clips=range(0, 2), seed=1, steps=1)
    finally:
        hook.remove()
    first, second = seen[0], seen[-1]  # one step per clip: first clip, then second
    frames = first.reshape(-1, N + F, *first.shape[1:])  # (B, n + F, C, h, w)
    assert torch.count_nonzero(frames[:, :N]) == 0
    assert torch.count_nonzero(second.reshape(-1, N + F, *second.shape[1:])[:, :N]) > 0


def _first_clip(pipeline: EMOPipeline, portrait, audio, **changes) -> np.ndarray:
    return pipeline(portrait, audio, clips=range(0, 1), **{**RUN, **changes}).frames


@pytest.mark.parametrize("change", ["audio", "speed", "face", "seed"])
def test_each_input_changes_the_output(pipeline: EMOPipeline, portrait, vocal, change: str) -> None:
    base = _first_clip(pipeline, portrait, vocal)
    assert np.array_equal(base, _first_clip(pipeline, portrait, vocal))  # deterministic
    if change == "audio":
        other = _first_clip(pipeline, portrait, np.roll(vocal, 4000))
    elif change == "speed":
        other = _first_clip(pipeline, portrait, vocal, speed=0.15)
    elif change == "face":
        other = _first_clip(pipeline, portrait, vocal, face_box=(0.0, 0.0, 0.3, 0.3))
    else:
        other = _first_clip(pipeline, portrait, vocal, seed=12)
    assert not np.array_equal(base, other)


def test_motion_state_changes_the_output(pipeline: EMOPipeline, portrait, vocal) -> None:
    a = pipeline(portrait, vocal, clips=range(0, 1), **RUN).motion_state
    b = pipeline(portrait, vocal, clips=range(0, 1), **{**RUN, "seed": 99}).motion_state
    after_a = pipeline(portrait, vocal, clips=range(1, 2), motion_state=a, **RUN).frames
    after_b = pipeline(portrait, vocal, clips=range(1, 2), motion_state=b, **RUN).frames
    assert not np.array_equal(after_a, after_b)


def test_per_frame_speed_schedule(pipeline: EMOPipeline, portrait, vocal) -> None:
    level = _first_clip(pipeline, portrait, vocal, speed=0.02)
    schedule = _first_clip(pipeline, portrait, vocal, speed=[0.02] * 6 + [0.2] * 6)
    same = _first_clip(pipeline, portrait, vocal, speed=[0.02] * F)
    assert np.array_equal(level, same) and not np.array_equal(level, schedule)


def test_noise_depends_on_seed_and_clip_only() -> None:
    assert clip_seed(1, 0) == clip_seed(1, 0)
    assert len({clip_seed(1, k) for k in range(100)} | {clip_seed(2, 0)}) == 101


def test_bad_calls_are_refused(pipeline: EMOPipeline, portrait, vocal) -> None:
    with pytest.raises(SettingsError, match="needs the motion state"):
        pipeline(portrait, vocal, clips=range(2, 3), **RUN)
    with pytest.raises(SettingsError, match="outside the track"):
        pipeline(portrait, vocal, clips=range(0, 99), **RUN)
    with pytest.raises(SettingsError, match="reference image must be"):
        pipeline(portrait[:32], vocal, clips=range(0, 1), **RUN)
    with pytest.raises(SettingsError, match="unknown scheduler"):
        pipeline(portrait, vocal, clips=range(0, 1), scheduler="nope", **RUN)


@pytest.mark.parametrize("scheduler", ["dpm++", "euler", "unipc"])
def test_other_schedulers_run(pipeline: EMOPipeline, portrait, vocal, scheduler: str) -> None:
    frames = pipeline(portrait, vocal, clips=range(0, 1), scheduler=scheduler, **RUN).frames
    assert frames.shape == (F, 64, 64, 3)


def test_residual_models_add_the_reference_back(
    tiny_components, pipeline: EMOPipeline, portrait, vocal
) -> None:
    """A model trained on (frame - reference) latents is sampled in that space, then offset."""
    from dataclasses import replace

    residual = EMOPipeline(
        tiny_components, replace(TINY, residual_to_reference=True), TINY.scheduler
    )
    plain = pipeline(portrait, vocal, clips=range(0, 1), **RUN).motion_state.latents
    shifted = residual(portrait, vocal, clips=range(0, 1), **RUN).motion_state.latents
    offset = pipeline.encode_reference(portrait)[0]  # (C, h, w)
    assert torch.allclose(shifted, plain + offset, atol=1e-5)


def test_pndm_is_refused_for_sample_prediction(tiny_components, portrait, vocal) -> None:
    config = {**TINY.scheduler, "prediction_type": "sample"}
    pipeline = EMOPipeline(tiny_components, TINY, config)
    with pytest.raises(SettingsError, match="pndm cannot sample"):
        pipeline(portrait, vocal, clips=range(0, 1), scheduler="pndm", steps=2)
