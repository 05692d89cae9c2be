"""Face region of the reference portrait (mediapipe 0.10.21's bundled face detector).

``face_box`` finds the most confident face and returns its normalised box (x0, y0, x1, y1);
``face_region`` applies the studio's choices: a manual box overrides detection, the box is
expanded by a factor (the head moves; the Face Locator mask must cover where it goes), and
with no face found the policy is ``error`` (one clear error naming the image) or
``full_frame``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from emo.errors import InputError, MediaError
from emo.quiet import native_output_silenced

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]
FULL_FRAME: Box = (0.0, 0.0, 1.0, 1.0)


# The Face Locator's mask is the face box grown by this factor, in training and in renders,
# so the head may move inside it.
FACE_EXPAND = 1.5


class FacePolicy(StrEnum):
    """What to do when no face is found."""

    ERROR = "error"
    FULL_FRAME = "full_frame"


@dataclass(frozen=True)
class FaceRegion:
    """The box the Face Locator mask covers, and where it came from."""

    box: Box
    source: str  # detected | manual | full_frame
    score: float | None = None


def detect_face(image: np.ndarray, min_confidence: float = 0.5) -> tuple[Box, float] | None:
    """The most confident face in an RGB uint8 image (H, W, 3), or None."""
    with native_output_silenced():  # TensorFlow Lite's and absl's start-up lines
        import mediapipe as mp  # heavy import, only where faces are detected

        detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_confidence
        )
        with detector:
            result = detector.process(np.ascontiguousarray(image))
    if not result.detections:
        return None
    best = max(result.detections, key=lambda d: d.score[0])
    rel = best.location_data.relative_bounding_box
    box = (rel.xmin, rel.ymin, rel.xmin + rel.width, rel.ymin + rel.height)
    return clamp_box(box), float(best.score[0])


def clamp_box(box: Sequence[float]) -> Box:
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
    return (x0, y0, x1, y1)


def expand_box(box: Box, factor: float) -> Box:
    """Grow ``box`` about its centre by ``factor`` (1.0 keeps it), clipped to the frame."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = (x1 - x0) * factor / 2, (y1 - y0) * factor / 2
    return clamp_box((cx - half_w, cy - half_h, cx + half_w, cy + half_h))


def check_box(box: Sequence[float], name: str = "face box") -> Box:
    """A manual box as (x0, y0, x1, y1) in [0, 1] with x0 < x1 and y0 < y1."""
    if len(box) != 4:
        raise InputError(f"{name} needs four numbers x0,y0,x1,y1 (fractions of the image)")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise InputError(
            f"{name} {tuple(box)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
        )
    return (x0, y0, x1, y1)


def face_region(
    image: np.ndarray,
    *,
    image_name: str = "reference image",
    manual_box: Sequence[float] | None = None,
    policy: FacePolicy | str = FacePolicy.ERROR,
    expand: float | None = None,
) -> FaceRegion:
    """Where the face is (or may move to) in the reference image, per the studio's policy."""
    policy = FacePolicy(policy)
    expand = FACE_EXPAND if expand is None else expand
    if manual_box is not None:
        return FaceRegion(box=expand_box(check_box(manual_box), expand), source="manual")
    found = detect_face(image)
    if found is not None:
        box, score = found
        return FaceRegion(box=expand_box(box, expand), source="detected", score=score)
    if policy is FacePolicy.FULL_FRAME:
        return FaceRegion(box=FULL_FRAME, source="full_frame")
    raise MediaError(
        f"no face found in {image_name}; give a face box, use the full_frame "
        "face policy, or choose a portrait with a visible face"
    )


# Where the mouth and jaw move inside a face region (the face box grown FACE_EXPAND times, as
# renders, QC and the training's face locator hold it): x0, y0, x1, y1 as fractions of the
# region. The one definition of the mouth: continuation frees it, QC watches it move, and the
# training loss weighs it.
MOUTH_OF_REGION = (0.3, 0.55, 0.7, 0.85)


def mouth_box(region: Box) -> Box:
    """The mouth's box, in the frame's fractions, inside a face region (also element-wise on
    tensors of the four edges)."""
    x0, y0, x1, y1 = region
    width, height = x1 - x0, y1 - y0
    left, top, right, bottom = MOUTH_OF_REGION
    return (x0 + left * width, y0 + top * height, x0 + right * width, y0 + bottom * height)


def mouth_mask(region: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 mask, 1 where the mouth moves, from a face-region mask (H, W) such
    as ``face_mask`` makes; cells the mouth area touches count whole.

    The fractions assume the whole grown region: where the frame edge clipped it (a close-up),
    part of the real mouth may lie outside this area and be held early in the schedule."""
    rows, cols = np.nonzero(region > 0.5)
    height, width = region.shape
    if rows.size == 0:  # no region: the whole frame is the face region
        rows, cols = np.array([0, height - 1]), np.array([0, width - 1])
    top, bottom = rows.min() / height, (rows.max() + 1) / height
    left, right = cols.min() / width, (cols.max() + 1) / width
    x0, y0, x1, y1 = mouth_box((left, top, right, bottom))

    def cells(start: float, end: float) -> slice:  # fractions of the frame -> touched cells
        return slice(int(np.floor(start * size)), int(np.ceil(end * size)))

    mask = np.zeros((size, size), dtype=np.float32)
    mask[cells(y0, y1), cells(x0, x1)] = 1.0
    return mask


def face_mask(box: Box, height: int, width: int) -> np.ndarray:
    """(H, W) float32 mask, 1 inside the box."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=np.float32)
    top, left = round(y0 * height), round(x0 * width)
    mask[top : max(round(y1 * height), top + 1), left : max(round(x1 * width), left + 1)] = 1.0
    return mask
