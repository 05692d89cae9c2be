"""`emo gc`'s judgement on a real local store: what it collects, what it never touches."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from db.references import JobReferences
from emo.errors import StoreError
from emo.store import LocalStore
from emo.store.checkpoint import write_segment_checkpoint
from emo.store.gc import delete_garbage, find_garbage

W, OTHER = "e" * 64, "f" * 64  # bundle hashes (hex)


def _job(store: LocalStore, job_id: str, **changes) -> JobReferences:
    fields = {
        "job_id": job_id,
        "status": "failed",
        "live": False,
        "image_uri": store.uri("inputs/" + "1" * 64 + ".png"),
        "audio_uri": store.uri("inputs/" + "2" * 64 + ".wav"),
        "output_uri": None,
        "weights_sha256": W,
        "image_sha256": "1" * 64,
        "audio_sha256": "2" * 64,
        "recorded": {},
    }
    return JobReferences(**{**fields, **changes})


def _attempt(store: LocalStore, tmp_path: Path, job_id: str, index: int, weights: str) -> str:
    video = tmp_path / "v.mp4"
    video.write_bytes(b"frames")
    checkpoint = write_segment_checkpoint(
        store,
        job_id=job_id,
        index=index,
        epoch=1,
        files={"video.mp4": video},
        meta={"weights_sha256": weights, "image_sha256": "1" * 64, "audio_sha256": "2" * 64},
    )
    return checkpoint.prefix


def _kinds(items) -> dict[str, str]:
    return {item.where: item.kind for item in items}


def test_gc_collects_only_what_no_job_can_use(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for key in ("inputs/" + "1" * 64 + ".png", "inputs/" + "2" * 64 + ".wav"):
        store.put_bytes(key, b"input")
    store.put_bytes("inputs/" + "3" * 64 + ".wav", b"nobody's")
    store.put_bytes(f"bundles/{W}/emo.json", b"{}")
    store.put_bytes(f"bundles/{OTHER}/emo.json", b"{}")
    store.put_bytes(f"bundles/{OTHER}/vae/model.safetensors", b"tensors")
    store.put_bytes("weights/current/emo.json", b"{}")  # an operator's own layout: not ours
    recorded = _attempt(store, tmp_path, "a", 0, W)
    adoptable = _attempt(store, tmp_path, "a", 1, W)  # unrecorded, fits: a resume adopts it
    unfit = _attempt(store, tmp_path, "a", 2, OTHER)  # made with other weights
    broken = _attempt(store, tmp_path, "a", 3, W)
    store.delete(broken + "manifest.json")  # a crash before the manifest
    held = _attempt(store, tmp_path, "b", 0, OTHER)  # job b is rendering now
    unknown = _attempt(store, tmp_path, "gone", 0, W)
    jobs = [
        _job(store, "a", recorded={0: store.uri(recorded + "manifest.json")}),
        _job(store, "b", live=True),
    ]

    found = _kinds(find_garbage(store, jobs, scratch=tmp_path / "scratch", min_age_seconds=0))
    assert found == {
        "inputs/" + "3" * 64 + ".wav": "unused-input",
        f"bundles/{OTHER}/": "unused-bundle",
        unfit: "unfit-attempt",
        broken: "unfit-attempt",
    }
    assert recorded not in found and adoptable not in found and held not in found

    with_unknown = find_garbage(
        store, jobs, scratch=tmp_path / "scratch", min_age_seconds=0, include_unknown_jobs=True
    )
    assert _kinds(with_unknown)[unknown] == "unknown-job"

    # Inputs and bundle copies a submit stored a moment ago wait for --min-age-hours.
    young = _kinds(find_garbage(store, jobs, scratch=tmp_path / "scratch"))
    assert set(young.values()) == {"unfit-attempt"}

    # Judged again at deletion: job a started rendering since gc looked, so its items stay.
    items = find_garbage(store, jobs, scratch=tmp_path / "scratch", min_age_seconds=0)
    busy = {"a": replace(jobs[0], live=True)}
    deleted = delete_garbage(store, items, current=busy.get)
    assert {item.kind for item in deleted} == {"unused-input", "unused-bundle"}
    assert not store.exists(f"bundles/{OTHER}/vae/model.safetensors")
    assert store.exists(unfit + "manifest.json")
    # ... or a render recorded the attempt gc had judged unfit: it is referenced now.
    took_it = replace(jobs[0], recorded={**jobs[0].recorded, 2: store.uri(unfit + "manifest.json")})
    delete_garbage(store, items, current={"a": took_it}.get)
    left = {info.key for info in store.list("")}
    assert unfit + "manifest.json" in left and not any(key.startswith(broken) for key in left)
    assert {recorded + "manifest.json", adoptable + "manifest.json"} <= left
    assert {f"bundles/{W}/emo.json", "weights/current/emo.json"} <= left


def test_gc_judges_nothing_when_a_job_names_another_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    moved = _job(store, "a", audio_uri="file:///elsewhere/inputs/x.wav")
    with pytest.raises(StoreError, match="outside the store .* spelled differently"):
        find_garbage(store, [moved], scratch=tmp_path / "scratch")


def test_a_submits_scratch_is_collected_only_when_old(tmp_path: Path) -> None:
    import os

    store = LocalStore(tmp_path / "store")
    scratch = tmp_path / "scratch"
    fresh, old = scratch / "submit-abc-1-x", scratch / "submit-abc-2-y"
    for folder in (fresh, old):
        folder.mkdir(parents=True)
    stamp = (datetime.now(UTC) - timedelta(hours=2)).timestamp()
    os.utime(old, (stamp, stamp))
    found = _kinds(find_garbage(store, [], scratch=scratch))
    assert found == {str(old): "scratch"}
