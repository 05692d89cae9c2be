"""What rendering one job needs besides orchestration: inputs, weights, portrait, segments.

The Prefect flows (``flows/``) call these in order; they hold no database or Prefect logic,
so they are testable on their own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from PIL import Image

from emo.errors import MediaError, SettingsError
from emo.face import FaceRegion, face_region
from emo.pipeline import EMOPipeline, MotionState, ProgressCallback
from emo.plan import PlannedSegment, SegmentPlan
from emo.settings import Settings
from emo.store import ObjectStore, open_store
from emo.store.base import is_fresh

SHIPPED_DEMO = Path(__file__).resolve().parent / "weights" / "demo"  # make demo-model


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


# -- inputs --------------------------------------------------------------------------------


def fetch(uri: str, destination: Path, *, base_dir: Path, settings: Settings) -> Path:
    """Copy an input (local path relative to ``base_dir``, ``file://`` or ``s3://``) locally."""
    parsed = urlparse(uri)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if parsed.scheme == "s3":
        store = open_store(f"s3://{parsed.netloc}", settings)
        return store.get_file(parsed.path.lstrip("/"), destination)
    if parsed.scheme == "file":
        source = Path(unquote(parsed.path))
    elif parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # plain or Windows-like path
        source = Path(uri) if Path(uri).is_absolute() else base_dir / uri
    else:
        raise MediaError(f"input {uri!r}: unsupported location; use a path, file:// or s3://")
    if not source.is_file():
        raise MediaError(f"input file {str(source)!r} does not exist")
    shutil.copyfile(source, destination)
    return destination


def prepare_portrait(
    image: np.ndarray, region: FaceRegion, size: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Square crop around the face, resized to ``size``; returns it and the box within it."""
    height, width = image.shape[:2]
    side = min(height, width)
    x0, y0, x1, y1 = region.box
    cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
    left = int(min(max(cx - side / 2, 0), width - side))
    top = int(min(max(cy - side / 2, 0), height - side))
    crop = Image.fromarray(image[top : top + side, left : left + side])
    square = np.array(crop.resize((size, size), Image.Resampling.LANCZOS))
    box = (
        (x0 * width - left) / side,
        (y0 * height - top) / side,
        (x1 * width - left) / side,
        (y1 * height - top) / side,
    )
    return square, tuple(min(max(v, 0.0), 1.0) for v in box)  # type: ignore[return-value]


def portrait_region(image: np.ndarray, params: JobParams, image_name: str) -> FaceRegion:
    return face_region(
        image, image_name=image_name, manual_box=params.face_box, policy=params.face_policy
    )


def speed_schedule(speed: float | Sequence[Sequence[float]], frames: int, fps: int) -> np.ndarray:
    """A per-frame speed array from one level or (time, level) points (linear between)."""
    if isinstance(speed, int | float):
        return np.full(frames, float(speed), dtype=np.float32)
    points = sorted((float(t), float(v)) for t, v in speed)
    times = np.arange(frames) / fps
    return np.interp(times, [t for t, _ in points], [v for _, v in points]).astype(np.float32)


# -- weights and the pipeline ----------------------------------------------------------------


def resolve_weights(settings: Settings) -> Path:
    """The local bundle to use: EMO_WEIGHTS (a path, or an s3:// prefix cached by hash), else
    the shipped demo model."""
    from emo.bundle import BUNDLE_FILE, read_bundle_info

    configured = settings.weights
    if configured and configured.startswith("s3://"):
        return _cached_remote_bundle(configured, settings)
    if configured:
        read_bundle_info(configured)  # a clear error if it is not a bundle
        return Path(configured)
    if not (SHIPPED_DEMO / BUNDLE_FILE).is_file():
        raise SettingsError(
            f"no weights bundle: the demo model is missing from {SHIPPED_DEMO}; set EMO_WEIGHTS "
            "to a bundle (emo weights init, or emo train)"
        )
    return SHIPPED_DEMO


BUNDLES_PREFIX = "bundles"  # store/bundles/<sha256>/: copies of the bundles jobs are pinned to


def bundle_sha256(path: Path) -> str:
    """The content hash a bundle's emo.json records (what jobs pin)."""
    from emo.bundle import read_bundle_info

    return read_bundle_info(path).sha256


def pin_bundle(store: ObjectStore, path: Path) -> str:
    """Keep a copy of the bundle at ``path`` in the store under its hash (emo.json last, so a
    copy interrupted half-way reads as absent); return the hash. Jobs registered with it can
    be resumed after EMO_WEIGHTS moves on."""
    from emo.bundle import BUNDLE_FILE

    sha = bundle_sha256(path)
    prefix = f"{BUNDLES_PREFIX}/{sha}/"
    stored = {info.key: info for info in store.list(prefix)}
    files = {prefix + p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    manifest = prefix + BUNDLE_FILE

    def size(key: str) -> int | None:
        return stored[key].size if key in stored else None

    for key, file in sorted(files.items()):
        if key != manifest and size(key) != file.stat().st_size:  # missing or partial
            store.put_file(key, file)
    # emo.json last; written again when old, so `emo gc` sees the copy is in use again.
    if size(manifest) != files[manifest].stat().st_size or not is_fresh(stored.get(manifest)):
        store.put_file(manifest, files[manifest])
    return sha


def pinned_bundle(settings: Settings, store: ObjectStore, sha: str) -> Path:
    """The local folder of the bundle whose hash is ``sha``: the configured bundle if it is
    that one, else the local cache, else the store's pinned copy (downloaded and verified)."""
    from emo.bundle import BUNDLE_FILE, read_bundle_info

    configured = settings.weights
    if not configured:
        candidate: Path | None = SHIPPED_DEMO
    elif configured.startswith("s3:"):
        candidate = None  # a remote prefix: its copy pinned in the store serves instead
    else:
        candidate = Path(configured)
    found = candidate is not None and (candidate / BUNDLE_FILE).is_file()
    if found and bundle_sha256(candidate) == sha:
        return candidate
    local = settings.home / "weights" / "cache" / sha
    if (local / BUNDLE_FILE).is_file():
        return local
    prefix = f"{BUNDLES_PREFIX}/{sha}/"
    if not store.exists(prefix + BUNDLE_FILE):
        raise SettingsError(
            f"the job is pinned to weights bundle {sha[:12]}, which is neither EMO_WEIGHTS "
            f"nor in the cache or the store ({store.url.rstrip('/')}/{prefix}); `emo resume JOB "
            "--new-weights` renders it again with the current bundle"
        )
    _download_bundle(store, prefix, local)
    read_bundle_info(local)
    return local


def _cached_remote_bundle(uri: str, settings: Settings) -> Path:
    from emo.bundle import BUNDLE_FILE, read_bundle_info

    parsed = urlparse(uri)
    store = open_store(f"s3://{parsed.netloc}", settings)
    prefix = parsed.path.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    sha = json.loads(store.get_bytes(prefix + BUNDLE_FILE))["sha256"]
    local = settings.home / "weights" / "cache" / sha
    if not (local / BUNDLE_FILE).is_file():
        _download_bundle(store, prefix, local)
    read_bundle_info(local)
    return local


def _download_bundle(store: ObjectStore, prefix: str, local: Path) -> None:
    """Download into a staging folder of this process, verify it, then rename it into place.

    The cache may be shared (a volume mounted by every render pod): two pods pulling the
    same bundle each fill their own staging folder; the first rename wins, the other is
    dropped. A staging folder nobody has written to for an hour (its pod was killed) is
    removed; a download is verified before it enters the cache, so a folder removed under a
    slow download can never be cached half-complete.
    """
    from emo.bundle import BUNDLE_FILE, read_bundle_info, verify_bundle

    local.parent.mkdir(parents=True, exist_ok=True)
    for stale in local.parent.glob(f".{local.name}.*.partial"):
        if time.time() - _last_write(stale) > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    staging = local.with_name(f".{local.name}.{uuid.uuid4().hex}.partial")
    try:
        for info in store.list(prefix):
            store.get_file(info.key, staging / info.key[len(prefix) :])
        verify_bundle(read_bundle_info(staging))
        try:
            staging.rename(local)
        except OSError:
            if not (local / BUNDLE_FILE).is_file():  # not another pod's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _last_write(folder: Path) -> float:
    """Newest modification time of a folder and everything in it (0 if it vanished).

    Other pods rename or remove their staging folders at any moment, so this walks with
    os.walk (which skips folders that vanish under it) instead of Path.rglob (which raises).
    """
    newest = 0.0
    for root, _dirs, files in os.walk(folder):
        for name in [None, *files]:
            try:
                stamp = os.stat(root if name is None else os.path.join(root, name)).st_mtime
            except FileNotFoundError:  # another pod removed it meanwhile
                continue
            newest = max(newest, stamp)
    return newest


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


# -- segments --------------------------------------------------------------------------------


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
