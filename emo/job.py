"""A job's identity and its parameters.

A batch is named by its content (the manifest's bytes and every input's bytes), and a job by
its batch and its name, so the same submit finds the same jobs. ``JobParams`` is every
parameter of a render, resolved from the job's options, the settings and the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from emo.settings import Settings


@dataclass(frozen=True)
class JobParams:
    """Every parameter of a render, resolved (manifest -> batch defaults -> model defaults)."""

    seed: int
    steps: int
    guidance: float
    scheduler: str
    speed: float | list[tuple[float, float]]
    segment_seconds: float
    face_box: tuple[float, float, float, float] | None
    face_policy: str
    format: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_params(
    options: dict[str, Any],
    *,
    job_id: str,
    settings: Settings,
    model_steps: int,
    model_guidance: float,
) -> JobParams:
    """Fill a job's unset options from settings and the model's configuration."""
    box = options.get("face_box")
    return JobParams(
        seed=int(options.get("seed", int(job_id[:12], 16))),
        steps=int(options.get("steps", model_steps)),
        guidance=float(options.get("guidance", model_guidance)),
        scheduler=options.get("scheduler", "ddim"),
        speed=options.get("speed", 0.02),
        segment_seconds=float(options.get("segment_seconds", settings.segment_seconds)),
        face_box=tuple(box) if box else None,
        face_policy=options.get("face_policy", "error"),
        format=options.get("format", "mp4"),
    )


def batch_key(manifest_sha256: str, inputs: Sequence[tuple[str, str, str]]) -> str:
    """A batch's identity: its manifest's bytes and the bytes of every input it names, given
    as (job name, image sha256, audio sha256). Editing an input in place makes a new batch."""
    digest = hashlib.sha256(f"manifest {manifest_sha256}\n".encode())
    for name, image, audio in sorted(inputs):
        digest.update(f"job {json.dumps(name)} image {image} audio {audio}\n".encode())
    return digest.hexdigest()


def job_id_for(batch_key: str, name: str) -> str:
    """A job is named by its batch's content key and its name, so resubmitting the same
    manifest over the same input bytes finds the same job, and new bytes make a new one."""
    return hashlib.sha256(f"{batch_key}:{name}".encode()).hexdigest()[:32]
