"""The evaluation measures what it claims: ground truth scores near-perfectly, a frozen mouth
scores no sync, and head motion orders the speed levels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emo.bundle import save_bundle
from emo.eval.evaluate import SPEED_LEVELS, HeldOut, portrait_of, score
from emo.eval.scores import head_motion
from emo.models.components import build_components
from emo.models.config import TINY
from emo.synthetic.corpus import VideoSpec, render_video
from tests.conftest import run_emo

pytestmark = pytest.mark.slow  # evaluation renders


def _truth(index: int, speed: float = SPEED_LEVELS["mid"]) -> tuple[VideoSpec, np.ndarray]:
    spec = VideoSpec(seed=0, split="heldout", index=index, seconds=6.0, size=64, speed=speed)
    return spec, render_video(spec)[0]


def test_ground_truth_scores_near_perfectly() -> None:
    for index in range(3):
        spec, frames = _truth(index)
        result = score(frames, HeldOut.of(spec), clip_frames=12)
        assert result["lip_sync_r"] >= 0.95, result
        assert result["av_offset_frames"] == 0
        assert result["identity"] >= 0.97
        assert 0.7 < result["seam_jitter"] < 1.3  # no seams in a continuous video


def test_a_frozen_mouth_scores_no_sync_and_a_late_one_is_found() -> None:
    spec, frames = _truth(1)
    _, box = portrait_of(spec)
    frozen = frames.copy()
    top = int((box[1] + 0.5 * (box[3] - box[1])) * 64)
    frozen[:, top:] = frames[0, top:]  # the lower face never moves
    frozen_score = score(frozen, HeldOut.of(spec), clip_frames=12)
    assert abs(frozen_score["lip_sync_r"]) < 0.1
    assert frozen_score["av_offset_frames"] is None  # no sync, so no offset either
    late = np.concatenate([frames[:1].repeat(2, axis=0), frames[:-2]])  # video 2 frames late
    assert score(late, HeldOut.of(spec), clip_frames=12)["av_offset_frames"] == 2


def test_head_motion_orders_the_speed_levels() -> None:
    for index in range(3):
        measured = []
        for speed in SPEED_LEVELS.values():
            spec, frames = _truth(index, speed)
            measured.append(head_motion(frames, portrait_of(spec)[1]))
        assert measured[0] < measured[1] < measured[2], measured


def test_cli_reports_every_key(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    save_bundle(build_components(TINY, seed=0), TINY, bundle)
    result = run_emo(
        "eval",
        str(bundle),
        "--heldout",
        "1",
        "--seconds",
        "1",
        "--steps",
        "2",
        "--guidance",
        "1",
        "--continuation-strength",
        "0.5",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    keys = (
        "lip_sync_r",
        "av_offset_frames",
        "identity",
        "speed_low",
        "speed_mid",
        "speed_high",
        "seam_jitter",
    )
    assert all(key in report for key in keys)
    assert report["bundle"]["path"] == str(bundle) and len(report["per_video"]) == 1
    asked = (report["steps"], report["guidance"], report["continuation_strength"])
    assert asked == (2, 1.0, 0.5)  # what was asked, recorded
    refused = run_emo("eval", str(bundle), "--continuation-strength", "1.5")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "--continuation-strength must be above 0 and at most 1" in refused.stderr
