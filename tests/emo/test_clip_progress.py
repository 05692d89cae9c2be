"""The CLI's progress bar over clips (emo render, emo resume, emo demo)."""

from __future__ import annotations

from emo import progress
from emo.cli_jobs import ClipProgress


def test_a_resumed_render_ends_with_every_clip_done() -> None:
    """Segments reused from checkpoints count as done: a resume that renders only the last
    segment ends at 21/21 clips, not 7/21."""
    bar = ClipProgress()
    with bar:
        progress.segment_done(0, 3, range(0, 7), 21)  # reused
        progress.segment_done(1, 3, range(7, 14), 21)  # reused
        report = progress.reporter(21)
        assert report is not None
        for clip in range(14, 21):
            report(clip, 1, 2)
        (task,) = bar.bar.tasks
        assert task.total == 21 and task.completed == 14 + 7 * 0.5
        progress.segment_done(2, 3, range(14, 21), 21)
        assert task.completed == 21 and task.description == "segment 3/3"
