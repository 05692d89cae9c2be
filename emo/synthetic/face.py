"""Procedural cartoon portraits: an identity (shapes and colours) drawn at a head pose.

The face is a curved surface: every feature (eyes, brows, nose, mouth, hairline) is a set of
points on an ellipsoid in head coordinates, rotated by the head pose and projected
orthographically, so turning, nodding and tilting foreshorten and hide features as a real head
does. Frames are drawn at twice the size and box-filtered down for smooth edges.

Some colours are fixed for every identity because evaluation measures them in generated
frames: the mouth interior (``MOUTH_INTERIOR``), the eye whites (``SCLERA``) and the pupils
(``PUPIL``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from emo.pose import rotation_matrices

MOUTH_INTERIOR = (70, 12, 28)
PUPIL = (12, 12, 16)
SCLERA = (245, 245, 240)
HAIR_STYLES = ("short", "long", "bald", "bun")
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Identity:
    """Everything that makes one synthetic person look like themselves (sizes: frame units)."""

    background: tuple[int, int, int]
    background_2: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str
    iris: tuple[int, int, int]
    lips: tuple[int, int, int]
    center: tuple[float, float]  # head centre, fractions of the frame
    radius: float  # head half-width, fraction of the frame
    aspect: float  # head height / width
    eye_spacing: float  # fractions of the head radius from here on
    eye_size: float
    eye_height: float
    mouth_width: float
    mouth_height: float
    nose_length: float

    def to_dict(self) -> dict:
        return asdict(self)


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def sample_identity(rng: np.random.Generator) -> Identity:
    """A random identity; every field is drawn from ``rng`` so a seed names a person."""
    tone = rng.uniform(0, 1)
    skin = np.array([255, 224, 196]) * (1 - tone) + np.array([120, 78, 52]) * tone
    skin = np.clip(skin + rng.normal(0, 12, 3), 0, 255)
    return Identity(
        background=_colour(rng, 30, 230),
        background_2=_colour(rng, 30, 230),
        skin=tuple(int(v) for v in skin),
        hair=_colour(rng, 10, 200),
        hair_style=str(rng.choice(HAIR_STYLES)),
        iris=_colour(rng, 40, 200),
        lips=(int(rng.integers(150, 220)), int(rng.integers(60, 110)), int(rng.integers(70, 120))),
        center=(float(rng.uniform(0.44, 0.56)), float(rng.uniform(0.48, 0.56))),
        radius=float(rng.uniform(0.22, 0.28)),
        aspect=float(rng.uniform(1.15, 1.35)),
        eye_spacing=float(rng.uniform(0.34, 0.44)),
        eye_size=float(rng.uniform(0.13, 0.19)),
        eye_height=float(rng.uniform(-0.22, -0.1)),
        mouth_width=float(rng.uniform(0.3, 0.42)),
        mouth_height=float(rng.uniform(0.24, 0.34)),
        nose_length=float(rng.uniform(0.12, 0.2)),
    )


@dataclass(frozen=True)
class Expression:
    """What changes from frame to frame besides the pose."""

    mouth_open: float  # 0 closed ... 1 wide open
    mouth_width: float  # 0 rounded ... 1 spread
    eyes_open: float  # 0 closed (blink) ... 1 open


class _Projector:
    """Head-surface points (x right, y down, in head radii) -> frame pixels at one pose."""

    def __init__(self, identity: Identity, rotation: np.ndarray, size: int) -> None:
        self.rotation, self.size = rotation, size
        self.scale = identity.radius * size
        self.aspect = identity.aspect
        self.origin = np.array(identity.center) * size

    def surface(self, x: np.ndarray, y: np.ndarray, lift: float = 0.0) -> np.ndarray:
        """(N, 3) points on the front of the head ellipsoid at face-plane (x, y)."""
        depth = np.sqrt(np.clip(1.0 - x**2 - (y / self.aspect) ** 2, 0.0, None)) + lift
        return np.stack([x, y, depth], axis=-1)

    def project(self, points: np.ndarray) -> tuple[list[tuple[float, float]], bool]:
        """Pixel polygon of ``points`` and whether it faces the camera."""
        rotated = points @ self.rotation.T  # (N, 3)
        xy = rotated[:, :2] * self.scale + self.origin
        return [tuple(p) for p in xy], bool(rotated[:, 2].mean() > 0.05)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> tuple[np.ndarray, ...]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return cx + rx * np.cos(t), cy + ry * np.sin(t)


def _background(identity: Identity, size: int) -> Image.Image:
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    top, bottom = np.array(identity.background), np.array(identity.background_2)
    image = (top * (1 - ramp) + bottom * ramp) * np.ones((1, size, 1))
    return Image.fromarray(image.astype(np.uint8))


def _outline(proj: _Projector, grow: float = 1.0) -> list[tuple[float, float]]:
    """The head's silhouette: the ellipsoid's rim, turned by the roll only."""
    x, y = _ellipse(0, 0, grow, grow * proj.aspect, 48)
    roll = np.arctan2(proj.rotation[1, 0], proj.rotation[0, 0])
    c, s = np.cos(roll), np.sin(roll)
    xy = np.stack([c * x - s * y, s * x + c * y], -1) * proj.scale + proj.origin
    return [tuple(p) for p in xy]


def _hair(draw: ImageDraw.ImageDraw, proj: _Projector, identity: Identity, back: bool) -> None:
    style, colour = identity.hair_style, identity.hair
    if style == "bald":
        return
    if back:
        if style == "long":
            x, y = _ellipse(0, 0.35, 1.18, proj.aspect * 1.08, 48)
            draw.polygon(proj.project(np.stack([x, y, np.zeros_like(x)], -1))[0], fill=colour)
        if style == "bun":
            x, y = _ellipse(0, -proj.aspect * 1.05, 0.42, 0.36)
            draw.polygon(proj.project(np.stack([x, y, np.full_like(x, -0.2)], -1))[0], fill=colour)
        return
    # The cap: the top of the head down to a hairline across the forehead.
    t = np.linspace(np.pi * 1.05, np.pi * 1.95, 24)
    top_x, top_y = 1.04 * np.cos(t), 1.04 * proj.aspect * np.sin(t)
    line_x = np.linspace(0.98, -0.98, 24)
    line_y = -proj.aspect * (0.5 + 0.12 * (1 - line_x**2))
    cap = np.concatenate(
        [np.stack([top_x, top_y, np.zeros_like(t)], -1), proj.surface(line_x, line_y, 0.02)]
    )
    draw.polygon(proj.project(cap)[0], fill=colour)


def _eye(draw: ImageDraw.ImageDraw, proj: _Projector, identity: Identity, side: int, open_: float):
    cx, cy = side * identity.eye_spacing, identity.eye_height * proj.aspect
    r = identity.eye_size
    x, y = _ellipse(cx, cy, r, r * 0.62 * max(open_, 0.08))
    polygon, visible = proj.project(proj.surface(x, y, 0.01))
    if not visible:
        return
    draw.polygon(polygon, fill=SCLERA)
    if open_ > 0.3:
        for radius, colour in ((0.5 * r, identity.iris), (0.24 * r, PUPIL)):
            x, y = _ellipse(cx, cy, radius, radius * min(1.0, open_))
            draw.polygon(proj.project(proj.surface(x, y, 0.02))[0], fill=colour)
    brow_x = np.linspace(cx - r, cx + r, 6)
    brow_y = cy - r * 1.1 - 0.05 * (1 - ((brow_x - cx) / r) ** 2)
    brow = proj.project(proj.surface(brow_x, brow_y, 0.02))[0]
    draw.line(brow, fill=identity.hair, width=max(2, int(proj.scale * 0.06)))


def _mouth(draw: ImageDraw.ImageDraw, proj: _Projector, identity: Identity, expr: Expression):
    cy = identity.mouth_height * proj.aspect + 0.1
    half_w = identity.mouth_width * (0.72 + 0.56 * expr.mouth_width)
    half_h = 0.04 + 0.26 * expr.mouth_open  # a closed mouth still shows a dark line
    x, y = _ellipse(0.0, cy, half_w, half_h, 32)
    polygon, visible = proj.project(proj.surface(x, y, 0.01))
    if visible:
        draw.polygon(
            polygon,
            fill=MOUTH_INTERIOR,
            outline=identity.lips,
            width=max(2, int(proj.scale * 0.05)),
        )


def _nose(draw: ImageDraw.ImageDraw, proj: _Projector, identity: Identity) -> None:
    top = identity.eye_height * proj.aspect + 0.1
    x = np.array([0.0, -0.07, 0.07])
    y = np.array([top, top + identity.nose_length + 0.1, top + identity.nose_length + 0.1])
    polygon, visible = proj.project(proj.surface(x, y, np.array([0.06, 0.12, 0.12])))
    shade = tuple(int(c * 0.8) for c in identity.skin)
    if visible:
        draw.polygon(polygon, fill=shade)


def draw_face(
    identity: Identity, angles: np.ndarray, expression: Expression, size: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """One frame (size, size, 3) uint8 and the head's box (x0, y0, x1, y1) in fractions."""
    big = size * SUPERSAMPLE
    image = _background(identity, big)
    draw = ImageDraw.Draw(image)
    proj = _Projector(identity, rotation_matrices(np.asarray(angles)[None])[0], big)
    _hair(draw, proj, identity, back=True)
    outline = _outline(proj)
    draw.polygon(outline, fill=identity.skin)
    _hair(draw, proj, identity, back=False)
    for side in (-1, 1):
        _eye(draw, proj, identity, side, expression.eyes_open)
    _nose(draw, proj, identity)
    _mouth(draw, proj, identity, expression)
    frame = np.asarray(image.reduce(SUPERSAMPLE))
    xy = np.array(outline) / big
    box = (*np.clip(xy.min(axis=0), 0, 1), *np.clip(xy.max(axis=0), 0, 1))
    return frame, tuple(float(v) for v in box)
