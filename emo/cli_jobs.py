"""``emo render | submit | status | resume | cancel | serve | deploy | demo``: studio commands.

They run the same Prefect flows as production. With the embedded defaults, flows run in this
process against an ephemeral Prefect server, the database is SQLite and the store a directory,
all under EMO_HOME.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from emo import progress
from emo.embedded_prefect import watch_ephemeral_servers
from emo.errors import InputError, NotFound
from emo.manifest import MAX_NAME_BYTES, ManifestError, name_character, parse_manifest
from emo.settings import get_settings

console = Console(soft_wrap=True)
# --allow-cost of submit and validate: lets a batch over EMO_MAX_BATCH_GPU_HOURS through.
AllowCost = Annotated[
    float | None,
    typer.Option(help="GPU-hours the batch may take in all, over EMO_MAX_BATCH_GPU_HOURS", min=0),
]  # paths and URLs stay on one line, copyable
ASSETS = Path(__file__).resolve().parent / "assets"


class ClipProgress:
    """A progress bar over clips (with ETA), fed by the render flow."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} clips"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("preparing", total=1)
        self.done: dict[int, float] = {}  # clip -> fraction of its denoising steps done

    def _show(self) -> None:
        """Start drawing at the first news from a render, so a command that fails or only
        registers prints no empty bar."""
        if not self.bar.live.is_started:
            self.bar.start()

    def step(self, clip: int, step: int, steps: int, total_clips: int) -> None:
        self._show()
        self.done[clip] = step / steps
        self.bar.update(self.task, total=total_clips, completed=sum(self.done.values()))

    def segment(self, index: int, total: int, clips: range, total_clips: int) -> None:
        """A segment is verified: its clips are done, whether rendered now or resumed."""
        self._show()
        self.done.update(dict.fromkeys(clips, 1.0))
        self.bar.update(
            self.task,
            description=f"segment {index + 1}/{total}",
            total=total_clips,
            completed=sum(self.done.values()),
        )

    def waiting(self, message: str) -> None:
        self._show()
        self.bar.console.print(f"[yellow]{escape(message)}[/]")
        self.bar.update(self.task, description="waiting for a GPU slot")

    def __enter__(self) -> ClipProgress:
        progress.listen(self)
        return self

    def __exit__(self, *exc: object) -> None:
        progress.listen(None)
        self.bar.stop()


RENDER_BATCH = "render-"  # a one-job batch of emo render is named after its output


def _safe_name(text: str) -> str:
    """An output file's stem as a job name (``emo.manifest.safe_name``): other characters
    become '_', and it is cut to whole characters so that its batch's name ("render-" and it)
    fits ``MAX_NAME_BYTES``."""
    name = "".join(c if name_character(c) else "_" for c in unicodedata.normalize("NFC", text))
    while len(f"{RENDER_BATCH}{name}".encode()) > MAX_NAME_BYTES:
        name = name[:-1]
    return name if name not in ("", ".", "..") else "render"


def _job_manifest(image: Path, audio: Path, name: str, options: dict[str, Any]) -> Path:
    """A one-job manifest under EMO_HOME; same inputs and options -> same job."""
    for path, kind in ((image, "image"), (audio, "audio")):
        if not path.is_file():
            raise InputError(f"{kind} file {str(path)!r} does not exist")
    document = {
        "name": f"{RENDER_BATCH}{name}",
        "jobs": [
            {
                "name": name,
                "image": str(image.absolute()),
                "audio": str(audio.absolute()),
                **{k: v for k, v in options.items() if v is not None},
            }
        ],
    }
    data = json.dumps(document, sort_keys=True, indent=2)
    try:
        parse_manifest(data.encode(), source="render.json")  # nothing is written for bad options
    except ManifestError as error:  # the manifest is emo's own: speak of the user's options
        raise InputError(user_problems(error.problems)) from None
    folder = get_settings().home / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data.encode()).hexdigest()[:16]}.json"
    path.write_text(data)
    return path


def _use_weights(weights: str | None) -> None:
    if weights is not None:
        os.environ["EMO_WEIGHTS"] = str(weights)
        get_settings.cache_clear()


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _report(result: dict[str, Any]) -> None:
    """Where the video, its sidecar, QC and the Prefect run are: what a user looks for next."""
    qc = result.get("qc") or {}
    console.print(f"[green]done[/]: {result.get('output') or result.get('output_uri')}")
    if result.get("output"):
        output = Path(result["output"])
        console.print(f"sidecar: {output.with_name(output.stem + '.json')}")
    console.print(f"segments rendered this run: {result.get('rendered')}/{result.get('segments')}")
    if qc:
        console.print(
            f"QC: seam jitter {_num(qc.get('seam_jitter'))}, identity "
            f"{_num(qc.get('identity_mean'))}, sync {_num(qc.get('sync_strength'))} "
            f"(lag {qc.get('sync_lag_frames')} frames)"
        )
        for warning in qc.get("warnings", []):
            console.print(f"[yellow]QC warning[/]: {warning}")
    if result.get("qc_uri"):
        console.print(f"QC report: {result['qc_uri']}")
    console.print(f"job {result['job_id']}: `emo status {result['job_id']}`")
    run = f"runs/flow-run/{result.get('flow_run_id')}"
    api = os.environ.get("PREFECT_API_URL")
    if api:
        console.print(f"Prefect run: {api.removesuffix('/api')}/{run}")
    else:  # the ephemeral server keeps its runs under EMO_HOME; `emo serve` shows them
        console.print(f"Prefect run: `emo serve`, then http://127.0.0.1:4200/{run}")


def render(
    image: Annotated[Path, typer.Argument(help="reference portrait")],
    audio: Annotated[Path, typer.Argument(help="vocal track")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output file (png: a folder)")],
    seed: Annotated[int | None, typer.Option(help="seed; default derived from the job")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps; default the model's")] = None,
    guidance: Annotated[float | None, typer.Option(help="audio guidance scale")] = None,
    speed: Annotated[float | None, typer.Option(help="head motion level, rad/frame")] = None,
    segment_seconds: Annotated[float | None, typer.Option(help="checkpoint every ~S s")] = None,
    format: Annotated[str, typer.Option(help="mp4, mov (ProRes 422 HQ) or png")] = "mp4",
    scheduler: Annotated[str | None, typer.Option(help="ddim, dpm++, euler, pndm, unipc")] = None,
    face_box: Annotated[str | None, typer.Option(help="x0,y0,x1,y1 as fractions")] = None,
    face_policy: Annotated[str | None, typer.Option(help="error or full_frame")] = None,
    weights: Annotated[
        str | None, typer.Option(help="weights bundle (folder or s3://); default EMO_WEIGHTS")
    ] = None,
) -> None:
    """Render one portrait + vocal track end to end (the same flow as a batch job)."""
    _use_weights(weights)
    options = {
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "speed": speed,
        "segment_seconds": segment_seconds,
        "format": format,
        "scheduler": scheduler,
        "face_box": face_box,
        "face_policy": face_policy,
    }
    manifest = _job_manifest(image, audio, _safe_name(output.stem), options)
    try:
        watch_ephemeral_servers()
        from flows.render_track import render_track
        from flows.submit_batch import submit_batch

        registered = submit_batch(manifest=str(manifest), render=False)
    except ManifestError as error:  # the manifest is emo's own: speak of the user's files
        raise InputError(user_problems(error.problems)) from None
    job_id = next(iter(registered["jobs"].values()))
    if weights is not None:
        _require_pinned(job_id, weights)
    with ClipProgress():
        result = render_track(job_id=job_id, output=str(output.absolute()))
    _report(result)


# The manifest fields `emo render` sets from its own options (named as options in its errors).
RENDER_OPTIONS = frozenset(inspect.signature(render).parameters) - {
    "image",
    "audio",
    "output",
    "weights",
}


def user_problems(problems: list[str]) -> str:
    """A one-job manifest's problems as ``emo render``'s user sees them: without the job and
    row of emo's own manifest, and with a field named as the option that set it."""

    def plain(problem: str) -> str:
        problem = re.sub(r"^job '[^']*' \(row \d+\)(: |, )", "", problem)
        field = re.match(r"^([a-z_]+): ", problem)
        if field and field.group(1) in RENDER_OPTIONS:
            return f"--{field.group(1).replace('_', '-')}{problem[len(field.group(1)) :]}"
        return problem

    return "; ".join(plain(p) for p in problems)


def submit(
    manifest: Annotated[str, typer.Argument(help="manifest (.yaml, .json, .csv; path or s3://)")],
    output_dir: Annotated[Path | None, typer.Option(help="also copy finished videos here")] = None,
    wait: Annotated[bool, typer.Option(help="wait for deployment runs to finish")] = False,
    allow_cost: AllowCost = None,
) -> None:
    """Submit a batch: validate, pre-flight, register, render (inline) or dispatch."""
    from emo.manifest import parse_manifest, read_manifest_source

    settings = get_settings()
    data, _ = read_manifest_source(manifest, settings)
    parse_manifest(data, source=manifest)  # a bad manifest fails now, before Prefect starts
    from flows.submit_batch import submit_batch

    watch_ephemeral_servers()
    render_now = settings.dispatch == "inline" or wait
    with ClipProgress():
        result = submit_batch(
            manifest=manifest,
            output_dir=str(output_dir) if output_dir else None,
            render=render_now,
            allow_cost_hours=allow_cost,
        )
    word = "registered" if result["created"] else "already registered"
    console.print(f"batch {result['name']} ({result['batch_id']}) {word}")
    _print_table(result["table"])
    if result["estimate_seconds"]:
        total = sum(result["estimate_seconds"].values())
        console.print(f"estimated GPU time of the batch: {_duration(total)} ({settings.gpu_class})")
    if any(row["status"] == "failed" for row in result["table"]):
        raise typer.Exit(1)


def validate(
    manifest: Annotated[str, typer.Argument(help="manifest (.yaml, .json, .csv; path or s3://)")],
    base: Annotated[
        str | None, typer.Option(help="where relative inputs are (default: next to it)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the jobs as JSON")] = False,
    allow_cost: AllowCost = None,
) -> None:
    """Check a manifest as a submit would (every input fetched and decoded, faces, limits,
    the estimate) without registering or storing anything. Exit 0 when valid; 2 with every
    problem listed when not."""
    from flows.submit_batch import validate_manifest

    settings = get_settings()
    parsed, prepared = validate_manifest(manifest, settings, base, allow_cost_hours=allow_cost)
    rows = [
        {
            "job": job.spec.name,
            "seconds": round(job.seconds, 2),
            "clips": job.clips,
            "steps": job.steps,
            "estimate_seconds": round(job.estimate_seconds, 4),
        }
        for job in prepared
    ]
    total = round(sum(job.estimate_seconds for job in prepared), 4)
    if as_json:
        typer.echo(json.dumps({"name": parsed.name, "jobs": rows, "estimate_seconds": total}))
        return
    console.print(f"manifest {manifest} is valid: batch {parsed.name}, {len(rows)} job(s)")
    for row in rows:
        row["estimated GPU time"] = _duration(row.pop("estimate_seconds"))
    _print_table(rows)
    console.print(
        f"estimated GPU time of the batch: {_duration(total)} on {settings.gpu_class} "
        "(EMO_GPU_CLASS); nothing registered"
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = Table()
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


def _find_job(session: Any, reference: str):
    from db.jobs import jobs_named

    matches = jobs_named(session=session, reference=reference)
    if len(matches) != 1:
        raise NotFound(f"no single job matches {reference!r} (give its id or a unique prefix)")
    return matches[0]


def status(
    reference: Annotated[str | None, typer.Argument(help="batch or job id (or prefix)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show batches, or one batch's jobs, or one job with its segments."""
    from db.batches import batch_by_prefix, recent_batches
    from db.models import Job
    from flows.context import services
    from flows.submit_batch import batch_rows

    with services().sessions() as session:
        if reference is None:
            batches = recent_batches(session=session)
            rows = [
                {"batch": b.id, "name": b.name, "jobs": len(b.jobs), **_counts(b.jobs)}
                for b in batches
            ]
        else:
            batch = batch_by_prefix(session=session, prefix=reference)
            if batch is not None:
                rows = batch_rows(list(batch.jobs))
            else:
                job: Job = _find_job(session, reference)
                done = sum(1 for s in job.segments if s.status.value == "done")
                rows = [
                    {
                        "job": job.id,
                        "name": job.name,
                        "batch": job.batch.name,
                        "status": job.status.value,
                        "attempt": job.attempt,
                        "segments": f"{done}/{len(job.segments)}",
                        "output": job.output_uri or "",
                        "error": job.error or "",
                        "qc_warnings": "; ".join((job.qc or {}).get("warnings", [])),
                    }
                ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
    else:
        _print_table(rows)


def _counts(jobs: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status.value] = counts.get(job.status.value, 0) + 1
    return counts


def resume(
    job: Annotated[str | None, typer.Argument(help="job id (or prefix)")] = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="every failed job with attempts left")
    ] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="output file")] = None,
    new_weights: Annotated[
        bool,
        typer.Option(
            "--new-weights",
            help="render the job again from scratch with the current bundle (EMO_WEIGHTS) "
            "instead of the one it is pinned to",
        ),
    ] = False,
) -> None:
    """Render what is missing of a job (only segments without a valid checkpoint), with the
    weights bundle it was registered with."""
    from db.dispatch import retryable_failed
    from db.models import JobStatus
    from flows.context import services
    from flows.render_track import render_track

    if (job is None) == (not failed):
        raise InputError("give a job id, or --failed (not both)")
    if failed and (output is not None or new_weights):
        raise InputError("-o/--output and --new-weights name one job; not with --failed")
    if new_weights:
        _repin(job)
    svc = services()
    with svc.sessions() as session:
        if failed:
            ids = retryable_failed(session=session)
        else:
            found = _find_job(session, job)
            if found.status is JobStatus.SUCCEEDED and not new_weights:
                _already_done(svc, found.id, found.output_uri, output)
                return
            ids = [found.id]
    if not ids:
        console.print("nothing to resume")
        return
    watch_ephemeral_servers()
    errors = 0
    for job_id in ids:
        try:
            with ClipProgress():
                result = render_track(
                    job_id=job_id, output=str(output.absolute()) if output else None
                )
            _report(result)
        except Exception as error:  # noqa: BLE001 (one job's failure must not stop the rest)
            errors += 1
            console.print(f"[red]job {job_id}[/]: {error}")
    if errors:
        raise typer.Exit(1)


def _already_done(svc: Any, job_id: str, output_uri: str, output: Path | None) -> None:
    """Resuming a finished job renders nothing: say where its output is, and with ``-o`` copy
    a video there when it is one of the same kind (a PNG job's frames are a zip in the store)."""
    if output is None:
        console.print(f"job {job_id} had already succeeded: {output_uri}")
        return
    kind = Path(output_uri).suffix
    if kind not in (".mp4", ".mov") or output.suffix != kind or output.is_dir():
        raise InputError(
            f"job {job_id} had already succeeded; its output is {output_uri}: -o copies it only "
            f"to a {kind} file"
        )
    svc.store.get_file(svc.store.key_of(output_uri), output.absolute())
    console.print(f"job {job_id} had already succeeded; its video is copied to {output}")


def _require_pinned(job_id: str, weights: str) -> None:
    """`--weights` names a bundle; a job registered earlier with another one renders with the
    bundle it is pinned to, so say so instead of rendering with weights nobody asked for."""
    from db.models import Job
    from emo.store.weights import bundle_sha256, resolve_weights
    from flows.context import services

    with services().sessions() as session:
        job = session.get(Job, job_id)
        pinned, status = job.weights_sha256, job.status.value
    wanted = bundle_sha256(resolve_weights(get_settings()))  # --weights, as EMO_WEIGHTS
    if pinned is not None and pinned != wanted and status in ("succeeded", "cancelled"):
        raise InputError(
            f"these inputs and options were already rendered (job {job_id}, {status}) with "
            f"weights {pinned[:12]}, not {wanted[:12]} ({weights}); give the render another "
            "-o name to render them again with this bundle as a new job"
        )
    if pinned is not None and pinned != wanted:
        raise InputError(
            f"job {job_id} (these inputs and options) was registered with weights "
            f"{pinned[:12]}, not {wanted[:12]} ({weights}); `EMO_WEIGHTS={weights} emo resume "
            f"{job_id[:12]} --new-weights` renders it again with that bundle"
        )


def _repin(reference: str) -> None:
    """Pin the job to the current bundle (a copy kept in the store) and start it over."""
    from db.jobs import repin_weights
    from emo.store.weights import pin_bundle, resolve_weights
    from flows.context import services

    svc = services()
    sha = pin_bundle(svc.store, resolve_weights(svc.settings))
    with svc.sessions() as session:
        found = _find_job(session, reference)
        repin_weights(session=session, job_id=found.id, weights_sha256=sha, actor="emo resume")
    console.print(
        f"job {found.name} ({found.id}) now renders with weights {sha[:12]}, from scratch"
    )


def cancel(job: Annotated[str, typer.Argument(help="job id (or prefix)")]) -> None:
    """Cancel a queued, running or failed job: it is never rendered again, nightly included (a
    running render stops at its next denoising step after its next lease heartbeat; verified
    segments are kept). Its Prefect run, if any, is cancelled too."""
    from db.jobs import transition_job
    from db.models import JobStatus
    from flows.context import services

    with services().sessions() as session:
        found = _find_job(session, job)
        transition_job(
            session=session,
            job_id=found.id,
            to=JobStatus.CANCELLED,
            actor="emo cancel",
            reason="cancelled by a user",
        )
        run_id = found.flow_run_id
    console.print(f"job {found.name} ({found.id}) cancelled")
    if run_id is not None and os.environ.get("PREFECT_API_URL"):
        _cancel_run(run_id)


def _cancel_run(run_id: str) -> None:
    """Ask Prefect to cancel the job's render run (best effort: the job is cancelled anyway,
    and a render that starts later finds it so and stops)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            if state is not None and not state.is_final():
                # A run not started yet has no process to stop: it is cancelled outright.
                stop = Cancelled if state.is_scheduled() else Cancelling
                client.set_flow_run_state(run_id, stop(message="emo cancel"), force=True)
                console.print(f"its Prefect run {run_id} is being cancelled")
    except Exception as error:  # noqa: BLE001 (the job's state is what counts)
        console.print(f"[yellow]note[/]: could not cancel its Prefect run {run_id}: {error}")


def demo(
    output: Annotated[Path, typer.Option("-o", "--output")] = Path("out/demo.mp4"),
    steps: Annotated[
        int | None, typer.Option(help="denoising steps; default the model's (fewer: a quick look)")
    ] = None,
) -> None:
    """Render the sample portrait (a held-out synthetic person) and vocal track (speech, then
    a sung phrase) with the bundled weights."""
    box = json.loads((ASSETS / "demo_portrait.json").read_text())["face_box"]
    render(
        image=ASSETS / "demo_portrait.png",
        audio=ASSETS / "demo_vocal.wav",
        output=output,
        seed=0,
        steps=steps,
        guidance=None,
        speed=None,
        segment_seconds=4.0,
        format="mp4",
        scheduler=None,
        face_box=",".join(str(v) for v in box),  # drawn by the generator (make_demo_assets)
        face_policy=None,
        weights=None,
    )


def register(app: typer.Typer) -> None:
    """Add these commands to the ``emo`` app."""
    for command in (render, submit, validate, status, resume, cancel, demo):
        app.command()(command)
