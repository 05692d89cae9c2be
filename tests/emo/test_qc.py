"""QC measures on videos with known properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emo.eval.qc import qc_report, seam_jitter, sync_score
from emo.face import FACE_EXPAND, expand_box
from emo.media import VideoWriter

SPF = 640


def test_seam_jitter_sees_jumps_at_boundaries() -> None:
    smooth = np.ones(47)
    assert seam_jitter(smooth, {12, 24, 36}) == 1.0
    jumpy = smooth.copy()
    jumpy[[11, 23, 35]] = 4.0  # differences across frames 11->12, 23->24, 35->36
    assert seam_jitter(jumpy, {12, 24, 36}) == 4.0


def test_sync_score_finds_the_lag() -> None:
    rng = np.random.default_rng(0)
    envelope = rng.random(200)
    motion = np.roll(envelope, 2)  # the mouth moves two frames after the sound
    lag, strength = sync_score(motion, envelope)
    assert lag == 2 and strength > 0.9


def test_report_on_a_rendered_video(tmp_path: Path) -> None:
    """A face whose mouth opens with the audio: good sync, stable identity, no seams."""
    frames, audio = 96, np.zeros(96 * SPF, dtype=np.float32)
    loud = (np.sin(np.arange(frames) / 3) > 0).astype(np.float32)
    video = np.full((frames, 64, 64, 3), 180, np.uint8)
    video[:, 16:48, 16:48] = (200, 150, 120)  # face
    video[:, 22:26, 22:28] = video[:, 22:26, 36:42] = 30  # eyes
    for i in range(frames):
        audio[i * SPF : (i + 1) * SPF] = loud[i] * np.sin(np.arange(SPF) / 3)
        opening = 2 + int(6 * loud[i])
        video[i, 38 : 38 + opening, 26:38] = 60  # mouth
    with VideoWriter(tmp_path / "v.mp4", width=64, height=64, fps=25) as writer:
        writer.write(video)
    report = qc_report(
        tmp_path / "v.mp4",
        reference=video[0],
        face_box=expand_box((0.25, 0.25, 0.75, 0.75), FACE_EXPAND),  # the region, as renders
        audio=audio,
        samples_per_frame=SPF,
        boundaries={14, 24, 34, 44},  # away from the mouth toggles
        max_seam_jitter=1.3,
        min_identity=0.8,
        min_sync=0.5,
    )
    assert report["frames"] == frames
    assert abs(report["sync_lag_frames"]) <= 1 and report["sync_strength"] > 0.5
    assert report["identity_mean"] > 0.8
    assert report["warnings"] == []
