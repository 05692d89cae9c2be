"""render_track: one job, segment by segment, resumable from its checkpoints.

The flow body is the recipe; each step is a task the Prefect UI shows under the same name.
Take the job's lease (its epoch is this render's fencing token) -> load the pinned model ->
load the inputs (checked against their hashes) -> plan -> take a GPU slot -> each segment in
order: reuse its verified checkpoint, or render it from the previous segment's motion state
and record it (between segments the slot goes to another batch if fair sharing owes that
batch one, and is waited for again with the model loaded) -> release the GPU (and dispatch the
next job) -> hand the rest to a finish-job
run on the CPU pool where one is deployed (``flows.finish_job``; the GPU pod ends here), or
else: assemble -> QC -> write the reports -> finish (the job succeeded, fenced by the epoch)
-> only then deliver the user's copy. However the render ends, ``JobOutcome`` records it;
verified checkpoints always stay in place. The slot is held only while segments render:
loading happens before it (while other jobs render, in a run dispatched ahead,
``EMO_DISPATCH_LOOKAHEAD``) and finishing after it.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from db.fair_share import mark_rendered
from db.jobs import get_job
from emo.render import release_cached_memory
from flows.context import JobLease, services
from flows.dispatch import admit_next, hand_off
from flows.gpu_slot import GpuSlot
from flows.job_run import JobOutcome, check_cancelled, start_job
from flows.render_inputs import job_params, load_inputs, load_model, plan_job
from flows.render_output import complete
from flows.retry import in_place
from flows.segments import JobSetup, ModelCard, SegmentLedger, render_segment_task


def job_run_name() -> str:
    job_id = flow_run.parameters.get("job_id", "?")
    try:
        with services().sessions() as session:
            job = get_job(session=session, job_id=job_id)
            return f"{job.batch.name}/{job.name}"
    except Exception:  # noqa: BLE001 (a name is cosmetic; never fail a run over it)
        return f"job {job_id}"


def gpu_slot(lease: JobLease) -> GpuSlot:
    """One of the farm's GPU slots for this render, waited for while the job stays wanted."""
    settings = lease.svc.settings
    return GpuSlot(
        lease.svc,
        lease,
        wait_seconds=settings.slot_wait_seconds,
        grace_seconds=settings.heartbeat_seconds,
        on_wait=lambda: check_cancelled(lease),
        lazy=True,
    )


def rendered(lease: JobLease) -> None:
    """The last segment is recorded and the slot given back: the job no longer counts against
    the GPUs (``db.fair_share``), so the next one is dispatched now."""
    with lease.svc.sessions() as session:
        mark_rendered(session=session, job_id=lease.job_id, epoch=lease.epoch)
    admit_next(lease.svc, actor=lease.owner)


@flow(name="render-track", flow_run_name=job_run_name, log_prints=True)
def render_track(job_id: str, output: str | None = None) -> dict[str, Any]:
    """Render one job; safe to run again (it resumes from the last verified segment)."""
    svc = services()
    started = time.perf_counter()
    try:
        with JobLease(svc, job_id) as lease, JobOutcome(lease) as outcome:
            job = in_place(lambda: start_job(lease), lease=lease, what="starting")
            pipeline = load_model(lease, job.weights_sha256)  # warmed while others render
            params = job_params(lease, job, pipeline.config)
            inputs = load_inputs(lease, job, params, pipeline.config.resolution)
            plan = plan_job(lease, inputs.audio, params, pipeline.config.clip_frames)
            setup = JobSetup(ModelCard.of(pipeline), params, inputs, plan, pipeline)
            ledger = SegmentLedger.open(lease, job, setup)
            with gpu_slot(lease) as gpu:  # the GPU renders segments, and nothing else
                for segment in plan.segments:
                    binding = ledger.binding(segment)
                    checkpoint = ledger.reusable(segment, binding)
                    if checkpoint is not None:
                        ledger.add(checkpoint)
                        continue
                    if gpu.give_way():  # to another batch, if fair sharing owes it a slot
                        release_cached_memory()  # the weights stay; the activations' cache goes
                    if not gpu.held:  # at the first segment to render, or after giving way
                        gpu.take()
                        admit_next(svc, actor=lease.owner)  # its batch's next job may load now
                    fresh = render_segment_task(
                        lease, setup, segment, ledger.previous, binding, ledger.motion
                    )
                    ledger.add(fresh.checkpoint, fresh.motion)
            rendered(lease)  # the next job may take the GPU while this one finishes
            done = ledger.done()
            outcome.result = hand_off(lease, done, output) or complete(lease, done, started, output)
    finally:
        admit_next(svc, actor="render-track")  # however it ended, its place is free
    return outcome.result


if __name__ == "__main__":
    import sys

    render_track(sys.argv[1])
