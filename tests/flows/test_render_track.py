"""render_track and submit_batch end to end on PostgreSQL, SeaweedFS S3 and Prefect."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from db.engine import make_engine, session_factory
from db.events import job_events
from db.models import Batch, Event, Job, JobStatus, SegmentStatus
from emo import media
from emo.manifest import ManifestError
from emo.store.checkpoint import read_segment_checkpoint
from flows.context import LeaseHeld
from flows.render_track import render_track
from flows.submit_batch import submit_batch
from tests.flows.conftest import Studio, clear_caches, manifest

pytestmark = pytest.mark.slow  # whole renders


def _session(studio: Studio):
    return session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))()


BOX = [0.2, 0.15, 0.8, 0.85]
CANARY = "pw-canary-7f3a9"  # the job database's password in this test: never printed or stored


def _with_password(url: str) -> str:
    """The database URL with a password (trust authentication ignores it)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=CANARY).render_as_string(hide_password=False)


def _secrets_left(studio: Studio, output_dir: Path, secrets: list[str]) -> list[str]:
    """Where any of ``secrets`` appears: the store's text objects, the output folder, the job
    events, and the Prefect server's flow runs (parameters), logs and artifacts."""
    from prefect.client.orchestration import get_client

    texts: dict[str, str] = {}
    for item in studio.store.list(""):
        if item.key.endswith((".json", ".txt", ".yaml", ".md")):
            texts[f"store:{item.key}"] = studio.store.get_bytes(item.key).decode(errors="replace")
    for path in output_dir.rglob("*"):
        if path.suffix in (".json", ".txt"):
            texts[f"file:{path}"] = path.read_text(errors="replace")
    with _session(studio) as session:
        for event in session.scalars(select(Event)):
            texts[f"event:{event.id}"] = f"{event.reason} {json.dumps(event.detail)}"
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(limit=200):
            texts[f"run:{run.id}"] = json.dumps(run.parameters, default=str) + str(run.state)
        for log in client.read_logs(limit=200):
            texts[f"log:{log.id}"] = log.message
        for artifact in client.read_artifacts(limit=200):
            texts[f"artifact:{artifact.key}"] = json.dumps(artifact.data, default=str)
    return [where for where, text in texts.items() for secret in secrets if secret in text]


def test_three_segment_job_end_to_end(
    studio: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("EMO_DATABASE_URL", _with_password(studio.env["EMO_DATABASE_URL"]))
    monkeypatch.setenv("EMO_LINK_SECONDS", "3600")
    clear_caches()
    result = submit_batch(
        manifest=str(manifest(tmp_path / "one.yaml", studio, ["solo"])),
        output_dir=str(tmp_path / "out"),
    )
    job_id = result["jobs"]["solo"]
    assert result["dispatched"] == {job_id: "succeeded"}
    assert result["estimate_seconds"]["solo"] > 0  # counted from the tiny bundle's FLOPs
    (row,) = result["table"]  # what emo submit prints and the batch artifact shows
    assert row["estimated GPU seconds"] == round(result["estimate_seconds"]["solo"], 1)
    assert row["track seconds"] == studio.seconds and row["clips"] == math.ceil(75 / 12)

    video = tmp_path / "out" / "solo.mp4"
    info = media.probe(video)
    assert info.video_frames == math.ceil(studio.seconds * 25)
    assert info.first("audio") is not None
    sidecar = json.loads((tmp_path / "out" / "solo.json").read_text())
    assert sidecar["weights_sha256"] and sidecar["params"]["seed"] == sidecar["seed"]
    assert len(sidecar["segments"]) == 3 and sidecar["segments_rendered_this_run"] == 3

    with _session(studio) as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.SUCCEEDED and job.attempt == 1
        out = f"jobs/{job_id}/output/e{job.lease_epoch:06d}/"  # the finishing render's epoch
        assert job.output_uri == f"{studio.store.url}/{out}final.mp4" and job.lease_epoch == 1
        assert job.image_sha256 and job.audio_sha256 and job.weights_sha256
        assert job.image_uri == f"{studio.store.url}/inputs/{job.image_sha256}.png"
        assert job.qc is not None and "seam_jitter" in job.qc
        segments = job.segments
        assert [s.status for s in segments] == [SegmentStatus.DONE] * 3
        kinds = [e.kind for e in job_events(session=session, job_id=job_id)]
        statuses = [
            (e.from_status, e.to_status)
            for e in job_events(session=session, job_id=job_id)
            if e.kind == "job.status"
        ]
    assert statuses == [("queued", "running"), ("running", "succeeded")]
    assert kinds.count("segment.done") == 3 and "job.planned" in kinds and "lease.released" in kinds
    for segment in segments:
        checkpoint = read_segment_checkpoint(studio.store, job_id=job_id, index=segment.index)
        assert checkpoint is not None and checkpoint.manifest_sha256 == segment.manifest_sha256
    assert studio.store.exists(f"{out}qc.json")
    # Nothing the render wrote or reported carries the database password or the S3 secret.
    secret_key = studio.env["EMO_S3_SECRET_KEY"]
    assert _secrets_left(studio, tmp_path / "out", [CANARY, secret_key]) == []
    assert studio.store.exists(f"{out}sidecar.json")
    assert studio.store.exists(f"bundles/{job.weights_sha256}/emo.json")  # pinned copy

    # What an operator sees in the Prefect UI, read back through Prefect's API.
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterName,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["one/solo"]))
        )
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]))
        )

        def latest(key: str):
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
            assert found, f"no artifact {key}"
            return max(found, key=lambda a: a.created)

        prefix = f"job-{job_id[:12]}"
        progress, qc, video = (latest(f"{prefix}-{k}") for k in ("progress", "qc", "video"))
        table = latest(f"batch-{result['batch_id'][:12]}")
    assert "batch:one" in run.tags  # flow run named batch/job, tagged with its batch
    # The task runs are the recipe's steps, in order; a segment's run is named by its place.
    ordered = sorted(tasks, key=lambda t: t.start_time)
    steps = [re.sub(r"-[0-9a-f]{3}$", "", t.name) for t in ordered]
    assert steps[:3] == ["load model", "load inputs", "plan"], steps
    assert steps[-5:] == ["assemble", "qc", "write reports", "finish", "deliver"], steps
    assert len(steps) == 3 + 3 + 5 and steps[3].startswith("segment 0 (0:00.0-"), steps
    # The GPU slot is held only while segments render: taken once the model, the inputs and
    # the plan are ready, given back when the last segment is recorded, before assembly.
    with _session(studio) as session:
        at = {e.kind: e.at for e in job_events(session=session, job_id=job_id)}
        last_segment = max(
            e.at for e in job_events(session=session, job_id=job_id) if e.kind == "segment.done"
        )
        rendered_at = session.get(Job, job_id).rendered_at
    assert ordered[2].end_time <= at["gpu.acquired"] <= ordered[3].start_time
    assert last_segment <= at["gpu.released"] <= rendered_at <= ordered[-5].start_time
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert qc.type == "table" and "seam_jitter" in json.dumps(qc.data)
    assert f"{out}final.mp4" in str(video.data)  # a link to the final video
    assert "X-Amz-Expires=3600&" in str(video.data)  # valid for EMO_LINK_SECONDS
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[0]["job"] == "solo" and rows[0]["status"] == "succeeded"
    assert {"job", "status", "duration_s", "qc", "output"} <= set(rows[0])


def test_same_manifest_twice_is_one_batch(studio: Studio, tmp_path: Path) -> None:
    path = manifest(tmp_path / "twice.yaml", studio, ["a", "b"])
    first = submit_batch(manifest=str(path), render=False)
    second = submit_batch(manifest=str(path), render=False)
    assert first["batch_id"] == second["batch_id"] and second["created"] is False
    with _session(studio) as session:
        assert len(list(session.scalars(select(Batch)))) == 1
        assert len(list(session.scalars(select(Job)))) == 2


def test_bad_jobs_are_all_reported_and_nothing_registered(studio: Studio, tmp_path: Path) -> None:
    import yaml

    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    jobs = [
        {
            "name": "fine",
            "image": str(studio.portrait),
            "audio": str(studio.vocal),
            "face_box": [0.2, 0.2, 0.8, 0.8],
        },
        {"name": "missing", "image": str(tmp_path / "nope.png"), "audio": str(studio.vocal)},
        {
            "name": "text-audio",
            "image": str(studio.portrait),
            "audio": str(text),
            "face_policy": "full_frame",
        },
        {
            "name": "no-face",
            "image": str(studio.vocal.with_name("blank.png")),
            "audio": str(studio.vocal),
        },
    ]
    from PIL import Image

    Image.new("RGB", (64, 64), (20, 20, 20)).save(studio.vocal.with_name("blank.png"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "jobs": jobs}))
    with pytest.raises(ManifestError) as caught:
        submit_batch(manifest=str(path))
    text_error = str(caught.value)
    assert len(caught.value.problems) == 3, text_error
    assert "'missing'" in text_error and "does not exist" in text_error
    assert "'text-audio'" in text_error and "notes.wav" in text_error
    assert "'no-face'" in text_error and "no face found" in text_error
    with _session(studio) as session:
        assert list(session.scalars(select(Batch))) == []
    assert list(studio.store.list("jobs/")) == []


def test_the_studio_limits_are_checked_before_anything_is_registered(
    studio: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMO_MAX_TRACK_SECONDS", "2")  # the studio's vocal is 3 s
    monkeypatch.setenv("EMO_MAX_IMAGE_PIXELS", "1000")  # its portrait is 64 x 64
    monkeypatch.setenv("EMO_MAX_STEPS", "50")
    clear_caches()
    rows = {"long-track": {}, "big-portrait": {}, "many-steps": {"steps": 60}}
    rows["tiny-segments"] = {"segment_seconds": 0.01}
    path = tmp_path / "limits.yaml"
    jobs = []
    for name, options in rows.items():
        job = {"name": name, "image": str(studio.portrait), "audio": str(studio.vocal)}
        job.update(face_box=[0.2, 0.15, 0.8, 0.85], **options)
        jobs.append(job)
    path.write_text(yaml.safe_dump({"name": "limits", "jobs": jobs}))
    with pytest.raises(ManifestError) as caught:
        submit_batch(manifest=str(path))
    text = str(caught.value)
    assert len(caught.value.problems) == 6, text  # every problem of every job, at once
    assert "job 'many-steps' (row 3): steps 60 is above 50" in text and "EMO_MAX_STEPS" in text
    assert "job 'tiny-segments' (row 4): segment_seconds 0.01 is shorter than one clip" in text
    # The image limit is met first when decoding; its message names the user's file, not
    # emo's copy of it.
    assert text.count("more than 1,000 pixels") == 4 and str(studio.portrait) in text
    with _session(studio) as session:
        assert list(session.scalars(select(Batch))) == []
    monkeypatch.setenv("EMO_MAX_IMAGE_PIXELS", "100000")
    clear_caches()
    with pytest.raises(ManifestError, match="longer than 2 s.*EMO_MAX_TRACK_SECONDS"):
        submit_batch(manifest=str(path))


def test_two_renders_of_one_job_only_one_renders(studio: Studio, tmp_path: Path) -> None:
    result = submit_batch(
        manifest=str(manifest(tmp_path / "race.yaml", studio, ["race"], steps=12)), render=False
    )
    job_id = result["jobs"]["race"]
    outcome: dict[str, object] = {}

    def first() -> None:
        outcome["first"] = render_track(job_id=job_id)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 120
    with _session(studio) as session:
        while time.monotonic() < deadline:  # wait until the first render holds the lease
            session.expire_all()
            if session.scalar(
                select(Event).where(Event.job_id == job_id, Event.kind == "lease.acquired")
            ):
                break
            time.sleep(0.2)
    with pytest.raises(LeaseHeld, match=r"being rendered by .*:\d+:"):
        render_track(job_id=job_id)
    thread.join(timeout=300)
    assert outcome["first"]["status"] == "succeeded"
    with _session(studio) as session:
        events = job_events(session=session, job_id=job_id)
        assert sum(1 for e in events if e.kind == "segment.done") == 3  # rendered once


def test_mov_and_png_outputs(studio: Studio, tmp_path: Path) -> None:
    """ProRes 422 HQ with PCM audio, and a folder of numbered PNG frames, same frames."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "formats.yaml"
    manifest(path, studio, ["master"], format="mov", steps=3, seed=11)
    document = yaml.safe_load(path.read_text())
    document["jobs"].append({**document["jobs"][0], "name": "frames", "format": "png"})
    path.write_text(yaml.safe_dump(document))
    result = submit_batch(manifest=str(path), output_dir=str(tmp_path / "out"))
    assert set(result["dispatched"].values()) == {"succeeded"}

    frames = math.ceil(studio.seconds * 25)
    mov = media.probe(tmp_path / "out" / "master.mov")
    assert mov.first("video").codec == "prores" and mov.video_frames == frames
    assert mov.first("audio").codec.startswith("pcm_s16")
    pngs = sorted((tmp_path / "out" / "frames").glob("frame_*.png"))
    assert [p.name for p in pngs[:2]] == ["frame_000001.png", "frame_000002.png"]
    assert len(pngs) == frames
    # Same seed and inputs: the PNG frames are the mov's frames, in order (both are made from
    # the same H.264 assembly; chroma resampling differs, so compare against other frames).
    size = Image.open(pngs[0]).size
    decoded = np.concatenate(list(media.iter_frames(tmp_path / "out" / "master.mov", *size)))
    assert len(decoded) == frames

    def distance(png: Path, index: int) -> float:
        image = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
        return float(np.abs(decoded[index].astype(np.float32) - image).mean())

    for i, j in ((0, frames - 1), (frames - 1, 0), (frames // 2, 0)):
        assert distance(pngs[i], i) < distance(pngs[i], j) / 2


def test_awkward_but_valid_inputs_render(studio: Studio, tmp_path: Path) -> None:
    """A Unicode job name, a CMYK camera JPEG stored on its side (EXIF orientation 6), a
    video as the vocal track, and 48 kHz stereo: each is converted, not refused."""
    import subprocess

    import numpy as np
    import soundfile
    from PIL import Image

    from tests.flows.conftest import speech

    folder = tmp_path / "session"
    folder.mkdir()
    upright = Image.open(studio.portrait).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show
    upright.rotate(90, expand=True).convert("CMYK").save(folder / "side.jpg", exif=exif)
    stereo = np.stack([speech(1.5), speech(1.5, seed=1)], axis=1)  # (N, 2) at 16 kHz
    stereo = np.repeat(stereo, 3, axis=0)  # (3N, 2): 48 kHz
    soundfile.write(folder / "take.wav", stereo, 48000, subtype="PCM_24")
    subprocess.run(
        [media.ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25",
         "-i", str(folder / "take.wav"), "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p",
         "-c:a", "aac", str(folder / "take.mp4")],
        check=True,
    )  # fmt: skip
    name = "Ана-日本語"
    jobs = [
        {"name": name, "image": "side.jpg", "audio": "take.mp4"},  # the face is found upright
        {"name": "stereo-48k", "image": str(studio.portrait), "audio": "take.wav", "steps": 2},
    ]
    path = folder / "awkward.yaml"
    path.write_text(yaml.safe_dump({"name": "awkward", "jobs": jobs}, allow_unicode=True))

    result = submit_batch(manifest=str(path), output_dir=str(tmp_path / "out"))

    assert set(result["dispatched"].values()) == {"succeeded"}, result["table"]
    for job in (name, "stereo-48k"):
        info = media.probe(tmp_path / "out" / f"{job}.mp4")
        assert info.video_frames == math.ceil(1.5 * 25)
        assert info.first("audio") is not None
    with _session(studio) as session:
        job = session.get(Job, result["jobs"][name])
        assert job.name == name and job.output_uri.endswith("final.mp4")
