"""Alembic revisions upgrade and downgrade cleanly on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from db import migrate
from db.engine import make_engine
from db.models import Base
from tests.services import pg_create_database, pg_drop_database

TABLES = {"batches", "jobs", "segments", "leases", "gpu_limits", "events"}


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    url = pg_create_database()
    yield url
    pg_drop_database(url)


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db: str) -> None:
    migrate.upgrade(empty_db)
    assert _tables(empty_db) == TABLES
    assert migrate.current_revision(empty_db) == migrate.head_revision()

    migrate.downgrade(empty_db, "base")
    assert _tables(empty_db) == set()
    assert migrate.current_revision(empty_db) is None

    migrate.upgrade(empty_db)
    assert _tables(empty_db) == TABLES


def test_models_match_migrations(empty_db: str) -> None:
    """The revisions create exactly what the models describe (nothing left to autogenerate)."""
    migrate.upgrade(empty_db)
    engine = make_engine(empty_db)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_cli_upgrade_and_downgrade(empty_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from emo.cli import app
    from emo.settings import get_settings

    monkeypatch.setenv("EMO_DATABASE_URL", empty_db)
    get_settings.cache_clear()
    runner = CliRunner()
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert f"revision {migrate.head_revision()}" in result.output
    assert _tables(empty_db) == TABLES
    result = runner.invoke(app, ["db", "downgrade", "base"])
    assert result.exit_code == 0, result.output
    assert _tables(empty_db) == set()


def test_upgrade_applies_the_gpu_limit_only_when_set(
    empty_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployment's migration Job is where EMO_GPU_SLOTS takes effect (renders never)."""
    from typer.testing import CliRunner

    from db.engine import session_factory
    from db.gpu_slots import gpu_limit
    from emo.cli import app
    from emo.settings import get_settings

    def upgrade(slots: str | None) -> str:
        if slots is None:
            monkeypatch.delenv("EMO_GPU_SLOTS", raising=False)
        else:
            monkeypatch.setenv("EMO_GPU_SLOTS", slots)
        get_settings.cache_clear()
        result = CliRunner().invoke(app, ["db", "upgrade"])
        assert result.exit_code == 0, result.output
        return result.output

    monkeypatch.setenv("EMO_DATABASE_URL", empty_db)
    assert "GPU limit" not in upgrade(None)
    assert "GPU limit: none -> 4" in upgrade("4")
    assert "GPU limit: 4 -> 6" in upgrade("6")
    assert "GPU limit" not in upgrade(None)
    engine = make_engine(empty_db)
    with session_factory(engine)() as session:
        assert gpu_limit(session=session) == 6
    engine.dispose()


def test_downgrading_keeps_the_rows_of_other_tables(empty_db: str) -> None:
    """SQLite alters a table by copying and dropping it; with foreign keys enforced that drop
    would cascade, and a downgrade of a jobs column would empty segments and leases."""
    from sqlalchemy import text

    migrate.upgrade(empty_db)
    engine = make_engine(empty_db)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO batches (id, name, manifest_sha256, submitted_by, created_at) "
                    "VALUES ('b', 'b', 'k', 't', CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO jobs (id, batch_id, name, status, priority, attempt, "
                    "max_attempts, image_uri, audio_uri, params, created_at, updated_at) "
                    "VALUES ('j', 'b', 'j', 'running', 0, 1, 3, 'i', 'a', '{}', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    'INSERT INTO segments (job_id, "index", frame_start, frame_end, sample_start, '
                    "sample_end, clip_count, status) VALUES ('j', 0, 0, 12, 0, 7680, 1, 'done')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO leases (job_id, owner, acquired_at, heartbeat_at, expires_at) "
                    "VALUES ('j', 'o', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
        migrate.downgrade(empty_db, "0004")
        migrate.downgrade(empty_db, "0001")
        with engine.connect() as connection:
            for table in ("jobs", "segments", "leases"):
                count = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
                assert count == 1, table
    finally:
        engine.dispose()
