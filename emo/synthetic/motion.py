"""Head poses and rotation speed: synthetic head motion at a chosen speed, and its measure.

Angles are (yaw, pitch, roll) in radians, applied as R = Rz(roll) @ Rx(pitch) @ Ry(yaw).
The *speed* of frame i is the angle of the relative rotation between frames i-1 and i
(radians per frame), the quantity EMO's speed layers are conditioned on; frame 0 takes frame
1's value so every frame has one.
"""

from __future__ import annotations

import numpy as np

# How far a portrait's head turns: beyond this the face leaves the frame or turns away.
LIMITS = np.array([0.45, 0.28, 0.22])  # yaw, pitch, roll (rad)
AXIS_WEIGHT = np.array([1.0, 0.7, 0.45])  # people turn (yaw) more than they nod or tilt


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


def head_motion(rng: np.random.Generator, frames: int, speed: float) -> np.ndarray:
    """(F, 3) angles of a head turning at about ``speed`` rad/frame, within ``LIMITS``.

    The angular velocity keeps its magnitude and drifts in direction (a smooth random walk),
    bouncing off the angle limits, so the measured speed stays near ``speed`` at every frame.
    """
    angles = np.zeros((frames, 3))
    position = rng.uniform(-0.4, 0.4, 3) * LIMITS
    direction = rng.standard_normal(3) * AXIS_WEIGHT
    for i in range(frames):
        angles[i] = position
        direction = direction / (np.linalg.norm(direction) or 1.0)
        direction += 0.25 * rng.standard_normal(3) * AXIS_WEIGHT
        direction /= np.linalg.norm(direction) or 1.0
        step = speed * direction
        beyond = np.abs(position + step) > LIMITS
        direction[beyond] *= -1.0  # bounce off the limit
        step[beyond] *= -1.0
        position = position + step
    return angles.astype(np.float32)
