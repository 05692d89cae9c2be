"""The S3 server stops mid-run and comes back: retried writes succeed; a dead one is named."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from emo.errors import StoreUnavailable
from tests.services import WeedServer


@pytest.fixture
def own_weed(tmp_path: Path):
    """A server this test may stop and restart (the session one stays up for the others)."""
    server = WeedServer(tmp_path / "weed")
    server.start()
    yield server
    server.stop()


@pytest.mark.slow  # an S3 server restarted
def test_put_is_retried_across_a_server_restart(own_weed: WeedServer, tmp_path: Path) -> None:
    store = own_weed.s3_store(prefix="p", retries=8, backoff_seconds=0.5)
    store.ensure_bucket()
    store.put_bytes("before", b"1")

    own_weed.stop()
    restarted = threading.Event()
    stop = threading.Event()  # set when the put has ended, so the thread never starts weed late

    def restart_later() -> None:
        if not stop.wait(2.0):
            own_weed.start(wait=False)
            restarted.set()

    thread = threading.Thread(target=restart_later)
    thread.start()
    started = time.monotonic()
    payload = tmp_path / "segment.mp4"
    payload.write_bytes(b"segment" * 10_000)
    try:
        store.put_file("jobs/j/segments/00000/r/video.mp4", payload)  # blocks through the outage
    finally:
        stop.set()
        thread.join()  # before the fixture stops the server
    assert restarted.is_set() and time.monotonic() - started >= 2.0
    assert store.get_bytes("jobs/j/segments/00000/r/video.mp4") == payload.read_bytes()
    assert store.get_bytes("before") == b"1"


def test_unreachable_server_names_the_endpoint(own_weed: WeedServer) -> None:
    endpoint = own_weed.endpoint
    own_weed.stop()
    store = own_weed.s3_store(access_key="a", secret_key="b", retries=2, backoff_seconds=0.05)
    with pytest.raises(StoreUnavailable, match=f"{endpoint}.*3 attempts"):
        store.put_bytes("k", b"v")
