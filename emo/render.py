"""The model on its device: device and precision, the pipeline cache, one segment's frames.

The Prefect flows (``flows/``) call these; they hold no database or Prefect logic, so they are
testable on their own.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from emo.errors import SettingsError
from emo.job import JobParams
from emo.pipeline import EMOPipeline, MotionState, ProgressCallback
from emo.plan import PlannedSegment, SegmentPlan
from emo.settings import Settings


def check_frame_layout(settings: Settings, clip_frames: int, motion_frames: int) -> None:
    """The bundle decides f and n; EMO_CLIP_FRAMES / EMO_MOTION_FRAMES, if set, must agree."""
    for name, wanted, actual in (
        ("EMO_CLIP_FRAMES", settings.clip_frames, clip_frames),
        ("EMO_MOTION_FRAMES", settings.motion_frames, motion_frames),
    ):
        if wanted is not None and wanted != actual:
            raise SettingsError(
                f"{name} is {wanted}, but the weights bundle was trained with {actual}; "
                f"unset {name} (the bundle decides) or use a bundle made for {wanted}"
            )


def device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """EMO_DEVICE / EMO_PRECISION, with 'auto' picking CUDA + bf16 (fp16 if unsupported)."""
    name = settings.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(
            f"EMO_DEVICE: {name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError("EMO_DEVICE asks for CUDA, but no CUDA device is available")
    precision = settings.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            precision = "float32"
    return device, getattr(torch, precision)


def release_cached_memory() -> None:
    """Hand the memory CUDA's caching allocator keeps back to the device: a render that gave
    its GPU slot away keeps its weights loaded, not its activations' cache, while another
    render uses the GPU (a no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=2)
def load_pipeline(
    path: str, device: str, dtype: str, fps: int, sample_rate: int, sha256: str | None = None
) -> EMOPipeline:
    """One pipeline per bundle and device in a process (weights load once per flow run).

    ``sha256`` (the bundle's hash) is part of the cache key, so a bundle replaced in place at
    the same path is loaded again rather than served from the cache."""
    return EMOPipeline.from_bundle(
        path, device=device, dtype=getattr(torch, dtype), fps=fps, sample_rate=sample_rate
    )


def render_segment(
    pipeline: EMOPipeline,
    *,
    portrait: np.ndarray,
    face_box: tuple[float, float, float, float],
    audio: np.ndarray,
    speeds: np.ndarray,
    plan: SegmentPlan,
    segment: PlannedSegment,
    params: JobParams,
    motion_state: MotionState | None,
    callback: ProgressCallback | None = None,
) -> tuple[np.ndarray, MotionState]:
    """The frames of one segment (padding of the track's last clip dropped) and the state."""
    clips = range(segment.clip_start, segment.clip_start + segment.clip_count)
    out = pipeline(
        portrait,
        audio,
        clips=clips,
        face_box=face_box,
        speed=speeds,
        seed=params.seed,
        steps=params.steps,
        guidance_scale=params.guidance,
        scheduler=params.scheduler,
        motion_state=motion_state,
        callback=callback,
    )
    return out.frames[: segment.frames], out.motion_state
