"""Segment checkpoints: manifest last, verified and matched to the render on read, never
rewritten; the database's record decides between good attempts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo.store import LocalStore, ObjectStore
from emo.store.checkpoint import (
    MANIFEST,
    read_segment_checkpoint,
    segment_prefix,
    write_segment_checkpoint,
)

META = {
    "frames": [0, 120],
    "samples": [0, 76800],
    "seed": 7,
    "weights_sha256": "w" * 64,
    "params": {"steps": 40},
    "previous_manifest_sha256": None,
}


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("weed")
    store = server.s3_store()
    store.ensure_bucket()
    return store


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    video, motion = tmp_path / "video.mp4", tmp_path / "motion.safetensors"
    video.write_bytes(bytes(range(256)) * 400)
    motion.write_bytes(b"motion-state" * 100)
    return {"video.mp4": video, "motion.safetensors": motion}


def _write(store: ObjectStore, files: dict[str, Path], index: int = 3, epoch: int = 1, **meta):
    return write_segment_checkpoint(
        store, job_id="job1", index=index, epoch=epoch, files=files, meta={**META, **meta}
    )


def test_written_checkpoint_reads_back_verified(store: ObjectStore, files) -> None:
    written = _write(store, files)
    read = read_segment_checkpoint(store, job_id="job1", index=3)
    assert read is not None
    assert read.manifest_sha256 == written.manifest_sha256
    assert read.manifest["seed"] == 7 and read.manifest["frames"] == [0, 120]
    assert (
        store.get_bytes(read.key("motion.safetensors")) == files["motion.safetensors"].read_bytes()
    )
    keys = [info.key for info in store.list(segment_prefix("job1", 3))]
    assert keys == sorted(written.prefix + name for name in [*files, MANIFEST])
    assert read_segment_checkpoint(store, job_id="job1", index=4) is None


def test_missing_manifest_reads_as_absent(store: ObjectStore, files) -> None:
    written = _write(store, files)
    store.delete(written.prefix + MANIFEST)
    assert read_segment_checkpoint(store, job_id="job1", index=3) is None


@pytest.mark.parametrize("name", ["video.mp4", "motion.safetensors"])
def test_flipped_byte_reads_as_absent(store: ObjectStore, files, name: str) -> None:
    written = _write(store, files)
    key = written.key(name)
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    store.put_bytes(key, bytes(data))
    assert read_segment_checkpoint(store, job_id="job1", index=3) is None


def test_missing_data_object_or_bad_manifest_reads_as_absent(store: ObjectStore, files) -> None:
    written = _write(store, files)
    store.delete(written.key("video.mp4"))
    assert read_segment_checkpoint(store, job_id="job1", index=3) is None
    second = _write(store, files, index=5)
    store.put_bytes(second.prefix + MANIFEST, b"{not json")
    assert read_segment_checkpoint(store, job_id="job1", index=5) is None


def test_a_second_attempt_leaves_the_first_and_the_record_decides(
    store: ObjectStore, files
) -> None:
    first = _write(store, files, epoch=1)
    before = {i.key: store.sha256(i.key) for i in store.list(first.prefix)}
    second = _write(store, files, epoch=2)
    assert second.prefix != first.prefix and "/e000002-" in second.prefix
    assert {i.key: store.sha256(i.key) for i in store.list(first.prefix)} == before
    # Without a record the oldest good attempt counts; with one, the recorded attempt does.
    assert read_segment_checkpoint(store, job_id="job1", index=3).prefix == first.prefix
    recorded = second.prefix + MANIFEST
    found = read_segment_checkpoint(store, job_id="job1", index=3, recorded_key=recorded)
    assert found.prefix == second.prefix


def test_an_attempt_that_does_not_fit_the_render_reads_as_absent(
    store: ObjectStore, files, caplog: pytest.LogCaptureFixture
) -> None:
    _write(store, files, audio_sha256="a" * 64, fps=25)
    fits = {"audio_sha256": "a" * 64, "fps": 25, "frames": (0, 120)}  # tuples match lists
    assert read_segment_checkpoint(store, job_id="job1", index=3, expect=fits) is not None
    other = {**fits, "audio_sha256": "b" * 64}
    assert read_segment_checkpoint(store, job_id="job1", index=3, expect=other) is None
    assert "audio_sha256" in caplog.text and "expected" in caplog.text
    later = _write(store, files, audio_sha256="b" * 64, fps=25)
    found = read_segment_checkpoint(store, job_id="job1", index=3, expect=other)
    assert found is not None and found.prefix == later.prefix  # the one that fits is found


def test_rerender_of_a_broken_checkpoint_uses_new_keys(store: ObjectStore, files) -> None:
    broken = _write(store, files)
    store.delete(broken.prefix + MANIFEST)  # crash before the manifest landed
    leftovers = {i.key: store.sha256(i.key) for i in store.list(broken.prefix)}
    fresh = _write(store, files)
    assert fresh.prefix != broken.prefix
    assert {i.key: store.sha256(i.key) for i in store.list(broken.prefix)} == leftovers
    read = read_segment_checkpoint(store, job_id="job1", index=3)
    assert read is not None and read.prefix == fresh.prefix
    manifest = json.loads(store.get_bytes(fresh.prefix + MANIFEST))
    assert set(manifest["files"]) == set(files)
