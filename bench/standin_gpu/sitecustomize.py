"""A stand-in GPU for the farm benchmark (``bench/farm.py --gpu-step-seconds S``).

On this CPU-only machine the "GPU" of a farm is the same two cores that start processes,
load models, encode video and run QC, so the overlap a farm exists for (the next job loads
while the GPUs render) slows the model itself, and the benchmark would measure two cores
contending rather than the dispatch. A GPU's denoising step leaves the CPU free; so here, after
the tiny model's real step, each step also waits ``EMO_BENCH_GPU_STEP_SECONDS`` off the CPU.
The wait is inside the segment's measured model time, as a GPU step would be.

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; only the benchmark's farm
processes have this folder there. The hook wraps ``emo.render.render_segment`` as that module
is first imported (before ``flows.segments`` takes the name); nothing else of emo changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

ENV = "EMO_BENCH_GPU_STEP_SECONDS"
TARGET = "emo.render"


def _slow_steps(render_segment: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``render_segment`` with every denoising step followed by ``seconds`` of waiting."""

    def render(*args: Any, callback: Callable[..., None] | None = None, **kwargs: Any) -> Any:
        def step(*where: Any) -> None:
            time.sleep(seconds)  # the GPU's share of the step: off the CPU
            if callback is not None:
                callback(*where)

        return render_segment(*args, callback=step, **kwargs)

    return render


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then wraps the module's ``render_segment`` (once: the finder
    leaves the import system then)."""

    def __init__(self, real: importlib.abc.Loader, finder: _Finder) -> None:
        self.real, self.finder = real, finder

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        module.render_segment = _slow_steps(module.render_segment, self.finder.seconds)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``emo.render`` as the other finders would, with ``_Loader`` in front."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.looking = seconds, False

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        if name != TARGET or self.looking:
            return None
        self.looking = True  # the lookup below asks every finder, this one too
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.looking = False
        if spec is None or spec.loader is None:
            raise ImportError(f"the stand-in GPU found no {name} to wrap")
        spec.loader = _Loader(spec.loader, self)
        return spec


_seconds = float(os.environ.get(ENV) or 0)
if _seconds > 0:
    sys.meta_path.insert(0, _Finder(_seconds))
