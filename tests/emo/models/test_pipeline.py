"""The clip pipeline: resume equivalence, ReferenceNet call counts, conditioning that matters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emo import face
from emo.errors import InputError
from emo.models.config import TINY
from emo.pipeline import EMOPipeline, MotionState, clip_seed, held_states

F, N = TINY.clip_frames, TINY.motion_frames
RUN = {"seed": 11, "steps": 3, "face_box": (0.25, 0.2, 0.75, 0.8)}


@pytest.mark.parametrize(
    "strength",
    [1.0, pytest.param(0.5, marks=pytest.mark.slow)],  # the fast lane keeps one
)
def test_resume_through_a_file_is_bit_identical(
    pipeline: EMOPipeline, portrait, vocal, tmp_path: Path, strength: float
) -> None:
    run = {**RUN, "continuation_strength": strength}  # 0.5: clips start from the motion state
    whole = pipeline(portrait, vocal, clips=range(0, 6), **run)
    first = pipeline(portrait, vocal, clips=range(0, 3), **run)
    first.motion_state.save(tmp_path / "motion.safetensors")
    state = MotionState.load(tmp_path / "motion.safetensors")
    assert state.next_clip == 3 and state.latents.shape == (N, 4, 8, 8)
    second = pipeline(portrait, vocal, clips=range(3, 6), motion_state=state, **run)
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
    with pytest.raises(InputError, match="needs the motion state"):
        pipeline(portrait, vocal, clips=range(2, 3), **RUN)
    with pytest.raises(InputError, match="outside the track"):
        pipeline(portrait, vocal, clips=range(0, 99), **RUN)
    with pytest.raises(InputError, match="reference image must be"):
        pipeline(portrait[:32], vocal, clips=range(0, 1), **RUN)
    with pytest.raises(InputError, match="unknown scheduler"):
        pipeline(portrait, vocal, clips=range(0, 1), scheduler="nope", **RUN)
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(InputError, match="continuation strength must be above 0"):
            pipeline(portrait, vocal, clips=range(0, 1), continuation_strength=strength, **RUN)


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
    with pytest.raises(InputError, match="pndm cannot sample"):
        pipeline(portrait, vocal, clips=range(0, 1), scheduler="pndm", steps=2)


def test_continued_clips_hold_the_last_frame_outside_the_mouth(
    tiny_components, portrait, vocal, monkeypatch
) -> None:
    """At strength 0.5 of 4 steps, clip 1's first two states are, outside the mouth, clip 0's
    last frame (minus the reference, for a residual model) noised to their level; the mouth
    area denoises freely throughout. Clip 0 continues nothing and is unchanged."""
    from dataclasses import replace

    pipeline = EMOPipeline(
        tiny_components, replace(TINY, residual_to_reference=True), TINY.scheduler
    )
    run = {**RUN, "steps": 4}
    noised: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # clean, t, result
    states: list[torch.Tensor] = []  # what each denoising step started from
    original = pipeline._scheduler

    def spying(name: str, steps: int):
        scheduler = original(name, steps)
        add_noise, step = scheduler.add_noise, scheduler.step

        def spy_noise(clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
            out = add_noise(clean, noise, timesteps)
            noised.append((clean.clone(), timesteps.clone(), out.clone()))
            return out

        def spy_step(prediction: torch.Tensor, t, sample: torch.Tensor, **kwargs):
            states.append(sample.clone())
            return step(prediction, t, sample, **kwargs)

        scheduler.add_noise, scheduler.step = spy_noise, spy_step
        return scheduler

    monkeypatch.setattr(pipeline, "_scheduler", spying)
    first = pipeline(portrait, vocal, clips=range(0, 1), **run)
    assert noised == [] and len(states) == 4  # the first clip: pure noise, every step
    states.clear()
    pipeline(
        portrait,
        vocal,
        clips=range(1, 2),
        motion_state=first.motion_state,
        continuation_strength=0.5,
        **run,
    )
    schedule = original("ddim", 4).timesteps
    assert [t.tolist() for _, t, _ in noised] == [[schedule[0].item()], [schedule[1].item()]]
    assert len(states) == 4  # every step still runs
    last = first.motion_state.latents[-1] - pipeline.encode_reference(portrait)[0]  # (C, h, w)
    region = face.face_mask(RUN["face_box"], 64, 64)
    mouth = torch.from_numpy(face.mouth_mask(region, 8)).bool()  # (h, w)
    assert 0 < mouth.sum() < 64 / 2
    for (clean, _, known), state in zip(noised, states[:2], strict=True):
        assert torch.allclose(clean, last[None, :, None].expand_as(clean), atol=1e-6)
        assert torch.equal(state[..., ~mouth], known[..., ~mouth])  # held outside the mouth
        assert not torch.allclose(state[..., mouth], known[..., mouth])  # free inside
    monkeypatch.undo()
    plain = pipeline(portrait, vocal, clips=range(0, 1), continuation_strength=0.5, **run)
    assert np.array_equal(plain.frames, first.frames)  # the first clip is never affected


@pytest.mark.parametrize(
    "scheduler",
    ["ddim", "dpm++", "euler", "unipc", pytest.param("pndm", marks=pytest.mark.slow)],  # 5 s
)
def test_every_scheduler_continues_clips(
    pipeline: EMOPipeline, portrait, vocal, scheduler: str
) -> None:
    run = {**RUN, "steps": 4, "scheduler": scheduler}
    first = pipeline(portrait, vocal, clips=range(0, 1), **run)
    after = {
        strength: pipeline(
            portrait,
            vocal,
            clips=range(1, 2),
            motion_state=first.motion_state,
            continuation_strength=strength,
            **run,
        ).motion_state.latents
        for strength in (1.0, 0.5)
    }
    assert torch.isfinite(after[0.5]).all()
    assert not torch.equal(after[0.5], after[1.0])


def test_held_states_round_half_up() -> None:
    assert [held_states(s, 20) for s in (1.0, 0.7, 0.5, 0.05)] == [0, 6, 10, 19]
    assert (held_states(0.5, 5), held_states(0.9, 5), held_states(0.5, 1)) == (3, 1, 1)


def test_unipc_keeps_held_states(pipeline: EMOPipeline, portrait, vocal, monkeypatch) -> None:
    """UniPC's corrector recomputes each state from the one before; on held states that would
    undo the hold, so it is off for them: the sample a held step starts from is the one kept."""
    run = {**RUN, "steps": 4, "scheduler": "unipc"}
    first = pipeline(portrait, vocal, clips=range(0, 1), **run)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sample given, sample the step kept)
    original = pipeline._scheduler

    def spying(name: str, steps: int):
        scheduler = original(name, steps)
        step = scheduler.step

        def spy_step(prediction: torch.Tensor, t, sample: torch.Tensor, **kwargs):
            out = step(prediction, t, sample, **kwargs)
            kept.append((sample.clone(), scheduler.last_sample.clone()))
            return out

        scheduler.step = spy_step
        return scheduler

    monkeypatch.setattr(pipeline, "_scheduler", spying)
    pipeline(
        portrait,
        vocal,
        clips=range(1, 2),
        motion_state=first.motion_state,
        continuation_strength=0.5,  # states 0 and 1 held
        **run,
    )
    assert torch.equal(*kept[1])  # held state 1 kept as given
    assert not torch.equal(*kept[2])  # free state 2: the corrector works again
