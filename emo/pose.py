"""Head pose conventions and head rotation speed, shared by the corpus, data prep and eval.

Angles are (yaw, pitch, roll) in radians, applied as R = Rz(roll) @ Rx(pitch) @ Ry(yaw)
(x right, y down, z towards the camera). The *speed* of frame i is the angle of the relative
rotation between frames i-1 and i (radians per frame), the quantity EMO's speed layers are
conditioned on; frame 0 takes frame 1's value so every frame has one.
"""

from __future__ import annotations

import numpy as np


def rotation_matrices(angles: np.ndarray) -> np.ndarray:
    """(F, 3) yaw/pitch/roll -> (F, 3, 3) rotation matrices."""
    yaw, pitch, roll = np.moveaxis(np.asarray(angles, np.float64), -1, 0)
    cy, sy, cp, sp, cr, sr = (
        np.cos(yaw),
        np.sin(yaw),
        np.cos(pitch),
        np.sin(pitch),
        np.cos(roll),
        np.sin(roll),
    )
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rx = np.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).reshape(-1, 3, 3)
    rz = np.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ rx @ ry


def rotation_speed(rotations: np.ndarray) -> np.ndarray:
    """(F, 3, 3) rotations -> (F,) angle of the rotation from each frame to the next (rad)."""
    if len(rotations) < 2:
        return np.zeros(len(rotations), np.float32)
    relative = np.einsum("fij,fkj->fik", rotations[1:], rotations[:-1])  # R_i @ R_{i-1}^T
    cosine = (np.trace(relative, axis1=1, axis2=2) - 1.0) / 2.0
    speed = np.arccos(np.clip(cosine, -1.0, 1.0))
    return np.concatenate([speed[:1], speed]).astype(np.float32)


def euler_angles(rotations: np.ndarray) -> np.ndarray:
    """(F, 3, 3) rotations -> (F, 3) yaw, pitch, roll inverting ``rotation_matrices``."""
    pitch = np.arcsin(np.clip(rotations[:, 2, 1], -1.0, 1.0))
    yaw = np.arctan2(-rotations[:, 2, 0], rotations[:, 2, 2])
    roll = np.arctan2(-rotations[:, 0, 1], rotations[:, 1, 1])
    return np.stack([yaw, pitch, roll], axis=-1).astype(np.float32)
