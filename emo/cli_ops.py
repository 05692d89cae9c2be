"""``emo serve``, ``emo deploy``, ``emo worker``, ``emo sweep``, ``emo slots``, ``emo gc``: the
operations commands, for whoever runs the render farm (the studio's commands are in
``emo.cli_jobs``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from emo.errors import EmoError, InputError, NotFound

console = Console(soft_wrap=True)
WORKER_QUERY_SECONDS = "2"  # how often `emo worker` asks for runs (PREFECT_WORKER_QUERY_SECONDS)


def _ago(moment: datetime | None, now: datetime) -> str:
    return "-" if moment is None else f"{(now - moment).total_seconds():.0f} s ago"


def slots(
    set_to: Annotated[
        int | None,
        typer.Option("--set", min=1, max=1024, help="change the limit (takes effect at once)"),
    ] = None,
) -> None:
    """Show the GPU limit and the renders holding slots; --set N changes the limit for every
    process that shares the job database (EMO_GPU_SLOTS seeds a new database, and `emo db
    upgrade` applies it)."""
    from db.gpu_slots import gpu_limit, gpu_slot_holders, set_gpu_limit
    from db.models import utcnow
    from flows.context import ACTOR, dead_local_owner, services

    with services().sessions() as session:
        if set_to is not None:
            previous = set_gpu_limit(session=session, slots=set_to, actor=f"{ACTOR} slots")
            console.print(f"GPU limit: {previous if previous is not None else 'none'} -> {set_to}")
        limit = gpu_limit(session=session)
        holders = gpu_slot_holders(session=session, is_dead=dead_local_owner)
    if limit is None:
        console.print("GPU limit: not set yet (the first render sets EMO_GPU_SLOTS)")
        return
    console.print(f"GPU slots: {len(holders)} of {limit} in use")
    if not holders:
        return
    now = utcnow()
    table = Table()
    for column in ("job", "id", "holder", "since", "last progress"):
        table.add_column(column)
    for h in holders:
        table.add_row(h.title, h.job_id[:12], h.owner, _ago(h.since, now), _ago(h.progress_at, now))
    console.print(table)


def share(
    batch: Annotated[str | None, typer.Argument(help="batch id (or prefix) or name")] = None,
    priority: Annotated[
        int | None, typer.Option(min=-1000, max=1000, help="served first when higher (rush)")
    ] = None,
    weight: Annotated[
        float | None, typer.Option(min=0.001, max=1000, help="its share against equal priority")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(min=0, max=100000, help="at most this many at once (0: no cap)")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="the studio's client, for reports")] = None,
) -> None:
    """How batches share the GPUs; with a BATCH and options, change its share (it takes effect
    at the next dispatch and the next free slot). `emo share BATCH --priority 10` rushes a
    batch; `--weight 2` gives it twice the slots of a weight-1 batch while both have work."""
    from db.batches import batch_named, set_share, share_rows
    from flows.context import ACTOR, services

    changes = {
        key: value
        for key, value in (("priority", priority), ("weight", weight), ("tenant", tenant))
        if value is not None
    }
    if max_concurrent is not None:
        changes["max_concurrent"] = max_concurrent or None
    if changes and batch is None:
        raise InputError("name the BATCH whose share to change (`emo share` lists them)")
    with services().sessions() as session:
        if batch is not None:
            found = batch_named(session=session, reference=batch)
            if found is None:
                raise NotFound(f"no batch matches {batch!r} (give its id, a prefix or its name)")
            if changes:
                set_share(session=session, batch_id=found.id, actor=f"{ACTOR} share", **changes)
        rows = share_rows(session=session)
    table = Table()
    for column in ("batch", "id", "tenant", "priority", "weight", "max", "dispatched", "held"):
        table.add_column(column)
    for row in rows:
        b = row.batch
        cap = "-" if b.max_concurrent is None else str(b.max_concurrent)
        table.add_row(
            b.name,
            b.id[:12],
            b.tenant or "-",
            str(b.priority),
            f"{b.weight:g}",
            cap,
            str(row.active),
            str(row.held),
        )
    if rows:
        console.print(table)
    else:
        console.print("no batch has work left")


def gc(
    delete: Annotated[bool, typer.Option("--delete", help="delete what is listed")] = False,
    unknown_jobs: Annotated[
        bool,
        typer.Option(
            "--unknown-jobs",
            help="also collect objects of jobs the database does not know (never after a "
            "database restore: resubmitting adopts them)",
        ),
    ] = False,
    min_age_hours: Annotated[
        float,
        typer.Option(
            min=0,
            help="leave inputs and bundle copies younger than this (a submit "
            "stores them before it registers their jobs)",
        ),
    ] = 24.0,
) -> None:
    """List what no job references any more (lost checkpoint attempts, outputs of displaced
    renders, unused inputs and bundle copies, scratch folders); --delete removes it. A
    checkpoint a job records, or may still adopt, is never touched."""
    from db.references import JobReferences, job_references
    from emo.store.gc import delete_garbage, find_garbage
    from flows.context import services

    svc = services()
    with svc.sessions() as session:
        jobs = job_references(session=session)
    items = find_garbage(
        svc.store,
        jobs,
        scratch=svc.settings.home / "scratch",
        include_unknown_jobs=unknown_jobs,
        min_age_seconds=min_age_hours * 3600,
    )
    if not items:
        console.print("nothing to collect")
        return
    table = Table()
    for column in ("kind", "where", "size", "why"):
        table.add_column(column)
    for item in items:
        table.add_row(item.kind, item.where, _size(item.size), item.reason)
    console.print(table)
    total = _size(sum(item.size for item in items))
    if not delete:
        console.print(f"{len(items)} item(s), {total}: dry run; `emo gc --delete` removes them")
        return

    def current(job_id: str) -> JobReferences | None:
        with svc.sessions() as session:
            found = job_references(session=session, job_ids=[job_id])
        return found[0] if found else None

    deleted = delete_garbage(svc.store, items, current=current)
    console.print(f"deleted {len(deleted)} of {len(items)} item(s)")


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def sweep(
    retry_failed: Annotated[
        bool, typer.Option(help="also requeue failed jobs with attempts left (as nightly does)")
    ] = False,
    every: Annotated[
        float | None,
        typer.Option(min=10, help="sweep again every SECONDS until stopped (a cron in a process)"),
    ] = None,
) -> None:
    """Dispatch again every queued or running job whose render is gone (crashed, never
    started, cancelled by the infrastructure); mark cancelled the jobs whose run was cancelled
    in Prefect. Safe to run from several places at once."""
    from flows.sweep import sweep as sweep_flow

    while True:
        result = sweep_flow(retry_failed=retry_failed)
        console.print(
            f"sweep: {len(result['crashed'])} crashed, {len(result['retried'])} dispatched again, "
            f"{len(result['cancelled'])} cancelled, {len(result['exhausted'])} out of attempts, "
            f"{len(result['alive'])} left to their render"
        )
        for job_id, status in result["retried"].items():
            console.print(f"  job {job_id}: {status}")
        if every is None:
            return
        time.sleep(every)


def worker(
    pool: Annotated[str, typer.Option(help="work pool: gpu-local (renders) or cpu-local")],
    limit: Annotated[
        int | None, typer.Option(min=1, help="flow runs at once (GPU pool: this host's GPUs)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="worker name; default host-pool")] = None,
) -> None:
    """Serve a work pool of the render farm on this workstation: a Prefect process worker
    that runs emo's deployments (`emo deploy --farm` made them) as processes here. Needs
    PREFECT_API_URL, EMO_DATABASE_URL and EMO_STORE_URL (and the store's keys); its runs
    dispatch renders to the farm (EMO_DISPATCH=deployment)."""
    from emo.errors import SettingsError

    missing = [
        v for v in ("PREFECT_API_URL", "EMO_DATABASE_URL", "EMO_STORE_URL") if not os.environ.get(v)
    ]
    if missing:
        raise SettingsError(
            f"{', '.join(missing)} not set: a farm worker needs the farm's Prefect API, job "
            "database and object store (see the README's 'A render farm on a few workstations')"
        )
    os.environ.setdefault("EMO_DISPATCH", "deployment")
    # Renders are dispatched as GPUs free up, not all at submit: a run should start within
    # seconds of being made, not at Prefect's default 10 s poll.
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS)
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    command += ["--type", "process", "--name", name or f"{socket.gethostname()}-{pool}"]
    if limit is not None:
        command += ["--limit", str(limit)]
    console.print(f"worker for pool {pool}: {' '.join(command[1:])}")
    sys.stdout.flush()
    os.execv(sys.executable, command)


def serve(
    port: Annotated[int, typer.Option(help="UI and API port")] = 4200,
) -> None:
    """Run a local Prefect server (UI on 127.0.0.1:PORT) and serve emo's flows to it."""
    import httpx

    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**os.environ, "PREFECT_API_URL": api},
    )
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise EmoError(f"the Prefect server did not start on port {port}")
        os.environ["PREFECT_API_URL"] = api
        console.print(f"Prefect UI: http://127.0.0.1:{port}  (Ctrl-C stops)")
        from prefect import serve as prefect_serve

        from flows.finish_job import finish_job
        from flows.nightly import nightly
        from flows.render_track import render_track
        from flows.submit_batch import submit_batch

        # No pausing of schedules on the way out: Ctrl-C stops the server too (it shares the
        # terminal's process group), and the runner retried the dead API for over a minute.
        # These deployments have no schedule (the nightly's cron is the farm's and cluster's,
        # prefect.yaml); one added here would find its overdue runs started on the next serve.
        prefect_serve(
            render_track.to_deployment(name="render-track"),
            finish_job.to_deployment(name="finish-job"),
            submit_batch.to_deployment(name="submit-batch"),
            nightly.to_deployment(name="nightly"),
            pause_on_shutdown=False,
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def deploy(
    project: Annotated[
        Path, typer.Option(help="folder with prefect.yaml and k8s/ (the checkout, /opt/emo)")
    ] = Path("."),
    image: Annotated[
        str, typer.Option(envvar="EMO_IMAGE", help="worker image of the flow-run pods")
    ] = "emo:latest",
    timezone: Annotated[
        str, typer.Option(envvar="EMO_NIGHTLY_TIMEZONE", help="time zone of the 02:00 nightly")
    ] = "UTC",
    namespace: Annotated[
        str, typer.Option(envvar="EMO_NAMESPACE", help="Kubernetes namespace of flow-run Jobs")
    ] = "emo",
    wait: Annotated[float, typer.Option(help="seconds to wait for the Prefect API")] = 0,
    farm: Annotated[
        bool,
        typer.Option(help="process pools gpu-local and cpu-local for `emo worker` (no k8s)"),
    ] = False,
) -> None:
    """Register emo with the Prefect server at PREFECT_API_URL: work pools gpu and cpu (with
    --farm: gpu-local and cpu-local), the deployments of prefect.yaml, the automations of
    k8s/automations (all idempotent)."""
    from emo.prefect_setup import deploy as register_all

    report = register_all(
        project.resolve(),
        image=image,
        timezone=timezone,
        namespace=namespace,
        wait_seconds=wait,
        farm=farm,
    )
    console.print(f"work pools: {', '.join(report.pools)}")
    console.print(
        f"deployments: {', '.join(report.deployments)} (image {image}, namespace {namespace})"
    )
    console.print(f"automations: {', '.join(report.automations)}")
    console.print(f"nightly runs at 02:00 {timezone}")


def register(app: typer.Typer) -> None:
    """Add these commands to the ``emo`` app."""
    app.command()(serve)
    app.command()(deploy)
    app.command()(slots)
    app.command()(share)
    app.command()(gc)
    app.command()(sweep)
    app.command()(worker)
