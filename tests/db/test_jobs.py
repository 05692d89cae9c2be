"""Batches, the job state machine, events, segment plans, on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, select

from db.batches import JobSpec, register_batch
from db.events import job_events
from db.jobs import finish_job, get_job, requeue_job, transition_job
from db.leases import acquire_lease
from db.models import Event, Job, JobStatus, SegmentStatus, utcnow
from db.segments import list_segments, record_segment_done, store_plan
from emo.errors import EpochSuperseded, JobStateError
from emo.plan import plan_segments

S = JobStatus


def _batch(session, sha: str = "a" * 64, jobs: int = 2, max_attempts: int = 3):
    specs = [
        JobSpec(
            name=f"job-{i}",
            image_uri=f"s3://in/{i}.png",
            audio_uri=f"s3://in/{i}.wav",
            params={"seed": i},
            priority=i,
            max_attempts=max_attempts,
        )
        for i in range(jobs)
    ]
    return register_batch(
        session=session, name="studio-a", manifest_sha256=sha, jobs=specs, actor="tester"
    )


def test_register_batch_is_idempotent(session) -> None:
    batch, created = _batch(session)
    again, created_again = _batch(session)
    assert created and not created_again
    assert again.id == batch.id
    assert session.scalar(select(func.count()).select_from(Job)) == 2
    kinds = list(session.scalars(select(Event.kind).order_by(Event.id)))
    assert kinds == ["batch.registered", "job.created", "job.created"]
    other, created_other = _batch(session, sha="b" * 64)
    assert created_other and other.id != batch.id


def test_state_machine_happy_path_and_events(session) -> None:
    batch, _ = _batch(session)
    job_id = batch.jobs[0].id
    transition_job(session=session, job_id=job_id, to=S.RUNNING, actor="w1")
    job = transition_job(
        session=session, job_id=job_id, to=S.SUCCEEDED, actor="w1", reason="rendered"
    )
    assert job.status is S.SUCCEEDED and job.attempt == 1 and job.finished_at is not None
    events = [
        (e.from_status, e.to_status, e.actor)
        for e in job_events(session=session, job_id=job_id)
        if e.kind == "job.status"
    ]
    assert events == [("queued", "running", "w1"), ("running", "succeeded", "w1")]


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], S.SUCCEEDED),
        ([], S.FAILED),
        ([], S.QUEUED),
        ([S.RUNNING, S.SUCCEEDED], S.CANCELLED),
        ([S.RUNNING], S.RUNNING),
        ([S.RUNNING, S.SUCCEEDED], S.RUNNING),
        ([S.RUNNING, S.SUCCEEDED], S.QUEUED),
        ([S.RUNNING, S.FAILED], S.RUNNING),
        ([S.RUNNING, S.FAILED], S.SUCCEEDED),
        ([S.RUNNING, S.CANCELLED], S.QUEUED),
    ],
)
def test_illegal_transitions_raise(session, path: list[JobStatus], illegal: JobStatus) -> None:
    batch, _ = _batch(session)
    job_id = batch.jobs[0].id
    for status in path:
        transition_job(session=session, job_id=job_id, to=status, actor="w1", reason="test")
    before = len(job_events(session=session, job_id=job_id))
    with pytest.raises(JobStateError, match=f"cannot go from .* to {illegal.value}"):
        transition_job(session=session, job_id=job_id, to=illegal, actor="w1")
    assert get_job(session=session, job_id=job_id).status is (path[-1] if path else S.QUEUED)
    assert len(job_events(session=session, job_id=job_id)) == before  # nothing recorded


def test_requeue_counts_attempts_up_to_the_limit(session) -> None:
    batch, _ = _batch(session, max_attempts=2)
    job_id = batch.jobs[0].id
    for attempt in (1, 2):
        transition_job(session=session, job_id=job_id, to=S.RUNNING, actor="w")
        job = transition_job(
            session=session, job_id=job_id, to=S.FAILED, actor="w", reason="GPU out of memory"
        )
        assert job.attempt == attempt and job.error == "GPU out of memory"
        if attempt == 1:
            job = requeue_job(session=session, job_id=job_id, actor="nightly", reason="retry")
            assert job.status is S.QUEUED and job.attempt == 1
    with pytest.raises(JobStateError, match="2 of 2 attempts"):
        requeue_job(session=session, job_id=job_id, actor="nightly", reason="retry")
    requeue_events = [
        e
        for e in job_events(session=session, job_id=job_id)
        if e.to_status == "queued" and e.from_status == "failed"
    ]
    assert len(requeue_events) == 1 and requeue_events[0].actor == "nightly"


def test_plan_is_stored_once(session) -> None:
    batch, _ = _batch(session)
    job_id = batch.jobs[0].id
    audio = np.random.default_rng(0).normal(size=16000 * 9).astype(np.float32) * 0.1
    plan = plan_segments(audio, sample_rate=16000, fps=25, clip_frames=12, segment_seconds=2)
    segments = store_plan(session=session, job_id=job_id, plan=plan, actor="flow")
    assert [s.index for s in segments] == list(range(len(plan.segments)))
    assert sum(s.frame_end - s.frame_start for s in segments) == plan.total_frames
    # The same plan again is accepted and changes nothing.
    assert len(store_plan(session=session, job_id=job_id, plan=plan, actor="flow")) == len(segments)
    other = plan_segments(audio, sample_rate=16000, fps=25, clip_frames=12, segment_seconds=4)
    with pytest.raises(JobStateError, match="already has a different segment plan"):
        store_plan(session=session, job_id=job_id, plan=other, actor="flow")
    assert get_job(session=session, job_id=job_id).plan_sha256 == plan.sha256


def test_segment_completion_is_recorded(session) -> None:
    batch, _ = _batch(session)
    job_id = batch.jobs[0].id
    audio = np.ones(16000 * 3, dtype=np.float32)
    plan = plan_segments(audio, sample_rate=16000, fps=25, clip_frames=12, segment_seconds=1)
    store_plan(session=session, job_id=job_id, plan=plan, actor="flow")
    lease = acquire_lease(session=session, job_id=job_id, owner="flow", ttl_seconds=60)
    record_segment_done(
        session=session,
        job_id=job_id,
        index=1,
        checkpoint_uri="s3://b/jobs/x/segments/00001/r/manifest.json",
        manifest_sha256="c" * 64,
        render_seconds=12.5,
        actor="flow",
        epoch=lease.epoch,
    )
    segments = list_segments(session=session, job_id=job_id)
    assert [s.status for s in segments[:2]] == [SegmentStatus.PENDING, SegmentStatus.DONE]
    assert segments[1].render_seconds == 12.5 and segments[1].completed_at is not None
    assert segments[1].epoch == lease.epoch == 1
    done = [e for e in job_events(session=session, job_id=job_id) if e.kind == "segment.done"]
    assert len(done) == 1 and done[0].segment_index == 1


def test_a_superseded_epoch_can_neither_record_nor_finish(session) -> None:
    """Every acquisition moves the job's epoch on; the displaced holder's writes are refused
    and leave nothing behind, the current holder's go through."""
    batch, _ = _batch(session)
    job_id = batch.jobs[0].id
    audio = np.ones(16000 * 3, dtype=np.float32)
    plan = plan_segments(audio, sample_rate=16000, fps=25, clip_frames=12, segment_seconds=1)
    store_plan(session=session, job_id=job_id, plan=plan, actor="flow")
    transition_job(session=session, job_id=job_id, to=S.RUNNING, actor="old")
    old = acquire_lease(session=session, job_id=job_id, owner="old", ttl_seconds=1).epoch
    later = utcnow() + timedelta(seconds=5)  # the old lease has expired: taken over
    new = acquire_lease(session=session, job_id=job_id, owner="new", ttl_seconds=60, now=later)
    assert (old, new.epoch) == (1, 2) and get_job(session=session, job_id=job_id).lease_epoch == 2

    def record(epoch: int, sha: str) -> None:
        record_segment_done(
            session=session,
            job_id=job_id,
            index=0,
            checkpoint_uri=f"s3://b/{sha}/manifest.json",
            manifest_sha256=sha * 64,
            render_seconds=1.0,
            actor="x",
            epoch=epoch,
        )

    with pytest.raises(EpochSuperseded, match="epoch 1, but the job is at epoch 2"):
        record(old, "o")
    with pytest.raises(EpochSuperseded):
        finish_job(
            session=session,
            job_id=job_id,
            epoch=old,
            output_uri="s3://b/old.mp4",
            qc={},
            actor="old",
            reason="done",
        )
    job = get_job(session=session, job_id=job_id)
    assert job.status is S.RUNNING and job.output_uri is None
    assert list_segments(session=session, job_id=job_id)[0].status is SegmentStatus.PENDING
    record(new.epoch, "n")
    finish_job(
        session=session,
        job_id=job_id,
        epoch=new.epoch,
        output_uri="s3://b/new.mp4",
        qc={},
        actor="new",
        reason="done",
    )
    job = get_job(session=session, job_id=job_id)
    assert job.status is S.SUCCEEDED and job.output_uri == "s3://b/new.mp4"
    assert list_segments(session=session, job_id=job_id)[0].manifest_sha256 == "n" * 64


def test_only_a_failed_job_is_requeued(session) -> None:
    """A sweep that saw a job failed must not pull it back from a render that resumed it
    meanwhile: requeue refuses a running job (only its render stops it, fenced)."""
    batch, _ = _batch(session)
    job_id = batch.jobs[0].id
    transition_job(session=session, job_id=job_id, to=S.RUNNING, actor="render")
    with pytest.raises(JobStateError, match="only a failed job is requeued"):
        requeue_job(session=session, job_id=job_id, actor="sweep", reason="retry")
    job = get_job(session=session, job_id=job_id)
    assert (job.status, job.attempt) == (S.RUNNING, 1)
