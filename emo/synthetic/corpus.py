"""The synthetic talking-head corpus: seeded videos with audio and exact per-frame labels.

Video ``i`` of split ``s`` is a pure function of (corpus seed, split, i): its identity, voice
track, head speed and blinks are drawn from separate random streams, so the ``heldout`` split
holds identities and tracks that ``train`` never saw, and regenerating a video gives the same
frames. Each video is ``<split>-<i:05d>.mp4`` (H.264 + AAC) with ``<split>-<i:05d>.labels.json``
beside it, written last, so a video with its labels is complete and generation resumes by
skipping those.

Labels (one entry per frame): the face box (x0, y0, x1, y1, fractions of the frame), head
angles (yaw, pitch, roll, radians), rotation speed (radians per frame), mouth opening and
width (0..1), eye openness (0..1), and whether the frame is sung.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from emo import media
from emo.errors import EmoError
from emo.parallel import parallel_map
from emo.pose import rotation_matrices, rotation_speed
from emo.synthetic.face import Expression, Identity, draw_face, sample_identity
from emo.synthetic.motion import head_motion
from emo.synthetic.voice import VoiceTrack, synthesize_voice

LABELS_VERSION = 1
SPLITS = ("train", "heldout")
SPEED_RANGE = (0.0, 0.05)  # rad/frame: from a still head to a lively singer


class CorpusMismatch(EmoError):
    """The output directory holds a corpus made with other settings."""

    exit_code = 2


@dataclass(frozen=True)
class VideoSpec:
    """What one corpus video is made of (all derivable from the seed)."""

    seed: int
    split: str
    index: int
    seconds: float
    size: int
    fps: int = 25
    sample_rate: int = 16000
    speed: float | None = None  # rad/frame; None draws one from SPEED_RANGE

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def _stream(spec: VideoSpec, purpose: str) -> np.random.Generator:
    """An independent random stream per (seed, split, index, purpose)."""
    split = SPLITS.index(spec.split)
    tag = sum(ord(c) << (8 * i) for i, c in enumerate(purpose[:8]))
    return np.random.default_rng([spec.seed, split, spec.index, tag])


def identity_for(spec: VideoSpec) -> Identity:
    return sample_identity(_stream(spec, "identity"))


def voice_for(spec: VideoSpec) -> VoiceTrack:
    return synthesize_voice(
        _stream(spec, "voice"), seconds=spec.seconds, sample_rate=spec.sample_rate, fps=spec.fps
    )


def blinks(rng: np.random.Generator, frames: int, fps: int) -> np.ndarray:
    """(F,) eye openness: open, with a 5-frame blink every 2-6 seconds."""
    shape = np.array([0.6, 0.15, 0.05, 0.3, 0.75])
    eyes = np.ones(frames, np.float32)
    position = int(rng.uniform(0.5, 3.0) * fps)
    while position < frames:
        span = eyes[position : position + len(shape)]
        span[:] = shape[: len(span)]
        position += int(rng.uniform(2.0, 6.0) * fps)
    return eyes


def render_video(spec: VideoSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """(frames (F, S, S, 3) uint8, audio (N,) float32, labels) of one corpus video."""
    identity, voice = identity_for(spec), voice_for(spec)
    frames = len(voice.mouth_open)
    motion_rng = _stream(spec, "motion")
    speed = spec.speed if spec.speed is not None else float(motion_rng.uniform(*SPEED_RANGE))
    angles = head_motion(motion_rng, frames, speed)  # (F, 3)
    eyes = blinks(_stream(spec, "blinks"), frames, spec.fps)
    video = np.empty((frames, spec.size, spec.size, 3), np.uint8)
    boxes = []
    for i in range(frames):
        expression = Expression(
            mouth_open=float(voice.mouth_open[i]),
            mouth_width=float(voice.mouth_width[i]),
            eyes_open=float(eyes[i]),
        )
        video[i], box = draw_face(identity, angles[i], expression, spec.size)
        boxes.append([round(v, 5) for v in box])
    labels = {
        "version": LABELS_VERSION,
        "source": "emo synth",
        "seed": spec.seed,
        "split": spec.split,
        "index": spec.index,
        "fps": spec.fps,
        "sample_rate": spec.sample_rate,
        "size": spec.size,
        "frames": frames,
        "speed_level": speed,
        "identity": identity.to_dict(),
        "phrases": voice.phrases,
        "face_box": boxes,
        "head_angles": np.round(angles, 5).tolist(),
        "head_speed": np.round(rotation_speed(rotation_matrices(angles)), 6).tolist(),
        "mouth_open": np.round(voice.mouth_open, 5).tolist(),
        "mouth_width": np.round(voice.mouth_width, 5).tolist(),
        "eyes_open": np.round(eyes, 3).tolist(),
        "sung": voice.sung.astype(int).tolist(),
    }
    return video, voice.audio, labels


def labels_path(video: Path) -> Path:
    return video.with_name(video.stem + ".labels.json")


def write_video(spec: VideoSpec, directory: Path) -> Path:
    """Render ``spec`` into ``directory`` (mp4 with audio, then its labels); returns the mp4."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{spec.name}.mp4"
    frames, audio, labels = render_video(spec)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".synth-") as scratch:
        silent, wav = Path(scratch) / "video.mp4", Path(scratch) / "audio.wav"
        with media.VideoWriter(silent, width=spec.size, height=spec.size, fps=spec.fps) as out:
            out.write(frames)
        soundfile.write(wav, audio, spec.sample_rate, subtype="PCM_16")
        media.concat_videos([silent], target, audio=wav)
    partial = labels_path(target).with_suffix(".partial")
    partial.write_text(json.dumps(labels))
    os.replace(partial, labels_path(target))
    return target


def is_complete(spec: VideoSpec, directory: Path) -> bool:
    video = directory / f"{spec.name}.mp4"
    return video.is_file() and labels_path(video).is_file()


def make_corpus(
    directory: Path,
    *,
    videos: int,
    seconds: float,
    size: int,
    seed: int = 0,
    split: str = "train",
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``videos`` corpus videos (skipping complete ones) and an index; returns the mp4s."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    index_path = directory / f"corpus-{split}.json"
    if index_path.is_file():
        previous = json.loads(index_path.read_text())
        made = {k: previous.get(k) for k in ("seed", "seconds", "size")}
        if made != {"seed": seed, "seconds": seconds, "size": size}:
            raise CorpusMismatch(
                f"{directory} already holds a {split} corpus made with {made}; use another "
                "directory or the same settings (generation resumes, it does not mix)"
            )
    specs = [VideoSpec(seed, split, i, seconds, size) for i in range(videos)]
    index = {
        "version": LABELS_VERSION,
        "seed": seed,
        "split": split,
        "seconds": seconds,
        "size": size,
        "videos": [f"{s.name}.mp4" for s in specs],
    }
    directory.mkdir(parents=True, exist_ok=True)
    index_path.write_text(json.dumps(index, indent=2))  # first: a resumed run must match it
    todo = [s for s in specs if not is_complete(s, directory)]
    done = len(specs) - len(todo)
    if progress:
        progress(done, len(specs))
    for _ in parallel_map(write_video, todo, directory, workers=workers):
        done += 1
        if progress:
            progress(done, len(specs))
    return [directory / f"{s.name}.mp4" for s in specs]
