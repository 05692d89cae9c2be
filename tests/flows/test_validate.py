"""`emo validate`: every check of a submit, with nothing registered or stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from emo.cli import app
from emo.manifest import ManifestError
from tests.conftest import emo_in_process, write_wav

ASSETS = Path(__file__).resolve().parents[2] / "emo" / "assets"
BOX = [0.2, 0.15, 0.8, 0.85]


def _studio_folder(tmp_path: Path) -> Path:
    """A manifest's folder with a portrait and a vocal track beside it (relative inputs)."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    shutil.copy(ASSETS / "demo_portrait.png", folder / "anna.png")
    shutil.copy(ASSETS / "demo_vocal.wav", folder / "song.wav")
    (folder / "notes.wav").write_text("ffconcat version 1.0\nfile 'song.wav'\n")
    return folder


def _write(folder: Path, jobs: list[dict]) -> Path:
    path = folder / "batch.yaml"
    path.write_text(yaml.safe_dump({"name": "spring", "jobs": jobs}))
    return path


def _nothing_written(home: Path) -> None:
    """No job database, no store, and no copies of the inputs left behind."""
    assert not (home / "emo.db").exists() and not (home / "store").exists()
    scratch = home / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir())


def test_a_valid_manifest_prints_its_jobs_and_estimate_and_registers_nothing(
    tmp_path: Path,
) -> None:
    folder = _studio_folder(tmp_path)
    jobs = [
        {"name": "anna", "image": "anna.png", "audio": "song.wav", "face_box": BOX, "steps": 10},
        {"name": "anna-long", "image": "anna.png", "audio": "song.wav", "face_box": BOX},
    ]
    result = CliRunner().invoke(app, ["validate", str(_write(folder, jobs)), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["name"] == "spring" and [j["job"] for j in report["jobs"]] == [
        "anna",
        "anna-long",
    ]
    short, default = report["jobs"]
    assert short["seconds"] == 10.0 and short["clips"] == default["clips"] > 0
    assert short["steps"] == 10 and default["steps"] > 10  # the bundle's own default
    assert default["estimate_seconds"] > short["estimate_seconds"] > 0
    total = short["estimate_seconds"] + default["estimate_seconds"]
    assert report["estimate_seconds"] == pytest.approx(total, abs=1e-4)
    _nothing_written(tmp_path / "emo-home")


def test_every_problem_is_listed_and_nothing_is_written(tmp_path: Path) -> None:
    folder = _studio_folder(tmp_path)
    jobs = [
        {"name": "fine", "image": "anna.png", "audio": "song.wav", "face_box": BOX},
        {"name": "greedy", "image": "anna.png", "audio": "song.wav", "face_box": BOX, "steps": 900},
        {"name": "sneaky", "image": "anna.png", "audio": "notes.wav", "face_box": BOX},
        {"name": "swapped", "image": "song.wav", "audio": "anna.png", "face_box": BOX},
        {"name": "blip", "image": "anna.png", "audio": "blip.wav", "face_box": BOX},
    ]
    write_wav(folder / "blip.wav", np.zeros(1600, np.float32))  # 0.1 s
    result = CliRunner().invoke(app, ["validate", str(_write(folder, jobs))])
    assert isinstance(result.exception, ManifestError), result.output
    problems = result.exception.problems
    assert len(problems) == 4, problems
    assert "job 'greedy' (row 2): steps 900 is above 200" in problems[0]
    assert "job 'sneaky' (row 3): audio file" in problems[1] and "notes.wav" in problems[1]
    assert "job 'swapped' (row 4): image file" in problems[2] and "song.wav" in problems[2]
    assert problems[3].startswith("job 'blip' (row 5): audio 'blip.wav' is 0.10 s long, shorter")
    _nothing_written(tmp_path / "emo-home")


def test_the_command_exits_2_with_the_list_and_no_traceback(tmp_path: Path) -> None:
    folder = _studio_folder(tmp_path)
    jobs = [{"name": "sneaky", "image": "anna.png", "audio": "notes.wav", "face_box": BOX}]
    result = emo_in_process("validate", str(_write(folder, jobs)))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "notes.wav" in result.stderr
    assert "is not in a format emo reads" in result.stderr


def test_inputs_outside_the_allowed_places_are_refused_naming_the_row(
    tmp_path: Path, monkeypatch
) -> None:
    from emo.settings import get_settings
    from flows.submit_batch import validate_manifest

    folder = _studio_folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(folder / "song.wav", elsewhere / "song.wav")
    jobs = [
        {"name": "beside", "image": "anna.png", "audio": "song.wav", "face_box": BOX},
        {"name": "far", "image": "anna.png", "audio": str(elsewhere / "song.wav"), "face_box": BOX},
    ]
    path = _write(folder, jobs)
    # A user's own submit reads their files anywhere ...
    _, prepared = validate_manifest(str(path), get_settings())
    assert [job.spec.name for job in prepared] == ["beside", "far"]
    # ... a manifest from the inbox only those beside it ...
    with pytest.raises(ManifestError) as caught:
        validate_manifest(str(path), get_settings(), inbox=True)
    assert caught.value.problems == [
        f"job 'far' (row 2): audio {str(elsewhere / 'song.wav')!r} is outside the folders inputs "
        "may come from (allowed: none; EMO_INPUT_ROOTS); put it beside the manifest"
    ]
    # ... and EMO_INPUT_ROOTS confines every submit.
    monkeypatch.setenv("EMO_INPUT_ROOTS", str(folder))
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert isinstance(result.exception, ManifestError)
    assert result.exception.problems[0].startswith("job 'far' (row 2): audio")
    monkeypatch.setenv("EMO_INPUT_ROOTS", f"{folder}:{elsewhere}")
    get_settings.cache_clear()
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0


def test_a_batch_over_the_gpu_budget_is_refused_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _studio_folder(tmp_path)
    jobs = [{"name": "anna", "image": "anna.png", "audio": "song.wav", "face_box": BOX}]
    path = str(_write(folder, jobs))
    monkeypatch.setenv("EMO_MAX_BATCH_GPU_HOURS", "0.000001")  # the demo job is ~0.1 s
    monkeypatch.setenv("EMO_GPU_CLASS", "cpu")
    refused = CliRunner().invoke(app, ["validate", path])
    assert isinstance(refused.exception, ManifestError)
    (problem,) = refused.exception.problems
    assert "GPU-hours on cpu (EMO_GPU_CLASS), over EMO_MAX_BATCH_GPU_HOURS (1e-06)" in problem
    assert problem.endswith("or allow it with --allow-cost 1")
    allowed = CliRunner().invoke(app, ["validate", path, "--allow-cost", "1", "--json"])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.output)["estimate_seconds"] > 0


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["first-batch.yaml", "first-batch.csv", "first-batch.json"])
def test_the_committed_examples_are_valid(name: str) -> None:
    """The README's first batch, in each manifest format, passes every check of a submit."""
    from emo.settings import get_settings
    from flows.submit_batch import validate_manifest

    parsed, prepared = validate_manifest(str(EXAMPLES / name), get_settings())
    assert [job.spec.name for job in prepared] == [job.name for job in parsed.jobs]
    assert all(job.seconds == 10.0 and job.estimate_seconds > 0 for job in prepared)
    _nothing_written(Path(get_settings().home))
