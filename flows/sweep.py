"""sweep: the recovery a cron (or nightly) runs, so that no job waits for a render that is gone.

Every queued or running job is judged (``flows.dispatch``): left alone while someone renders
it or its run waits for a worker; marked cancelled when its run was cancelled in Prefect;
otherwise dispatched again under its next dispatch generation (a crashed render's job is first
marked failed, counting the attempt, and requeued while attempts are left). With
``retry_failed`` (nightly), failed jobs with attempts left are requeued and dispatched too.
Running it twice at once is safe: a dispatch is a compare-and-set on the job's generation.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from db.dispatch import retryable_failed
from db.jobs import requeue_job
from emo.errors import JobStateError
from flows.context import Services, services
from flows.dispatch import Outcome, settle

log = logging.getLogger(__name__)
ACTOR = "sweep"


def sweep_jobs(svc: Services, *, actor: str, retry_failed: bool) -> dict[str, Any]:
    """Requeue failed jobs (when asked), then settle every waiting job; a report by job."""
    requeued: list[str] = []
    if retry_failed:
        with svc.sessions() as session:
            failed = retryable_failed(session=session)
        for job_id in failed:
            with svc.sessions() as session:
                try:
                    requeue_job(session=session, job_id=job_id, actor=actor, reason="retry")
                    requeued.append(job_id)
                except JobStateError as error:  # moved on meanwhile
                    log.info("not retried: %s", error)
    outcomes = settle(svc, requeued, actor=actor, eager=True) if requeued else []
    outcomes += settle(svc, None, actor=actor)
    return report(outcomes)


def report(outcomes: list[Outcome]) -> dict[str, Any]:
    """What a sweep did, by kind: the jobs it found crashed, dispatched again (with how their
    render ended inline, or their new run), cancelled, gave up on, and left alone."""
    acted = [o for o in outcomes if o.action in ("dispatched", "rendered")]
    return {
        "crashed": [o.job_id for o in outcomes if o.crashed],
        "retried": {o.job_id: o.detail if o.action == "rendered" else "dispatched" for o in acted},
        "runs": {o.job_id: o.flow_run_id for o in acted if o.flow_run_id},
        "cancelled": [o.job_id for o in outcomes if o.action == "cancelled"],
        "exhausted": [o.job_id for o in outcomes if o.action == "exhausted"],
        "alive": [o.job_id for o in outcomes if o.action == "alive"],
    }


def markdown(title: str, result: dict[str, Any]) -> list[str]:
    """The report's lines for a Prefect artifact."""
    lines = [
        f"# {title}",
        "",
        f"- crashed renders found: {len(result['crashed'])}",
        f"- jobs dispatched again: {len(result['retried'])}",
        f"- jobs cancelled (their run was cancelled): {len(result['cancelled'])}",
        f"- jobs out of attempts: {len(result['exhausted'])}",
        f"- jobs left to their render: {len(result['alive'])}",
        "",
    ]
    lines += [f"- job `{job}`: {status}" for job, status in result["retried"].items()]
    return lines


@flow(name="sweep", flow_run_name="sweep")
def sweep(retry_failed: bool = False) -> dict[str, Any]:
    """Find queued and running jobs whose render is gone and dispatch them again."""
    svc = services()
    result = sweep_jobs(svc, actor=ACTOR, retry_failed=retry_failed)
    create_markdown_artifact(
        key="sweep-report", markdown="\n".join(markdown("Sweep", result)), description="sweep"
    )
    return result


if __name__ == "__main__":
    sweep()
