"""Checkpoint integrity on PostgreSQL, SeaweedFS S3, ffmpeg and Prefect (tiny weights).

A job is its content; a checkpoint counts only for the render it fits; the job's lease epoch
fences a displaced render; a job renders with the bundle it was registered with; `emo gc`
collects only what nothing references. Each test compares the frames it gets with a clean,
uninterrupted render of the same content (same seed): identical, not merely similar.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db import migrate
from db.engine import make_engine, session_factory
from db.events import job_events
from db.leases import acquire_lease, release_lease
from db.models import Job, JobStatus, Segment, utcnow
from emo import media
from emo.bundle import save_bundle
from emo.errors import InputError, SettingsError
from emo.models.components import build_components
from emo.models.config import TINY
from emo.store.checkpoint import MANIFEST, attempt_manifests, verify_manifest
from flows.context import LeaseHeld
from flows.render_track import render_track
from flows.submit_batch import submit_batch
from tests.conftest import write_wav
from tests.flows.conftest import Studio, clear_caches, manifest, speech

pytestmark = pytest.mark.slow  # whole renders, restored and displaced

SEED = 5


def _session(studio: Studio):
    return session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))()


def _frames(video: Path) -> np.ndarray:
    """Every decoded frame (what a framemd5 hashes), as one array."""
    stream = media.probe(video).first("video")
    return np.concatenate(list(media.iter_frames(video, stream.width, stream.height)))


def _cli_render(studio: Studio, audio: Path, output: Path, weights: Path | None = None) -> None:
    """`emo render PORTRAIT AUDIO -o OUTPUT --seed 5` in this process."""
    from emo.cli_jobs import render

    render(
        image=studio.portrait,
        audio=audio,
        output=output,
        seed=SEED,
        steps=None,
        guidance=None,
        speed=None,
        segment_seconds=None,
        format="mp4",
        scheduler=None,
        face_box="0.2,0.15,0.8,0.85",
        face_policy=None,
        weights=weights,
    )


def _job(studio: Studio, tmp_path: Path, name: str, audio: Path | None = None) -> str:
    """Register a one-job batch (seed 5) over the studio's portrait and ``audio``."""
    path = manifest(tmp_path / f"{name}.yaml", studio, [name], seed=SEED)
    if audio is not None:
        document = path.read_text().replace(str(studio.vocal), str(audio))
        path.write_text(document)
    return submit_batch(manifest=str(path), render=False)["jobs"][name]


def _clean_render(studio: Studio, tmp_path: Path, audio: Path, name: str) -> np.ndarray:
    """Frames of an uninterrupted render of ``audio`` as a job of its own."""
    job_id = _job(studio, tmp_path, name, audio)
    output = tmp_path / f"{name}.mp4"
    render_track(job_id=job_id, output=str(output))
    return _frames(output)


@pytest.fixture
def api(prefect_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    return prefect_server


def test_an_input_edited_in_place_renders_the_new_content(
    studio: Studio, tmp_path: Path, api: str
) -> None:
    output = tmp_path / "out" / "take.mp4"
    _cli_render(studio, studio.vocal, output)
    first = _frames(output)
    assert len(first) == 75  # 3 s at 25 fps

    write_wav(studio.vocal, speech(2.0, seed=3))  # the same path, new bytes
    _cli_render(studio, studio.vocal, output)  # the same command again
    edited = _frames(output)
    assert len(edited) == 50
    clean = _clean_render(
        studio, tmp_path, write_wav(tmp_path / "new.wav", speech(2.0, seed=3)), "clean"
    )
    assert np.array_equal(edited, clean)
    with _session(studio) as session:
        jobs = list(session.scalars(select(Job).where(Job.name == "take")))
    assert len(jobs) == 2 and {j.status for j in jobs} == {JobStatus.SUCCEEDED}
    assert len({j.audio_sha256 for j in jobs}) == 2  # the old job stays as it was


def _lose_database(studio: Studio) -> None:
    """The job database is restored from nothing; the store keeps every object."""
    url = studio.env["EMO_DATABASE_URL"]
    migrate.downgrade(url, "base")
    migrate.upgrade(url)
    clear_caches()


def test_database_lost_store_kept_never_splices_old_segments(
    studio: Studio, tmp_path: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _job(studio, tmp_path, "track")
    render_track(job_id=first)

    # Same inputs, other segment length: the same job id, but its old checkpoints belong to
    # another plan; they must read as absent, not be spliced onto the new one.
    _lose_database(studio)
    monkeypatch.setenv("EMO_SEGMENT_SECONDS", "0.7")
    clear_caches()
    again = _job(studio, tmp_path, "track")
    assert again == first
    output = tmp_path / "again.mp4"
    result = render_track(job_id=again, output=str(output))
    assert result["rendered"] == result["segments"] != 3  # nothing of the old plan reused
    replanned = _frames(output)

    # The audio replaced by a longer one at the same path: a new job; frame for frame a clean
    # render of the new audio.
    _lose_database(studio)
    write_wav(studio.vocal, speech(4.0, seed=7))
    longer = _job(studio, tmp_path, "track")
    assert longer != first
    output = tmp_path / "longer.mp4"
    render_track(job_id=longer, output=str(output))
    frames = _frames(output)
    assert len(frames) == 100
    clean = _clean_render(
        studio, tmp_path, write_wav(tmp_path / "long.wav", speech(4.0, seed=7)), "clean"
    )
    assert np.array_equal(frames, clean)
    original = _clean_render(
        studio, tmp_path, write_wav(tmp_path / "orig.wav", speech(3.0)), "orig"
    )
    assert np.array_equal(replanned, original)  # the same frames whatever the segment length


def test_settings_that_change_the_frames_are_refused_at_start_naming_them(
    studio: Studio, tmp_path: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _job(studio, tmp_path, "layout")
    monkeypatch.setenv("EMO_CLIP_FRAMES", "16")
    clear_caches()
    wanted = f"EMO_CLIP_FRAMES is 16, but the weights bundle was trained with {TINY.clip_frames}"
    with pytest.raises(SettingsError, match=wanted):
        submit_batch(manifest=str(manifest(tmp_path / "b.yaml", studio, ["b"])), render=False)
    with pytest.raises(SettingsError, match=wanted):
        render_track(job_id=job_id)
    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.plan is None and job.status is JobStatus.FAILED  # nothing was rendered

    # A half-rendered job resumed under another EMO_FPS: its stored plan no longer matches.
    monkeypatch.delenv("EMO_CLIP_FRAMES")
    clear_caches()
    half = _job(studio, tmp_path, "half")
    _fail_at_segment_2(monkeypatch, [half])
    monkeypatch.setenv("EMO_FPS", "20")
    clear_caches()
    with pytest.raises(SettingsError, match=r"planned with other settings: EMO_FPS 25 -> 20"):
        render_track(job_id=half)
    with _session(studio) as session:
        assert [s.status.value for s in session.get(Job, half).segments] == [
            "done",
            "done",
            "pending",
        ]


def _take_over(studio: Studio, job_id: str, owner: str = "other-host:1:usurper") -> int:
    """Another render takes the job over, as when the holder's lease expired during a network
    partition while it went on rendering; returns the new epoch."""
    later = utcnow() + timedelta(hours=2)  # the displaced render's lease has expired by then
    with _session(studio) as session:
        lease = acquire_lease(
            session=session, job_id=job_id, owner=owner, ttl_seconds=7200, now=later
        )
        return lease.epoch


def _give_back(studio: Studio, job_id: str, owner: str = "other-host:1:usurper") -> None:
    with _session(studio) as session:
        assert release_lease(session=session, job_id=job_id, owner=owner)


def test_a_displaced_render_cannot_record_or_publish_and_its_work_is_adopted(
    studio: Studio, tmp_path: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.render_output as flow  # the steps after the segments
    import flows.segments as segments

    # The heartbeat (every 20 s) will not notice the take-over: only the fencing stops it.
    monkeypatch.setenv("EMO_LEASE_SECONDS", "60")
    clear_caches()
    reference = _clean_render(studio, tmp_path, studio.vocal, "reference")
    job_id = _job(studio, tmp_path, "displaced")
    original = segments.render_segment

    def taken_over_during_segment_1(pipeline, **kwargs):
        if kwargs["segment"].index == 1:
            _take_over(studio, job_id)
        return original(pipeline, **kwargs)

    monkeypatch.setattr(segments, "render_segment", taken_over_during_segment_1)
    with pytest.raises(LeaseHeld, match="epoch 1, but the job is at epoch 2.*usurper"):
        render_track(job_id=job_id)
    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.RUNNING  # the holder's to finish, not failed
        assert [s.status.value for s in job.segments] == ["done", "pending", "pending"]
    (written,) = attempt_manifests(studio.store, job_id, 1)  # rendered, never recorded
    assert "/e000001-" in written and verify_manifest(studio.store, written) is not None
    gc = _gc()
    assert gc.exit_code == 0 and job_id not in gc.output  # a held job is never collected

    # The holder gives the job up; the next render adopts the displaced render's segment 1.
    monkeypatch.setattr(segments, "render_segment", original)
    _give_back(studio, job_id)

    def taken_over_during_qc(*args, **kwargs):
        epoch = _take_over(studio, job_id)  # assembled and checked, not yet committed
        assert epoch == 4
        return original_quality(*args, **kwargs)

    original_quality = flow.quality
    monkeypatch.setattr(flow, "quality", taken_over_during_qc)
    output = tmp_path / "displaced.mp4"
    with pytest.raises(LeaseHeld, match="usurper"):
        render_track(job_id=job_id, output=str(output))
    assert not output.exists() and not output.with_suffix(".json").exists()
    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.RUNNING and job.output_uri is None
        segment_1 = job.segments[1]
        assert segment_1.checkpoint_uri.endswith(written) and segment_1.epoch == 3
        actors = [e.actor for e in job_events(session=session, job_id=job_id)]
    assert "render-track (adopted epoch 1)" in actors

    monkeypatch.setattr(flow, "quality", original_quality)
    _give_back(studio, job_id)
    result = render_track(job_id=job_id, output=str(output))
    assert result["rendered"] == 0  # every segment reused: nothing rendered twice
    assert np.array_equal(_frames(output), reference)
    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.SUCCEEDED and "/output/e000005/" in job.output_uri
    gc = _gc()  # the output the displaced epoch-3 render assembled is nobody's
    assert re.search(rf"unused-output\W+jobs/{job_id}/output/e000003/", gc.output), gc.output


def _gc(*args: str):
    """`emo gc` in this process, one table row per line; inputs of any age."""
    from typer.testing import CliRunner

    from emo.cli import app

    runner = CliRunner(env={"COLUMNS": "400"})
    return runner.invoke(app, ["gc", "--min-age-hours", "0", *args])


def _fail_at_segment_2(monkeypatch: pytest.MonkeyPatch, job_ids: list[str]) -> None:
    """Render each job until its segment 2 fails (a GPU error): segments 0 and 1 recorded."""
    import flows.segments as segments

    original = segments.render_segment

    def fail_at_segment_2(pipeline, **kwargs):
        if kwargs["segment"].index == 2:
            raise RuntimeError("GPU fell off the bus")
        return original(pipeline, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(segments, "render_segment", fail_at_segment_2)
        for job_id in job_ids:
            with pytest.raises(RuntimeError, match="GPU fell off the bus"):
                render_track(job_id=job_id)


def _forge_attempt(studio: Studio, recorded_key: str, tmp_path: Path) -> str:
    """A second verified attempt of the same segment, older by its name (epoch 0), with the
    same binding but other frames (inverted): what "the oldest attempt wins" would pick."""
    manifest_doc = json.loads(studio.store.get_bytes(recorded_key))
    prefix = recorded_key.rsplit("/", 2)[0] + "/e000000-forged/"
    video = studio.store.get_file(manifest_doc["files"]["video.mp4"]["key"], tmp_path / "v.mp4")
    frames = _frames(video)
    inverted = tmp_path / "inverted.mp4"
    with media.VideoWriter(inverted, width=frames.shape[2], height=frames.shape[1], fps=25) as w:
        w.write(255 - frames)
    motion = studio.store.get_file(
        manifest_doc["files"]["motion.safetensors"]["key"], tmp_path / "m.safetensors"
    )
    import hashlib

    files = {}
    for name, path in (("video.mp4", inverted), ("motion.safetensors", motion)):
        info = studio.store.put_file(prefix + name, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        files[name] = {"key": prefix + name, "sha256": digest, "size": info.size}
    forged = {**manifest_doc, "epoch": 0, "files": files}
    studio.store.put_bytes(prefix + MANIFEST, json.dumps(forged).encode())
    assert verify_manifest(studio.store, prefix + MANIFEST) is not None
    return prefix + MANIFEST


def test_two_verified_attempts_resolve_to_the_recorded_one_and_gc_keeps_it(
    studio: Studio, tmp_path: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from emo.cli import app

    reference = _clean_render(studio, tmp_path, studio.vocal, "reference")
    job_id = _job(studio, tmp_path, "twice")
    _fail_at_segment_2(monkeypatch, [job_id])
    with _session(studio) as session:
        recorded = session.scalar(
            select(Segment.checkpoint_uri).where(Segment.job_id == job_id, Segment.index == 1)
        )
    recorded_key = recorded.removeprefix(studio.store.url + "/")
    forged = _forge_attempt(studio, recorded_key, tmp_path)
    assert attempt_manifests(studio.store, job_id, 1)[0] == forged  # it sorts first

    output = tmp_path / "twice.mp4"
    result = render_track(job_id=job_id, output=str(output))
    assert result["rendered"] == 1
    assert np.array_equal(_frames(output), reference)

    # gc: the forged attempt lost (the database records the other); an input nobody names
    # and the finished job's scratch folder go too; every recorded checkpoint stays.
    orphan = tmp_path / "orphan.wav"
    orphan.write_bytes(b"RIFF")
    studio.store.put_file("inputs/" + "0" * 64 + ".wav", orphan)
    scratch = studio.home / "scratch" / job_id
    scratch.mkdir(parents=True, exist_ok=True)
    with _session(studio) as session:
        kept = [
            s.checkpoint_uri.removeprefix(studio.store.url + "/")
            for s in session.scalars(select(Segment).where(Segment.job_id.is_not(None)))
        ]
    before = sorted(info.key for info in studio.store.list(""))
    runner = CliRunner(env={"COLUMNS": "400"})  # one table row per line
    dry = runner.invoke(app, ["gc", "--min-age-hours", "0"])
    assert dry.exit_code == 0, dry.output
    assert "lost-attempt" in dry.output and "unused-input" in dry.output
    assert "dry run" in dry.output and str(scratch) in dry.output
    assert sorted(info.key for info in studio.store.list("")) == before  # nothing deleted
    deleted = runner.invoke(app, ["gc", "--delete", "--min-age-hours", "0"])
    assert deleted.exit_code == 0, deleted.output
    after = {info.key for info in studio.store.list("")}
    assert not any(key.startswith(forged.removesuffix(MANIFEST)) for key in after)
    assert "inputs/" + "0" * 64 + ".wav" not in after and not scratch.exists()
    for key in kept:
        assert verify_manifest(studio.store, key) is not None
    with _session(studio) as session:
        inputs = [j.audio_uri for j in session.scalars(select(Job))]
    assert all(uri.removeprefix(studio.store.url + "/") in after for uri in inputs)
    assert runner.invoke(app, ["gc", "--min-age-hours", "0"]).output.strip() == "nothing to collect"

    # An input gone from the store (deleted by hand): submitting the batch again restores it.
    (audio,) = {uri.removeprefix(studio.store.url + "/") for uri in inputs}
    studio.store.delete(audio)
    assert _job(studio, tmp_path, "twice") == job_id and studio.store.exists(audio)


def test_a_half_rendered_job_finishes_on_its_pinned_bundle_after_emo_weights_moves(
    studio: Studio, tmp_path: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from emo.cli import app

    weights = tmp_path / "weights" / "current"  # a mutable location, like s3://.../current
    save_bundle(build_components(TINY, seed=11), TINY, weights)
    monkeypatch.setenv("EMO_WEIGHTS", str(weights))
    clear_caches()
    reference = _clean_render(studio, tmp_path, studio.vocal, "reference")
    jobs = [_job(studio, tmp_path, name) for name in ("pinned", "repinned")]
    _fail_at_segment_2(monkeypatch, jobs)
    _cli_render(studio, studio.vocal, tmp_path / "cli.mp4")  # `emo render` with the bundle

    shutil.rmtree(weights)  # a new bundle is published at the same location
    save_bundle(build_components(TINY, seed=12), TINY, weights)
    clear_caches()
    # The same `emo render --weights` again: rendered already, with the other bundle; it says so.
    with pytest.raises(InputError, match="already rendered .* another -o name"):
        _cli_render(studio, studio.vocal, tmp_path / "cli.mp4", weights=weights)
    output = tmp_path / "pinned.mp4"
    result = render_track(job_id=jobs[0], output=str(output))
    assert result["rendered"] == 1  # segments 0 and 1 resumed, not refused
    assert np.array_equal(_frames(output), reference)
    sidecar = json.loads(output.with_suffix(".json").read_text())
    with _session(studio) as session:
        assert sidecar["weights_sha256"] == session.get(Job, jobs[0]).weights_sha256

    # --new-weights: the other job starts over with the bundle now at EMO_WEIGHTS.
    repinned = CliRunner().invoke(app, ["resume", jobs[1], "--new-weights"])
    assert repinned.exit_code == 0, repinned.output
    assert "from scratch" in repinned.output
    assert "segments rendered this run: 3/3" in repinned.output
    with _session(studio) as session:
        job = session.get(Job, jobs[1])
        assert job.status is JobStatus.SUCCEEDED and job.weights_sha256 != sidecar["weights_sha256"]
        assert job.attempt == 1  # its attempts started over
    gc = _gc()  # its checkpoints from the old bundle lost to the new render's
    lost = re.findall(rf"lost-attempt\W+jobs/{jobs[1]}/segments/", gc.output)
    assert len(lost) == 2, gc.output  # segments 0 and 1 of the first render
