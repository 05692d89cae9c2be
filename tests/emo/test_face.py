"""Face detection on real photographs (scikit-image's public-domain test images), offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage

from emo.errors import InputError, MediaError
from emo.face import (
    FACE_EXPAND,
    FULL_FRAME,
    detect_face,
    expand_box,
    face_mask,
    face_region,
    mouth_mask,
)
from emo.media import load_image

DATA = Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return load_image(DATA / "astronaut.png")


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return load_image(DATA / "chelsea.png")


def test_astronaut_face_is_found(astronaut: np.ndarray) -> None:
    found = detect_face(astronaut)
    assert found is not None
    (x0, y0, x1, y1), score = found
    assert score > 0.8
    # Eileen Collins' face: about x 0.34, y 0.13, 0.20 wide and high.
    assert 0.30 < x0 < 0.40 and 0.08 < y0 < 0.20 and 0.14 < x1 - x0 < 0.26
    assert 0.14 < y1 - y0 < 0.26


def test_region_expands_the_box_and_manual_box_wins(astronaut: np.ndarray) -> None:
    detected = face_region(astronaut, expand=1.0)
    wider = face_region(astronaut, expand=1.5)
    assert detected.source == "detected"
    assert (wider.box[2] - wider.box[0]) == pytest.approx(1.5 * (detected.box[2] - detected.box[0]))
    manual = face_region(astronaut, manual_box=(0.1, 0.1, 0.3, 0.4), expand=1.0)
    assert manual.source == "manual" and manual.box == pytest.approx((0.1, 0.1, 0.3, 0.4))
    with pytest.raises(InputError, match="face box"):
        face_region(astronaut, manual_box=(0.5, 0.1, 0.3, 0.4))


def test_cat_has_no_face(cat: np.ndarray) -> None:
    with pytest.raises(MediaError, match="no face found in chelsea.png"):
        face_region(cat, image_name="chelsea.png")
    region = face_region(cat, policy="full_frame")
    assert region.box == FULL_FRAME and region.source == "full_frame"


def test_mask_and_expansion_geometry() -> None:
    mask = face_mask((0.25, 0.5, 0.75, 1.0), 8, 8)
    assert mask.sum() == 4 * 4 and mask[4:, 2:6].all()
    assert expand_box((0.4, 0.4, 0.6, 0.6), 2.0) == pytest.approx((0.3, 0.3, 0.7, 0.7))
    assert expand_box((0.0, 0.0, 0.2, 0.2), 3.0) == pytest.approx((0.0, 0.0, 0.4, 0.4))  # clipped


def test_mouth_area_covers_the_mouth_training_weighs() -> None:
    """Continued clips denoise this area freely; it must hold the mouth region the training
    loss weighs (the same emo.face.mouth_box, of the face box grown as renders grow it), in
    latent cells, for a face region inside the frame, and little of the rest of the face. (A
    region clipped by the frame edge shifts the area: see emo.face.mouth_mask.)"""
    import torch

    from emo.training.objective import mouth_mask as training_mouth

    face = (0.3, 0.25, 0.7, 0.75)
    region = face_mask(expand_box(face, FACE_EXPAND), 64, 64)
    area = mouth_mask(region, 16).astype(bool)
    trained = training_mouth(torch.tensor([[face]]), 16)[0, 0].numpy().astype(bool)
    assert trained.any() and not (trained & ~area).any()  # the whole trained mouth is free
    assert area.sum() <= 2 * trained.sum()  # and not much else
    assert not area[: int(16 * face[1]) + 4].any()  # eyes and forehead stay held
    whole = mouth_mask(np.zeros((64, 64), np.float32), 16)  # no region: the whole frame
    assert whole.sum() > 0 and np.array_equal(whole, mouth_mask(np.ones((64, 64)), 16))
