"""nightly: submit the manifests dropped in the store's inbox, then sweep and retry failed jobs.

A manifest stays in the inbox until its batch is registered; only then is it moved to
``processed/<batch id>/`` (copied, then deleted), or, if it is invalid, to
``rejected/<sha256 of its bytes>/`` with a note of why. A kill at any point leaves it in the
inbox (or in both places), never in neither, and the next nightly submits it again:
registration is idempotent on content, so no batch is made twice, and the folder is named by
content, so no second copy is filed. A manifest that fails for a service's sake stays in the
inbox for the next night. The new batches' jobs are dispatched; then the sweep
(``flows.sweep``) requeues failed jobs with attempts left and dispatches again every job whose
render is gone. A report artifact lists what happened.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from emo.errors import EmoError, StoreAuthError, StoreUnavailable
from emo.faults import fault_point
from flows.context import Services, services
from flows.dispatch import settle
from flows.submit_batch import submit_batch
from flows.sweep import markdown, report, sweep_jobs

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
def file_manifest(svc: Services, key: str, target: str, note: str | None = None) -> None:
    """Move a handled manifest out of the inbox: copy (with its note), then delete. Safe to
    repeat; a manifest already gone from the inbox was filed by another run."""
    if not svc.store.exists(key):
        return
    if note is not None:
        svc.store.put_bytes(f"{target}.error.txt", note.encode())
    if not svc.store.exists(target):
        svc.store.put_bytes(target, svc.store.get_bytes(key))
    fault_point("nightly.copied")
    svc.store.delete(key)


@flow(name="nightly", flow_run_name="nightly {inbox}")
def nightly(inbox: str = "inbox/", retry_failed: bool = True) -> dict[str, Any]:
    """Submit new manifests from the inbox, then sweep (and retry failed jobs); a report."""
    svc = services()
    result: dict[str, Any] = {"submitted": [], "rejected": [], "dispatched": {}}
    base = svc.store.uri(inbox.strip("/"))  # relative inputs resolve against the inbox
    new_jobs: list[str] = []
    for source in list_inbox(svc, inbox):
        name = source.rsplit("/", 1)[-1]
        try:  # one manifest at a time, whatever the others do
            batch = submit_batch(
                manifest=svc.store.uri(source), base=base, render=False, inbox=True
            )
        except (StoreUnavailable, StoreAuthError) as error:  # the store's fault: try again
            log.error("nightly: manifest %s stays in the inbox: %s", source, error)
            result["rejected"].append({"manifest": source, "error": f"will retry: {error}"})
            continue
        except EmoError as error:
            digest = hashlib.sha256(svc.store.get_bytes(source)).hexdigest()[:16]
            file_manifest(svc, source, f"rejected/{digest}/{name}", note=str(error))
            result["rejected"].append({"manifest": source, "error": str(error)})
            continue
        except Exception as error:  # noqa: BLE001 (a service failure: it stays for next night)
            log.error("nightly: manifest %s stays in the inbox: %s", source, error)
            result["rejected"].append({"manifest": source, "error": f"will retry: {error}"})
            continue
        fault_point("nightly.registered")
        file_manifest(svc, source, f"processed/{batch['batch_id'][:16]}/{name}")
        result["submitted"].append(
            {"manifest": source, "batch": batch["name"], "created": batch["created"]}
        )
        new_jobs += batch["jobs"].values()
    fault_point("nightly.filed")
    dispatched = report(settle(svc, new_jobs, actor=ACTOR, eager=True)) if new_jobs else None
    result["dispatched"] = dispatched["retried"] if dispatched else {}
    result |= sweep_jobs(svc, actor=ACTOR, retry_failed=retry_failed)
    lines = markdown("Nightly report", result)
    lines[2:2] = [
        f"- manifests submitted: {len(result['submitted'])}",
        f"- manifests rejected: {len(result['rejected'])}",
    ]
    lines += [
        f"- submitted `{s['manifest']}` as batch **{s['batch']}**" for s in result["submitted"]
    ]
    lines += [f"- rejected `{r['manifest']}`: {r['error']}" for r in result["rejected"]]
    create_markdown_artifact(
        key="nightly-report",
        markdown="\n".join(lines),
        description="nightly inbox and retry report",
    )
    return result


if __name__ == "__main__":
    nightly()
