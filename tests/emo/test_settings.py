"""Settings: embedded defaults need no service; invalid values name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from emo.errors import SettingsError
from emo.settings import load_settings


def test_embedded_defaults_live_under_home(tmp_path: Path) -> None:
    settings = load_settings()
    home = tmp_path / "emo-home"
    assert settings.home == home
    assert settings.resolved_database_url == f"sqlite:///{home / 'emo.db'}"
    assert settings.resolved_store_url == f"file://{home / 'store'}"
    assert (settings.fps, settings.sample_rate, settings.clip_frames) == (25, 16000, None)
    assert (settings.motion_frames, settings.segment_seconds) == (None, 20.0)  # the bundle decides
    assert settings.samples_per_frame == 640


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMO_DATABASE_URL", "postgresql://u@db:5432/emo")
    monkeypatch.setenv("EMO_STORE_URL", "s3://renders/studio-a")
    monkeypatch.setenv("EMO_S3_ENDPOINT", "minio:9000")
    monkeypatch.setenv("EMO_S3_SECURE", "false")
    monkeypatch.setenv("EMO_FPS", "30")
    monkeypatch.setenv("EMO_SAMPLE_RATE", "48000")
    settings = load_settings()
    assert settings.resolved_database_url == "postgresql+psycopg://u@db:5432/emo"
    assert settings.resolved_store_url == "s3://renders/studio-a"
    assert settings.s3_secure is False
    assert settings.samples_per_frame == 1600


def test_emo_settings_hides_the_database_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from emo.cli import app

    monkeypatch.setenv("EMO_DATABASE_URL", "postgresql://studio:pa55-w0rd@db.internal:5432/emo")
    monkeypatch.setenv("EMO_S3_ENDPOINT", "minio:9000")
    monkeypatch.setenv("EMO_S3_ACCESS_KEY", "render-user")
    monkeypatch.setenv("EMO_S3_SECRET_KEY", "s3-s3cr3t-key")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    assert "pa55-w0rd" not in result.output and "s3-s3cr3t-key" not in result.output
    # Still says where it connects, as whom.
    assert "database_url = postgresql://studio:***@db.internal:5432/emo" in result.output
    assert "postgresql+psycopg://studio:***@db.internal:5432/emo" in result.output


# Every setting with a value that cannot work: (variable, value, what the one line says).
BAD_SETTINGS = [
    ("EMO_DATABASE_URL", "postgres at db.internal", "not a database URL"),
    ("EMO_STORE_URL", "ftp://files/emo", "must start with file:// or s3://"),
    ("EMO_STORE_URL", "s3://", "s3:// URLs need a bucket"),
    ("EMO_STORE_URL", "file://relative/dir", "file:// URLs need an absolute path"),
    ("EMO_STORE_URL", "s3://bucket/prefix", "EMO_S3_ENDPOINT must be set"),
    ("EMO_S3_ENDPOINT", "http://minio:9000", "give host:port"),
    ("EMO_S3_ENDPOINT", "minio:9000/emo", "give host:port"),
    ("EMO_S3_ENDPOINT", "minio:99999", "give host:port"),
    ("EMO_S3_PUBLIC_ENDPOINT", "ftp://files.studio.com", "give host:port or https://host"),
    ("EMO_S3_SECURE", "maybe", "valid boolean"),
    ("EMO_LINK_SECONDS", "10", "greater than or equal to 60"),
    ("EMO_STORE_RETRIES", "-1", "greater than or equal to 0"),
    ("EMO_STORE_BACKOFF_SECONDS", "nan", "finite number"),
    ("EMO_FPS", "twenty-five", "valid integer"),
    ("EMO_FPS", "0", "greater than or equal to 1"),
    ("EMO_SAMPLE_RATE", "16001", "must be a multiple of EMO_FPS"),
    ("EMO_CLIP_FRAMES", "0", "greater than or equal to 1"),
    ("EMO_MOTION_FRAMES", "-2", "greater than or equal to 0"),
    ("EMO_SEGMENT_SECONDS", "inf", "finite number"),
    ("EMO_SEGMENT_SECONDS", "-3", "greater than 0"),
    ("EMO_DISPATCH", "kubernetes", "'inline' or 'deployment'"),
    ("EMO_RENDER_DEPLOYMENT", "render-track", "flow-name/deployment-name"),
    ("EMO_FINISH_DEPLOYMENT", "finish-job", "flow-name/deployment-name, or leave it empty"),
    ("EMO_GPU_SLOTS", "0", "greater than or equal to 1"),
    ("EMO_HOST_GPU_SLOTS", "0", "greater than or equal to 1"),
    ("EMO_DISPATCH_LOOKAHEAD", "-1", "greater than or equal to 0"),
    ("EMO_SLOT_WAIT_SECONDS", "0", "greater than 0"),
    ("EMO_SLOT_WAIT_SECONDS", "30", "EMO_SLOT_WAIT_SECONDS (30) must be at least two lease"),
    ("EMO_LEASE_SECONDS", "nan", "finite number"),
    ("EMO_MAX_ATTEMPTS", "3.5", "valid integer"),
    ("EMO_SWEEP_GRACE_SECONDS", "-5", "greater than or equal to 0"),
    ("EMO_TRANSIENT_RETRY_SECONDS", "forever", "valid number"),
    ("EMO_MAX_TRACK_SECONDS", "0", "greater than or equal to 1"),
    ("EMO_MAX_STEPS", "5000", "less than or equal to 1000"),
    ("EMO_MAX_IMAGE_PIXELS", "lots", "valid integer"),
    ("EMO_INPUT_ROOTS", "/srv/shared:relative/dir", "'relative/dir' is not an absolute folder"),
    ("EMO_INPUT_BUCKETS", "emo,Studio_Files", "'Studio_Files' is not a bucket name"),
    ("EMO_DEVICE", "gpu", "use auto, cpu, cuda, cuda:N or mps"),
    ("EMO_PRECISION", "fp8", "'auto', 'float32', 'bfloat16' or 'float16'"),
    ("EMO_QC_MAX_SEAM_JITTER", "0", "greater than 0"),
    ("EMO_QC_MIN_IDENTITY", "nan", "finite number"),
    ("EMO_QC_MIN_SYNC", "2", "less than or equal to 1"),
]


@pytest.mark.parametrize(("variable", "value", "message"), BAD_SETTINGS)
def test_a_bad_setting_is_one_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    text = str(caught.value)
    assert text.startswith(f"invalid setting: {variable}") or variable in text, text
    assert message in text and "\n" not in text, text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EMO_S3_ENDPOINT", "minio.emo.svc:9000"),
        ("EMO_S3_ENDPOINT", "[::1]:9000"),
        ("EMO_S3_ENDPOINT", "emo_minio:9000"),  # a compose service name
        ("EMO_S3_ENDPOINT", "[fe80::1%eth0]:9000"),
        ("EMO_GPU_CLASS", "rtx4090"),
        ("EMO_S3_PUBLIC_ENDPOINT", "https://files.studio.com"),
        ("EMO_DEVICE", "cuda:1"),
        ("EMO_DATABASE_URL", "postgresql://emo:secret@db:5432/emo"),
        ("EMO_INPUT_ROOTS", ""),
        ("EMO_INPUT_BUCKETS", "emo, studio.files"),
    ],
)
def test_good_values_are_taken(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    load_settings()


def test_the_cli_prints_a_bad_setting_as_one_line() -> None:
    from tests.conftest import emo_in_process

    result = emo_in_process("settings", env={"EMO_DEVICE": "gpu"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: invalid setting: EMO_DEVICE: use auto, cpu, cuda, cuda:N or mps"
    ]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://emo:ab/cd@db/emo", "postgresql+psycopg://emo:***@db/emo"),
        ("postgresql://emo:p@ss:w@db:5432/emo", "postgresql://emo:***@db:5432/emo"),
        ("postgresql://db/emo?password=hunter2", "postgresql://db/emo?password=%2A%2A%2A"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
    ],
)
def test_passwords_are_hidden_however_they_are_written(url: str, shown: str) -> None:
    from emo.settings import hide_password

    assert hide_password(url) == shown


def test_emo_ffmpeg_must_be_an_executable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A path that is not an executable (a typo, a file without its x bit) is named at load,
    not found as a traceback at the first decode."""
    plain = tmp_path / "ffmpeg"
    plain.write_text("#!/bin/sh\n")
    monkeypatch.setenv("EMO_FFMPEG", str(plain))
    with pytest.raises(SettingsError, match=r"EMO_FFMPEG: .*ffmpeg' is not an executable ffmpeg"):
        load_settings()
    plain.chmod(0o755)
    assert load_settings().ffmpeg == str(plain)
