"""Fault injection on a render farm: every job delivered once, frames identical, whatever dies.

Brings up the farm of ``bench/farm_harness.py`` (its own PostgreSQL, SeaweedFS, a Prefect
server on PostgreSQL, `emo worker` processes), submits a batch, and injects faults at points
drawn from the seed: kill -9 and SIGTERM of render processes, kill -9 of a worker, restarts
of the Prefect server and of PostgreSQL, the S3 server stopped, a nightly run started in the
middle (with the batch's manifest dropped in its inbox again), a cancel of one job, and an
`emo resume` of a running job from another shell. Then it runs the documented recovery (`emo
sweep --retry-failed`, every few seconds) until the batch settles, and checks each job against
a fault-free render of the same manifest (framemd5 of the decoded frames).

    python bench/chaos.py [--seed N] [--jobs N] [--faults N] [--json FILE] [--keep]

The farm's folder (/tmp/emo-chaos-<seed>-*: logs, databases, renders) is removed after a pass,
kept after a failure or with --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.farm_harness import (  # noqa: E402
    BIN,
    ROOT,
    Farm,
    flow_run_pids,
    speech_manifest,
    start_farm,
)
from emo.media import frame_md5s  # noqa: E402

KINDS = (
    "kill_render",
    "term_render",
    "kill_worker",
    "restart_prefect",
    "restart_postgres",
    "s3_outage",
    "nightly",
    "cancel",
    "resume_running",
)
STEPS = 6  # denoising steps per clip: renders long enough for faults to land inside them
SETTINGS = {
    "EMO_SEGMENT_SECONDS": "1.0",
    "EMO_LEASE_SECONDS": "12",
    "EMO_SWEEP_GRACE_SECONDS": "30",
    "EMO_MAX_ATTEMPTS": "6",
    "EMO_SLOT_WAIT_SECONDS": "900",
}


@dataclass
class Run:
    """One chaos run's state: the farm, what was injected, and who was cancelled."""

    farm: Farm
    rng: random.Random
    faults: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    cancelled: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)
    background: list[subprocess.Popen] = field(default_factory=list)

    def say(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        self.log.append(line)
        print(line, flush=True)


def make_batch(root: Path, jobs: int, seed: int, seconds: float) -> Path:
    """A manifest of ``jobs`` jobs over the demo portrait and synthetic speech of varied length."""
    rng = random.Random(seed)
    lengths = {f"take-{index}": seconds * (0.8 + 0.4 * rng.random()) for index in range(jobs)}
    return speech_manifest(root, "chaos", lengths, steps=STEPS, seed=seed)


# -- the farm's state, read as the operator would ------------------------------------------


def jobs_table() -> dict[str, Any]:
    """Job id -> its row (expunged), for the batch's jobs."""
    from db.jobs import all_jobs
    from flows.context import services

    with services().sessions() as session:
        rows = all_jobs(session=session)
        for row in rows:
            session.expunge(row)
    return {row.id: row for row in rows}


def render_processes(run: Run) -> list[int]:
    """Pids of running render-track flow runs."""
    from prefect.client.orchestration import get_client

    pids = []
    with get_client(sync_client=True) as client:
        for pid, run_id in flow_run_pids(run.farm.prefect.api).items():
            try:
                flow = client.read_flow(client.read_flow_run(run_id).flow_id)
            except Exception:  # noqa: BLE001 (the server may be restarting; skip this one)
                continue
            if flow.name == "render-track":
                pids.append(pid)
    return pids


def settled(table: dict[str, Any]) -> bool:
    from db.models import JobStatus

    final = (JobStatus.SUCCEEDED, JobStatus.CANCELLED)
    return all(
        job.status in final or (job.status is JobStatus.FAILED and job.attempt >= job.max_attempts)
        for job in table.values()
    )


# -- faults -----------------------------------------------------------------------------------


def inject(run: Run, kind: str, manifest: Path) -> bool:
    """Inject one fault of ``kind``; False if there was nothing to inject it into yet."""
    farm, rng = run.farm, run.rng
    if kind in ("kill_render", "term_render"):
        pids = render_processes(run)
        if not pids:
            return False
        pid = rng.choice(pids)
        try:
            os.kill(pid, signal.SIGKILL if kind == "kill_render" else signal.SIGTERM)
        except ProcessLookupError:  # it finished between the listing and the signal
            return False
        run.say(f"{kind}: pid {pid}")
    elif kind == "kill_worker":
        name = rng.choice(sorted(farm.workers))
        farm.workers[name].send_signal(signal.SIGKILL)
        farm.workers[name].wait()
        run.say(f"kill_worker: {name}; restarted in 3 s")
        time.sleep(3)
        farm.start_worker(name)
    elif kind == "restart_prefect":
        run.say("restart_prefect")
        farm.prefect.stop()
        time.sleep(2)
        farm.prefect.start()
    elif kind == "restart_postgres":
        run.say("restart_postgres")
        farm.pg.restart()
    elif kind == "s3_outage":
        seconds = 20
        run.say(f"s3_outage: {seconds} s")
        farm.weed.stop()
        time.sleep(seconds)
        farm.weed.start()
    elif kind == "nightly":
        from prefect.deployments import run_deployment

        farm.weed.s3_store(bucket="farm", prefix="studio").put_bytes(
            "inbox/chaos.yaml", manifest.read_bytes()
        )
        started = run_deployment("nightly/nightly", timeout=0)
        run.say(f"nightly: run {started.id}, with the batch's manifest in the inbox again")
    elif kind == "cancel":
        from db.models import JobStatus

        waiting = [
            j.id for j in jobs_table().values() if j.status in (JobStatus.QUEUED, JobStatus.RUNNING)
        ]
        if not waiting or run.cancelled:
            return False
        job_id = rng.choice(sorted(waiting))
        done = farm.emo("cancel", job_id)
        run.say(f"cancel: {job_id[:12]} -> {done.returncode} {done.stdout.strip()[:120]}")
        if done.returncode == 0:
            run.cancelled.add(job_id)
    elif kind == "resume_running":
        from db.models import JobStatus

        running = [j.id for j in jobs_table().values() if j.status is JobStatus.RUNNING]
        if not running:
            return False
        job_id = rng.choice(sorted(running))
        process = subprocess.Popen(
            [str(BIN / "emo"), "resume", job_id],
            env={**farm.env, "EMO_HOME": str(farm.root / "home-shell"), "EMO_DISPATCH": "inline"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        run.background.append(process)
        run.say(f"resume_running: emo resume {job_id[:12]} (pid {process.pid})")
    return True


def schedule(rng: random.Random, count: int) -> list[str]:
    """``count`` fault kinds: every kind once before any twice, in an order from the seed."""
    kinds: list[str] = []
    while len(kinds) < count:
        batch = list(KINDS)
        rng.shuffle(batch)
        kinds += batch
    return kinds[:count]


# -- checks -----------------------------------------------------------------------------------


def reference(root: Path, manifest: Path, weights: str) -> dict[str, list[str]]:
    """Fault-free renders of the manifest (embedded defaults, one process): name -> frames."""
    out = root / "reference"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EMO_", "PREFECT_"))},
        "EMO_HOME": str(root / "home-reference"),
        "EMO_WEIGHTS": weights,
        "EMO_SEGMENT_SECONDS": SETTINGS["EMO_SEGMENT_SECONDS"],
    }
    done = subprocess.run(
        [str(BIN / "emo"), "submit", str(manifest), "--output-dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the reference render failed: {done.stdout[-3000:]}{done.stderr}")
    return {video.stem: frame_md5s(video) for video in out.glob("*.mp4")}


def check(run: Run, manifest: Path, names: dict[str, str]) -> dict[str, Any]:
    """Compare every job with the reference, and the farm with what it must be at rest."""
    from db.batches import batch_count
    from db.events import job_events
    from db.gpu_slots import marked_slots
    from db.models import JobStatus
    from flows.context import services

    svc = services()
    table = jobs_table()
    store = svc.store
    expected = reference(run.farm.root, manifest, run.farm.env["EMO_WEIGHTS"])
    identical, differing, delivered, stranded, cancelled = [], [], [], [], []
    segments_rendered = segments_fault_free = 0
    over_attempts = []
    with svc.sessions() as session:
        for job_id, job in table.items():
            outputs = [
                e for e in job_events(session=session, job_id=job_id) if e.kind == "job.output"
            ]
            attempts = {
                info.key.rsplit("/", 2)[0]
                for info in store.list(f"jobs/{job_id}/segments/")
                if info.key.endswith("/manifest.json")
            }
            if job.attempt > job.max_attempts:
                over_attempts.append(job.name)
            if job.status is JobStatus.CANCELLED and job_id in run.cancelled:
                cancelled.append(job.name)
                continue
            if job.status is not JobStatus.SUCCEEDED or len(outputs) != 1:
                stranded.append(f"{job.name}: {job.status.value}, {len(outputs)} outputs")
                continue
            delivered.append(job.name)
            segments_rendered += len(attempts)
            segments_fault_free += len(job.plan["segments"]) if job.plan else 0
            key = store.key_of(job.output_uri)
            local = run.farm.root / "delivered" / Path(key).name
            local = store.get_file(key, local.with_name(f"{job.name}.mp4"))
            has_sidecar = store.exists(key.rsplit("/", 1)[0] + "/sidecar.json")
            same = frame_md5s(local) == expected.get(job.name)
            (identical if same and has_sidecar else differing).append(job.name)
        # Raw lease rows still marking a GPU slot, live or not: at rest there must be none.
        slots = marked_slots(session=session)
        batches = batch_count(session=session)
    inbox = [i.key for i in store.list("inbox/")]
    processed = [i.key for i in store.list("processed/") if i.key.endswith("chaos.yaml")]
    nightly_ran = run.faults.get("nightly", 0) > 0
    return {
        "jobs": {
            "submitted": len(table),
            "delivered": len(delivered),
            "cancelled": len(cancelled),
            "stranded": len(stranded),
        },
        "stranded": stranded,
        "frames_identical": len(identical),
        "frames_differing": len(differing),
        "differing": differing,
        "manifests_lost": int(nightly_ran and not processed and "inbox/chaos.yaml" not in inbox),
        "batches": batches,
        "slots_leaked": len(slots),
        "attempts_over_limit": over_attempts,
        "segments_rendered": segments_rendered,
        "segments_fault_free": segments_fault_free,
        "names": names,
    }


# -- the run ----------------------------------------------------------------------------------


def chaos(seed: int, jobs: int, faults: int, seconds: float, timeout: float) -> dict[str, Any]:
    rng = random.Random(seed)
    # Under /tmp, not a private folder: the cluster's server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix=f"emo-chaos-{seed}-"))
    os.chmod(root, 0o755)
    print(f"the farm's folder: {root}", flush=True)
    started = time.monotonic()
    # The batch's inputs are files of this machine: the farm says where inputs may come
    # from, so the nightly fault's inbox copy of the manifest (absolute paths) is accepted.
    roots = f"{ROOT / 'emo' / 'assets'}:{root}"
    farm = start_farm(root, settings={**SETTINGS, "EMO_INPUT_ROOTS": roots})
    os.environ.update(farm.env)
    os.environ["EMO_HOME"] = str(root / "home-chaos")
    run = Run(farm=farm, rng=rng)
    try:
        from prefect.deployments import run_deployment

        from flows.sweep import sweep_jobs

        manifest = make_batch(root, jobs, seed, seconds)
        submitted = run_deployment(
            "submit-batch/submit-batch", parameters={"manifest": str(manifest)}, timeout=0
        )
        run.say(f"farm up in {time.monotonic() - started:.0f} s; submit-batch run {submitted.id}")
        for kind in schedule(rng, faults):
            deadline = time.monotonic() + 90
            time.sleep(rng.uniform(1, 6))
            while not inject(run, kind, manifest):
                table = _retrying(jobs_table)
                if time.monotonic() > deadline or (table and settled(table)):
                    run.skipped[kind] += 1
                    run.say(f"{kind}: nothing to inject it into; skipped")
                    break
                time.sleep(1)
            else:
                run.faults[kind] += 1
        from flows.context import services

        deadline = time.monotonic() + timeout
        sweeps = 0
        while True:
            table = _retrying(jobs_table)
            if table and settled(table):
                break
            if time.monotonic() > deadline:
                run.say("the batch did not settle in time")
                break
            time.sleep(8)
            result = _retrying(lambda: sweep_jobs(services(), actor="chaos", retry_failed=True))
            sweeps += 1
            if result and (result["retried"] or result["crashed"] or result["cancelled"]):
                run.say(f"sweep: {json.dumps({k: len(v) for k, v in result.items()})}")
        for process in run.background:
            try:
                output, _ = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                output = "(killed)"
            run.say(f"emo resume exited {process.returncode}: {output.strip()[-200:]}")
        names = {job_id: job.name for job_id, job in jobs_table().items()}
        result = check(run, manifest, names)
        result.update(
            prefect_auth_required=run.farm.prefect.requires_auth(),
            seed=seed,
            faults=dict(run.faults),
            faults_skipped=dict(run.skipped),
            sweeps=sweeps,
            seconds=round(time.monotonic() - started, 1),
            workdir=str(root),
            log=run.log,
        )
        return result
    finally:
        farm.stop()


def _retrying(call, attempts: int = 10):
    """A read of the farm's state while a part of it may be restarting."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 (a restart in progress: try again)
            if attempt == attempts - 1:
                raise
            print(f"  (retrying a read: {str(error).splitlines()[0][:120]})", flush=True)
            time.sleep(3)
    return None


def table(result: dict[str, Any]) -> str:
    jobs = result["jobs"]
    rows = [
        ("seed", result["seed"]),
        ("faults injected", ", ".join(f"{k} {v}" for k, v in sorted(result["faults"].items()))),
        ("jobs submitted", jobs["submitted"]),
        ("delivered once", jobs["delivered"]),
        ("cancelled (as asked)", jobs["cancelled"]),
        ("stranded", jobs["stranded"]),
        ("frames identical", f"{result['frames_identical']} of {jobs['delivered']}"),
        ("manifests lost", result["manifests_lost"]),
        ("GPU slots leaked", result["slots_leaked"]),
        ("attempts over limit", len(result["attempts_over_limit"])),
        (
            "segments rendered / fault-free",
            f"{result['segments_rendered']} / {result['segments_fault_free']}",
        ),
        ("wall time", f"{result['seconds']:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _interrupt(number: int, frame: object) -> None:
    """A SIGTERM ends the run as Ctrl-C does: ``chaos`` stops every process of the farm on
    the way out (by default the signal would end this process alone and leave them running)."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--faults", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=3.0, help="mean track length")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to settle")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--keep", action="store_true", help="keep the farm's folder (logs, data) after a pass"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, a CI timeout: tear the farm down too
    try:
        result = chaos(args.seed, args.jobs, args.faults, args.seconds, args.timeout)
    except KeyboardInterrupt:
        print("stopped; the farm is down (its folder is kept)", file=sys.stderr)
        return 130
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    ok = (
        result["jobs"]["stranded"] == 0
        and result["frames_differing"] == 0
        and result["manifests_lost"] == 0
        and result["slots_leaked"] == 0
        and not result["attempts_over_limit"]
    )
    workdir = Path(result["workdir"])
    if ok and not args.keep and not any(workdir.glob("**/postmaster.pid")):
        shutil.rmtree(workdir)  # a few hundred MB of farm state; the farm has stopped
    else:
        print(f"the farm's logs and data are kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
