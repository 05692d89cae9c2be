"""``s3://bucket/prefix`` object store through the ``minio`` SDK (MinIO, SeaweedFS, AWS).

Transient failures (connection refused or reset, timeouts, 5xx, SlowDown) are retried with
exponential backoff up to ``EMO_STORE_RETRIES`` times, then raise ``StoreUnavailable`` naming
the endpoint. Refused credentials raise ``StoreAuthError`` naming the settings to fix.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from emo.errors import ObjectNotFound, StoreAuthError, StoreError, StoreUnavailable
from emo.store.base import ObjectInfo, ObjectStore, check_key, sha256_stream

log = logging.getLogger(__name__)
T = TypeVar("T")

AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
}
TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
}
MISSING_CODES = {"NoSuchKey", "NoSuchObject"}


class S3Store(ObjectStore):
    """Objects under ``prefix`` in ``bucket`` on an S3-compatible server."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        secure: bool = True,
        region: str | None = None,
        retries: int = 5,
        backoff_seconds: float = 0.5,
        timeout_seconds: float = 60.0,
        public_endpoint: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        # Our own retry loop decides; urllib3 must not retry behind it.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10.0, read=timeout_seconds),
            retries=False,
            maxsize=8,
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        # Links for people are signed for the address they reach (a URL's host is part of its
        # signature). Signing is local: the region is given so no request is made to find it.
        self.public = self.client
        if public_endpoint:
            address = public_endpoint if "://" in public_endpoint else f"//{public_endpoint}"
            public = urlparse(address)
            self.public = Minio(
                public.netloc,
                access_key=access_key,
                secret_key=secret_key,
                secure=public.scheme == "https" if public.scheme else secure,
                region=region or "us-east-1",
            )

    # -- retry and error translation -------------------------------------------------------

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying transient failures; translate errors for people."""
        for attempt in range(self.retries + 1):
            try:
                return operation()
            except S3Error as error:
                if error.code in MISSING_CODES:
                    raise ObjectNotFound(f"no object for {what}") from None
                if error.code == "NoSuchBucket":
                    raise StoreError(
                        f"bucket {self.bucket!r} does not exist on {self.endpoint}; create it "
                        "(k8s/ runs a bucket Job) or fix EMO_STORE_URL"
                    ) from None
                if error.code in AUTH_CODES:
                    raise StoreAuthError(
                        f"{self.endpoint} refused the credentials ({error.code}) for {what}; "
                        "check EMO_S3_ACCESS_KEY and EMO_S3_SECRET_KEY"
                    ) from None
                if error.code not in TRANSIENT_CODES:
                    raise StoreError(
                        f"{what} failed on {self.endpoint}: {error.code}: {error.message}"
                    ) from None
                failure: Exception = error
            except (
                ServerError,
                InvalidResponseError,
                urllib3.exceptions.HTTPError,
                OSError,
            ) as error:
                if isinstance(error, ServerError) and error.status_code < 500:
                    raise StoreError(f"{what} failed on {self.endpoint}: {error}") from None
                failure = error
            if attempt < self.retries:
                delay = self.backoff_seconds * 2**attempt
                log.warning(
                    "%s on %s failed (%s); retry %d/%d in %.1fs",
                    what,
                    self.endpoint,
                    type(failure).__name__,
                    attempt + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
        raise StoreUnavailable(
            f"object store {self.endpoint} did not answer for {what} after {self.retries + 1} "
            f"attempts ({type(failure).__name__}); check that it is running and EMO_S3_ENDPOINT"
        )

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _info(self, key: str, obj: object) -> ObjectInfo:
        return ObjectInfo(key=key, size=obj.size, modified=obj.last_modified)  # type: ignore[attr-defined]

    # -- interface -------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (local and test setups)."""
        if not self._call("bucket check", lambda: self.client.bucket_exists(self.bucket)):
            self._call("bucket create", lambda: self.client.make_bucket(self.bucket))

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        name = self._name(key)
        self._call(f"put {key}", lambda: self.client.fput_object(self.bucket, name, str(path)))
        return self.stat(key)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        name = self._name(key)
        self._call(
            f"put {key}",
            lambda: self.client.put_object(self.bucket, name, io.BytesIO(data), len(data)),
        )
        return self.stat(key)

    def _read(self, key: str, consume: Callable[[urllib3.BaseHTTPResponse], T]) -> T:
        name = self._name(key)

        def operation() -> T:
            response = self.client.get_object(self.bucket, name)
            try:
                return consume(response)
            finally:
                response.close()
                response.release_conn()

        return self._call(f"get {key}", operation)

    def get_file(self, key: str, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".download")

        def download(response: urllib3.BaseHTTPResponse) -> None:
            with open(partial, "wb") as out:
                for chunk in response.stream(1 << 20):
                    out.write(chunk)

        try:
            self._read(key, download)
            os.replace(partial, path)  # same directory: the rename is atomic
        finally:
            partial.unlink(missing_ok=True)
        return path

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        return self._read(key, lambda response: response.read(limit))

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        obj = self._call(f"stat {key}", lambda: self.client.stat_object(self.bucket, name))
        return self._info(key, obj)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self.prefix + prefix
        objects = self._call(
            f"list {prefix or '/'}",
            lambda: list(self.client.list_objects(self.bucket, prefix=full, recursive=True)),
        )
        for obj in sorted(objects, key=lambda o: o.object_name):
            yield self._info(obj.object_name[len(self.prefix) :], obj)

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._call(f"delete {key}", lambda: self.client.remove_object(self.bucket, name))

    def sha256(self, key: str) -> str:
        return self._read(key, sha256_stream)

    def url_for(self, key: str, expires_seconds: int = 24 * 3600) -> str:
        name = self._name(key)
        return self.public.presigned_get_object(
            self.bucket, name, expires=timedelta(seconds=expires_seconds)
        )
