"""Dispatch: give each waiting job a live render, and never hand back a run that died.

A queued or running job is in one of three conditions, judged from the job database (its lease)
and the Prefect server (the render run of its latest dispatch):

- **cancelled**: its run, or the submit-batch run that submitted its batch, was cancelled in
  Prefect (the UI's Cancel) without the render getting to say so (checked first: a render
  still holding the job stops at its next heartbeat once the job is marked cancelled);
- **alive**: someone renders it (a live lease), or its run waits for a worker or a GPU pool
  slot (scheduled, paused), or started moments ago (pending: a pod being scheduled or an
  image pulled, for ten times the grace);
- **gone**: its run crashed, failed or completed without finishing the job, never started,
  or Prefect no longer knows it. A running job is first marked failed as crashed (its lease
  revoked, the crash counted as an attempt) and requeued while attempts are left; then the
  job is dispatched again under the next dispatch generation, so its new run has a new
  idempotency key. A dispatch whose run was never recorded (its dispatcher died inside
  ``run_deployment``) is issued again under the same generation: the same key gets the same
  run back if it was made.

Submitting a batch again and the sweep (nightly, ``emo sweep``) both go through ``settle``.
Inline (no deployments), a job is rendered here instead, in this process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import tags
from prefect.client.schemas.objects import StateType

from db.dispatch import (
    DispatchView,
    begin_dispatch,
    hold_again,
    record_finish_run,
    record_run,
    waiting_jobs,
)
from db.fair_share import admit_jobs
from db.gpu_slots import lock_gpu_limit
from db.jobs import fail_crashed_job, get_job, requeue_job, transition_job
from db.models import JobStatus, utcnow
from emo.errors import JobStateError
from emo.faults import fault_point
from flows.context import JobLease, Services, dead_local_owner

if TYPE_CHECKING:
    from flows.segments import RenderedJob

log = logging.getLogger(__name__)

FINISHED_RUN = (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED)
CANCELLING = (StateType.CANCELLED, StateType.CANCELLING)
PENDING_GRACE_FACTOR = 10  # a pending run (a pod scheduled, an image pulled) may take longer


class Verdict(StrEnum):
    ALIVE = "alive"
    GONE = "gone"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class RunInfo:
    """The Prefect flow run of a job's latest dispatch, as the server reports it now."""

    state: StateType | None  # None: the server has no such run
    since: datetime | None  # when it entered that state


@dataclass(frozen=True)
class Outcome:
    """What settling one job did: left it (alive), dispatched it, cancelled it, or gave up."""

    job_id: str
    action: str  # alive | held | dispatched | rendered | cancelled | exhausted
    flow_run_id: str | None = None
    detail: str = ""
    crashed: bool = False  # it was running with its render dead: marked failed first


def judge(
    view: DispatchView,
    run: RunInfo | None,
    *,
    now: datetime,
    grace_seconds: float,
    eager: bool = False,
    batch_run: RunInfo | None = None,
) -> Verdict:
    """Alive, gone or cancelled (see the module's docstring). ``run`` is None inline, where
    renders have no run of their own to ask about. A job with no run to ask about that was
    was never dispatched, or (inline) dispatched less than ``grace_seconds`` ago, is left to its
    dispatcher unless ``eager`` (a user's submit or render: dispatch it now)."""
    grace = timedelta(seconds=grace_seconds)
    if batch_run is not None and batch_run.state in CANCELLING:
        return Verdict.CANCELLED  # the batch was cancelled
    state = run.state if run is not None else None
    if state in (StateType.CANCELLED, StateType.CANCELLING):
        stale = run.since is None or now - run.since >= grace
        if state is StateType.CANCELLED or stale:
            return Verdict.CANCELLED
        return Verdict.ALIVE  # the render is stopping and will say so itself
    if view.lease_live:
        return Verdict.ALIVE
    if view.status is JobStatus.RUNNING and not (view.rendered and run is not None):
        return Verdict.GONE  # running with no live lease: its render died
    # (A rendered job's run may be the finish-job run its render handed it to: judged below.)
    if state in (StateType.SCHEDULED, StateType.PAUSED):
        return Verdict.ALIVE  # waiting for a worker, or for the deployment's concurrency
    if state in (StateType.PENDING, StateType.RUNNING):
        since = run.since or view.dispatched_at or view.created_at
        limit = grace * PENDING_GRACE_FACTOR if state is StateType.PENDING else grace
        return Verdict.ALIVE if now - since < limit else Verdict.GONE
    if state in FINISHED_RUN:
        return Verdict.GONE
    if run is not None and view.dispatched_at is not None:
        # A run was made and the server no longer knows it, or its dispatcher died before
        # recording it (issued again under the same key: idempotent).
        return Verdict.GONE
    if eager and (run is None or view.dispatched_at is None):
        return Verdict.GONE
    recent = now - (view.dispatched_at or view.created_at) < grace
    return Verdict.ALIVE if recent else Verdict.GONE  # no run (yet, or any more)


def read_run(flow_run_id: str | None) -> RunInfo | None:
    """The run's state from the Prefect server; ``RunInfo(None, None)`` if it has none."""
    if flow_run_id is None:
        return RunInfo(None, None)
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(flow_run_id).state
        except ObjectNotFound:
            return RunInfo(None, None)
    if state is None:
        return RunInfo(None, None)
    return RunInfo(state.type, state.timestamp)


def render_key(job_id: str, weights_sha256: str | None, generation: int) -> str:
    """Idempotency key of a job's render run: its pin and its dispatch generation."""
    return f"{job_id}:{(weights_sha256 or 'configured')[:12]}:g{generation}"


def settle(
    svc: Services,
    job_ids: list[str] | None,
    *,
    actor: str,
    batch_name: str | None = None,
    output_dir: str | None = None,
    eager: bool = False,
    linked: bool = False,
) -> list[Outcome]:
    """Judge each waiting job (all of them when ``job_ids`` is None) and act on the verdict,
    in order of priority, then age. ``eager``: see ``judge``. ``linked``: new render runs are
    children of the calling flow run (submit-batch: a Cancel of the batch reaches them); a
    sweep's or nightly's are not, so cancelling those cancels no render."""
    inline = svc.settings.dispatch == "inline"
    with svc.sessions() as session:
        views = waiting_jobs(session=session)
    if job_ids is not None:
        wanted = set(job_ids)
        views = [v for v in views if v.job_id in wanted]
    outcomes = []
    batch_runs: dict[str, RunInfo | None] = {}
    for view in views:
        if view.lease_live and dead_local_owner(view.lease_owner or ""):
            view = replace(view, lease_live=False)  # a killed render on this host
        run = None if inline else read_run(view.flow_run_id)
        if not inline and view.batch_run_id and view.batch_run_id not in batch_runs:
            batch_runs[view.batch_run_id] = read_run(view.batch_run_id)
        if not inline and view.dispatched_at is None and view.status is JobStatus.QUEUED:
            batch_run = batch_runs.get(view.batch_run_id or "")
            if batch_run is not None and batch_run.state in CANCELLING:
                outcomes.append(_cancel(svc, view, actor))
            else:  # never dispatched: admission decides when (``admit``)
                outcomes.append(Outcome(view.job_id, "held", None, "waiting its turn for a GPU"))
            continue
        verdict = judge(
            view,
            run,
            now=utcnow(),
            grace_seconds=svc.settings.sweep_grace_seconds,
            eager=eager,
            batch_run=batch_runs.get(view.batch_run_id or ""),
        )
        if verdict is Verdict.ALIVE:
            holder = f"rendered by {view.lease_owner}" if view.lease_live else "waiting for a run"
            outcomes.append(Outcome(view.job_id, "alive", view.flow_run_id, holder))
        elif verdict is Verdict.CANCELLED:
            outcomes.append(_cancel(svc, view, actor))
        else:
            outcomes.append(_redispatch(svc, view, actor, batch_name, output_dir, linked))
    if inline:
        return outcomes
    mine = set(job_ids) if job_ids is not None else None
    admitted = {o.job_id: o for o in admit(svc, actor=actor, linked=mine if linked else set())}
    outcomes = [
        replace(admitted.pop(o.job_id), crashed=o.crashed) if o.job_id in admitted else o
        for o in outcomes
    ]
    return outcomes + [o for o in admitted.values() if mine is None]


def admit(svc: Services, *, actor: str, linked: set[str] | None = None) -> list[Outcome]:
    """Dispatch the held jobs fair sharing lets through now (``db.fair_share``): as many as the
    GPU slots plus ``EMO_DISPATCH_LOOKAHEAD`` leave room for, and with a look-ahead, the next
    job of each batch that has none loading. Runs of jobs in ``linked`` (all
    when None) are children of the calling flow run. Each publishes to its own batch's folder.
    If Prefect refuses a run, the jobs not yet started are held again (the one refused keeps
    its dispatch: the sweep issues it again under its key). Nothing to do inline."""
    if svc.settings.dispatch == "inline":
        return []
    with svc.sessions() as session:
        slots = lock_gpu_limit(session=session, default_slots=svc.settings.gpu_slots, actor=actor)
        lookahead = svc.settings.dispatch_lookahead
        # Beyond the places, each batch's next job (``wings_picks``), at most the slots over;
        # none with no look-ahead (Kubernetes: a run is a pod that would ask for a GPU).
        room = slots if lookahead > 0 else 0
        picked = admit_jobs(
            session=session, capacity=slots + lookahead, actor=actor, first_room=room
        )
    outcomes = []
    for n, (job_id, generation) in enumerate(picked):
        try:
            outcomes.append(
                _start_run(
                    svc, job_id, generation, actor, linked=linked is None or job_id in linked
                )
            )
        except Exception:
            for later, later_generation in picked[n + 1 :]:
                with svc.sessions() as session:
                    hold_again(
                        session=session,
                        job_id=later,
                        generation=later_generation,
                        actor=actor,
                        reason="its dispatch was interrupted before its run was made",
                    )
            raise
    return outcomes


def admit_next(svc: Services, actor: str) -> None:
    """A render gave a GPU (or its place) back: dispatch whoever is next. Never fails the
    render: whatever is left undispatched, the next admission or the sweep dispatches."""
    try:
        admitted = admit(svc, actor=actor, linked=set())
    except Exception as failure:  # noqa: BLE001 (the sweep is the backstop)
        log.warning("dispatching the next job failed (the sweep will): %s", failure)
        return
    for outcome in admitted:
        log.info("dispatched job %s (%s)", outcome.job_id, outcome.detail)


def _cancel(svc: Services, view: DispatchView, actor: str) -> Outcome:
    """The job's run (or its batch's) was cancelled in Prefect: so is the job (never retried
    by nightly). A render still holding it stops at its next heartbeat."""
    with svc.sessions() as session:
        try:
            transition_job(
                session=session,
                job_id=view.job_id,
                to=JobStatus.CANCELLED,
                actor=actor,
                reason="its render run was cancelled in Prefect",
            )
        except JobStateError as error:  # it moved on meanwhile (finished, or taken)
            return Outcome(view.job_id, "alive", view.flow_run_id, str(error))
    return Outcome(view.job_id, "cancelled", view.flow_run_id, "its run was cancelled")


def _redispatch(
    svc: Services,
    view: DispatchView,
    actor: str,
    batch_name: str | None,
    output_dir: str | None,
    linked: bool,
) -> Outcome:
    """A job whose render is gone: mark a crashed run failed and requeue it (attempts
    permitting), then dispatch it under the next generation. Inline, a running job whose
    holder was a process on this host that is gone is rendered here at once instead: the
    render takes its lease over and resumes the job, as running the killed command again
    does."""
    inline = svc.settings.dispatch == "inline"
    killed_here = inline and dead_local_owner(view.lease_owner or "")
    crashed = view.status is JobStatus.RUNNING and not killed_here
    if crashed:
        with svc.sessions() as session:
            if not fail_crashed_job(session=session, job_id=view.job_id, actor=actor):
                return Outcome(view.job_id, "alive", view.flow_run_id, "its render came back")
        with svc.sessions() as session:
            try:
                requeue_job(session=session, job_id=view.job_id, actor=actor, reason="crashed run")
            except JobStateError as error:  # attempts used up: it stays failed
                return Outcome(view.job_id, "exhausted", view.flow_run_id, str(error), True)
    # A dispatch whose run was never recorded is issued again under its own generation.
    reissue = not (inline or crashed) and view.dispatched_at is not None and not view.flow_run_id
    if not (inline or reissue or view.rendered):
        # Back in the queue, unrendered: admission gives it its next run in the fair order.
        with svc.sessions() as session:
            held = hold_again(
                session=session,
                job_id=view.job_id,
                generation=view.generation,
                actor=actor,
                reason="its run is gone" if view.dispatched_at else "first dispatch",
            )
        if not held:
            return Outcome(view.job_id, "alive", None, "dispatched by another sweep or submit")
        return Outcome(view.job_id, "held", None, "waiting its turn for a GPU", crashed)
    with svc.sessions() as session:
        generation = (
            view.generation
            if reissue
            else begin_dispatch(
                session=session,
                job_id=view.job_id,
                generation=view.generation,
                actor=actor,
                reason="its run is gone",
                rendered=view.rendered,
            )
        )
        job = get_job(session=session, job_id=view.job_id)
        weights, name = job.weights_sha256, batch_name or job.batch.name
        output = _output_path(job.name, job.params, output_dir or job.batch.output_dir)
    if generation is None:
        return Outcome(view.job_id, "alive", None, "dispatched by another sweep or submit")
    fault_point("dispatch.claimed")
    if inline:
        return replace(_render_here(view.job_id, name, output), crashed=crashed)
    if view.rendered:  # its segments are rendered: only its finishing is left to do
        run_id = _finish_run(svc, view.job_id, generation, name, output)
        if run_id is not None:
            return Outcome(view.job_id, "dispatched", run_id, "to finish-job", crashed)
    run_id = _make_run(svc, view.job_id, generation, weights, name, output, linked)
    return Outcome(view.job_id, "dispatched", run_id, f"generation {generation}", crashed)


def _finish_run(
    svc: Services, job_id: str, generation: int, batch_name: str, output: str | None
) -> str | None:
    """A finish-job run for a rendered job whose finishing died, recorded as its run; None if
    there is no finish deployment (a render run then finishes it)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    deployment = svc.settings.finish_deployment
    if not deployment:
        return None
    try:
        run = run_deployment(
            deployment,
            parameters={"job_id": job_id, "output": output},
            idempotency_key=f"{job_id}:finish:g{generation}",
            timeout=0,
            tags=[f"batch:{batch_name}"],
            as_subflow=False,
        )
    except ObjectNotFound:
        return None
    with svc.sessions() as session:
        record_run(session=session, job_id=job_id, generation=generation, flow_run_id=str(run.id))
    return str(run.id)


def _start_run(svc: Services, job_id: str, generation: int, actor: str, *, linked: bool) -> Outcome:
    """The render run of a job admission dispatched, unless its batch was cancelled in Prefect
    meanwhile (then the job is cancelled instead)."""
    with svc.sessions() as session:
        job = get_job(session=session, job_id=job_id)
        weights, name, batch_run = job.weights_sha256, job.batch.name, job.batch.submit_run_id
        output = _output_path(job.name, job.params, job.batch.output_dir)
        view = DispatchView(
            job_id,
            f"{name}/{job.name}",
            job.status,
            generation,
            None,
            job.dispatched_at,
            job.created_at,
            None,
            False,
            batch_run,
        )
    if batch_run is not None:
        state = (read_run(batch_run) or RunInfo(None, None)).state
        if state in CANCELLING:
            return _cancel(svc, view, actor)
    fault_point("dispatch.claimed")
    run_id = _make_run(svc, job_id, generation, weights, name, output, linked)
    return Outcome(job_id, "dispatched", run_id, f"its turn, generation {generation}")


def _make_run(
    svc: Services,
    job_id: str,
    generation: int,
    weights: str | None,
    batch_name: str,
    output: str | None,
    linked: bool,
) -> str:
    """Make (or get back, by its idempotency key) the job's render run and record it."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        svc.settings.render_deployment,
        parameters={"job_id": job_id, "output": output},
        idempotency_key=render_key(job_id, weights, generation),
        timeout=0,
        tags=[f"batch:{batch_name}"],
        as_subflow=linked,
    )
    with svc.sessions() as session:
        record_run(session=session, job_id=job_id, generation=generation, flow_run_id=str(run.id))
    return str(run.id)


def hand_off(lease: JobLease, done: RenderedJob, output: str | None) -> dict[str, Any] | None:
    """Give the rest of the job (assemble, QC, reports, publishing) to a finish-job run on the
    CPU pool, so this render, and its GPU pod, end now; what the render returns then. None:
    finish here (inline dispatch, EMO_FINISH_DEPLOYMENT empty, or no such deployment)."""
    settings = lease.svc.settings
    if settings.dispatch != "deployment" or not settings.finish_deployment:
        return None
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    lease.verify()  # a render that lost its job hands nothing over
    try:
        run = run_deployment(
            settings.finish_deployment,
            parameters={"job_id": lease.job_id, "output": output},
            idempotency_key=f"{lease.job_id}:finish:e{lease.epoch}",
            timeout=0,
            tags=[f"batch:{done.job.batch_name}"],
            as_subflow=False,
        )
    except ObjectNotFound:
        log.warning(
            "no %s deployment: job %s is finished by its render (`emo deploy` registers it)",
            settings.finish_deployment,
            lease.job_id,
        )
        return None
    except Exception as error:  # noqa: BLE001 (Prefect unreachable: finish here, not fail)
        log.warning("job %s: handing over failed (%s); its render finishes it", lease.job_id, error)
        return None
    with lease.svc.sessions() as session:
        handed = record_finish_run(
            session=session, job_id=lease.job_id, epoch=lease.epoch, flow_run_id=str(run.id)
        )
    if not handed:
        lease.verify()  # the lease was lost: say so as the render's end
    log.info("job %s: rendered; finish-job run %s finishes it", lease.job_id, run.id)
    return {
        "job_id": lease.job_id,
        "status": "rendered",
        "finish_run": str(run.id),
        "rendered": done.rendered,
        "segments": len(done.plan.segments),
    }


def _render_here(job_id: str, batch_name: str, output: str | None) -> Outcome:
    """Inline: render the job as a subflow of this run (one job's failure is not the batch's)."""
    from flows.render_track import render_track

    try:
        with tags(f"batch:{batch_name}"):
            result: dict[str, Any] = render_track(job_id=job_id, output=output)
    except Exception as error:  # noqa: BLE001 (recorded on the job; the others go on)
        log.error("job %s failed: %s", job_id, error)
        return Outcome(job_id, "rendered", None, f"failed: {error}")
    return Outcome(job_id, "rendered", None, result["status"])


def _output_path(name: str, params: dict[str, Any], output_dir: str | None) -> str | None:
    """Where a batch's job publishes its video when the submit asked for a folder."""
    if output_dir is None:
        return None
    suffix = {"mov": ".mov", "png": ""}.get(params.get("format", "mp4"), ".mp4")
    return str(Path(output_dir) / f"{name}{suffix}")
