"""Map a function over items in worker processes, or inline for one worker.

Workers are *spawned*, not forked: a forked child of a process that has already started
mediapipe's (or torch's) threads can crash in native code, as it did under pytest.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def parallel_map(
    function: Callable[..., Any], items: Sequence[Any], *shared: Any, workers: int = 1
) -> Iterator[Any]:
    """``function(item, *shared)`` for every item, in order, over ``workers`` processes."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield function(item, *shared)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(function, items, *([value] * len(items) for value in shared))
