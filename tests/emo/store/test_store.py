"""Object store round trips on the local directory backend and a real S3 server."""

from __future__ import annotations

from pathlib import Path
from urllib.request import urlopen

import pytest

from emo.errors import ObjectNotFound, StoreAuthError, StoreError
from emo.settings import load_settings
from emo.store import LocalStore, ObjectStore, S3Store, open_store
from emo.store.local import TEMP_MARK
from tests.services import WeedServer


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return LocalStore(tmp_path / "store")
    store = request.getfixturevalue("weed").s3_store(prefix="studio/run")
    store.ensure_bucket()
    return store


def test_round_trips(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "clip.bin"
    source.write_bytes(b"\x00\x01" * 100_000)
    info = store.put_file("jobs/j1/inputs/clip.bin", source)
    assert info.size == 200_000
    store.put_bytes("jobs/j1/qc.json", b'{"ok": true}')

    assert store.get_bytes("jobs/j1/qc.json") == b'{"ok": true}'
    target = store.get_file("jobs/j1/inputs/clip.bin", tmp_path / "out" / "clip.bin")
    assert target.read_bytes() == source.read_bytes()
    assert store.exists("jobs/j1/qc.json") and not store.exists("jobs/j1/nothing")
    assert store.stat("jobs/j1/inputs/clip.bin").size == 200_000
    import hashlib

    assert (
        store.sha256("jobs/j1/inputs/clip.bin") == hashlib.sha256(source.read_bytes()).hexdigest()
    )
    with pytest.raises(ObjectNotFound):
        store.get_bytes("jobs/j1/nothing")
    with pytest.raises(ObjectNotFound):
        store.stat("jobs/j1/nothing")
    store.delete("jobs/j1/qc.json")
    assert not store.exists("jobs/j1/qc.json")


def test_listing_is_recursive_sorted_and_prefix_bound(store: ObjectStore) -> None:
    for key in [
        "jobs/b/x",
        "jobs/a/segments/00001/m",
        "jobs/a/segments/00000/m",
        "jobsX/z",
        "inbox/new.yaml",
    ]:
        store.put_bytes(key, key.encode())
    assert [i.key for i in store.list("jobs/a/")] == [
        "jobs/a/segments/00000/m",
        "jobs/a/segments/00001/m",
    ]
    assert [i.key for i in store.list("jobs/")] == [
        "jobs/a/segments/00000/m",
        "jobs/a/segments/00001/m",
        "jobs/b/x",
    ]
    assert len(list(store.list())) == 5
    assert list(store.list("nothing/")) == []


def test_url_opens_the_object(store: ObjectStore) -> None:
    store.put_bytes("jobs/j/final.mp4", b"video bytes")
    with urlopen(store.url_for("jobs/j/final.mp4", expires_seconds=600)) as response:
        assert response.read() == b"video bytes"


def test_links_are_signed_for_the_public_address_and_last_a_day(
    weed: WeedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Users reach the store at another address than the workers (here the same server by
    the name localhost): a link signed for it opens there, and lasts EMO_LINK_SECONDS."""
    from urllib.parse import parse_qs, urlparse

    inner = weed.s3_store(prefix="links")
    inner.ensure_bucket()
    port = weed.endpoint.rsplit(":", 1)[1]
    for name, value in {
        "EMO_STORE_URL": f"s3://{inner.bucket}/links",
        "EMO_S3_ENDPOINT": weed.endpoint,
        "EMO_S3_PUBLIC_ENDPOINT": f"http://localhost:{port}",
        "EMO_S3_ACCESS_KEY": weed.access_key,
        "EMO_S3_SECRET_KEY": weed.secret_key,
        "EMO_S3_SECURE": "false",
    }.items():
        monkeypatch.setenv(name, value)
    store = open_store(settings=load_settings())
    store.put_bytes("jobs/j/final.mp4", b"video bytes")
    link = store.url_for("jobs/j/final.mp4")
    assert link.startswith(f"http://localhost:{port}/{inner.bucket}/links/jobs/j/final.mp4?")
    assert parse_qs(urlparse(link).query)["X-Amz-Expires"] == ["86400"]  # a day by default
    with urlopen(link) as response:
        assert response.read() == b"video bytes"
    assert "127.0.0.1" in inner.url_for("jobs/j/final.mp4")  # without one: the workers' address


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../../b", "a//b", "./a"])
def test_unsafe_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes(key, b"x")


def test_local_writes_never_expose_partial_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")

    class Boom(Exception):
        pass

    class Exploding:
        def read(self, _n: int = -1) -> bytes:
            raise Boom

    from emo.store import local

    with pytest.raises(Boom):
        local._atomic(tmp_path / "store" / "k", lambda out: out.write(Exploding().read()))
    assert list(store.list()) == []
    assert not [p for p in (tmp_path / "store").rglob("*") if TEMP_MARK in p.name]


def test_wrong_credentials_are_refused_with_the_setting_named(weed: WeedServer) -> None:
    good = weed.s3_store()
    good.ensure_bucket()
    bad = weed.s3_store(bucket=good.bucket, secret_key="not-the-secret")
    with pytest.raises(StoreAuthError, match="EMO_S3_SECRET_KEY"):
        bad.put_bytes("x", b"x")
    unknown = weed.s3_store(bucket=good.bucket, access_key="nobody", secret_key="nothing")
    with pytest.raises(StoreAuthError, match="EMO_S3_ACCESS_KEY"):
        unknown.get_bytes("x")


def test_open_store_from_settings(weed: WeedServer, tmp_path: Path) -> None:
    local = open_store(settings=load_settings())
    assert isinstance(local, LocalStore) and local.root == tmp_path / "emo-home" / "store"
    settings = load_settings(
        store_url="s3://emo-settings/pre/fix",
        s3_endpoint=weed.endpoint,
        s3_access_key=weed.access_key,
        s3_secret_key=weed.secret_key,
        s3_secure=False,
    )
    remote = open_store(settings=settings)
    assert isinstance(remote, S3Store)
    remote.ensure_bucket()
    remote.put_bytes("k", b"v")
    assert remote.uri("k") == "s3://emo-settings/pre/fix/k"
    assert remote.client.get_object("emo-settings", "pre/fix/k").read() == b"v"


def test_outputs_get_normal_permissions(tmp_path: Path) -> None:
    """Atomically written files are readable as the umask allows, not owner-only (0600)."""
    import numpy as np

    from emo.files import FILE_MODE
    from emo.media import VideoWriter
    from emo.store.local import atomic_write

    atomic_write(tmp_path / "sidecar.json", b"{}")
    with VideoWriter(tmp_path / "video.mp4", width=16, height=16, fps=25) as writer:
        writer.write(np.zeros((2, 16, 16, 3), np.uint8))
    for name in ("sidecar.json", "video.mp4"):
        assert (tmp_path / name).stat().st_mode & 0o777 == FILE_MODE
    assert FILE_MODE & 0o044  # group/other may read under the usual umask (022)


def test_get_bytes_reads_no_further_than_its_limit(store: ObjectStore) -> None:
    """A caller that must refuse big objects (a manifest) never holds more than it allows,
    even when the object grew after it was sized."""
    store.put_bytes("big", b"x" * 1000)
    assert store.get_bytes("big", limit=11) == b"x" * 11
    assert store.get_bytes("big") == b"x" * 1000
