"""GPU time on a render farm: how much of a held slot is model time, and how batches share.

Brings up the farm of ``bench/farm_harness.py`` (its own PostgreSQL, SeaweedFS, a Prefect
server, `emo worker` processes; two GPU slots served by two GPU workers; tiny weights) and
submits a batch of 12 jobs, then, ``--late`` seconds later, a second batch of 3. From the job
database's events it measures:

- ``slot_model_fraction``: model time (segments' ``model_seconds``; ``render_seconds``, the
  segment's whole work, for code that does not record it) over slot-held time (``gpu.acquired``
  to ``gpu.released``); ``slot_segment_fraction``: the segments' whole work over it, for both;
- ``makespan_ratio``: first submit to last job finished, over the ideal (model time / slots);
  ``first_slot_seconds`` and ``last_finish_seconds``: the start and the finish it includes;
- ``second_batch_wait_seconds``: its submit to its first slot;
- ``second_batch_share``: its share of slot-held time while both batches had work (the promise
  of weighted sharing: its weight over the sum, 0.5 here), and its completion time against the
  promise (its model time over its share of the slots).

Each setting is one farm, run one after the other in the same invocation:

- ``fair`` (this checkout): fair sharing, ``EMO_DISPATCH_LOOKAHEAD=1`` (``--lookahead``) and
  GPU workers taking enough runs for the slots, the look-ahead and each batch's next job: a
  job loads while the slots render, a batch's next job finds a worker at once, and jobs
  finish on the CPU pool;
- ``before`` (``--before REV``, a commit of this repository checked out beside it): every job
  dispatched at submit in Prefect's first-come order, each GPU worker one run at a time.

With ``--gpu-step-seconds S`` (1.0 by default) the GPU is a stand-in
(``bench/standin_gpu``): each denoising step of the tiny model also waits S seconds off the
CPU, as a GPU step leaves the CPU free. Without it (``0``) the "GPU" is this machine's two
cores, which the overlapped loading, encoding and QC slow down: the dispatch cannot be told
from the contention.

    python bench/farm.py [--before REV] [--lookahead N] [--gpu-step-seconds S] [--json FILE]
                         [--steps N] [--seconds S] [--late S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.farm_harness import ROOT, Farm, speech_manifest, start_farm  # noqa: E402

SLOTS = 2
STANDIN = ROOT / "bench" / "standin_gpu"
STANDIN_ENV = "EMO_BENCH_GPU_STEP_SECONDS"
BIG, SMALL = 12, 3
SETTINGS = {
    "EMO_SEGMENT_SECONDS": "1.0",
    "EMO_SLOT_WAIT_SECONDS": "900",
    # Both settings' workers poll Prefect as this code's `emo worker` does (the old one left
    # Prefect's 10 s), so the comparison is of the dispatch, not of the polling.
    "PREFECT_WORKER_QUERY_SECONDS": "2",
}


def _interrupt(number: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a SIGTERM tears the farm down as Ctrl-C does


def _jobs(name: str, count: int, seconds: float) -> dict[str, float]:
    return {f"{name}-{index}": seconds for index in range(count)}


@dataclass
class Setting:
    """One farm to measure: its code, its settings and its GPU workers' run limit."""

    name: str
    code: Path
    settings: dict[str, str]
    gpu_runs: int


def _farm(root: Path, setting: Setting, gpu_step_seconds: float) -> Farm:
    env = {**SETTINGS, **setting.settings, "EMO_INPUT_ROOTS": f"{ROOT / 'emo' / 'assets'}:{root}"}
    paths = []
    if setting.code != ROOT:  # the farm's processes import this code, not the checkout's
        paths.append(str(setting.code))
    if gpu_step_seconds > 0:  # and the stand-in GPU's sitecustomize
        paths.append(str(STANDIN))
        env[STANDIN_ENV] = str(gpu_step_seconds)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return start_farm(
        root, gpu_workers=SLOTS, gpu_runs=setting.gpu_runs, settings=env, project=setting.code
    )


def _rows(farm: Farm, query: str) -> list[Any]:
    from sqlalchemy import create_engine, text

    engine = create_engine(farm.env["EMO_DATABASE_URL"])
    with engine.connect() as connection:
        rows = list(connection.execute(text(query)))
    engine.dispose()
    return rows


def _finished(farm: Farm) -> tuple[int, int]:
    """(jobs finished, jobs registered)."""
    ((done, total),) = _rows(
        farm,
        "SELECT count(*) FILTER (WHERE status IN ('succeeded','failed','cancelled')), count(*) "
        "FROM jobs",
    )
    return done, total


def submit(farm: Farm, manifest: Path) -> None:
    """Start a submit-batch run of ``manifest`` on this farm's Prefect server (each setting's
    farm has its own: the settings are switched, not read once from the environment)."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    server = {
        PREFECT_API_URL: farm.env["PREFECT_API_URL"],
        PREFECT_API_AUTH_STRING: farm.env["PREFECT_API_AUTH_STRING"],
    }
    with temporary_settings(updates=server):
        run_deployment(
            "submit-batch/submit-batch", parameters={"manifest": str(manifest)}, timeout=0
        )


def run_setting(setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    """Bring a farm up, submit both batches, wait for every job; the measurements."""
    root = Path(tempfile.mkdtemp(prefix=f"emo-farm-{setting.name}-"))
    os.chmod(root, 0o755)  # the cluster's server runs as the postgres user
    print(f"[{setting.name}] the farm's folder: {root}", flush=True)
    farm = _farm(root, setting, args.gpu_step_seconds)
    steps, seconds, late = args.steps, args.seconds, args.late
    try:
        big = speech_manifest(root, "big", _jobs("big", BIG, seconds), steps=steps, seed=1)
        small = speech_manifest(root, "small", _jobs("small", SMALL, seconds), steps=steps, seed=2)
        submitted = {"big": time.time()}
        submit(farm, big)
        time.sleep(late)
        submitted["small"] = time.time()
        submit(farm, small)
        deadline = time.monotonic() + 1800
        while True:
            done, total = _finished(farm)
            if total == BIG + SMALL and done == total:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"[{setting.name}] {done} of {total} jobs finished in time")
            time.sleep(3)
        result = measure(farm, submitted)
        result["setting"] = setting.name
        return result
    finally:
        farm.stop()
        shutil.rmtree(root, ignore_errors=True)


def _intervals(farm: Farm) -> list[tuple[str, datetime, datetime]]:
    """(batch, acquired, released) of every slot hold."""
    rows = _rows(
        farm,
        "SELECT b.name, e.job_id, e.kind, e.at FROM events e JOIN jobs j ON j.id = e.job_id "
        "JOIN batches b ON b.id = j.batch_id "
        "WHERE e.kind IN ('gpu.acquired', 'gpu.released', 'gpu.reclaimed') ORDER BY e.at, e.id",
    )
    open_at: dict[str, tuple[str, datetime]] = {}
    holds = []
    for batch, job_id, kind, at in rows:
        if kind == "gpu.acquired":
            open_at[job_id] = (batch, at)
        elif job_id in open_at:
            batch, since = open_at.pop(job_id)
            holds.append((batch, since, at))
    return holds


def _overlap(hold: tuple[str, datetime, datetime], start: float, end: float) -> float:
    return max(0.0, min(hold[2].timestamp(), end) - max(hold[1].timestamp(), start))


def measure(farm: Farm, submitted: dict[str, float]) -> dict[str, Any]:
    """The figures of the module's docstring, from the farm's job database."""
    holds = _intervals(farm)
    segments = _rows(
        farm,
        "SELECT b.name, e.detail FROM events e JOIN jobs j ON j.id = e.job_id "
        "JOIN batches b ON b.id = j.batch_id WHERE e.kind = 'segment.done'",
    )
    details = [(batch, d if isinstance(d, dict) else json.loads(d)) for batch, d in segments]
    measured = all(d.get("model_seconds") is not None for _, d in details)
    key = "model_seconds" if measured else "render_seconds"
    model = {name: sum(d[key] for b, d in details if b == name) for name in submitted}
    segment_work = sum(d["render_seconds"] for _, d in details)
    finished = dict(
        _rows(
            farm,
            "SELECT b.name, max(j.finished_at) FROM jobs j JOIN batches b "
            "ON b.id = j.batch_id GROUP BY b.name",
        )
    )
    held = sum((end - start).total_seconds() for _, start, end in holds)
    makespan = max(t.timestamp() for t in finished.values()) - submitted["big"]
    ideal = sum(model.values()) / SLOTS
    small_holds = [h for h in holds if h[0] == "small"]
    first_small = min(h[1].timestamp() for h in small_holds)
    # Both had work from the second submit until the first batch's last slot was given back.
    both_from = submitted["small"]
    both_to = min(max(h[2].timestamp() for h in holds if h[0] == name) for name in submitted)
    share_held = {
        name: sum(_overlap(h, both_from, both_to) for h in holds if h[0] == name)
        for name in submitted
    }
    both = sum(share_held.values())
    first_slot = min(h[1].timestamp() for h in holds)
    last_release = max(h[2].timestamp() for h in holds)
    last_done = max(t.timestamp() for t in finished.values())
    small_done = finished["small"].timestamp() - submitted["small"]
    promised = model["small"] / (SLOTS * 0.5)  # equal weights: one slot of two
    return {
        "model_time": key,
        "model_seconds": round(sum(model.values()), 1),
        "slot_held_seconds": round(held, 1),
        "slot_model_fraction": round(sum(model.values()) / held, 3),
        # The segments' whole work (model, encoding, motion state) over slot time: what code
        # that does not record model time can be compared on.
        "slot_segment_fraction": round(segment_work / held, 3),
        "makespan_seconds": round(makespan, 1),
        "ideal_seconds": round(ideal, 1),
        "makespan_ratio": round(makespan / ideal, 2),
        # Where the rest of the makespan goes: before the first slot is taken (submit, the
        # first render's start and load), and after the last is given back (finishing).
        "first_slot_seconds": round(first_slot - submitted["big"], 1),
        "last_finish_seconds": round(last_done - last_release, 1),
        "second_batch_wait_seconds": round(first_small - submitted["small"], 1),
        "second_batch_share": round(share_held["small"] / both, 3) if both else None,
        "second_batch_seconds": round(small_done, 1),
        "second_batch_promised_seconds": round(promised, 1),
    }


def checkout(rev: str) -> Path:
    """The repository at ``rev``, in a folder of its own (removed by the caller)."""
    path = Path(tempfile.mkdtemp(prefix="emo-farm-before-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def table(results: list[dict[str, Any]]) -> str:
    keys = [k for k in results[0] if k != "setting"]
    width = max(len(k) for k in keys)
    lines = [f"{'':{width}}  " + "  ".join(f"{r['setting']:>10}" for r in results)]
    for key in keys:
        lines.append(f"{key:{width}}  " + "  ".join(f"{str(r[key]):>10}" for r in results))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="also measure this commit, first")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per clip")
    parser.add_argument("--seconds", type=float, default=6.0, help="track length per job")
    parser.add_argument("--late", type=float, default=30.0, help="second batch's delay")
    parser.add_argument(
        "--lookahead", type=int, default=1, help="EMO_DISPATCH_LOOKAHEAD of the fair farm"
    )
    parser.add_argument(
        "--gpu-step-seconds",
        type=float,
        default=1.0,
        help="the stand-in GPU's time per denoising step, off the CPU (0: the CPU is the GPU)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    settings = []
    before = checkout(args.before) if args.before else None
    if before is not None:
        settings.append(Setting("before", before, {}, 1))
    # Runs in flight at most: the slots, the look-ahead, and a next job per batch beyond them
    # (at most the slots): the workers take them all, so an admitted run never queues.
    gpu_runs = -(-(2 * SLOTS + args.lookahead) // SLOTS)
    lookahead = {"EMO_DISPATCH_LOOKAHEAD": str(args.lookahead)}
    settings.append(Setting("fair", ROOT, lookahead, gpu_runs))
    results = []
    try:
        for setting in settings:
            results.append(run_setting(setting, args))
            print(json.dumps(results[-1]), flush=True)
    except KeyboardInterrupt:
        print("stopped; the farm is down", file=sys.stderr)
        return 130
    finally:
        if before is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                capture_output=True,
            )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({r["setting"]: r for r in results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
