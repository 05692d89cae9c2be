"""finish-job: what follows a job's last segment, on the CPU pool, so the GPU pod is free.

A render hands its job over here (``flows.dispatch.hand_off``) once its last segment is
recorded and its GPU slot given back, then ends. This run takes the job's lease (a new epoch)
-> reads the model's card (configuration and bundle hash from ``emo.json``; no weights) ->
loads the inputs -> the plan -> checks every segment's checkpoint against what it must match
-> assemble -> QC -> write the reports -> finish (the job succeeded, fenced by the epoch) ->
deliver. It renders nothing: a segment that no longer verifies fails the job, naming it, and
`emo resume` renders it again. Running it twice is safe, as for a render.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from emo.errors import EmoError
from emo.plan import PlannedSegment
from flows.context import JobLease, services
from flows.dispatch import admit_next
from flows.job_run import JobOutcome, start_job
from flows.render_inputs import job_params, load_inputs, plan_job, read_model_card
from flows.render_output import complete
from flows.render_track import job_run_name
from flows.retry import in_place
from flows.segments import JobSetup, SegmentLedger

REASON = "finishing on the CPU pool (its segments are rendered)"


class SegmentUnverified(EmoError):
    """A segment's checkpoint no longer verifies when the job is being finished."""


def unverified(job_id: str, segment: PlannedSegment) -> SegmentUnverified:
    return SegmentUnverified(
        f"segment {segment.index} of job {job_id} has no verified checkpoint left to assemble "
        f"(removed or altered since it was rendered); `emo resume {job_id[:12]}` renders it again"
    )


@flow(name="finish-job", flow_run_name=job_run_name, log_prints=True)
def finish_job(job_id: str, output: str | None = None) -> dict[str, Any]:
    """Assemble, check and publish a job whose segments are all rendered."""
    svc = services()
    started = time.perf_counter()
    try:
        # The render that handed the job over gives its lease back as it ends (or it lapses).
        wait = svc.settings.lease_seconds + svc.settings.heartbeat_seconds
        with JobLease(svc, job_id, wait_seconds=wait) as lease, JobOutcome(lease) as outcome:
            job = in_place(lambda: start_job(lease, reason=REASON), lease=lease, what="starting")
            card = read_model_card(lease, job.weights_sha256)
            params = job_params(lease, job, card.config)
            inputs = load_inputs(lease, job, params, card.config.resolution)
            plan = plan_job(lease, inputs.audio, params, card.config.clip_frames)
            ledger = SegmentLedger.open(lease, job, JobSetup(card, params, inputs, plan))
            for segment in plan.segments:
                checkpoint = ledger.reusable(segment, ledger.binding(segment))
                if checkpoint is None:
                    raise unverified(job_id, segment)
                ledger.add(checkpoint)
            outcome.result = complete(lease, ledger.done(), started, output)
    finally:
        admit_next(svc, actor="finish-job")  # a failed job's place is free
    return outcome.result


if __name__ == "__main__":
    import sys

    finish_job(sys.argv[1])
