"""Which weights bundle a render uses, and the store's copies of bundles.

``resolve_weights``: EMO_WEIGHTS (a folder, or an ``s3://`` prefix downloaded once into a local
cache keyed by its hash), else the demo model shipped in the package. Every job is pinned to
its bundle's hash at submit: ``pin_bundle`` keeps a copy in the store under
``bundles/<sha256>/`` (emo.json last), and ``pinned_bundle`` finds it again for a resume after
EMO_WEIGHTS has moved on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from emo.errors import SettingsError
from emo.settings import Settings
from emo.store import ObjectStore, open_store
from emo.store.base import is_fresh

if TYPE_CHECKING:
    from emo.bundle import BundleInfo

SHIPPED_DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"  # make demo-model


def resolve_weights(settings: Settings) -> Path:
    """The local bundle to use: EMO_WEIGHTS (a path, or an s3:// prefix cached by hash), else
    the shipped demo model."""
    from emo.bundle import BUNDLE_FILE, read_bundle_info

    configured = settings.weights
    if configured and configured.startswith("s3://"):
        return _cached_remote_bundle(configured, settings)
    if configured:
        read_bundle_info(configured)  # a clear error if it is not a bundle
        return Path(configured)
    if not (SHIPPED_DEMO / BUNDLE_FILE).is_file():
        raise SettingsError(
            f"no weights bundle: the demo model is missing from {SHIPPED_DEMO}; set EMO_WEIGHTS "
            "to a bundle (emo weights init, or emo train)"
        )
    return SHIPPED_DEMO


BUNDLES_PREFIX = "bundles"  # store/bundles/<sha256>/: copies of the bundles jobs are pinned to


def bundle_sha256(path: Path) -> str:
    """The content hash a bundle's emo.json records (what jobs pin)."""
    from emo.bundle import read_bundle_info

    return read_bundle_info(path).sha256


def pin_bundle(store: ObjectStore, path: Path) -> str:
    """Keep a copy of the bundle at ``path`` in the store under its hash (emo.json last, so a
    copy interrupted half-way reads as absent); return the hash. Jobs registered with it can
    be resumed after EMO_WEIGHTS moves on."""
    from emo.bundle import BUNDLE_FILE

    sha = bundle_sha256(path)
    prefix = f"{BUNDLES_PREFIX}/{sha}/"
    stored = {info.key: info for info in store.list(prefix)}
    files = {prefix + p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    manifest = prefix + BUNDLE_FILE

    def size(key: str) -> int | None:
        return stored[key].size if key in stored else None

    for key, file in sorted(files.items()):
        if key != manifest and size(key) != file.stat().st_size:  # missing or partial
            store.put_file(key, file)
    # emo.json last; written again when old, so `emo gc` sees the copy is in use again.
    if size(manifest) != files[manifest].stat().st_size or not is_fresh(stored.get(manifest)):
        store.put_file(manifest, files[manifest])
    return sha


def pinned_bundle(settings: Settings, store: ObjectStore, sha: str) -> Path:
    """The local folder of the bundle whose hash is ``sha``: the configured bundle if it is
    that one, else the local cache, else the store's pinned copy (downloaded and verified)."""
    from emo.bundle import BUNDLE_FILE, read_bundle_info

    configured = settings.weights
    if not configured:
        candidate: Path | None = SHIPPED_DEMO
    elif configured.startswith("s3:"):
        candidate = None  # a remote prefix: its copy pinned in the store serves instead
    else:
        candidate = Path(configured)
    found = candidate is not None and (candidate / BUNDLE_FILE).is_file()
    if found and bundle_sha256(candidate) == sha:
        return candidate
    local = settings.home / "weights" / "cache" / sha
    if (local / BUNDLE_FILE).is_file():
        return local
    prefix = f"{BUNDLES_PREFIX}/{sha}/"
    if not store.exists(prefix + BUNDLE_FILE):
        raise SettingsError(
            f"the job is pinned to weights bundle {sha[:12]}, which is neither EMO_WEIGHTS "
            f"nor in the cache or the store ({store.url.rstrip('/')}/{prefix}); `emo resume JOB "
            "--new-weights` renders it again with the current bundle"
        )
    _download_bundle(store, prefix, local)
    read_bundle_info(local)
    return local


def pinned_bundle_info(settings: Settings, store: ObjectStore, sha: str) -> BundleInfo:
    """What the bundle whose hash is ``sha`` is (its ``emo.json``), without its weights: from
    a local copy if there is one, else from the store's pinned copy (a finishing run on a CPU
    node needs the configuration, not gigabytes of weights)."""
    from emo.bundle import BUNDLE_FILE, parse_bundle_info, read_bundle_info

    configured = settings.weights
    local = settings.home / "weights" / "cache" / sha
    candidates = [SHIPPED_DEMO, local]
    if configured and not configured.startswith("s3:"):
        candidates.insert(0, Path(configured))
    for candidate in candidates:
        if (candidate / BUNDLE_FILE).is_file():
            info = read_bundle_info(candidate)
            if info.sha256 == sha:
                return info
    prefix = f"{BUNDLES_PREFIX}/{sha}/"
    if not store.exists(prefix + BUNDLE_FILE):
        return read_bundle_info(pinned_bundle(settings, store, sha))  # its error names the fix
    info = parse_bundle_info(store.get_bytes(prefix + BUNDLE_FILE).decode(), local)
    if info.sha256 != sha:
        raise SettingsError(
            f"the store's copy of weights bundle {sha[:12]} records {info.sha256[:12]}; "
            "the store was altered: `emo resume JOB --new-weights` renders the job again"
        )
    return info


def _cached_remote_bundle(uri: str, settings: Settings) -> Path:
    from emo.bundle import BUNDLE_FILE, read_bundle_info

    parsed = urlparse(uri)
    store = open_store(f"s3://{parsed.netloc}", settings)
    prefix = parsed.path.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    sha = json.loads(store.get_bytes(prefix + BUNDLE_FILE))["sha256"]
    local = settings.home / "weights" / "cache" / sha
    if not (local / BUNDLE_FILE).is_file():
        _download_bundle(store, prefix, local)
    read_bundle_info(local)
    return local


def _download_bundle(store: ObjectStore, prefix: str, local: Path) -> None:
    """Download into a staging folder of this process, verify it, then rename it into place.

    The cache may be shared (a volume mounted by every render pod): two pods pulling the
    same bundle each fill their own staging folder; the first rename wins, the other is
    dropped. A staging folder nobody has written to for an hour (its pod was killed) is
    removed; a download is verified before it enters the cache, so a folder removed under a
    slow download can never be cached half-complete.
    """
    from emo.bundle import BUNDLE_FILE, read_bundle_info, verify_bundle

    local.parent.mkdir(parents=True, exist_ok=True)
    for stale in local.parent.glob(f".{local.name}.*.partial"):
        if time.time() - _last_write(stale) > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    staging = local.with_name(f".{local.name}.{uuid.uuid4().hex}.partial")
    try:
        for info in store.list(prefix):
            store.get_file(info.key, staging / info.key[len(prefix) :])
        verify_bundle(read_bundle_info(staging))
        try:
            staging.rename(local)
        except OSError:
            if not (local / BUNDLE_FILE).is_file():  # not another pod's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _last_write(folder: Path) -> float:
    """Newest modification time of a folder and everything in it (0 if it vanished).

    Other pods rename or remove their staging folders at any moment, so this walks with
    os.walk (which skips folders that vanish under it) instead of Path.rglob (which raises).
    """
    newest = 0.0
    for root, _dirs, files in os.walk(folder):
        for name in [None, *files]:
            try:
                stamp = os.stat(root if name is None else os.path.join(root, name)).st_mtime
            except FileNotFoundError:  # another pod removed it meanwhile
                continue
            newest = max(newest, stamp)
    return newest
