"""Segment planning: cut a vocal track into segments of whole clips at its quietest points.

Frame i covers audio samples [i*spf, (i+1)*spf) with spf = sample_rate / fps, an integer by
construction, so frame and sample positions never drift apart. The video has
ceil(samples / spf) frames, generated in whole clips of ``clip_frames`` (the last clip padded;
the padding is dropped at assembly). Segments are whole numbers of clips of about
``segment_seconds``; each boundary is the quietest clip boundary within a window of +-25% of
the segment length around the target (the last segment is at most target + window clips and
at least window clips long). The plan is a pure function of the audio and the
settings, and is stored once per job.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

WINDOW_FRACTION = 0.25  # boundary search window, as a fraction of the target segment length
LOUDNESS_RADIUS_FRAMES = 2  # loudness at a boundary: RMS of the 2 frames either side of it


@dataclass(frozen=True)
class PlannedSegment:
    """One segment: clips [clip_start, clip_start + clip_count), frames and samples it covers."""

    index: int
    clip_start: int
    clip_count: int
    frame_start: int
    frame_end: int  # exclusive; the last segment stops at the video's last real frame
    sample_start: int
    sample_end: int  # exclusive; the last segment stops at the track's last sample
    start_seconds: float
    end_seconds: float

    @property
    def frames(self) -> int:
        return self.frame_end - self.frame_start


@dataclass(frozen=True)
class SegmentPlan:
    """The whole plan of one track; ``sha256`` identifies it."""

    fps: int
    sample_rate: int
    clip_frames: int
    segment_seconds: float
    total_samples: int
    total_frames: int
    total_clips: int
    segments: tuple[PlannedSegment, ...]

    @property
    def duration_seconds(self) -> float:
        return self.total_samples / self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["segments"] = [asdict(segment) for segment in self.segments]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentPlan:
        fields = dict(data)
        fields["segments"] = tuple(PlannedSegment(**s) for s in data["segments"])
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def samples_per_frame(sample_rate: int, fps: int) -> int:
    """Audio samples per video frame; raises ``ValueError`` unless it is a whole number."""
    if sample_rate % fps:
        raise ValueError(f"sample rate {sample_rate} is not a multiple of fps {fps}")
    return sample_rate // fps


def frame_count(total_samples: int, sample_rate: int, fps: int) -> int:
    """ceil(duration * fps), computed exactly in integers."""
    return -(-total_samples // samples_per_frame(sample_rate, fps))


def boundary_loudness(
    audio: np.ndarray, *, spf: int, clip_frames: int, total_frames: int
) -> np.ndarray:
    """RMS loudness around each inner clip boundary; index b-1 holds boundary b."""
    padded = np.zeros(total_frames * spf, dtype=np.float32)
    padded[: audio.shape[0]] = audio
    frame_power = np.mean(padded.reshape(total_frames, spf) ** 2, axis=1)  # (F,)
    total_clips = -(-total_frames // clip_frames)
    r = LOUDNESS_RADIUS_FRAMES
    loudness = np.empty(max(total_clips - 1, 0), dtype=np.float64)
    for b in range(1, total_clips):
        frame = b * clip_frames
        loudness[b - 1] = math.sqrt(float(frame_power[max(frame - r, 0) : frame + r].mean()))
    return loudness


def _clip_boundaries(loudness: np.ndarray, total_clips: int, target: int) -> list[int]:
    """Clip indices where segments start (after 0), chosen greedily from the start."""
    window = max(1, round(target * WINDOW_FRACTION))
    cuts, start = [], 0
    while total_clips - start > target + window:
        # Non-empty: the remainder exceeds target + window, so hi >= lo. Leaving at least
        # `window` clips keeps the last segment from being a sliver.
        lo = start + max(1, target - window)
        hi = min(start + target + window, total_clips - window)
        candidates = range(lo, hi + 1)
        best = min(candidates, key=lambda b: (loudness[b - 1], abs(b - start - target), b))
        cuts.append(best)
        start = best
    return cuts


def plan_segments(
    audio: np.ndarray,
    *,
    sample_rate: int,
    fps: int,
    clip_frames: int,
    segment_seconds: float,
) -> SegmentPlan:
    """Plan the segments of a mono track ``audio`` (float samples at ``sample_rate``)."""
    if audio.ndim != 1 or audio.shape[0] == 0:
        raise ValueError("audio must be a non-empty mono signal")
    spf = samples_per_frame(sample_rate, fps)
    total_samples = int(audio.shape[0])
    total_frames = frame_count(total_samples, sample_rate, fps)
    total_clips = -(-total_frames // clip_frames)
    target = max(1, round(segment_seconds * fps / clip_frames))
    loudness = boundary_loudness(audio, spf=spf, clip_frames=clip_frames, total_frames=total_frames)
    starts = [0, *_clip_boundaries(loudness, total_clips, target)]
    ends = [*starts[1:], total_clips]
    segments = []
    for index, (clip_start, clip_end) in enumerate(zip(starts, ends, strict=True)):
        frame_start = clip_start * clip_frames
        frame_end = min(clip_end * clip_frames, total_frames)
        segments.append(
            PlannedSegment(
                index=index,
                clip_start=clip_start,
                clip_count=clip_end - clip_start,
                frame_start=frame_start,
                frame_end=frame_end,
                sample_start=frame_start * spf,
                sample_end=min(frame_end * spf, total_samples),
                start_seconds=frame_start / fps,
                end_seconds=min(frame_end * spf, total_samples) / sample_rate,
            )
        )
    return SegmentPlan(
        fps=fps,
        sample_rate=sample_rate,
        clip_frames=clip_frames,
        segment_seconds=segment_seconds,
        total_samples=total_samples,
        total_frames=total_frames,
        total_clips=total_clips,
        segments=tuple(segments),
    )


def plan_change(job_id: str, stored: SegmentPlan, now: SegmentPlan) -> str:
    """What differs between a job's stored plan and the one computed now, by the setting's
    name, and how to go on: checkpoints hold only for the boundaries they were rendered with."""
    names = {
        "fps": "EMO_FPS",
        "sample_rate": "EMO_SAMPLE_RATE",
        "clip_frames": "the weights bundle's clip_frames",
        "segment_seconds": "segment_seconds (EMO_SEGMENT_SECONDS or the job's option)",
        "total_samples": "the audio's length",
    }
    changed = [
        f"{label} {getattr(stored, field)} -> {getattr(now, field)}"
        for field, label in names.items()
        if getattr(stored, field) != getattr(now, field)
    ] or ["the audio's quiet points (the input changed)"]
    return (
        f"job {job_id} was planned with other settings: {'; '.join(changed)}. Restore them to "
        "resume it, or `emo resume JOB --new-weights` to render it again from scratch"
    )
