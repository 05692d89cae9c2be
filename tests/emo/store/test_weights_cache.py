"""EMO_WEIGHTS=s3://...: the bundle is pulled once into EMO_HOME/weights/cache/<sha256>, which
render pods may share (a volume): concurrent pulls of one bundle end in one verified copy."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from emo.bundle import read_bundle_info, save_bundle
from emo.models.components import build_components
from emo.models.config import TINY
from emo.settings import load_settings
from emo.store.weights import _last_write, resolve_weights
from tests.services import WeedServer


def test_s3_weights_are_cached_by_hash_and_concurrent_pulls_agree(
    weed: WeedServer, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    save_bundle(build_components(TINY, seed=3), TINY, bundle)
    sha = read_bundle_info(bundle).sha256
    store = weed.s3_store()
    store.ensure_bucket()
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        store.put_file(f"weights/tiny/{path.relative_to(bundle)}", path)
    settings = load_settings(
        weights=f"s3://{store.bucket}/weights/tiny",
        home=tmp_path / "home",
        s3_endpoint=weed.endpoint,
        s3_access_key=weed.access_key,
        s3_secret_key=weed.secret_key,
        s3_secure=False,
    )
    cache = tmp_path / "home" / "weights" / "cache"
    stale = cache / f".{sha}.0123.partial"  # left by a pod killed mid-download two hours ago
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    results: list[Path] = []
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            results.append(resolve_weights(settings))
        except BaseException as error:  # noqa: BLE001 (reported by the assertion below)
            errors.append(error)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(results) == {cache / sha}
    assert read_bundle_info(cache / sha).sha256 == sha  # complete and verified
    assert sorted(p.name for p in cache.iterdir()) == [sha]  # no staging folders left

    for info in store.list("weights/tiny/"):  # only emo.json (the hash) is read again
        if not info.key.endswith("/emo.json"):
            store.delete(info.key)
    assert resolve_weights(settings) == cache / sha  # served from the cache


def test_staging_folders_vanishing_mid_scan_are_not_an_error(tmp_path: Path) -> None:
    """Another pod renames or removes its staging folder while this one checks its age (a CI
    run once failed on exactly that: Path.rglob raised FileNotFoundError mid-walk)."""
    staging = tmp_path / ".sha.1234.partial"
    stop = threading.Event()

    def churn() -> None:  # a pod filling its staging folder and renaming it away, repeatedly
        while not stop.is_set():
            (staging / "backbone").mkdir(parents=True, exist_ok=True)
            (staging / "backbone" / "model.safetensors").write_bytes(b"x")
            shutil.rmtree(staging, ignore_errors=True)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        ages = [_last_write(staging) for _ in range(3000)]
    finally:
        stop.set()
        thread.join()
    assert all(age == 0.0 or age > time.time() - 60 for age in ages)
