"""Synthetic head motion at a chosen rotation speed (see ``emo.pose`` for the measure)."""

from __future__ import annotations

import numpy as np

# How far a portrait's head turns: beyond this the face leaves the frame or turns away.
LIMITS = np.array([0.45, 0.28, 0.22])  # yaw, pitch, roll (rad)
AXIS_WEIGHT = np.array([1.0, 0.7, 0.45])  # people turn (yaw) more than they nod or tilt


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
