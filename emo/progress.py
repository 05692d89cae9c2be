"""Progress of a render, for whoever is watching (the CLI's progress bar).

The render flow reports through these functions; the CLI installs a listener. Without one
they do nothing, so flows running in a worker pay nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Listener(Protocol):
    def step(self, clip: int, step: int, steps: int, total_clips: int) -> None: ...
    def segment(self, index: int, total: int, clips: range, total_clips: int) -> None: ...
    def waiting(self, message: str) -> None: ...


_listener: Listener | None = None


def listen(listener: Listener | None) -> None:
    """Install (or remove, with None) the process's progress listener."""
    global _listener
    _listener = listener


def reporter(total_clips: int) -> Callable[[int, int, int], None] | None:
    """A pipeline callback (clip, step, steps) forwarding to the listener, or None."""
    listener = _listener
    if listener is None:
        return None
    return lambda clip, step, steps: listener.step(clip, step, steps, total_clips)


def segment_done(index: int, total: int, clips: range, total_clips: int) -> None:
    """Segment ``index`` of ``total`` is verified (rendered now, or reused from a checkpoint):
    its ``clips`` of the track's ``total_clips`` are done."""
    if _listener is not None:
        _listener.segment(index, total, clips, total_clips)


def waiting(message: str) -> None:
    """The render is waiting for something (a GPU slot); ``message`` says for what."""
    if _listener is not None:
        _listener.waiting(message)
