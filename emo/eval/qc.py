"""QC of a finished video: seam jitter, identity drift, audio-visual sync.

- Seam jitter: mean absolute frame difference across clip and segment boundaries divided by
  the mean inside clips (1.0 = boundaries as smooth as the rest).
- Identity: cosine similarity of each frame's face region (grey, 32x32, zero-mean) to the
  reference portrait's; mean, minimum, and drift (last tenth minus first tenth).
- Sync: correlation between mouth-region motion (``emo.face.mouth_box``, frame to frame)
  and the change of the audio envelope (RMS per frame), at the best lag within +-5 frames.


Thresholds from settings turn a bad score into a warning on the job.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emo.face import mouth_box
from emo.media import iter_frames

Box = tuple[float, float, float, float]
MAX_LAG = 5


def _crop(frame: np.ndarray, box: Box, size: int = 32) -> np.ndarray:
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = box
    left, top = int(x0 * width), int(y0 * height)
    right, bottom = max(int(x1 * width), left + 1), max(int(y1 * height), top + 1)
    grey = Image.fromarray(frame[top:bottom, left:right]).convert("L").resize((size, size))
    pixels = np.asarray(grey, dtype=np.float32)
    return pixels - pixels.mean()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def seam_jitter(differences: np.ndarray, boundaries: set[int]) -> float | None:
    """differences[i] = |frame i+1 - frame i|; a boundary b sits between frames b-1 and b."""
    at = [differences[b - 1] for b in sorted(boundaries) if 0 < b <= len(differences)]
    inside = [d for i, d in enumerate(differences) if (i + 1) not in boundaries]
    if not at or not inside or np.mean(inside) == 0:
        return None
    return float(np.mean(at) / np.mean(inside))


def sync_score(motion: np.ndarray, envelope: np.ndarray) -> tuple[int, float]:
    """(lag in frames, correlation) maximising corr(motion[i], envelope[i - lag])."""
    best = (0, 0.0)
    n = min(len(motion), len(envelope))
    for lag in range(-MAX_LAG, MAX_LAG + 1):
        a = motion[max(lag, 0) : n + min(lag, 0)]
        b = envelope[max(-lag, 0) : n - max(lag, 0)]
        if len(a) > 2 and a.std() > 0 and b.std() > 0:
            r = float(np.corrcoef(a, b)[0, 1])
            if r > best[1]:
                best = (lag, r)
    return best


def audio_envelope(audio: np.ndarray, samples_per_frame: int, frames: int) -> np.ndarray:
    padded = np.zeros(frames * samples_per_frame, dtype=np.float32)
    padded[: min(audio.size, padded.size)] = audio[: padded.size]
    return np.sqrt((padded.reshape(frames, samples_per_frame) ** 2).mean(axis=1))


def measure(
    frames: Iterable[np.ndarray],
    *,
    reference: np.ndarray,
    face_box: Box,
    audio: np.ndarray,
    samples_per_frame: int,
    boundaries: set[int],
) -> dict[str, Any]:
    """All QC measures over frame chunks (N, H, W, 3) of one video."""
    reference_face = _crop(reference, face_box)
    differences, identity, mouth_motion = [], [], []
    previous = previous_mouth = None
    count = 0
    for chunk in frames:
        for frame in chunk:
            current = frame.astype(np.int16)
            mouth = _crop(frame, mouth_box(face_box))
            if previous is not None:
                differences.append(float(np.abs(current - previous).mean()))
                mouth_motion.append(float(np.abs(mouth - previous_mouth).mean()))
            identity.append(_cosine(_crop(frame, face_box), reference_face))
            previous, previous_mouth = current, mouth
            count += 1
    tenth = max(count // 10, 1)
    envelope = audio_envelope(audio, samples_per_frame, count)
    # The mouth moves when loudness changes: compare the sizes of both changes.
    lag, strength = sync_score(np.array(mouth_motion), np.abs(np.diff(envelope)))
    return {
        "frames": count,
        "seam_jitter": seam_jitter(np.array(differences), boundaries),
        "identity_mean": float(np.mean(identity)) if identity else None,
        "identity_min": float(np.min(identity)) if identity else None,
        "identity_drift": float(np.mean(identity[-tenth:]) - np.mean(identity[:tenth]))
        if identity
        else None,
        "sync_lag_frames": lag,
        "sync_strength": strength,
    }


def qc_report(
    video: Path,
    *,
    reference: np.ndarray,
    face_box: Box,
    audio: np.ndarray,
    samples_per_frame: int,
    boundaries: set[int],
    max_seam_jitter: float,
    min_identity: float,
    min_sync: float,
) -> dict[str, Any]:
    """Measure a finished video and list the warnings its scores earn."""
    height, width = reference.shape[:2]
    scores = measure(
        iter_frames(video, width, height),
        reference=reference,
        face_box=face_box,
        audio=audio,
        samples_per_frame=samples_per_frame,
        boundaries=boundaries,
    )
    warnings = []
    if scores["seam_jitter"] is not None and scores["seam_jitter"] > max_seam_jitter:
        warnings.append(f"seam jitter {scores['seam_jitter']:.2f} above {max_seam_jitter}")
    if scores["identity_mean"] is not None and scores["identity_mean"] < min_identity:
        warnings.append(f"identity similarity {scores['identity_mean']:.2f} below {min_identity}")
    if scores["sync_strength"] < min_sync:
        warnings.append(f"audio-visual sync {scores['sync_strength']:.2f} below {min_sync}")
    return {
        **scores,
        "warnings": warnings,
        "thresholds": {
            "max_seam_jitter": max_seam_jitter,
            "min_identity": min_identity,
            "min_sync": min_sync,
        },
    }
