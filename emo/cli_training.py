"""``emo synth``, ``emo prepare``, ``emo train`` and ``emo eval``: making and measuring models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from emo.errors import InputError

console = Console(soft_wrap=True)


def _bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def synth(
    output: Annotated[Path, typer.Option("-o", "--output", help="corpus directory")],
    videos: Annotated[int, typer.Option(help="how many videos")] = 100,
    seconds: Annotated[float, typer.Option(help="length of each video")] = 8.0,
    size: Annotated[int, typer.Option(help="frame width and height (even)")] = 128,
    seed: Annotated[int, typer.Option(help="corpus seed")] = 0,
    split: Annotated[str, typer.Option(help="train, or heldout (unseen people and tracks)")] = (
        "train"
    ),
    workers: Annotated[int, typer.Option(help="parallel processes")] = 2,
) -> None:
    """Generate synthetic talking and singing heads with exact per-frame labels (resumable)."""
    from emo.synthetic.corpus import SPLITS, make_corpus

    if videos < 1:
        raise InputError(f"--videos must be at least 1, not {videos}")
    if size < 32 or size % 2:
        raise InputError(f"--size must be an even number of pixels >= 32, not {size}")
    if not 0.5 <= seconds <= 600:
        raise InputError(f"--seconds must be between 0.5 and 600, not {seconds}")
    if split not in SPLITS:
        raise InputError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    with _bar() as bar:
        task = bar.add_task(f"synth {split}", total=videos)
        paths = make_corpus(
            output,
            videos=videos,
            seconds=seconds,
            size=size,
            seed=seed,
            split=split,
            workers=workers,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(f"{len(paths)} videos with labels in {output} (index: corpus-{split}.json)")


def prepare(
    videos: Annotated[Path, typer.Argument(help="directory of talking-head videos with audio")],
    output: Annotated[Path, typer.Option("-o", "--output", help="dataset directory")],
    resolution: Annotated[int, typer.Option(help="training frame size (square)")] = 64,
    workers: Annotated[int, typer.Option(help="parallel processes")] = 2,
) -> None:
    """Turn videos into a training dataset: frames, face boxes, head pose and speed, audio."""
    from rich.table import Table

    from emo.settings import get_settings
    from emo.training.prepare import PrepareOptions, prepare_dataset

    if not videos.is_dir():
        raise InputError(f"videos directory {str(videos)!r} does not exist")
    if resolution < 16 or resolution % 8:
        raise InputError(f"--resolution must be a multiple of 8, at least 16, not {resolution}")
    settings = get_settings()
    options = PrepareOptions(resolution, fps=settings.fps, sample_rate=settings.sample_rate)
    with _bar() as bar:
        task = bar.add_task("prepare", total=1)
        index, rows = prepare_dataset(
            videos,
            output,
            options,
            workers=workers,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        table = Table("skipped video", "reason")
        for row in skipped:
            table.add_row(Path(row["video"]).name, row["reason"])
        console.print(table)
    console.print(
        f"{len(index['shards'])} videos, {index['frames']} frames in {output} "
        f"({len(skipped)} skipped; report.json lists all); speed buckets "
        f"{index['speed_centers']}"
    )


def train(
    stage: Annotated[int, typer.Option(help="1 image, 2 video + audio, 3 speed")],
    data: Annotated[Path, typer.Option(help="dataset made by emo prepare")],
    init: Annotated[Path, typer.Option(help="bundle to start from")],
    output: Annotated[Path, typer.Option("-o", "--output", help="bundle to write")],
    config: Annotated[Path | None, typer.Option(help="training recipe (YAML)")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override one setting: key=value")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="checkpoints and logs; default runs/<output name>")
    ] = None,
) -> None:
    """Train one of EMO's three stages; rerun the same command to resume after a stop."""
    from emo.settings import get_settings
    from emo.training.config import load_train_config
    from emo.training.trainer import train_stage

    if stage not in (1, 2, 3):
        raise InputError(f"--stage must be 1, 2 or 3, not {stage}")
    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set {item!r}: write key=value")
        overrides[key.strip()] = value.strip()
    recipe = load_train_config(config, overrides, stage)
    settings = get_settings()
    run = run_dir or Path("runs") / output.name

    def show(record: dict) -> None:
        console.print(
            f"stage {record['stage']} step {record['step']}/{recipe.steps}: "
            f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
            f"{record['samples_per_second']:.2f} samples/s"
        )

    bundle = train_stage(
        stage=stage,
        data=data,
        init=init,
        output=output,
        train=recipe,
        run_dir=run,
        fps=settings.fps,
        sample_rate=settings.sample_rate,
        on_log=show,
    )
    console.print(f"stage {stage} done: bundle {bundle.path} (sha256 {bundle.sha256[:16]})")


def evaluate(
    bundle: Annotated[
        Path | None, typer.Argument(help="bundle; default the configured weights")
    ] = None,
    heldout: Annotated[int, typer.Option(help="held-out people (and tracks) to render")] = 4,
    seconds: Annotated[float, typer.Option(help="length of each held-out track")] = 6.0,
    steps: Annotated[int | None, typer.Option(help="denoising steps; default the model's")] = None,
    guidance: Annotated[
        float | None, typer.Option(help="audio guidance scale; default the model's")
    ] = None,
    continuation_strength: Annotated[
        float | None,
        typer.Option(help="hold clip starts to the frame before, except the mouth (1 = off)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="held-out corpus seed")] = 0,
    speed_videos: Annotated[
        int, typer.Option(help="people also rendered at the low and high speed levels")
    ] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable report")] = False,
    report: Annotated[Path | None, typer.Option(help="also write the JSON report here")] = None,
) -> None:
    """Render held-out synthetic people and score lip sync, identity, speed and seams."""
    import json

    from rich.table import Table

    from emo.eval.evaluate import BARS
    from emo.eval.evaluate import evaluate as run_evaluation
    from emo.pipeline import EMOPipeline
    from emo.render import device_and_dtype
    from emo.settings import get_settings
    from emo.store.weights import resolve_weights

    if heldout < 1 or seconds < 1.0:
        raise InputError("--heldout must be at least 1 and --seconds at least 1")
    if guidance is not None and not guidance > 0:
        raise InputError(f"--guidance must be positive (1 = no guidance), not {guidance}")
    if continuation_strength is not None and not 0 < continuation_strength <= 1:
        raise InputError(
            f"--continuation-strength must be above 0 and at most 1, not {continuation_strength}"
        )
    settings = get_settings()
    path = bundle or resolve_weights(settings)
    device, dtype = device_and_dtype(settings)
    pipeline = EMOPipeline.from_bundle(
        path, device=device, dtype=dtype, fps=settings.fps, sample_rate=settings.sample_rate
    )
    quiet = Console(stderr=True, soft_wrap=True)
    result = run_evaluation(
        pipeline,
        heldout=heldout,
        seconds=seconds,
        seed=seed,
        speed_videos=speed_videos,
        steps=steps,
        guidance=guidance,
        continuation_strength=continuation_strength,
        progress=None if as_json else lambda text: quiet.print(f"rendering {text}"),
    )
    result["bundle"] = {"path": str(path), "sha256": pipeline.bundle.sha256}
    text = json.dumps(result, indent=2)
    if report is not None:
        report.write_text(text)
    if as_json:
        typer.echo(text)
        return
    table = Table("measure", "value", "bar")
    for key in ("lip_sync_r", "av_offset_frames", "identity", "seam_jitter"):
        value = result[key]
        table.add_row(key, "n/a" if value is None else f"{value:.3f}", BARS[key])
    if result["speed_low"] is not None:
        speeds = " < ".join(f"{result[f'speed_{k}']:.2f}" for k in ("low", "mid", "high"))
        table.add_row("speed low < mid < high", speeds, BARS["speed"])
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add these commands to the ``emo`` app."""
    app.command()(synth)
    app.command()(prepare)
    app.command()(train)
    app.command("eval")(evaluate)
