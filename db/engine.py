"""Engine and sessions for PostgreSQL (production, tests) and SQLite (embedded default).

The engine survives a database restart: connections are pre-pinged before use, and opening a
connection is retried a bounded number of times with exponential backoff. On SQLite every
transaction is ``BEGIN IMMEDIATE`` (a single writer at a time, the others wait on
``busy_timeout``), the journal is WAL and foreign keys are enforced.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 5  # about 0.5 + 1 + 2 + 4 = 7.5 s of waiting for a restarting server
CONNECT_BACKOFF_SECONDS = 0.5
SQLITE_BUSY_TIMEOUT_MS = 30_000


def _retry_connect(engine: Engine, attempts: int, backoff: float) -> None:
    """Retry opening a DBAPI connection on transient errors (server restarting, refused)."""
    dbapi_error = engine.dialect.loaded_dbapi.OperationalError

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, conn_rec: Any, cargs: tuple, cparams: dict) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return dialect.loaded_dbapi.connect(*cargs, **cparams)
            except dbapi_error as error:
                if attempt == attempts:
                    raise
                delay = backoff * 2 ** (attempt - 1)
                log.warning(
                    "database connect failed (%s); retry %d in %.1fs", error, attempt, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")


def _configure_sqlite(engine: Engine, foreign_keys: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own handling
        # defers it, which would defeat BEGIN IMMEDIATE).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(
    url: str,
    *,
    connect_attempts: int = CONNECT_ATTEMPTS,
    connect_backoff: float = CONNECT_BACKOFF_SECONDS,
    sqlite_foreign_keys: bool = True,
    **kwargs: Any,
) -> Engine:
    """An engine for ``url`` with pre-ping, connect retries and per-backend settings.

    ``sqlite_foreign_keys=False`` is for migrations only: SQLite alters a table by copying
    and dropping it, and with foreign keys enforced that drop would cascade to every row
    referencing it (a downgrade would empty the segments and leases)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_pre_ping=True, **kwargs)
        _configure_sqlite(engine, sqlite_foreign_keys)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_recycle=1800, **kwargs)
    _retry_connect(engine, connect_attempts, connect_backoff)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (data ops commit themselves)."""
    return sessionmaker(engine, expire_on_commit=False)
