"""emo train: each stage trains exactly its parameters; a killed run resumes where it stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emo.bundle import load_bundle, save_bundle
from emo.errors import InputError
from emo.models.components import build_components
from emo.models.config import TINY
from emo.synthetic.corpus import make_corpus
from emo.training.config import load_train_config
from emo.training.prepare import PrepareOptions, prepare_dataset
from emo.training.stages import role, trained_roles
from emo.training.trainer import train_stage
from tests.conftest import run_emo

pytestmark = pytest.mark.slow  # training stages and a killed training run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, initial bundle): three synthetic videos at the tiny model's 64x64."""
    root = tmp_path_factory.mktemp("train")
    make_corpus(root / "videos", videos=3, seconds=2.0, size=64, seed=9)
    prepare_dataset(root / "videos", root / "data", PrepareOptions(resolution=64))
    init = root / "init"
    save_bundle(build_components(TINY, seed=0), TINY, init)
    return root / "data", init


def _state(bundle: Path) -> dict[str, torch.Tensor]:
    components, _ = load_bundle(bundle)
    return {
        f"{component}.{name}": tensor.clone()
        for component, module in components.modules().items()
        for name, tensor in module.state_dict().items()
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_step_changes_exactly_what_the_stage_trains(
    stage: int, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    data, init = corpus
    train = load_train_config(None, {"steps": 1, "batch_size": 1, "learning_rate": 1e-3})
    out = train_stage(
        stage=stage,
        data=data,
        init=init,
        output=tmp_path / "out",
        train=train,
        run_dir=tmp_path / "run",
    )
    assert out is not None and out.meta["stage"] == stage
    before, after = _state(init), _state(tmp_path / "out")
    assert before.keys() == after.keys()
    roles = trained_roles(stage)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {k for k in before if role(k.split(".", 1)[0], k.split(".", 1)[1]) in roles}
    assert changed <= trained, sorted(changed - trained)[:5]  # nothing else moved, bit for bit
    nonzero = {k for k in trained if before[k].abs().sum() > 0}
    assert len(changed & nonzero) > 0.9 * len(nonzero)  # and what trains did move
    kinds = {role(k.split(".", 1)[0], k.split(".", 1)[1]) for k in changed}
    assert kinds == roles if stage != 2 else kinds >= {"temporal", "audio"}


def test_stage_three_takes_speed_buckets_from_the_dataset(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    data, init = corpus
    train = load_train_config(None, {"steps": 1, "batch_size": 1})
    out = train_stage(
        stage=3, data=data, init=init, output=tmp_path / "b", train=train, run_dir=tmp_path / "run"
    )
    index = json.loads((data / "dataset.json").read_text())
    assert list(out.config.speed_centers) == index["speed_centers"]
    assert list(out.config.speed_radii) == index["speed_radii"]


def test_killed_training_resumes_from_its_checkpoint(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    data, init = corpus
    run, out = tmp_path / "run", tmp_path / "bundle"
    command = [
        str(Path(sys.executable).with_name("emo")),
        "train",
        "--stage",
        "1",
        "--data",
        str(data),
        "--init",
        str(init),
        "-o",
        str(out),
        "--run-dir",
        str(run),
        "--set",
        "steps=40",
        "--set",
        "checkpoint_every=5",
        "--set",
        "log_every=1",
        "--set",
        "batch_size=1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    step_file = run / "checkpoint" / "step.json"
    while not (step_file.is_file() and json.loads(step_file.read_text())["step"] >= 10):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint at step 10 in time"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = json.loads(step_file.read_text())["step"]
    assert not out.exists()

    resumed = run_emo(*command[1:], timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-(40 - saved) :] == list(range(saved + 1, 41))  # continued, not restarted
    assert steps.count(1) == 1
    optimizer = torch.load(run / "checkpoint" / "optimizer.bin", weights_only=False)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {40}  # Adam's own count
    assert (out / "emo.json").is_file()

    other = run_emo(
        *command[1:8], "-o", str(tmp_path / "other"), "--run-dir", str(run), "--set", "steps=41"
    )
    assert other.returncode == 2 and "belongs to another run" in other.stderr


def test_bad_training_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="unknown training setting.*stepz"):
        load_train_config(None, {"stepz": 3})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  prediction: x0\n")
    with pytest.raises(Exception, match="prediction must be"):
        load_train_config(recipe, {})


def test_roles_follow_parameter_names() -> None:
    assert role("backbone", "unet.down_blocks.0.resnets.0.norm2.weight") == "spatial"
    assert (
        role("backbone", "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm2.weight")
        == "audio"
    )
    assert (
        role("backbone", "unet.down_blocks.0.motion_modules.0.temporal.proj_in.weight")
        == "temporal"
    )
    assert (
        role("backbone", "unet.mid_block.motion_modules.0.speed_attention.to_q.weight") == "speed"
    )
    assert role("vae", "encoder.conv_in.weight") == "frozen"


def test_a_later_stage_keeps_the_earlier_stages_target(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    data, init = corpus
    sample = load_train_config(None, {"steps": 1, "batch_size": 1, "prediction": "sample"})
    first = train_stage(
        stage=1,
        data=data,
        init=init,
        output=tmp_path / "one",
        train=sample,
        run_dir=tmp_path / "run1",
    )
    assert first.meta["made_by"] == "emo train"
    epsilon = load_train_config(None, {"steps": 1, "batch_size": 1})
    with pytest.raises(InputError, match="trained to predict sample"):
        train_stage(
            stage=2,
            data=data,
            init=tmp_path / "one",
            output=tmp_path / "two",
            train=epsilon,
            run_dir=tmp_path / "run2",
        )


def test_a_diverging_run_stops_naming_the_step_and_writes_no_bundle(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    from emo.errors import TrainingDiverged

    data, init = corpus
    wild = {"steps": 4, "batch_size": 1, "learning_rate": 1e12, "grad_clip": 0}
    with pytest.raises(TrainingDiverged, match=r"loss became \S+ at step \d; lower learning_rate"):
        train_stage(
            stage=1,
            data=data,
            init=init,
            output=tmp_path / "out",
            train=load_train_config(None, wild),
            run_dir=tmp_path / "run",
        )
    assert not (tmp_path / "out").exists()
