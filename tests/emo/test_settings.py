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


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("EMO_FPS", "fast", "EMO_FPS"),
        ("EMO_FPS", "0", "EMO_FPS"),
        ("EMO_SEGMENT_SECONDS", "-3", "EMO_SEGMENT_SECONDS"),
        ("EMO_STORE_URL", "ftp://x/y", "EMO_STORE_URL"),
        ("EMO_STORE_URL", "file://relative/dir", "EMO_STORE_URL"),
        ("EMO_STORE_URL", "s3://bucket/prefix", "EMO_S3_ENDPOINT"),
        ("EMO_SAMPLE_RATE", "16001", "EMO_SAMPLE_RATE"),
        ("EMO_S3_SECURE", "maybe", "EMO_S3_SECURE"),
        ("EMO_SLOT_WAIT_SECONDS", "0", "EMO_SLOT_WAIT_SECONDS"),
        ("EMO_SLOT_WAIT_SECONDS", "30", r"EMO_SLOT_WAIT_SECONDS \(30\) must be at least two"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=expected):
        load_settings()


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
