"""Object store: one interface (``ObjectStore``), ``file://`` and ``s3://`` backends."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import SecretStr

from emo.errors import SettingsError
from emo.settings import Settings, get_settings
from emo.store.base import ObjectInfo, ObjectStore
from emo.store.local import LocalStore
from emo.store.s3 import S3Store

__all__ = ["LocalStore", "ObjectInfo", "ObjectStore", "S3Store", "open_store"]


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret else None


def open_store(url: str | None = None, settings: Settings | None = None) -> ObjectStore:
    """The store at ``url`` (default ``EMO_STORE_URL``), configured from ``settings``."""
    settings = settings or get_settings()
    url = url or settings.resolved_store_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not settings.s3_endpoint:
            raise SettingsError(f"EMO_S3_ENDPOINT must be set to use the store {url}")
        return S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path,
            endpoint=settings.s3_endpoint,
            access_key=_reveal(settings.s3_access_key),
            secret_key=_reveal(settings.s3_secret_key),
            secure=settings.s3_secure,
            region=settings.s3_region,
            retries=settings.store_retries,
            backoff_seconds=settings.store_backoff_seconds,
            public_endpoint=settings.s3_public_endpoint,
        )
    raise SettingsError(f"EMO_STORE_URL: unsupported store URL {url!r}; use file:// or s3://")
