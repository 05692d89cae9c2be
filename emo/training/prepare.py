"""``emo prepare``: talking-head videos -> a streaming training dataset.

For each video (in parallel, skipping videos already prepared): frames resampled to the
dataset fps; face box and head pose per frame (sidecar labels, else mediapipe); head rotation
speed between consecutive frames; one square crop around the union of the video's face boxes
(expanded, so the head can move inside it), resized to the training resolution; the audio as
mono at the dataset rate. Videos with no audio or no face are reported and skipped.

Layout of a dataset directory::

    dataset.json          fps, sample_rate, resolution, speed buckets, the shard list
    shards/<name>.npz     frames (F, R, R, 3) uint8, audio (N,) float32, boxes (F, 4) in
                          crop fractions, angles (F, 3), speed (F,), extra labels
    shards/<name>.json    the shard's metadata (written after its .npz, so it marks it done)
    report.json           every video with its outcome (prepared, skipped and why)

The index is rebuilt from the shard metadata at the end of every run, so an interrupted run
resumes where it stopped and the trainer reads shards one at a time (streaming).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from emo import media
from emo.errors import EmoError, MediaError
from emo.parallel import parallel_map
from emo.pose import rotation_matrices, rotation_speed
from emo.training.labels import detect_labels, read_sidecar

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
DATASET_VERSION = 1
CROP_EXPANSION = 1.6  # the crop is this much larger than the union of the face boxes
SPEED_BUCKETS = 6


class SkipVideo(EmoError):
    """This video cannot be used (no audio, no face); the reason goes into the report."""


@dataclass(frozen=True)
class PrepareOptions:
    resolution: int
    fps: int = 25
    sample_rate: int = 16000


def crop_square(
    boxes: np.ndarray, width: int, height: int, expansion: float = CROP_EXPANSION
) -> tuple[int, int, int]:
    """(left, top, side) in pixels: the square around the union of ``boxes`` (fractions),
    expanded so the head can move inside it, and kept inside the frame."""
    pixels = boxes * np.array([width, height, width, height], np.float32)
    x0, y0 = pixels[:, 0].min(), pixels[:, 1].min()
    x1, y1 = pixels[:, 2].max(), pixels[:, 3].max()
    side = int(round(min(min(width, height), max(x1 - x0, y1 - y0) * expansion)))
    side = max(2, side)
    left = int(np.clip(round((x0 + x1) / 2 - side / 2), 0, width - side))
    top = int(np.clip(round((y0 + y1) / 2 - side / 2), 0, height - side))
    return left, top, side


def _read_frames(video: Path, fps: int) -> np.ndarray:
    info = media.probe(video)
    stream = info.first("video")
    if stream is None or not stream.width:
        raise SkipVideo("no video stream")
    chunks = list(media.iter_frames(video, stream.width, stream.height, fps=fps))
    if not chunks:
        raise SkipVideo("no frames")
    return np.concatenate(chunks)


def _read_audio(video: Path, sample_rate: int) -> np.ndarray:
    try:
        return media.load_audio(video, sample_rate)
    except MediaError as error:
        raise SkipVideo(f"no usable audio ({error})") from error


def _crop(frames: np.ndarray, square: tuple[int, int, int], resolution: int) -> np.ndarray:
    """(F, H, W, 3) -> (F, R, R, 3): the square (left, top, side) of every frame, resized."""
    left, top, side = square
    out = np.empty((len(frames), resolution, resolution, 3), np.uint8)
    for i, frame in enumerate(frames):
        patch = Image.fromarray(frame[top : top + side, left : left + side])
        out[i] = np.asarray(patch.resize((resolution, resolution), Image.Resampling.BICUBIC))
    return out


def prepare_video(video: Path, shards: Path, options: PrepareOptions) -> dict:
    """Prepare one video into ``shards/<stem>.npz`` + ``.json``; returns its metadata."""
    audio = _read_audio(video, options.sample_rate)
    frames = _read_frames(video, options.fps)
    samples_per_frame = options.sample_rate // options.fps
    count = min(len(frames), len(audio) // samples_per_frame)
    if count < 2:
        raise SkipVideo("shorter than two frames of audio and video")
    frames, audio = frames[:count], audio[: count * samples_per_frame]
    labels = read_sidecar(video, count) or detect_labels(frames)
    if not labels.found.any():
        raise SkipVideo("no face found in any frame")
    height, width = frames.shape[1:3]
    square = crop_square(labels.boxes[labels.found], width, height)
    cropped = _crop(frames, square, options.resolution)
    left, top, side = square
    pixels = labels.boxes * np.array([width, height, width, height], np.float32)
    boxes = np.clip((pixels - [left, top, left, top]) / side, 0, 1).astype(np.float32)
    speed = rotation_speed(rotation_matrices(labels.angles))
    shards.mkdir(parents=True, exist_ok=True)
    name = video.stem
    partial = shards / f".{name}.partial.npz"
    np.savez(
        partial,
        frames=cropped,
        audio=audio.astype(np.float32),
        boxes=boxes,
        angles=labels.angles.astype(np.float32),
        speed=speed,
        found=labels.found,
        **{k: np.asarray(v, np.float32) for k, v in labels.extra.items()},
    )
    os.replace(partial, shards / f"{name}.npz")
    meta = {
        "name": name,
        "source": str(video),
        "frames": int(count),
        "labels": labels.source,
        "face_found": float(labels.found.mean()),
        "crop": {"left": square[0], "top": square[1], "side": square[2]},
        "speed_mean": float(speed.mean()),
        "extra": sorted(labels.extra),
    }
    (shards / f"{name}.json").write_text(json.dumps(meta))
    return meta


def _prepare_or_skip(video: Path, shards: Path, options: PrepareOptions) -> dict:
    try:
        return {"video": str(video), "status": "prepared", **prepare_video(video, shards, options)}
    except (SkipVideo, MediaError) as error:
        return {"video": str(video), "status": "skipped", "reason": str(error)}


def speed_buckets(speeds: np.ndarray, count: int = SPEED_BUCKETS) -> tuple[list, list]:
    """Bucket centres at evenly spaced quantiles of the speeds; radii half the gap to the
    neighbouring centre, so neighbouring buckets overlap like the paper's tanh activations."""
    levels = (np.arange(count) + 0.5) / count
    centres = np.quantile(speeds, levels) if len(speeds) else np.zeros(count)
    centres = np.maximum.accumulate(centres + np.arange(count) * 1e-5)  # strictly increasing
    gaps = np.diff(centres)
    radii = np.maximum(np.concatenate([gaps[:1], (gaps[:-1] + gaps[1:]) / 2, gaps[-1:]]), 1e-3)
    return [round(float(c), 6) for c in centres], [round(float(r), 6) for r in radii]


def write_index(dataset: Path, options: PrepareOptions) -> dict:
    """Rebuild ``dataset.json`` from every finished shard."""
    shards = sorted((dataset / "shards").glob("*.json"))
    metas = [json.loads(p.read_text()) for p in shards]
    speeds = (
        np.concatenate([np.load(dataset / "shards" / f"{m['name']}.npz")["speed"] for m in metas])
        if metas
        else np.zeros(0)
    )
    centres, radii = speed_buckets(speeds)
    index = {
        "version": DATASET_VERSION,
        "fps": options.fps,
        "sample_rate": options.sample_rate,
        "resolution": options.resolution,
        "speed_centers": centres,
        "speed_radii": radii,
        "frames": int(sum(m["frames"] for m in metas)),
        "shards": [{"name": m["name"], "frames": m["frames"]} for m in metas],
    }
    (dataset / "dataset.json").write_text(json.dumps(index, indent=2))
    return index


def prepare_dataset(
    videos: Path,
    dataset: Path,
    options: PrepareOptions,
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Prepare every video under ``videos`` not prepared yet; returns (index, report rows)."""
    found = sorted(p for p in videos.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not found:
        raise EmoError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {videos}")
    existing = dataset / "dataset.json"
    if existing.is_file():
        made = json.loads(existing.read_text())
        wanted = {
            "fps": options.fps,
            "sample_rate": options.sample_rate,
            "resolution": options.resolution,
        }
        if {k: made.get(k) for k in wanted} != wanted:
            raise EmoError(
                f"{dataset} was prepared with { ({k: made.get(k) for k in wanted}) }; "
                "prepare into a new directory to change them"
            )
    shards = dataset / "shards"
    report_path = dataset / "report.json"
    earlier = (
        {r["video"]: r for r in json.loads(report_path.read_text())}
        if (report_path.is_file())
        else {}
    )
    todo = [v for v in found if not (shards / f"{v.stem}.json").is_file()]
    rows = [
        earlier.get(str(v), {"video": str(v), "status": "prepared"}) for v in found if v not in todo
    ]
    if progress:
        progress(len(rows), len(found))
    for row in parallel_map(_prepare_or_skip, todo, shards, options, workers=workers):
        rows.append(row)
        if progress:
            progress(len(rows), len(found))
    dataset.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: r["video"])
    report_path.write_text(json.dumps(rows, indent=2))
    return write_index(dataset, options), rows
