"""The engine survives a database restart: dead pooled connections and refused connects."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from db.engine import make_engine
from tests.services import free_port


def test_pooled_connection_killed_by_the_server_is_replaced(pg_url: str) -> None:
    """What a PostgreSQL restart does to a pool: every open connection dies."""
    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    with engine.connect() as connection:
        first_pid = connection.execute(text("select pg_backend_pid()")).scalar_one()
    admin = make_engine(pg_url)
    with admin.connect() as connection:
        connection.execute(text("select pg_terminate_backend(:pid)"), {"pid": first_pid})
        connection.commit()
    admin.dispose()
    with engine.connect() as connection:  # pre-ping notices the dead one and reconnects
        assert connection.execute(text("select pg_backend_pid()")).scalar_one() != first_pid
    engine.dispose()


def test_connect_retries_are_bounded() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    engine = make_engine(url, connect_attempts=3, connect_backoff=0.1)
    started = time.monotonic()
    with pytest.raises(OperationalError):
        engine.connect()
    assert time.monotonic() - started >= 0.1 + 0.2  # two waits between three attempts
    engine.dispose()
