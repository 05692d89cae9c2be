"""nightly: pick up manifests dropped in the store's inbox, and retry failed jobs.

Each manifest under the inbox prefix is moved to ``processed/<date>/`` (copied, then deleted
from the inbox) before it is submitted, so each is processed once; a crash between the two
steps can only resubmit the same manifest, which is idempotent. Failed jobs with attempts left
are requeued and rendered. So are crashed jobs: still ``running`` but with no live lease (their
pod or node died; the zombie automation marks such flow runs Crashed). They are marked failed
first, so a crash counts as an attempt, and rendering them again resumes from their last
verified segment. A report artifact lists what happened.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select

from db.jobs import fail_crashed_job, requeue_job
from db.models import Job, JobStatus
from emo.errors import EmoError
from flows.context import Services, services
from flows.submit_batch import dispatch, submit_batch

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json", ".csv")
ACTOR = "nightly"
log = logging.getLogger(__name__)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def list_inbox(svc: Services, inbox: str) -> list[str]:
    """Keys of the manifests waiting directly under the inbox prefix."""
    inbox = inbox.strip("/") + "/"
    return [
        info.key
        for info in svc.store.list(inbox)
        if "/" not in info.key[len(inbox) :] and info.key.lower().endswith(MANIFEST_SUFFIXES)
    ]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def claim_manifest(svc: Services, key: str, target: str) -> bool:
    """Move one manifest to ``target`` (copy, then delete); False if another run took it.

    Safe to retry: a manifest already copied but not yet deleted is finished, not copied
    again; one that is gone from the inbox and from ``target`` belongs to another run.
    """
    if not svc.store.exists(key):
        return False
    if not svc.store.exists(target):
        svc.store.put_bytes(target, svc.store.get_bytes(key))
    svc.store.delete(key)
    return True


def _return_to_inbox(svc: Services, key: str, source: str) -> None:
    """Put a claimed manifest back where it came from (best effort; logged if impossible)."""
    try:
        if svc.store.exists(key):
            svc.store.put_bytes(source, svc.store.get_bytes(key))
            svc.store.delete(key)
    except Exception as error:  # noqa: BLE001 (the store itself is down: say where it is)
        log.error("manifest stays at %s (could not return it to %s): %s", key, source, error)


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


@task(cache_policy=NO_CACHE)
def fail_crashed(svc: Services) -> list[str]:
    """Mark failed the running jobs nobody renders (``fail_crashed_job`` checks the lease)."""
    with svc.sessions() as session:
        running = list(session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING)))
    crashed = []
    for job_id in running:
        with svc.sessions() as session:
            if fail_crashed_job(session=session, job_id=job_id, actor=ACTOR):
                crashed.append(job_id)
    return crashed


@flow(name="nightly", flow_run_name="nightly {inbox}")
def nightly(inbox: str = "inbox/", retry_failed: bool = True) -> dict[str, Any]:
    """Submit new manifests from the inbox, then retry failed jobs; publish a report."""
    svc = services()
    report: dict[str, Any] = {"submitted": [], "rejected": [], "crashed": [], "retried": {}}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = svc.store.uri(inbox.strip("/"))  # relative inputs resolve against the inbox
    for source in list_inbox(svc, inbox):
        key = f"processed/{stamp}/{source.rsplit('/', 1)[-1]}"
        try:  # one manifest at a time: claimed, then submitted, whatever the others do
            if not claim_manifest(svc, source, key):
                continue
            result = submit_batch(manifest=svc.store.uri(key), base=base)
            report["submitted"].append(
                {"manifest": key, "batch": result["name"], "created": result["created"]}
            )
        except EmoError as error:
            report["rejected"].append({"manifest": key, "error": str(error)})
        except Exception as error:  # noqa: BLE001 (a service failure: retry it next night)
            log.error("nightly: manifest %s failed, back to the inbox: %s", source, error)
            _return_to_inbox(svc, key, source)
            report["rejected"].append({"manifest": source, "error": f"will retry: {error}"})
    if retry_failed:
        report["crashed"] = fail_crashed(svc)
        report["retried"] = dispatch(svc, "nightly-retry", requeue_failed(svc), None)
    lines = [
        "# Nightly report",
        "",
        f"- manifests submitted: {len(report['submitted'])}",
        f"- manifests rejected: {len(report['rejected'])}",
        f"- crashed jobs found (marked failed): {len(report['crashed'])}",
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
