"""Training samples streamed from a prepared dataset (see ``emo.training.prepare``).

Shards are visited in a random order and one shard is held in memory at a time; from each,
``samples_per_shard`` windows are drawn: ``frames`` consecutive frames (n motion frames + f
clip frames, or 1 for stage 1), a reference frame from elsewhere in the same video, the audio
those frames need (with the model's window and context), their speeds and face boxes. The
sampler is seeded by (seed, first step, worker), so a resumed run does not replay old data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from emo.errors import InputError
from emo.models.audio import frames_audio


@dataclass(frozen=True)
class WindowSpec:
    """What one sample holds, in frames, and how its audio is cut."""

    frames: int  # consecutive frames per sample (n + f, or 1)
    window: int  # m: audio/speed neighbours either side of a frame
    context: int  # frames of extra audio context either side for wav2vec2
    spf: int  # audio samples per frame


def read_index(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise InputError(f"{root} is not a prepared dataset (no dataset.json); run emo prepare")
    index = json.loads(path.read_text())
    if not index["shards"]:
        raise InputError(f"dataset {root} holds no videos")
    return index


class WindowSampler(IterableDataset):
    """Endless stream of training windows; every item is a dict of numpy arrays."""

    def __init__(
        self,
        root: Path,
        spec: WindowSpec,
        *,
        seed: int,
        samples_per_shard: int = 16,
    ) -> None:
        self.root, self.spec, self.seed = root, spec, seed
        self.samples_per_shard = samples_per_shard
        index = read_index(root)
        self.shards = [s["name"] for s in index["shards"] if s["frames"] >= spec.frames + 1]
        if not self.shards:
            raise InputError(f"no video in {root} has the {spec.frames + 1} frames a sample needs")

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, worker.id if worker else 0])
        while True:
            for name in rng.permutation(self.shards):
                with np.load(self.root / "shards" / f"{name}.npz") as shard:
                    data = {k: shard[k] for k in shard.files}
                for _ in range(self.samples_per_shard):
                    yield self.sample(data, rng)

    def sample(self, data: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        spec = self.spec
        total = len(data["frames"])
        start = int(rng.integers(0, total - spec.frames + 1))
        outside = [i for i in range(total) if not start <= i < start + spec.frames]
        reference = int(rng.choice(outside))  # another frame of the same video
        span = slice(start, start + spec.frames)
        speeds = np.pad(data["speed"], spec.window, mode="edge")[
            start : start + spec.frames + 2 * spec.window
        ]
        return {
            "frames": data["frames"][span],  # (T, R, R, 3) uint8
            "reference": data["frames"][reference],  # (R, R, 3) uint8
            "boxes": data["boxes"][span],  # (T, 4) face boxes, fractions
            "speeds": np.lib.stride_tricks.sliding_window_view(speeds, 2 * spec.window + 1),
            "audio": frames_audio(
                data["audio"],
                start=start,
                frames=spec.frames,
                spf=spec.spf,
                window=spec.window,
                context=spec.context,
            ),
        }


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of samples into tensors with a leading batch axis."""
    return {k: torch.from_numpy(np.stack([item[k] for item in items])) for k in items[0]}
