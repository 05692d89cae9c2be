"""A job's inputs on this machine: copied from where the manifest names them, and the portrait
cropped square around the face at the model's resolution.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from emo.errors import MediaError
from emo.face import FaceRegion, face_region
from emo.job import JobParams
from emo.settings import Settings
from emo.store import open_store


def fetch(uri: str, destination: Path, *, base_dir: Path, settings: Settings) -> Path:
    """Copy an input (local path relative to ``base_dir``, ``file://`` or ``s3://``) locally."""
    parsed = urlparse(uri)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if parsed.scheme == "s3":
        store = open_store(f"s3://{parsed.netloc}", settings)
        return store.get_file(parsed.path.lstrip("/"), destination)
    if parsed.scheme == "file":
        source = Path(unquote(parsed.path))
    elif parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # plain or Windows-like path
        source = Path(uri) if Path(uri).is_absolute() else base_dir / uri
    else:
        raise MediaError(f"input {uri!r}: unsupported location; use a path, file:// or s3://")
    if not source.is_file():
        raise MediaError(f"input file {str(source)!r} does not exist")
    shutil.copyfile(source, destination)
    return destination


def prepare_portrait(
    image: np.ndarray, region: FaceRegion, size: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Square crop around the face, resized to ``size``; returns it and the box within it."""
    height, width = image.shape[:2]
    side = min(height, width)
    x0, y0, x1, y1 = region.box
    cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
    left = int(min(max(cx - side / 2, 0), width - side))
    top = int(min(max(cy - side / 2, 0), height - side))
    crop = Image.fromarray(image[top : top + side, left : left + side])
    square = np.array(crop.resize((size, size), Image.Resampling.LANCZOS))
    box = (
        (x0 * width - left) / side,
        (y0 * height - top) / side,
        (x1 * width - left) / side,
        (y1 * height - top) / side,
    )
    return square, tuple(min(max(v, 0.0), 1.0) for v in box)  # type: ignore[return-value]


def portrait_region(image: np.ndarray, params: JobParams, image_name: str) -> FaceRegion:
    return face_region(
        image, image_name=image_name, manual_box=params.face_box, policy=params.face_policy
    )
