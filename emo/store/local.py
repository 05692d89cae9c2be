"""``file://`` object store: a directory tree; writes are temp file + rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from emo.errors import ObjectNotFound, StoreError
from emo.files import temp_beside
from emo.store.base import ObjectInfo, ObjectStore, check_key, sha256_stream

TEMP_MARK = ".emo-partial-"  # temp files carry this in their name and are never listed


def _atomic(target: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through ``fill`` so that it appears complete or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = temp_beside(target, prefix=f"{TEMP_MARK}{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically."""
    with open(source, "rb") as src:
        _atomic(target, lambda out: shutil.copyfileobj(src, out, length=1 << 20))


def atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    _atomic(target, lambda out: out.write(data))


class LocalStore(ObjectStore):
    """Objects are files under ``root``; keys are their relative paths."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.url = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(
                f"cannot create the object store directory {self.root} ({error.strerror}); "
                "set EMO_STORE_URL or EMO_HOME to a writable place"
            ) from None

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(
            key=key, size=st.st_size, modified=datetime.fromtimestamp(st.st_mtime, UTC)
        )

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        target = self._path(key)
        atomic_copy(Path(path), target)
        return self._info(key, target)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        target = self._path(key)
        atomic_write(target, data)
        return self._info(key, target)

    def get_file(self, key: str, path: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"no object {self.uri(key)}")
        atomic_copy(source, Path(path))
        return Path(path)

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        try:
            with self._path(key).open("rb") as handle:
                return handle.read(-1 if limit is None else limit)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {self.uri(key)}") from None

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object {self.uri(key)}")
        return self._info(key, path)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        keys = []
        # Walk only the directory the prefix names (its part up to the last '/').
        top = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if name.startswith(TEMP_MARK):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys):
            try:
                yield self._info(key, self.root / key)
            except FileNotFoundError:  # deleted while listing
                continue

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def sha256(self, key: str) -> str:
        try:
            with open(self._path(key), "rb") as stream:
                return sha256_stream(stream)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {self.uri(key)}") from None

    def url_for(self, key: str, expires_seconds: int = 24 * 3600) -> str:
        return self._path(key).as_uri()
