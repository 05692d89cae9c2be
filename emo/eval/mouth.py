"""Mouth opening measured in frames of synthetic faces (generated or ground truth).

Every synthetic identity draws its mouth interior in one known colour
(``emo.synthetic.face.MOUTH_INTERIOR``), so the opening can be read off any frame that shows
such a face: the interior's area divided by its width is its mean height, in units of the face
box height. Pixels count softly by their colour distance to the interior colour, so a mouth a
pixel or two high still registers at 64x64 after H.264.
"""

from __future__ import annotations

import numpy as np

from emo.synthetic.face import MOUTH_INTERIOR

COLOUR_TOLERANCE = 70.0  # RGB distance at which a pixel stops counting as mouth interior
Box = tuple[float, float, float, float]


def interior_weight(region: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) in [0, 1]: how much each pixel looks like the mouth interior."""
    distance = np.linalg.norm(region.astype(np.float32) - np.array(MOUTH_INTERIOR), axis=-1)
    return np.clip(1.0 - distance / COLOUR_TOLERANCE, 0.0, 1.0)


def mouth_opening(frame: np.ndarray, box: Box) -> float:
    """Mean height of the mouth interior ÷ face-box height, in the box's lower part."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = box
    top = int(np.floor((y0 + 0.5 * (y1 - y0)) * height))  # the mouth sits in the lower half
    rows = slice(max(0, top), min(height, int(np.ceil(y1 * height)) + 1))
    cols = slice(max(0, int(np.floor(x0 * width))), min(width, int(np.ceil(x1 * width)) + 1))
    weight = interior_weight(frame[rows, cols])  # (h, w)
    columns = weight.max(axis=0)  # how strongly each column holds mouth
    span = float(columns.sum())
    if span < 1.0:
        return 0.0
    face_height = max(1.0, (y1 - y0) * height)
    return float(weight.sum() / span / face_height)


def mouth_openings(frames: np.ndarray, boxes: list[Box] | np.ndarray) -> np.ndarray:
    """(F, H, W, 3) frames and one box per frame (or one for all) -> (F,) openings."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim == 1:
        boxes = np.broadcast_to(boxes, (len(frames), 4))
    return np.array([mouth_opening(f, tuple(b)) for f, b in zip(frames, boxes, strict=True)])
