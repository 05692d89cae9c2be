"""nightly: pick up manifests dropped in the store's inbox, and retry failed jobs.

Each manifest under the inbox prefix is moved to ``processed/<date>/`` (copied, then deleted
from the inbox) before it is submitted, so each is processed once; a crash between the two
steps can only resubmit the same manifest, which is idempotent. Failed jobs with attempts left
are requeued and rendered. A report artifact lists what happened.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select

from db.jobs import requeue_job
from db.models import Job, JobStatus
from emo.errors import EmoError
from flows.context import Services, services
from flows.submit_batch import dispatch, submit_batch

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json", ".csv")
ACTOR = "nightly"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def claim_inbox(svc: Services, inbox: str) -> list[tuple[str, str]]:
    """Move every manifest out of the inbox; returns (processed key, original base URI)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    inbox = inbox.strip("/") + "/"
    claimed = []
    for info in list(svc.store.list(inbox)):
        relative = info.key[len(inbox) :]
        if "/" in relative or not relative.lower().endswith(MANIFEST_SUFFIXES):
            continue  # inputs next to manifests stay where the manifests point
        target = f"processed/{stamp}/{relative}"
        svc.store.put_bytes(target, svc.store.get_bytes(info.key))
        svc.store.delete(info.key)
        claimed.append((target, svc.store.uri(inbox.rstrip("/"))))
    return claimed


@task(cache_policy=NO_CACHE)
def requeue_failed(svc: Services) -> list[str]:
    """Requeue failed jobs that have attempts left; returns their ids."""
    with svc.sessions() as session:
        failed = list(
            session.scalars(
                select(Job).where(Job.status == JobStatus.FAILED, Job.attempt < Job.max_attempts)
            )
        )
        requeued = []
        for job in failed:
            requeue_job(session=session, job_id=job.id, actor=ACTOR, reason="nightly retry")
            requeued.append(job.id)
    return requeued


@flow(name="nightly", flow_run_name="nightly {inbox}")
def nightly(inbox: str = "inbox/", retry_failed: bool = True) -> dict[str, Any]:
    """Submit new manifests from the inbox, then retry failed jobs; publish a report."""
    svc = services()
    report: dict[str, Any] = {"submitted": [], "rejected": [], "retried": {}}
    for key, base in claim_inbox(svc, inbox):
        try:
            result = submit_batch(manifest=svc.store.uri(key), base=base)
            report["submitted"].append(
                {"manifest": key, "batch": result["name"], "created": result["created"]}
            )
        except EmoError as error:
            report["rejected"].append({"manifest": key, "error": str(error)})
    if retry_failed:
        report["retried"] = dispatch(svc, "nightly-retry", requeue_failed(svc), None)
    lines = [
        "# Nightly report",
        "",
        f"- manifests submitted: {len(report['submitted'])}",
        f"- manifests rejected: {len(report['rejected'])}",
        f"- failed jobs retried: {len(report['retried'])}",
        "",
    ]
    lines += [
        f"- submitted `{s['manifest']}` as batch **{s['batch']}**" for s in report["submitted"]
    ]
    lines += [f"- rejected `{r['manifest']}`: {r['error']}" for r in report["rejected"]]
    lines += [f"- retried job `{job}`: {status}" for job, status in report["retried"].items()]
    create_markdown_artifact(
        key="nightly-report",
        markdown="\n".join(lines),
        description="nightly inbox and retry report",
    )
    return report


if __name__ == "__main__":
    nightly()
