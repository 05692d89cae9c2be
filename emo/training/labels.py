"""Per-frame labels of a talking-head video: face box and head pose.

From mediapipe's face mesh (its bundled model): the box is the extent of the 468 landmarks;
the pose comes from ``cv2.solvePnP`` of six landmarks (nose tip, chin, outer eye corners,
mouth corners) against a generic 3-D face, with a pinhole camera whose focal length is the
image width. A sidecar ``<video>.labels.json`` (as ``emo synth`` writes) overrides detection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emo.pose import euler_angles

# Face-mesh landmark indices and a generic face in millimetres (x right, y up, z forward):
# nose tip, chin, right-eye outer corner, left-eye outer corner, mouth corners.
MESH_POINTS = (1, 152, 33, 263, 61, 291)
FACE_MODEL = np.array(
    [
        (0.0, 0.0, 0.0),
        (0.0, -63.6, -12.5),
        (-43.3, 32.7, -26.0),
        (43.3, 32.7, -26.0),
        (-28.9, -28.9, -24.1),
        (28.9, -28.9, -24.1),
    ]
)
# solvePnP's camera frame has y down and z away from the camera; ours has z towards it.
FLIP = np.diag([1.0, 1.0, -1.0])


@dataclass
class VideoLabels:
    """Labels of every frame of one video (after resampling to the dataset's fps)."""

    boxes: np.ndarray  # (F, 4) x0, y0, x1, y1 as fractions of the frame
    angles: np.ndarray  # (F, 3) yaw, pitch, roll in radians
    found: np.ndarray  # (F,) bool: a face was detected (sidecar labels: all True)
    source: str  # "sidecar" | "mediapipe"
    extra: dict  # further sidecar labels (mouth opening, ...) kept with the dataset


def sidecar_path(video: Path) -> Path:
    return video.with_name(video.stem + ".labels.json")


def read_sidecar(video: Path, frames: int) -> VideoLabels | None:
    """Labels from ``<video>.labels.json`` if present (cut or padded to ``frames``)."""
    path = sidecar_path(video)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())

    def fit(values: list) -> np.ndarray:
        array = np.asarray(values, np.float32)
        if len(array) >= frames:
            return array[:frames]
        return np.concatenate([array, np.repeat(array[-1:], frames - len(array), axis=0)])

    extra = {
        key: fit(data[key]).tolist()
        for key in ("mouth_open", "mouth_width", "eyes_open")
        if key in data
    }
    return VideoLabels(
        boxes=fit(data["face_box"]),
        angles=fit(data["head_angles"]),
        found=np.ones(frames, bool),
        source="sidecar",
        extra=extra,
    )


def _pose(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(6, 2) pixel landmarks -> (3, 3) head rotation in our convention."""
    import cv2

    camera = np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], np.float64)
    model = FACE_MODEL * np.array([1.0, -1.0, -1.0])  # to solvePnP's y-down, z-away frame
    ok, rvec, _ = cv2.solvePnP(
        model, points.astype(np.float64), camera, None, flags=cv2.SOLVEPNP_ITERATIVE
    )
    if not ok:
        return np.eye(3)
    rotation, _ = cv2.Rodrigues(rvec)
    return FLIP @ rotation @ FLIP


def detect_labels(frames: np.ndarray) -> VideoLabels:
    """Face box and head pose of every frame with mediapipe's face mesh (video mode)."""
    import mediapipe as mp

    count, height, width = frames.shape[:3]
    boxes = np.zeros((count, 4), np.float32)
    rotations = np.repeat(np.eye(3)[None], count, axis=0)
    found = np.zeros(count, bool)
    mesh = mp.solutions.face_mesh.FaceMesh(
        static_image_mode=False, max_num_faces=1, min_detection_confidence=0.5
    )
    with mesh:
        for i, frame in enumerate(frames):
            result = mesh.process(np.ascontiguousarray(frame))
            if not result.multi_face_landmarks:
                continue
            marks = result.multi_face_landmarks[0].landmark
            xy = np.array([(m.x, m.y) for m in marks], np.float32)  # (468, 2) fractions
            boxes[i] = (*np.clip(xy.min(axis=0), 0, 1), *np.clip(xy.max(axis=0), 0, 1))
            rotations[i] = _pose(xy[list(MESH_POINTS)] * (width, height), width, height)
            found[i] = True
    _fill_gaps(boxes, rotations, found)
    angles = smooth_angles(euler_angles(rotations))
    return VideoLabels(boxes=boxes, angles=angles, found=found, source="mediapipe", extra={})


def smooth_angles(angles: np.ndarray, window: int = 5) -> np.ndarray:
    """Median then mean over ``window`` frames: landmark jitter (about 0.3 degrees per frame,
    more while the tracker settles) would otherwise read as head speed."""
    if len(angles) < window:
        return angles
    half = window // 2
    padded = np.pad(angles, ((half, half), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # (F, 3, w)
    median = np.median(windows, axis=-1)
    padded = np.pad(median, ((half, half), (0, 0)), mode="edge")
    return (
        np.lib.stride_tricks.sliding_window_view(padded, window, axis=0).mean(-1).astype(np.float32)
    )


def _fill_gaps(boxes: np.ndarray, rotations: np.ndarray, found: np.ndarray) -> None:
    """Frames without a detection take the nearest detected frame's labels."""
    if not found.any():
        return
    hits = np.flatnonzero(found)
    for i in np.flatnonzero(~found):
        nearest = hits[np.argmin(np.abs(hits - i))]
        boxes[i], rotations[i] = boxes[nearest], rotations[nearest]
