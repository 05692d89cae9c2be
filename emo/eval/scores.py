"""Scores of a video of a synthetic face against the generator's ground truth.

- Lip sync: Pearson correlation between the mouth opening measured in the frames
  (``emo.eval.mouth``) and the true opening, at lag 0 (``lip_sync_r``); the lag within
  +-``MAX_LAG`` frames with the best correlation is the audio-visual offset.
- Identity: how well the frames keep the person's known colours: 1 - (mean absolute error of
  the cheek skin and of the background corners against the identity's true colours) / 255.
  1.0 is exact; 0.9 means the colours are off by 25 levels on average.
- Head motion: mean absolute frame-to-frame change of the upper face (see ``head_motion``);
  it orders speed levels reliably even at 64x64, where tracking features by position does
  not (a pixel of centroid jitter is as large as a slow turn).
- Seam jitter: as in QC (``emo.eval.qc``), at clip boundaries.
"""

from __future__ import annotations

import numpy as np

from emo.eval.mouth import mouth_openings
from emo.eval.qc import seam_jitter
from emo.synthetic.face import Identity

MAX_LAG = 5
Box = tuple[float, float, float, float]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; 0.0 when either side does not vary (a frozen mouth has no sync)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def lagged(measured: np.ndarray, truth: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (measured[i + lag], truth[i]): a positive lag means the video is late."""
    if lag >= 0:
        return measured[lag:], truth[: len(truth) - lag]
    return measured[:lag], truth[-lag:]


NO_SYNC = 0.2  # below this best correlation there is no offset to speak of


def lip_sync(frames: np.ndarray, boxes, truth: np.ndarray) -> tuple[float, int | None]:
    """(r at lag 0, the lag with the best r) of measured against true mouth opening; the lag
    is None when even the best r is below ``NO_SYNC`` (a frozen mouth is not 'in sync')."""
    measured = mouth_openings(frames, boxes)
    scores = {
        lag: correlation(*lagged(measured, truth, lag)) for lag in range(-MAX_LAG, MAX_LAG + 1)
    }
    best = max(scores, key=lambda lag: (scores[lag], -abs(lag)))
    return scores[0], best if scores[best] >= NO_SYNC else None


def _patch(frame: np.ndarray, box: Box, region: tuple[float, float, float, float]) -> np.ndarray:
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    left, right = int((x0 + region[0] * w) * width), int(np.ceil((x0 + region[2] * w) * width))
    top, bottom = int((y0 + region[1] * h) * height), int(np.ceil((y0 + region[3] * h) * height))
    return frame[max(0, top) : max(top + 1, bottom), max(0, left) : max(left + 1, right)]


def identity_score(frames: np.ndarray, box: Box, identity: Identity) -> float:
    """1 - mean colour error (0..255) of cheeks and background corners, / 255."""
    size = frames.shape[1]
    corner = max(1, size // 10)
    ramp = (np.arange(corner) + 0.5) / size  # the background's vertical gradient
    top, bottom = np.array(identity.background), np.array(identity.background_2)
    background = top * (1 - ramp.mean()) + bottom * ramp.mean()
    errors = []
    for frame in frames:
        cheeks = np.concatenate(
            [
                _patch(frame, box, (0.12, 0.5, 0.28, 0.62)).reshape(-1, 3),
                _patch(frame, box, (0.72, 0.5, 0.88, 0.62)).reshape(-1, 3),
            ]
        )
        corners = np.concatenate(
            [frame[:corner, :corner].reshape(-1, 3), frame[:corner, -corner:].reshape(-1, 3)]
        )
        skin_error = np.abs(np.median(cheeks, axis=0) - np.array(identity.skin)).mean()
        background_error = np.abs(np.median(corners, axis=0) - background).mean()
        errors.append((skin_error + background_error) / 2)
    return float(1.0 - np.mean(errors) / 255.0)


def head_motion(frames: np.ndarray, box: Box) -> float:
    """Head motion of a video: mean absolute frame-to-frame change (0-255 levels) of the
    upper face (eyes, brows, nose, hairline; not the mouth) inside ``box``.

    It grows with the head's rotation speed: on ground-truth videos of one person and track,
    0.005, 0.02 and 0.04 rad/frame measure about 0.8, 2.2 and 3.7. It counts any change, so
    it compares levels only when everything else is equal: the evaluation renders each level
    with the same person, track and seed, so blinks, mouth and noise match across levels.
    """
    height, width = frames.shape[1:3]
    x0, y0, x1, y1 = box
    rows = slice(int(y0 * height), int(np.ceil((y0 + 0.6 * (y1 - y0)) * height)))
    cols = slice(int(x0 * width), int(np.ceil(x1 * width)))
    region = frames[:, rows, cols].astype(np.float32)
    return float(np.abs(np.diff(region, axis=0)).mean()) if len(frames) > 1 else 0.0


def seams(frames: np.ndarray, clip_frames: int) -> float | None:
    """Seam jitter at clip boundaries (1.0: as smooth as inside clips)."""
    differences = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    boundaries = set(range(clip_frames, len(frames), clip_frames))
    return seam_jitter(differences, boundaries)
