"""The synthetic corpus: seeded, labelled exactly, and measurable from its own frames."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from emo import media
from emo.eval.mouth import mouth_openings
from emo.pose import rotation_matrices, rotation_speed
from emo.synthetic.corpus import VideoSpec, identity_for, make_corpus, render_video, voice_for
from emo.synthetic.motion import head_motion
from tests.conftest import run_emo


def test_a_seed_names_a_video_and_splits_do_not_share_people() -> None:
    spec = VideoSpec(seed=3, split="train", index=0, seconds=1.0, size=64)
    frames, audio, labels = render_video(spec)
    again = render_video(spec)
    assert np.array_equal(frames, again[0]) and np.array_equal(audio, again[1])
    assert labels == again[2]
    heldout = VideoSpec(seed=3, split="heldout", index=0, seconds=1.0, size=64)
    neighbour = VideoSpec(seed=3, split="train", index=1, seconds=1.0, size=64)
    people = {identity_for(s) for s in (spec, heldout, neighbour)}
    assert len(people) == 3
    tracks = [voice_for(s).audio for s in (spec, heldout, neighbour)]
    assert not np.array_equal(tracks[0], tracks[1]) and not np.array_equal(tracks[0], tracks[2])


@pytest.mark.parametrize("speed", [0.005, 0.02, 0.04])
def test_head_turns_at_the_requested_speed_within_limits(speed: float) -> None:
    angles = head_motion(np.random.default_rng(1), 250, speed)
    measured = rotation_speed(rotation_matrices(angles))
    assert abs(measured.mean() - speed) < 0.1 * speed
    assert np.all(np.abs(angles) <= np.array([0.45, 0.28, 0.22]) + 1e-6)


def test_rotation_speed_is_the_relative_rotation_angle() -> None:
    angles = np.zeros((3, 3))
    angles[1, 0], angles[2, 0] = 0.1, 0.3  # yaw only: speeds are the yaw steps
    assert np.allclose(rotation_speed(rotation_matrices(angles)), [0.1, 0.1, 0.2], atol=1e-6)


def test_mouth_follows_the_voice_and_rests_in_pauses() -> None:
    spec = VideoSpec(seed=0, split="train", index=2, seconds=12.0, size=64)
    voice = voice_for(spec)
    frames = len(voice.mouth_open)
    assert frames == math.ceil(12.0 * 25)
    rms = np.sqrt(
        (np.pad(voice.audio, (0, frames * 640 - len(voice.audio))) ** 2)
        .reshape(frames, 640)
        .mean(axis=1)
    )
    assert np.corrcoef(rms, voice.mouth_open)[0, 1] > 0.8
    silent = rms < 1e-4
    resting = silent & np.roll(silent, 1) & np.roll(silent, -1)  # silent with its neighbours
    assert resting.sum() > 20 and voice.mouth_open[resting].max() < 0.01  # mouth closed
    kinds = {
        p["kind"]
        for s in range(4)
        for p in voice_for(VideoSpec(seed=0, split="train", index=s, seconds=12.0, size=64)).phrases
    }
    assert kinds == {"speech", "song"}


def test_face_box_holds_the_face() -> None:
    spec = VideoSpec(seed=5, split="train", index=0, seconds=1.0, size=128, speed=0.04)
    frames, _, labels = render_video(spec)
    skin = np.array(labels["identity"]["skin"])
    for frame, box in zip(frames[::5], labels["face_box"][::5], strict=True):
        ys, xs = np.nonzero(np.linalg.norm(frame.astype(float) - skin, axis=-1) < 8)
        x0, y0, x1, y1 = np.array(box) * 128
        inside = (xs >= x0 - 1) & (xs <= x1 + 1) & (ys >= y0 - 1) & (ys <= y1 + 1)
        assert len(xs) > 500 and inside.mean() > 0.97


def test_corpus_videos_are_real_and_their_mouths_measure_as_labelled(tmp_path: Path) -> None:
    paths = make_corpus(tmp_path, videos=2, seconds=4.0, size=64, seed=1)
    for path in paths:
        labels = json.loads(path.with_name(path.stem + ".labels.json").read_text())
        info = media.probe(path)
        assert info.video_frames == labels["frames"] == 100
        assert info.first("audio") is not None
        frames = np.concatenate(list(media.iter_frames(path, 64, 64)))
        measured = mouth_openings(frames, labels["face_box"])
        assert np.corrcoef(measured, labels["mouth_open"])[0, 1] > 0.95
        frozen = mouth_openings(np.repeat(frames[:1], len(frames), 0), labels["face_box"][0])
        assert np.ptp(frozen) == 0.0  # a frozen mouth measures as no motion at all


@pytest.mark.slow  # emo synth as processes
def test_cli_resumes_and_refuses_to_mix_corpora(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    first = run_emo("synth", "-o", str(out), "--videos", "2", "--seconds", "1", "--size", "64")
    assert first.returncode == 0, first.stderr
    made = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    assert sorted(made) == ["train-00000.mp4", "train-00001.mp4"]
    (out / "train-00001.labels.json").unlink()  # as if killed before its labels were written
    again = run_emo("synth", "-o", str(out), "--videos", "2", "--seconds", "1", "--size", "64")
    assert again.returncode == 0, again.stderr
    assert (out / "train-00000.mp4").stat().st_mtime_ns == made["train-00000.mp4"]  # skipped
    assert (out / "train-00001.labels.json").is_file()
    mixed = run_emo("synth", "-o", str(out), "--videos", "2", "--seconds", "1", "--size", "96")
    assert mixed.returncode == 2
    assert "already holds a train corpus" in mixed.stderr and "Traceback" not in mixed.stderr
    bad = run_emo("synth", "-o", str(out), "--videos", "2", "--size", "63")
    assert bad.returncode == 2 and "--size" in bad.stderr
