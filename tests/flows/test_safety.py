"""What a failing or displaced render must never do: clobber another render's job state,
splice in checkpoints from other weights, delete a user's files, or lose an inbox manifest."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.engine import make_engine, session_factory
from db.events import job_events
from db.leases import acquire_lease
from db.models import Job, JobStatus, Segment, SegmentStatus, utcnow
from emo.errors import EmoError
from emo.job import JobParams
from emo.models.config import TINY
from emo.outputs import replace_frame_folder
from emo.plan import plan_segments
from emo.store import LocalStore
from emo.store.checkpoint import read_segment_checkpoint, write_segment_checkpoint
from flows.context import LeaseHeld
from flows.job_run import JobRecord
from flows.render_track import render_track
from flows.segments import segment_binding
from flows.submit_batch import submit_batch
from tests.flows.conftest import Studio, manifest

pytestmark = pytest.mark.slow  # whole renders


def test_render_that_lost_its_lease_leaves_the_job_to_the_new_holder(
    studio: Studio, tmp_path: Path
) -> None:
    result = submit_batch(
        manifest=str(manifest(tmp_path / "lost.yaml", studio, ["lost"], steps=6)), render=False
    )
    job_id = result["jobs"]["lost"]
    sessions = session_factory(make_engine(studio.env["EMO_DATABASE_URL"]))

    def usurp() -> None:
        """After segment 0, another worker takes the job over as if the lease had expired."""
        deadline = time.monotonic() + 120
        with sessions() as session:
            while time.monotonic() < deadline:
                done = session.scalar(
                    select(Segment).where(
                        Segment.job_id == job_id, Segment.status == SegmentStatus.DONE
                    )
                )
                if done is not None:
                    break
                session.expire_all()
                time.sleep(0.05)
            later = utcnow() + timedelta(hours=1)  # the old lease has long expired by then
            assert acquire_lease(
                session=session,
                job_id=job_id,
                owner="other-host:1:usurper",
                ttl_seconds=7200,
                now=later,
            )

    thread = threading.Thread(target=usurp)
    thread.start()
    with pytest.raises(LeaseHeld, match="usurper"):
        render_track(job_id=job_id)
    thread.join()
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.RUNNING  # the new holder's to finish, not failed
        done = [s.index for s in job.segments if s.status is SegmentStatus.DONE]
        kinds = [e.kind for e in job_events(session=session, job_id=job_id)]
    assert done in ([0], [0, 1])  # at most the segment in flight when the lease went
    assert "lease.taken_over" in kinds


def test_checkpoints_from_other_weights_params_inputs_or_history_do_not_count(
    tmp_path: Path,
) -> None:
    """A checkpoint counts only for the render it was made for; any other reads as absent."""
    params = JobParams(
        seed=1,
        steps=4,
        guidance=2.0,
        scheduler="ddim",
        speed=0.0,
        segment_seconds=1.0,
        face_box=(0.1, 0.1, 0.9, 0.9),  # a tuple: stored as a JSON list
        face_policy="error",
        format="mp4",
    )
    job = JobRecord("job", "solo", "b", {}, "i" * 64, "a" * 64, "w" * 64)
    plan = plan_segments(
        np.ones(48000, np.float32), sample_rate=16000, fps=25, clip_frames=12, segment_seconds=1
    )
    store = LocalStore(tmp_path / "store")
    video = tmp_path / "video.mp4"
    video.write_bytes(b"frames")

    def binding(**changes) -> dict:
        found = segment_binding(job, plan, plan.segments[0], params, TINY, "w" * 64, None)
        return {**found, **changes}

    write_segment_checkpoint(
        store, job_id="job", index=0, epoch=1, files={"video.mp4": video}, meta=binding()
    )

    def fits(expect: dict) -> bool:
        return read_segment_checkpoint(store, job_id="job", index=0, expect=expect) is not None

    assert fits(binding())
    other = JobParams(**{**params.__dict__, "steps": 8})
    for changed in (
        {"weights_sha256": "v" * 64},
        {"params": other.to_dict()},
        {"previous_manifest_sha256": "m" * 64},
        {"audio_sha256": "b" * 64},
        {"plan_sha256": "p" * 64},
        {"clip_frames": 16},
        {"fps": 30},
    ):
        assert not fits(binding(**changed)), changed


def test_png_output_never_deletes_a_users_folder(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "frame_000001.png").write_bytes(b"new")
    archive = Path(shutil.make_archive(str(tmp_path / "final"), "zip", frames))

    deliveries = tmp_path / "deliveries"
    deliveries.mkdir()
    (deliveries / "contract.pdf").write_bytes(b"keep me")
    with pytest.raises(EmoError, match="not a frame folder from emo .*contract.pdf"):
        replace_frame_folder(archive, deliveries)
    assert (deliveries / "contract.pdf").read_bytes() == b"keep me"

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "frame_000001.png").write_bytes(b"old")
    (earlier / "frame_000002.png").write_bytes(b"old")
    replace_frame_folder(archive, earlier)  # a folder this command wrote: replaced whole
    assert sorted(p.name for p in earlier.iterdir()) == ["frame_000001.png"]
    assert (earlier / "frame_000001.png").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_assembled_video_of_the_wrong_length_fails_the_job(tmp_path: Path) -> None:
    """A video whose frames or audio do not match the track (another plan's segment spliced
    in) is refused at assembly, never published."""
    from emo import media
    from emo.errors import MediaError
    from emo.outputs import check_assembled
    from tests.conftest import write_wav

    audio = write_wav(tmp_path / "a.wav", np.zeros(16000, np.float32))  # 1 s: 25 frames
    plan = plan_segments(
        np.zeros(16000, np.float32), sample_rate=16000, fps=25, clip_frames=12, segment_seconds=1
    )

    def video(frames: int) -> Path:
        path = tmp_path / f"v{frames}.mp4"
        with media.VideoWriter(path, width=16, height=16, fps=25) as writer:
            writer.write(np.zeros((frames, 16, 16, 3), np.uint8))
        return media.concat_videos([path], tmp_path / f"final{frames}.mp4", audio=audio)

    check_assembled(video(25), plan)  # exactly ceil(samples / 640) frames and 1 s of audio
    with pytest.raises(MediaError, match="24 frames, the track needs 25"):
        check_assembled(video(24), plan)
