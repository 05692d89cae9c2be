"""The ``emo`` command line.

Exit codes: 0 success; 1 a job or operation failed; 2 bad input or settings (the message
says which and how to fix it); 3 a service (object store, database) could not be reached.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import OperationalError

from emo import embedded_prefect

try:  # typer 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]
from emo.cli_jobs import register as register_job_commands
from emo.cli_ops import register as register_ops_commands
from emo.cli_training import register as register_training_commands
from emo.errors import EmoError, InputError
from emo.quiet import SERVICE_COMMANDS, quiet_console
from emo.settings import get_settings, hide_password

UsageError = click_errors.UsageError
NoArgsIsHelpError = getattr(click_errors, "NoArgsIsHelpError", ())  # click 8.2 and later

app = typer.Typer(
    help="EMO talking/singing portrait video generation and batch production.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
weights_app = typer.Typer(help="Weights bundles: build and inspect.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
console = Console()


@app.callback()
def _options(
    context: typer.Context,
    verbose: Annotated[
        bool,
        typer.Option(
            "-v", "--verbose", help="also show Prefect's run logs and the libraries' messages"
        ),
    ] = False,
) -> None:
    """EMO talking/singing portrait video generation and batch production."""
    if not verbose and context.invoked_subcommand not in SERVICE_COMMANDS:
        quiet_console()


@app.command()
def plan(
    audio: Annotated[Path, typer.Argument(help="vocal track (wav, flac, mp3, m4a, ogg, ...)")],
    segment_seconds: Annotated[
        float | None,
        typer.Option(help="target segment length; default EMO_SEGMENT_SECONDS", min=0.1),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Show how a vocal track is cut into segments of whole clips at its quiet points."""
    from emo.bundle import read_bundle_info
    from emo.media import load_audio
    from emo.plan import plan_segments
    from emo.store.weights import resolve_weights

    settings = get_settings()
    samples = load_audio(audio, settings.sample_rate)
    result = plan_segments(
        samples,
        sample_rate=settings.sample_rate,
        fps=settings.fps,
        clip_frames=read_bundle_info(resolve_weights(settings)).config.clip_frames,
        segment_seconds=segment_seconds or settings.segment_seconds,
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict() | {"sha256": result.sha256}, indent=2))
        return
    table = Table(
        title=f"{audio.name}: {result.duration_seconds:.2f} s, "
        f"{result.total_frames} frames, {result.total_clips} clips"
    )
    for column in ("segment", "frames", "time (s)", "clips", "samples"):
        table.add_column(column, justify="right")
    for s in result.segments:
        table.add_row(
            str(s.index),
            f"{s.frame_start}-{s.frame_end}",
            f"{s.start_seconds:.2f}-{s.end_seconds:.2f}",
            str(s.clip_count),
            f"{s.sample_start}-{s.sample_end}",
        )
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
) -> None:
    """Create or migrate the tables of the configured database (EMO_DATABASE_URL); with
    EMO_GPU_SLOTS set, also apply it as the GPU limit (the deployment's migration Job does)."""
    from db import migrate

    migrate.upgrade(revision=revision)
    current = migrate.current_revision()
    typer.echo(f"database at revision {current}")
    settings = get_settings()
    if "gpu_slots" in settings.model_fields_set and current != migrate.head_revision():
        typer.echo("EMO_GPU_SLOTS not applied: the GPU limit needs the newest revision")
    elif "gpu_slots" in settings.model_fields_set:
        from db.engine import make_engine, session_factory
        from db.gpu_slots import set_gpu_limit

        engine = make_engine(settings.resolved_database_url)
        with session_factory(engine)() as session:
            before = set_gpu_limit(
                session=session, slots=settings.gpu_slots, actor="emo db upgrade"
            )
        engine.dispose()
        typer.echo(f"GPU limit: {before if before is not None else 'none'} -> {settings.gpu_slots}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[
        str, typer.Argument(help="target revision: -1 for one step, base to remove every table")
    ] = "-1",
) -> None:
    """Undo migrations of the configured database."""
    from db import migrate

    migrate.downgrade(revision=revision)
    typer.echo(f"database at revision {migrate.current_revision() or 'base'}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision and the newest one this code ships."""
    from db import migrate

    typer.echo(f"current {migrate.current_revision() or 'base'}, head {migrate.head_revision()}")


@weights_app.command("init")
def weights_init(
    sd15: Annotated[Path, typer.Option(help="SD1.5 directory, diffusers layout (unet/, vae/)")],
    animatediff: Annotated[
        Path,
        typer.Option(help="AnimateDiff motion modules: MotionAdapter directory or original .ckpt"),
    ],
    wav2vec2: Annotated[Path, typer.Option(help="wav2vec2 directory (transformers layout)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="new bundle directory")],
    vae: Annotated[Path | None, typer.Option(help="VAE directory; default SD15/vae")] = None,
    config: Annotated[str, typer.Option(help="model configuration: full or tiny")] = "full",
) -> None:
    """Build a starting bundle from pretrained weights, as the EMO paper initialises."""
    from emo.models.config import get_config
    from emo.weights_init import init_bundle

    info, report = init_bundle(
        sd15=sd15,
        animatediff=animatediff,
        wav2vec2=wav2vec2,
        vae=vae,
        base=get_config(config),
        output=output,
    )
    for line in report.lines():
        typer.echo(line)
    typer.echo(f"wrote {info.path} (configuration {info.config.name}, sha256 {info.sha256})")


@weights_app.command("new")
def weights_new(
    output: Annotated[Path, typer.Option("-o", "--output", help="new bundle directory")],
    config: Annotated[str, typer.Option(help="model configuration: demo, tiny or full")] = "demo",
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
) -> None:
    """A bundle of freshly initialised networks (for training from scratch, as the demo model
    is: no pretrained weights exist for its size)."""
    from emo.bundle import save_bundle
    from emo.models.components import build_components
    from emo.models.config import get_config

    base = get_config(config)
    info = save_bundle(
        build_components(base, seed=seed),
        base,
        output,
        meta={"made_by": "emo weights new", "seed": seed},
    )
    typer.echo(f"wrote {info.path} (configuration {base.name}, sha256 {info.sha256})")


@weights_app.command("upgrade")
def weights_upgrade(
    source: Annotated[Path, typer.Argument(help="a trained bundle")],
    output: Annotated[Path, typer.Option("-o", "--output", help="new bundle directory")],
    config: Annotated[
        str | None, typer.Option(help="the configuration it was made from; default its own")
    ] = None,
) -> None:
    """Rebuild a bundle with configuration fields added since it was made (new layers start
    at their initial values, everything trained is kept), so training can continue from it.
    A bundle that is already current is copied unchanged."""
    from emo.bundle import upgrade_bundle

    info = upgrade_bundle(source, output, config)
    upgraded = info.meta["upgraded"]
    fields = ", ".join(f"{k}={v}" for k, v in upgraded["fields"].items()) or "already current"
    typer.echo(
        f"wrote {info.path} ({fields}; {len(upgraded['new_tensors'])} new tensors, "
        f"sha256 {info.sha256})"
    )


@weights_app.command("export")
def weights_export(
    bundle: Annotated[Path, typer.Argument(help="trained bundle")],
    output: Annotated[Path, typer.Option("-o", "--output", help="new bundle directory")],
    half: Annotated[bool, typer.Option(help="store float16 weights (half the size)")] = True,
    recipe: Annotated[
        list[Path] | None,
        typer.Option(
            help="the training recipe, recorded (repeat for recipes run in turn)",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    evaluation: Annotated[
        Path | None,
        typer.Option(
            "--eval", help="emo eval --report JSON, recorded", exists=True, dir_okay=False
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="default denoising steps of renders; default the bundle's")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="default audio guidance of renders; default the bundle's")
    ] = None,
    continuation_strength: Annotated[
        float | None,
        typer.Option(help="default continuation strength of renders; default the bundle's"),
    ] = None,
) -> None:
    """Copy a bundle for shipping: optionally float16, with its recipe and evaluation, and
    with the sampling defaults its evaluation was run with."""
    from emo.bundle import export_bundle

    if (steps is not None and steps < 1) or (guidance is not None and not guidance > 0):
        raise InputError("--steps must be at least 1 and --guidance positive (1 = none)")
    if continuation_strength is not None and not 0 < continuation_strength <= 1:
        raise InputError(
            f"--continuation-strength must be above 0 and at most 1, not {continuation_strength}"
        )
    exported = export_bundle(
        bundle,
        output,
        half=half,
        recipes=[{"file": path.name, "text": path.read_text()} for path in recipe or []],
        evaluation=json.loads(evaluation.read_text()) if evaluation is not None else None,
        sampling={
            "steps": steps,
            "guidance_scale": guidance,
            "continuation_strength": continuation_strength,
        },
    )
    typer.echo(f"wrote {exported.path} (sha256 {exported.sha256})")


@weights_app.command("info")
def weights_info(
    bundle: Annotated[
        Path | None, typer.Argument(help="bundle; default the weights renders use")
    ] = None,
) -> None:
    """Print a bundle's configuration, parameter counts per component and content hash."""
    from emo.bundle import load_bundle
    from emo.store.weights import resolve_weights

    # The weights a render would use: EMO_WEIGHTS (local or s3://, cached), else the default.
    path = bundle or resolve_weights(get_settings())
    components, info = load_bundle(path)
    config = info.config
    typer.echo(f"bundle        {info.path}")
    typer.echo(f"sha256        {info.sha256}")
    typer.echo(
        f"configuration {config.name}: {config.resolution}x{config.resolution}, "
        f"f={config.clip_frames}, n={config.motion_frames}, m={config.audio_window}, "
        f"{config.steps} steps, guidance {config.guidance_scale}, "
        f"continuation strength {config.continuation_strength}"
    )
    counts = components.parameter_counts()
    for name, count in counts.items():
        typer.echo(f"  {name:<17}{count:>14,} parameters")
    typer.echo(f"  {'total':<17}{sum(counts.values()):>14,} parameters")
    for key, value in sorted(info.meta.items()):
        typer.echo(f"{key:<14} {_describe(key, value)}")


EVAL_KEYS = (
    "lip_sync_r",
    "av_offset_frames",
    "identity",
    "speed_low",
    "speed_mid",
    "speed_high",
    "seam_jitter",
)


def _describe(key: str, value: object) -> str:
    """One line per bundle metadata entry: the recipe by name, the evaluation's figures."""
    if key == "recipe" and isinstance(value, dict | list):  # one recipe, or several in turn
        recipes = value if isinstance(value, list) else [value]
        names = " then ".join(str(item.get("file")) for item in recipes if isinstance(item, dict))
        return f"{names} ({'text' if len(recipes) == 1 else 'texts'} recorded in emo.json)"
    if key == "evaluation" and isinstance(value, dict):
        return ", ".join(
            f"{k} {value[k]:.3f}" if isinstance(value.get(k), float) else f"{k} {value.get(k)}"
            for k in EVAL_KEYS
        )
    text = json.dumps(value)
    return text if len(text) <= 160 else text[:157] + "..."


@app.command("settings")
def show_settings() -> None:
    """Print the effective settings (secrets hidden)."""
    settings = get_settings()
    values = settings.model_dump(mode="json")
    values["database_url (resolved)"] = settings.resolved_database_url
    values["store_url (resolved)"] = settings.resolved_store_url
    for name, value in values.items():
        typer.echo(f"{name} = {hide_password(value) if isinstance(value, str) else value}")


def _fail(message: str, code: int) -> int:
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    return code


def _usage(error: UsageError) -> int:
    """A command-line mistake as one line: what is wrong and where the command's help is."""
    if isinstance(error, NoArgsIsHelpError):  # the help is printed as it is made
        return error.exit_code
    command = error.ctx.command_path if error.ctx else "emo"
    message = " ".join(error.format_message().split())
    return _fail(f"{message} (see '{command} --help')", error.exit_code)


def run(argv: list[str] | None = None) -> int:
    """Run one ``emo`` command and return its exit code: settings are checked first, and
    every user-facing error is one line on stderr with no traceback (``EmoError``: its own
    code; a usage mistake: 2; an unreachable database: 3). The console script calls this;
    tests call it in-process to see exactly what a user sees."""
    try:
        embedded_prefect.configure(get_settings().home)
        code = app(args=argv, prog_name="emo", standalone_mode=False)
    except UsageError as error:
        return _usage(error)
    except typer.Abort:  # end of input at a prompt
        return _fail("aborted", 1)
    except EmoError as error:
        return _fail(str(error), error.exit_code)
    except OperationalError as error:
        url = hide_password(get_settings().resolved_database_url)
        reason = str(error.orig or error).strip().splitlines()[0]
        return _fail(f"database {url} is not reachable ({reason}); check EMO_DATABASE_URL", 3)
    except KeyboardInterrupt:
        code = 130
    if code == 130:
        Console(stderr=True).print("interrupted")
    return code if isinstance(code, int) else 0


def main() -> None:
    """Console entry point (``emo``)."""
    sys.exit(run())


register_job_commands(app)
register_ops_commands(app)
register_training_commands(app)

if __name__ == "__main__":
    main()
