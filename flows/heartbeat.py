"""A daemon thread that renews something (a job lease, a GPU slot) at a fixed interval."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Heartbeat:
    """Call ``beat`` every ``interval`` seconds until ``stop()``, or until ``beat`` returns
    False (what it renews is gone; the owner learns that through its own flag)."""

    def __init__(self, beat: Callable[[], bool], interval: float, name: str) -> None:
        self.beat, self.interval = beat, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.beat():
                return

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
