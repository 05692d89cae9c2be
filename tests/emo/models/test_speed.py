"""The one speed schedule: what a manifest's `speed` and the pipeline's `speed=` become."""

from __future__ import annotations

import numpy as np
import pytest

from emo.models.speed import speed_schedule


def test_one_level_holds_for_every_frame() -> None:
    out = speed_schedule(0.3, 5, fps=25)
    assert out.dtype == np.float32 and out.tolist() == pytest.approx([0.3] * 5)


def test_a_per_frame_array_is_padded_with_its_last_value_and_cut_to_length() -> None:
    assert speed_schedule([0.1, 0.2], 4, fps=25).tolist() == pytest.approx([0.1, 0.2, 0.2, 0.2])
    assert speed_schedule(np.arange(6), 3, fps=25).tolist() == [0.0, 1.0, 2.0]


def test_points_are_seconds_and_levels_linear_between_held_beyond() -> None:
    # Given out of order, as a spreadsheet might: 0.0 at 1 s, 1.0 at 2 s.
    out = speed_schedule([[2.0, 1.0], [1.0, 0.0]], 4, fps=2)  # frames at 0, 0.5, 1, 1.5 s
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5])
    late = speed_schedule([[0.0, 0.2], [1.0, 0.6]], 5, fps=2)  # 2 s: held at the last level
    assert late.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.6, 0.6])


def test_points_interpolate_like_the_manifest_always_did() -> None:
    """Bit for bit the float64 interpolation renders were made with (a resumed job's earlier
    segments used it), and a per-frame array is copied, not shared."""
    points = [[0.0, 0.01], [30.0, 0.05]]
    times = np.arange(2000) / 25
    before = np.interp(times, [0.0, 30.0], [0.01, 0.05]).astype(np.float32)
    assert np.array_equal(speed_schedule(points, 2000, fps=25), before)
    mine = np.full(4, 0.1, np.float32)
    speed_schedule(mine, 4, fps=25)[0] = 9.0
    assert mine[0] == np.float32(0.1)
