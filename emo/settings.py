"""Settings: one ``Settings`` object, read from ``EMO_*`` environment variables.

Embedded defaults need no running service: a SQLite file and a local object-store directory
under the data directory (``EMO_HOME``, default ``~/.emo``). Production sets
``EMO_DATABASE_URL`` (PostgreSQL), ``EMO_STORE_URL=s3://bucket/prefix`` with the
``EMO_S3_*`` endpoint and credentials, and ``EMO_WEIGHTS``.

An invalid value raises ``SettingsError`` naming the environment variable, at start-up.
"""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from emo.errors import SettingsError

ENV_PREFIX = "EMO_"
# host[:port]: names (underscores as in compose service names), IPv4, [IPv6] (zone ids too)
ENDPOINT = re.compile(
    r"([A-Za-z0-9_.-]+|\[[0-9a-fA-F:.]+(%[A-Za-z0-9_.-]+)?\])"
    r"(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
)
# Settings that are one word of a small language: (pattern, what to give instead).
PATTERNS = {
    "device": (r"auto|cpu|mps|cuda(:\d+)?", "use auto, cpu, cuda, cuda:N or mps"),
    "render_deployment": (r"[^/\s]+/[^/\s]+", "give the deployment as flow-name/deployment-name"),
    "finish_deployment": (
        r"([^/\s]+/[^/\s]+)?",
        "give the deployment as flow-name/deployment-name, or leave it empty",
    ),
}
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# How often a render waiting for a GPU slot asks again: a freed slot idles until its next
# holder asks, up to this long at every hand-over (a job's end, a segment's when giving way).
SLOT_POLL_SECONDS = 0.5


def hide_password(value: str) -> str:
    """``value`` with the password of a ``scheme://user:password@host/...`` URL (or a
    ``password=`` query parameter) replaced by ``***``; anything else unchanged. For printing
    settings and URLs anywhere."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if "://" not in value:
        return value
    try:  # SQLAlchemy's own parser: a password may hold '/', '@' or ':'
        url = make_url(value)
    except (ArgumentError, ValueError):
        url = None
    if url is not None and (url.password or "password" in url.query):
        query = {k: ("***" if k == "password" else v) for k, v in url.query.items()}
        return url.set(query=query).render_as_string(hide_password=True)
    scheme, _, rest = value.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return value
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"


class Settings(BaseSettings):
    """Every knob of emo; each field ``x`` is read from ``EMO_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, allow_inf_nan=False
    )

    home: Path = Field(Path("~/.emo"), description="data directory; embedded defaults live here")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in home")
    store_url: str | None = Field(None, description="file:///dir or s3://bucket/prefix")
    s3_endpoint: str | None = Field(None, description="host:port of the S3/MinIO server")
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = Field(True, description="use TLS to reach the S3 endpoint")
    s3_region: str | None = None
    s3_public_endpoint: str | None = Field(
        None,
        description="address users reach the store at (host:port, or https://host); download "
        "links are signed for it",
    )
    link_seconds: int = Field(
        86400, ge=60, le=7 * 86400, description="lifetime of download links in artifacts"
    )
    store_retries: int = Field(5, ge=0, le=20, description="retries of a transient store failure")
    store_backoff_seconds: float = Field(0.5, gt=0, le=60, description="first retry delay")
    weights: str | None = Field(None, description="bundle directory or s3:// prefix")
    ffmpeg: str | None = Field(None, description="ffmpeg binary; default imageio-ffmpeg's")
    fps: int = Field(25, ge=1, le=120)
    sample_rate: int = Field(16000, ge=8000, le=192000)
    # The weights bundle decides the frame layout (f and n in the paper); these only assert it:
    # a render whose bundle disagrees is refused at start, naming both.
    clip_frames: int | None = Field(
        None, ge=1, le=256, description="expected f; default the bundle's"
    )
    motion_frames: int | None = Field(
        None, ge=0, le=64, description="expected n; default the bundle's"
    )
    segment_seconds: float = Field(20.0, gt=0, le=3600)
    dispatch: Literal["inline", "deployment"] = Field(
        "inline", description="render jobs as subflows, or via the render-track deployment"
    )
    render_deployment: str = Field("render-track/render-track", description="deployment name")
    finish_deployment: str = Field(
        "finish-job/finish-job",
        description="deployment a render hands its job's finishing to, on the CPU pool (empty: "
        "the render finishes the job itself)",
    )
    gpu_slots: int = Field(
        1, ge=1, le=1024, description="GPU limit a new job database starts with (`emo slots`)"
    )
    host_gpu_slots: int | None = Field(
        None,
        ge=1,
        le=64,
        description="GPUs of this host: its renders never hold more slots at once, so a GPU "
        "worker may take more runs than GPUs (the extra ones load while the GPUs render)",
    )
    dispatch_lookahead: int = Field(
        1,
        ge=0,
        le=1024,
        description="render runs dispatched beyond the GPU slots: they fetch their inputs and "
        "load the model while the slots render, so a freed slot is taken at once",
    )
    slot_wait_seconds: float = Field(
        600.0,
        gt=0,
        le=7 * 86400,
        description="give up waiting for a GPU slot after this long without progress",
    )
    lease_seconds: float = Field(60.0, ge=1, le=3600, description="job lease time to live")
    max_attempts: int = Field(3, ge=1, le=100, description="default attempts per job")
    sweep_grace_seconds: float = Field(
        120.0,
        ge=0,
        le=86400,
        description="the sweep leaves a job alone this long after its dispatch (or creation)",
    )
    transient_retry_seconds: float = Field(
        900.0,
        ge=0,
        le=86400,
        description="a render retries an unreachable database or store in place this long",
    )
    max_track_seconds: float = Field(
        3600.0, ge=1, le=7 * 86400, description="longest vocal track a batch may submit"
    )
    max_steps: int = Field(200, ge=1, le=1000, description="most denoising steps a job may ask")
    max_image_pixels: int = Field(
        50_000_000, ge=1, le=2_000_000_000, description="largest portrait (width x height)"
    )
    input_roots: str | None = Field(
        None,
        description="folders (':'-separated) local inputs may come from; unset: anywhere, "
        "empty: none",
    )
    input_buckets: str | None = Field(
        None,
        description="buckets (','-separated) s3:// inputs may come from; unset: any, empty: none",
    )
    gpu_class: Literal[
        "b200", "h200", "h100", "a100", "l40s", "a6000", "rtx4090", "a10g", "l4", "cpu"
    ] = Field("h100", description="the GPUs estimates are made for (emo/cost.py)")
    max_batch_gpu_hours: float = Field(
        100.0, gt=0, le=1_000_000, description="a batch estimated above this is refused"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, mps")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    qc_max_seam_jitter: float = Field(1.3, gt=0, description="QC warning above this")
    qc_min_identity: float = Field(0.8, ge=-1, le=1, description="QC warning below this")
    qc_min_sync: float = Field(0.2, ge=-1, le=1, description="QC warning below this")

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("database_url", mode="after")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a database URL; use postgresql://user:password@host:5432/emo or "
                "sqlite:////abs/path/emo.db"
            ) from None
        return value

    @field_validator("ffmpeg", mode="after")
    @classmethod
    def _check_ffmpeg(cls, value: str | None) -> str | None:
        found = shutil.which(value) if value else None
        if value and found is None:
            raise ValueError(
                f"{value!r} is not an executable ffmpeg; give the path of an ffmpeg binary, "
                "or unset it to use the bundled one"
            )
        return found

    @field_validator("s3_endpoint", mode="after")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not ENDPOINT.fullmatch(value):
            raise ValueError("give host:port (no scheme, no path), e.g. minio:9000")
        return value

    @field_validator("s3_public_endpoint", mode="after")
    @classmethod
    def _check_public_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            bare = value.split("://", 1)[1] if value.startswith(("http://", "https://")) else value
            if not ENDPOINT.fullmatch(bare.rstrip("/")):
                raise ValueError("give host:port or https://host, e.g. https://files.studio.com")
        return value

    @field_validator("device", "render_deployment", "finish_deployment", mode="after")
    @classmethod
    def _check_pattern(cls, value: str, info: ValidationInfo) -> str:
        pattern, fix = PATTERNS[info.field_name]
        if not re.fullmatch(pattern, value):
            raise ValueError(fix)
        return value

    @field_validator("input_roots", mode="after")
    @classmethod
    def _check_roots(cls, value: str | None) -> str | None:
        for root in (value or "").split(":"):
            if root.strip() and not Path(root.strip()).is_absolute():
                raise ValueError(f"{root.strip()!r} is not an absolute folder")
        return value

    @field_validator("input_buckets", mode="after")
    @classmethod
    def _check_buckets(cls, value: str | None) -> str | None:
        for bucket in (value or "").split(","):
            if bucket.strip() and not BUCKET.fullmatch(bucket.strip()):
                raise ValueError(f"{bucket.strip()!r} is not a bucket name")
        return value

    @field_validator("store_url", mode="after")
    @classmethod
    def _check_store_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("file", "s3"):
            raise ValueError("must start with file:// or s3://")
        if parsed.scheme == "s3" and not parsed.netloc:
            raise ValueError("s3:// URLs need a bucket: s3://bucket/prefix")
        if parsed.scheme == "file" and (
            parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/")
        ):
            raise ValueError("file:// URLs need an absolute path: file:///srv/emo/store")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.sample_rate % self.fps:
            raise ValueError(
                f"EMO_SAMPLE_RATE ({self.sample_rate}) must be a multiple of EMO_FPS ({self.fps}) "
                "so that every frame covers a whole number of audio samples"
            )
        least_wait = 2 * self.heartbeat_seconds + SLOT_POLL_SECONDS
        if self.slot_wait_seconds < least_wait:
            raise ValueError(
                f"EMO_SLOT_WAIT_SECONDS ({self.slot_wait_seconds:g}) must be at least two "
                f"lease heartbeats and a poll ({least_wait:g} s with EMO_LEASE_SECONDS "
                f"{self.lease_seconds:g}): renders report their progress at each heartbeat"
            )
        if self.store_url and self.store_url.startswith("s3://") and not self.s3_endpoint:
            raise ValueError("EMO_S3_ENDPOINT must be set when EMO_STORE_URL is an s3:// URL")
        return self

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under the data directory."""
        url = self.database_url or f"sqlite:///{self.home / 'emo.db'}"
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @property
    def resolved_store_url(self) -> str:
        """The object-store URL, defaulting to a directory under the data directory."""
        return self.store_url or f"file://{self.home / 'store'}"

    @property
    def heartbeat_seconds(self) -> float:
        """How often a render renews its lease: a third of its time to live."""
        return self.lease_seconds / 3

    @property
    def samples_per_frame(self) -> int:
        """Audio samples covered by one video frame (exact by construction)."""
        return self.sample_rate // self.fps


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{name}: {message}" if field else message)
    return "invalid setting: " + "; ".join(problems)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (and overrides); raise ``SettingsError`` if invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once (``get_settings.cache_clear()`` re-reads)."""
    return load_settings()
