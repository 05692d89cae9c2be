"""What a render needs before its first segment: the model, the job's inputs, and its plan.

The weights are the bundle the job is pinned to; the inputs are fetched from the store and
checked against the hashes the job was registered with (what renders is what was submitted);
the plan is a pure function of the audio and the frame layout, stored once, and a stored plan
that differs is refused by name, since checkpoints only hold for the boundaries they were
rendered with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from db.jobs import get_job
from db.segments import store_plan
from emo import media
from emo.bundle import read_bundle_info
from emo.errors import EpochSuperseded, MediaError, SettingsError
from emo.inputs import portrait_region, prepare_portrait
from emo.job import JobParams, resolve_params
from emo.models.config import EMOConfig
from emo.models.speed import speed_schedule
from emo.pipeline import EMOPipeline
from emo.plan import SegmentPlan, plan_change, plan_segments
from emo.render import check_frame_layout, device_and_dtype, load_pipeline
from emo.store.base import sha256_file
from emo.store.weights import bundle_sha256, pinned_bundle, pinned_bundle_info, resolve_weights
from flows.context import JobLease
from flows.job_run import JobRecord
from flows.retry import in_place


@dataclass
class JobInputs:
    """A job's decoded inputs, prepared for the model."""

    portrait: np.ndarray  # (R, R, 3) uint8, square crop around the face
    face_box: tuple[float, float, float, float]  # in portrait coordinates
    face_source: str
    audio: np.ndarray  # (N,) float32 mono at the configured rate
    audio_path: Path  # the original track, muxed into the final video
    speeds: np.ndarray  # (frames,) head speed per frame
    scratch: Path


@dataclass(frozen=True)
class ModelCard:
    """What a job's segments are bound to about the model: its configuration and bundle."""

    config: EMOConfig
    weights_sha256: str | None  # None: a bundle loaded without a recorded hash

    @classmethod
    def of(cls, pipeline: EMOPipeline) -> ModelCard:
        return cls(pipeline.config, pipeline.bundle.sha256 if pipeline.bundle else None)


@task(name="load model", cache_policy=NO_CACHE)
def load_model(lease: JobLease, weights_sha256: str | None) -> EMOPipeline:
    """The job's pinned weights bundle (or, for a job registered before pinning, the configured
    one), loaded once per process; refused if EMO_CLIP_FRAMES/EMO_MOTION_FRAMES disagree."""
    pipeline = in_place(
        lambda: _load_model(lease, weights_sha256), lease=lease, what="loading the weights"
    )
    lease.mark_progress()  # work done while holding the slot counts as progress to waiters
    return pipeline


def _load_model(lease: JobLease, weights_sha256: str | None) -> EMOPipeline:
    settings = lease.svc.settings
    device, dtype = device_and_dtype(settings)
    if weights_sha256 is None:
        path = resolve_weights(settings)
    else:
        path = pinned_bundle(settings, lease.svc.store, weights_sha256)
    pipeline = load_pipeline(
        str(path),
        str(device),
        str(dtype).removeprefix("torch."),
        settings.fps,
        settings.sample_rate,
        bundle_sha256(path),
    )
    found = pipeline.bundle.sha256 if pipeline.bundle else None
    if weights_sha256 is not None and found != weights_sha256:
        raise SettingsError(
            f"the bundle at {path} changed while in use ({str(found)[:12]}, the job is pinned "
            f"to {weights_sha256[:12]}); run the job again"
        )
    check_frame_layout(settings, pipeline.config.clip_frames, pipeline.config.motion_frames)
    return pipeline


@task(name="read model card", cache_policy=NO_CACHE)
def read_model_card(lease: JobLease, weights_sha256: str | None) -> ModelCard:
    """What the job's bundle is (its configuration and hash), read from its ``emo.json``
    without loading, or downloading, its weights: all a finishing run needs of the model."""
    settings, store = lease.svc.settings, lease.svc.store

    def read() -> ModelCard:
        if weights_sha256 is None:
            info = read_bundle_info(resolve_weights(settings))
        else:
            info = pinned_bundle_info(settings, store, weights_sha256)
        return ModelCard(info.config, info.sha256)

    return in_place(read, lease=lease, what="reading the weights bundle's card")


def job_params(lease: JobLease, job: JobRecord, config: EMOConfig) -> JobParams:
    """The job's options, with what it left unset from the settings and the model's defaults."""
    return resolve_params(
        job.options,
        job_id=job.job_id,
        settings=lease.svc.settings,
        model_steps=config.steps,
        model_guidance=config.guidance_scale,
    )


@task(name="load inputs", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def load_inputs(lease: JobLease, job: JobRecord, params: JobParams, resolution: int) -> JobInputs:
    """Fetch the job's inputs from the store, check their hashes, prepare portrait and audio."""
    svc = lease.svc
    with svc.sessions() as session:
        row = get_job(session=session, job_id=job.job_id)
        image_key, audio_key = svc.store.key_of(row.image_uri), svc.store.key_of(row.audio_uri)
    scratch = svc.settings.home / "scratch" / job.job_id
    image_path = svc.store.get_file(image_key, scratch / Path(image_key).name)
    audio_path = svc.store.get_file(audio_key, scratch / Path(audio_key).name)
    for path, key, expected in (
        (image_path, image_key, job.image_sha256),
        (audio_path, audio_key, job.audio_sha256),
    ):
        if expected is not None and sha256_file(path) != expected:
            raise MediaError(
                f"input {svc.store.uri(key)} does not match the hash job {job.job_id} was "
                f"registered with ({expected[:12]}); the store was altered: submit the job again"
            )
    image = media.load_image(image_path)
    region = portrait_region(image, params, Path(image_key).name)
    portrait, box = prepare_portrait(image, region, resolution)
    audio = media.load_audio(audio_path, svc.settings.sample_rate)
    frames = -(-audio.size // svc.settings.samples_per_frame)
    return JobInputs(
        portrait=portrait,
        face_box=box,
        face_source=region.source,
        audio=audio,
        audio_path=audio_path,
        speeds=speed_schedule(params.speed, frames, svc.settings.fps),
        scratch=scratch,
    )


@task(name="plan", cache_policy=NO_CACHE)
def plan_job(
    lease: JobLease, audio: np.ndarray, params: JobParams, clip_frames: int
) -> SegmentPlan:
    """The job's segments: computed from the audio, the bundle's clip length and the settings,
    and stored once (fenced by the epoch); a stored plan that differs is refused."""
    settings = lease.svc.settings
    plan = plan_segments(
        audio,
        sample_rate=settings.sample_rate,
        fps=settings.fps,
        clip_frames=clip_frames,
        segment_seconds=params.segment_seconds,
    )

    def store() -> None:
        with lease.svc.sessions() as session:
            job = get_job(session=session, job_id=lease.job_id)
            if job.plan is not None and job.plan_sha256 != plan.sha256:
                stored = SegmentPlan.from_dict(job.plan)
                raise SettingsError(plan_change(lease.job_id, stored, plan))
            store_plan(
                session=session,
                job_id=lease.job_id,
                plan=plan,
                actor="render-track",
                epoch=lease.epoch,
            )

    try:
        in_place(store, lease=lease, what="storing the plan")
    except EpochSuperseded as error:
        lease.fenced(error)
    return plan
