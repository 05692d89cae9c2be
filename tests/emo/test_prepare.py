"""emo prepare: synthetic videos keep their exact labels, real photographs get mediapipe's,
videos without a face or audio are reported and skipped, and runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from skimage import data as skimage_data  # a test extra: astronaut.png, chelsea.png

from emo import media
from emo.synthetic.corpus import make_corpus
from emo.training.prepare import PrepareOptions, crop_square, prepare_dataset, speed_buckets
from tests.conftest import run_emo, tone


def _still_video(path: Path, image: np.ndarray, seconds: float, audio: bool = True) -> Path:
    """A still photograph as an mp4 (with a tone as its audio unless ``audio`` is False)."""
    size = (min(image.shape[:2]) // 2) * 2
    frames = np.repeat(image[None, :size, :size, :3], int(seconds * 25), axis=0)
    silent = path.with_name(path.stem + "-silent.mp4")
    with media.VideoWriter(silent if audio else path, width=size, height=size, fps=25) as out:
        out.write(frames)
    if audio:
        wav = path.with_suffix(".wav")
        soundfile.write(wav, tone(seconds), 16000)
        media.concat_videos([silent], path, audio=wav)
        silent.unlink()
        wav.unlink()
    return path


def test_synthetic_videos_keep_their_exact_labels(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    make_corpus(videos, videos=3, seconds=2.0, size=96, seed=4)
    index, rows = prepare_dataset(videos, tmp_path / "data", PrepareOptions(resolution=64))
    assert [r["status"] for r in rows] == ["prepared"] * 3
    assert index["frames"] == 150 and len(index["shards"]) == 3 and index["resolution"] == 64
    for shard in index["shards"]:
        labels = json.loads((videos / f"{shard['name']}.labels.json").read_text())
        data = np.load(tmp_path / "data" / "shards" / f"{shard['name']}.npz")
        meta = json.loads((tmp_path / "data" / "shards" / f"{shard['name']}.json").read_text())
        assert data["frames"].shape == (50, 64, 64, 3) and data["audio"].shape == (50 * 640,)
        assert np.allclose(data["speed"], labels["head_speed"], atol=1e-4)
        assert np.allclose(data["mouth_open"], labels["mouth_open"])
        # Boxes map back from crop coordinates to the labelled ones.
        crop = meta["crop"]
        back = data["boxes"] * crop["side"] + [crop["left"], crop["top"]] * 2
        assert np.allclose(back / 96, labels["face_box"], atol=1e-4)


def test_photograph_gets_mediapipe_labels_and_faceless_or_silent_videos_are_skipped(
    tmp_path: Path,
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    _still_video(videos / "astronaut.mp4", skimage_data.astronaut(), 1.0)
    _still_video(videos / "cat.mp4", skimage_data.chelsea(), 1.0)
    _still_video(videos / "mute.mp4", skimage_data.astronaut(), 1.0, audio=False)
    index, rows = prepare_dataset(videos, tmp_path / "data", PrepareOptions(resolution=64))
    outcome = {Path(r["video"]).name: r for r in rows}
    assert outcome["astronaut.mp4"]["status"] == "prepared"
    assert outcome["astronaut.mp4"]["labels"] == "mediapipe"
    assert outcome["astronaut.mp4"]["face_found"] > 0.9
    assert outcome["cat.mp4"] == {
        "video": str(videos / "cat.mp4"),
        "status": "skipped",
        "reason": "no face found in any frame",
    }
    assert outcome["mute.mp4"]["status"] == "skipped"
    assert "no usable audio" in outcome["mute.mp4"]["reason"]
    data = np.load(tmp_path / "data" / "shards" / "astronaut.npz")
    assert data["speed"].max() < 0.01  # a still photograph does not turn
    x0, y0, x1, y1 = data["boxes"].mean(axis=0)
    assert 0.1 < x0 < x1 < 0.9 and 0.1 < y0 < y1 < 0.9  # the face sits inside its crop
    assert [s["name"] for s in index["shards"]] == ["astronaut"]


def test_speed_buckets_follow_the_distribution() -> None:
    speeds = np.random.default_rng(0).uniform(0.0, 0.05, 5000)
    centres, radii = speed_buckets(speeds)
    assert len(centres) == len(radii) == 6
    assert np.all(np.diff(centres) > 0) and min(radii) > 0
    assert np.allclose(centres, (np.arange(6) + 0.5) / 6 * 0.05, atol=0.003)


def test_crop_stays_square_and_inside_the_frame() -> None:
    boxes = np.array([[0.7, 0.1, 0.95, 0.5], [0.75, 0.15, 0.98, 0.55]])
    left, top, side = crop_square(boxes, 200, 100)
    assert left + side <= 200 and top + side <= 100 and side <= 100 and left >= 0 and top >= 0


@pytest.mark.slow  # emo prepare as processes
def test_cli_prepares_resumes_and_reports(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    make_corpus(videos, videos=2, seconds=1.0, size=64, seed=2)
    (videos / "notes.mp4").write_text("not a video")
    out = tmp_path / "data"
    first = run_emo("prepare", str(videos), "-o", str(out), "--resolution", "32")
    assert first.returncode == 0, first.stderr
    assert "2 videos, 50 frames" in first.stdout and "notes.mp4" in first.stdout
    made = (out / "shards" / "train-00000.npz").stat().st_mtime_ns
    again = run_emo("prepare", str(videos), "-o", str(out), "--resolution", "32")
    assert again.returncode == 0, again.stderr
    assert (out / "shards" / "train-00000.npz").stat().st_mtime_ns == made  # not redone
    other = run_emo("prepare", str(videos), "-o", str(out), "--resolution", "64")
    assert other.returncode != 0 and "prepared with" in other.stderr
    assert "Traceback" not in other.stderr
