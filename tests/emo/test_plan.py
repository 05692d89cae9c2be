"""Segment plans: whole clips, exact frame/sample arithmetic, boundaries in the silences."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from emo.plan import frame_count, plan_segments
from tests.conftest import emo_in_process, write_wav

SR, FPS, CLIP = 16000, 25, 12
SILENCES = [(18.5, 19.3), (38.0, 38.8), (57.7, 58.5)]


def speech_like(seconds: float, silences=SILENCES, seed: int = 0) -> np.ndarray:
    """Syllable-modulated voiced tone with noise; exact silence in ``silences``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    envelope = 0.3 + 0.7 * np.abs(np.sin(2 * np.pi * 3.1 * t))
    audio = envelope * (0.4 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(t.size))
    for start, end in silences:
        audio[int(start * SR) : int(end * SR)] = 0.0
    return audio.astype(np.float32)


def _plan(audio: np.ndarray, segment_seconds: float = 20.0):
    return plan_segments(
        audio, sample_rate=SR, fps=FPS, clip_frames=CLIP, segment_seconds=segment_seconds
    )


def test_boundaries_fall_in_the_silences() -> None:
    plan = _plan(speech_like(70.0))
    cuts = [s.start_seconds for s in plan.segments[1:]]
    assert len(cuts) == len(SILENCES)
    for cut, (start, end) in zip(cuts, SILENCES, strict=True):
        assert start <= cut <= end, f"cut at {cut:.2f} s is outside the silence {start}-{end}"


def test_frames_clips_and_samples_are_exact() -> None:
    audio = speech_like(70.0)
    plan = _plan(audio)
    assert plan.total_frames == math.ceil(70.0 * FPS) == frame_count(audio.size, SR, FPS)
    spf = SR // FPS
    previous_end = 0
    for segment in plan.segments:
        assert segment.frame_start == previous_end == segment.clip_start * CLIP
        assert segment.sample_start == segment.frame_start * spf
        previous_end = segment.frame_end
    assert previous_end == plan.total_frames
    assert plan.segments[-1].sample_end == audio.size
    assert sum(s.clip_count for s in plan.segments) == plan.total_clips
    assert all(s.frames == s.clip_count * CLIP for s in plan.segments[:-1])


@pytest.mark.parametrize("samples", [1, 639, 640, 641, 16000 * 3 + 17, 16000 * 45 + 5])
def test_total_frames_is_ceil_of_duration(samples: int) -> None:
    audio = np.random.default_rng(samples).standard_normal(samples).astype(np.float32)
    plan = _plan(audio, segment_seconds=10)
    assert plan.total_frames == math.ceil(samples * FPS / SR)
    assert plan.total_clips == math.ceil(plan.total_frames / CLIP)
    assert plan.segments[-1].frame_end == plan.total_frames


def test_plan_is_deterministic_and_round_trips() -> None:
    audio = speech_like(70.0)
    first, second = _plan(audio), _plan(audio.copy())
    assert first == second and first.sha256 == second.sha256
    assert type(first).from_dict(json.loads(first.to_json())) == first
    assert _plan(audio, segment_seconds=10).sha256 != first.sha256


def test_segment_lengths_stay_near_the_target() -> None:
    audio = speech_like(600.0, silences=[])
    plan = _plan(audio)
    lengths = [s.end_seconds - s.start_seconds for s in plan.segments]
    assert all(15.0 <= length <= 25.0 for length in lengths[:-1])
    assert lengths[-1] <= 25.0


def test_cli_prints_a_table_and_json(tmp_path: Path) -> None:
    track = write_wav(tmp_path / "song.wav", speech_like(70.0))
    table = emo_in_process("plan", str(track))
    assert table.returncode == 0, table.stderr
    assert "1750 frames" in table.stdout and "segment" in table.stdout
    as_json = emo_in_process("plan", str(track), "--json", "--segment-seconds", "10")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["total_frames"] == 1750 and len(data["segments"]) >= 6
    assert data["segment_seconds"] == 10
