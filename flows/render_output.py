"""After the last segment: assemble, QC, the reports, the job's fenced success, delivery.

Everything is written under this render's lease epoch (``emo.outputs.output_prefix``) and
counts only once ``finish`` records the job succeeded, which only the lease holder can do.
Only then is the user's copy written (``deliver``): a render that lost its job never
replaces a video another render delivered.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from db.jobs import finish_job, get_job
from db.models import JobStatus
from emo import media
from emo.errors import EpochSuperseded, JobStateError
from emo.eval.qc import qc_report
from emo.outputs import check_assembled, output_prefix, publish_output
from flows.context import JobLease
from flows.retry import in_place
from flows.segments import RenderedJob
from flows.sidecar import build_sidecar


@dataclass(frozen=True)
class FinalVideo:
    """The assembled video: its local copy and its key in the store (under this epoch)."""

    path: Path
    key: str


@task(name="assemble", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def assemble(lease: JobLease, done: RenderedJob) -> FinalVideo:
    """Concatenate the segments (stream copy), mux the track, check the result, export, and
    upload it under this render's epoch (unpublished until the job's fenced commit)."""
    lease.check()  # each step after the segments starts by checking: stopped, cancelled, lost
    store, scratch = lease.svc.store, done.inputs.scratch
    videos = [
        in_place(
            lambda c=c: store.get_file(c.key("video.mp4"), scratch / f"final-{c.index:05d}.mp4"),
            lease=lease,
            what=f"fetching segment {c.index}",
        )
        for c in done.checkpoints
    ]
    final = media.concat_videos(videos, scratch / "final.mp4", audio=done.inputs.audio_path)
    for video in videos:
        video.unlink(missing_ok=True)
    check_assembled(final, done.plan)
    if done.params.format == "mov":
        final = media.to_prores(final, scratch / "final.mov")
    elif done.params.format == "png":
        frames = media.to_png_sequence(final, scratch / "final_png")
        final = Path(shutil.make_archive(str(scratch / "final_png"), "zip", frames[0].parent))
    key = f"{output_prefix(lease.job_id, lease.epoch)}{final.name}"
    in_place(lambda: store.put_file(key, final), lease=lease, what="uploading the video")
    return FinalVideo(final, key)


@task(name="qc", cache_policy=NO_CACHE)
def quality(lease: JobLease, done: RenderedJob) -> dict[str, Any]:
    """QC scores and warnings of the final video (always read from the assembled mp4)."""
    lease.check()
    settings, plan = lease.svc.settings, done.plan
    boundaries = {c * plan.clip_frames for c in range(1, plan.total_clips)}
    boundaries |= {s.frame_start for s in plan.segments[1:]}
    return qc_report(
        done.inputs.scratch / "final.mp4",
        reference=done.inputs.portrait,
        face_box=done.inputs.face_box,
        audio=done.inputs.audio,
        samples_per_frame=settings.samples_per_frame,
        boundaries=boundaries,
        max_seam_jitter=settings.qc_max_seam_jitter,
        min_identity=settings.qc_min_identity,
        min_sync=settings.qc_min_sync,
    )


@task(name="write reports", cache_policy=NO_CACHE)
def write_reports(lease: JobLease, qc: dict[str, Any], sidecar: dict[str, Any]) -> None:
    """The QC report and the sidecar, beside the video under this render's epoch."""
    lease.check()
    prefix = output_prefix(lease.job_id, lease.epoch)
    reports = {
        f"{prefix}qc.json": json.dumps(qc, indent=2).encode(),
        f"{prefix}sidecar.json": json.dumps(sidecar, indent=2, sort_keys=True).encode(),
    }
    for key, data in reports.items():
        in_place(lambda k=key, d=data: lease.svc.store.put_bytes(k, d), lease=lease, what=key)


@task(name="finish", cache_policy=NO_CACHE)
def finish(lease: JobLease, final: FinalVideo, qc: dict[str, Any], rendered: int) -> None:
    """Record the job succeeded with this epoch's output, if this render still holds it."""
    output_uri = lease.svc.store.uri(final.key)
    in_place(lease.verify, lease=lease, what="checking the lease")

    def commit() -> None:
        lease.check()  # a SIGTERM swallowed while verify read the database stops it here
        with lease.svc.sessions() as session:
            try:
                finish_job(
                    session=session,
                    job_id=lease.job_id,
                    epoch=lease.epoch,
                    output_uri=output_uri,
                    qc=qc,
                    actor=lease.owner,
                    reason=f"{rendered} segment(s) rendered this run",
                )
            except JobStateError:
                # A retry after a commit whose answer was lost finds the job finished by us.
                row = get_job(session=session, job_id=lease.job_id)
                if row.status is not JobStatus.SUCCEEDED or row.output_uri != output_uri:
                    raise

    try:
        in_place(commit, lease=lease, what="finishing the job")
    except EpochSuperseded as error:
        lease.fenced(error)


@task(name="deliver", cache_policy=NO_CACHE)
def deliver(
    lease: JobLease,
    done: RenderedJob,
    final: FinalVideo,
    sidecar: dict[str, Any],
    output: str | None,
) -> dict[str, Any]:
    """The user's copy (if asked), the UI's QC table and video link; what the run returns."""
    svc, job, qc = lease.svc, done.job, sidecar["qc"]
    target = publish_output(final.path, Path(output), sidecar) if output else None
    key = f"job-{job.job_id[:12]}"
    create_table_artifact(
        key=f"{key}-qc",
        table=[{"measure": k, "value": str(v)} for k, v in qc.items() if k != "thresholds"],
        description=f"QC of {job.batch_name}/{job.name}",
    )
    create_link_artifact(
        key=f"{key}-video",
        link=svc.store.url_for(final.key, expires_seconds=svc.settings.link_seconds),
        link_text=f"{job.name}{final.path.suffix}",
        description=f"final video of {job.batch_name}/{job.name}",
    )
    shutil.rmtree(done.inputs.scratch, ignore_errors=True)
    prefix = output_prefix(job.job_id, lease.epoch)
    return {
        "job_id": job.job_id,
        "status": JobStatus.SUCCEEDED.value,
        "flow_run_id": sidecar["prefect_flow_run"],
        "qc_uri": svc.store.uri(f"{prefix}qc.json"),
        "sidecar_uri": svc.store.uri(f"{prefix}sidecar.json"),
        "output_uri": svc.store.uri(final.key),
        "output": str(target) if target else None,
        "qc": qc,
        "rendered": done.rendered,
        "segments": len(done.plan.segments),
    }


def complete(
    lease: JobLease, done: RenderedJob, started: float, output: str | None
) -> dict[str, Any]:
    """Everything after the segments, in order: assemble -> QC -> the reports -> the job's
    fenced success -> delivery (``started``: when the run began, for the sidecar)."""
    final = assemble(lease, done)
    qc = quality(lease, done)
    seconds = time.perf_counter() - started
    sidecar = build_sidecar(
        done, qc, epoch=lease.epoch, fps=lease.svc.settings.fps, run_seconds=seconds
    )
    write_reports(lease, qc, sidecar)
    finish(lease, final, qc, done.rendered)
    return deliver(lease, done, final, sidecar, output)
