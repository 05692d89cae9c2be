"""The object-store interface shared by the ``file://`` and ``s3://`` backends.

Keys are relative POSIX paths (``jobs/<job>/segments/00003/...``) below the store's root
(a directory, or a bucket plus prefix). A key may not be absolute, empty, or contain ``..``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from emo.errors import StoreError

HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object."""

    key: str
    size: int
    modified: datetime | None = None


# An object a writer finds already stored, but older than this, is written again: its new time
# tells `emo gc` (which leaves young unreferenced objects alone) that it is in use again.
REFRESH_SECONDS = 3600


def is_fresh(info: ObjectInfo | None, now: datetime | None = None) -> bool:
    """True if ``info`` names an object written less than ``REFRESH_SECONDS`` ago."""
    if info is None or info.modified is None:
        return False
    now = now or datetime.now(UTC)
    return (now - info.modified).total_seconds() < REFRESH_SECONDS


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key; raise ``StoreError`` otherwise."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid object key {key!r}: use a relative path without '..' or '//'")
    return key


def sha256_stream(stream: BinaryIO) -> str:
    """Hex sha256 of a binary stream, read in chunks."""
    digest = hashlib.sha256()
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file."""
    with open(path, "rb") as stream:
        return sha256_stream(stream)


class ObjectStore(ABC):
    """Put/get/list objects by key. Writes are all-or-nothing: a reader never sees half."""

    url: str

    @abstractmethod
    def put_file(self, key: str, path: Path) -> ObjectInfo:
        """Upload the file at ``path`` as ``key``."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` as ``key``."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> Path:
        """Download ``key`` to ``path`` (written atomically); raises ``ObjectNotFound``."""

    @abstractmethod
    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        """The content of ``key`` (at most ``limit`` bytes of it, read no further: a caller
        that must refuse big objects reads ``limit + 1``); raises ``ObjectNotFound``."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time of ``key``; raises ``ObjectNotFound``."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively, in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is absent)."""

    @abstractmethod
    def sha256(self, key: str) -> str:
        """Hex sha256 of the stored bytes of ``key`` (read back, not remembered)."""

    @abstractmethod
    def url_for(self, key: str, expires_seconds: int = 24 * 3600) -> str:
        """A URL a person or program can open: presigned for S3, ``file://`` for local."""

    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""
        from emo.errors import ObjectNotFound

        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def uri(self, key: str) -> str:
        """The store URI of ``key`` (``file:///...`` or ``s3://bucket/prefix/key``)."""
        return f"{self.url.rstrip('/')}/{check_key(key)}"

    def key_of(self, uri: str) -> str:
        """The key of a URI made by ``uri``; ``StoreError`` if it names another store."""
        prefix = self.url.rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise StoreError(f"{uri} is not in the configured object store {self.url}")
        return uri[len(prefix) :]
