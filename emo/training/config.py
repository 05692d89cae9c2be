"""Training configuration: the paper's defaults, the objective's options, one YAML file.

A recipe file (YAML) holds a ``TrainConfig``; every key is optional and unknown keys are an
error naming the key. ``emo train --set key=value`` overrides single keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from emo.errors import InputError

Prediction = Literal["epsilon", "v_prediction", "sample"]


@dataclass(frozen=True)
class TrainConfig:
    """One stage's training run. Defaults are the paper's where it gives them."""

    learning_rate: float = 1e-5  # the paper's, for every stage
    warmup_steps: int = 0  # linear learning-rate warm-up
    batch_size: int = 4  # clips (stages 2, 3) or frames (stage 1) per step
    steps: int = 1000  # optimisation steps of this stage
    clip_frames: int | None = None  # f; None: the model's (12 in the paper)
    motion_frames: int | None = None  # n; None: the model's (4)
    prediction: Prediction = "epsilon"  # what the Backbone predicts
    residual_to_reference: bool = False  # predict (frame - reference) latents
    min_snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023)
    mouth_weight: float = 1.0  # loss weight inside the mouth region (1 = none)
    ema_decay: float | None = None  # EMA of trained weights, used for export when set
    train_stage1_modules_in_stage2: bool = True  # the paper keeps them training
    audio_dropout: float = 0.1  # zero the audio tokens this often (for guidance)
    motion_dropout: float = 0.15  # train as a first clip (zero motion features) this often
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200  # steps between resumable checkpoints
    log_every: int = 10
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    workers: int = 0  # data-loading processes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any) -> Any:
    """A ``--set`` string to the field's type."""
    kind = {f.name: f.type for f in fields(TrainConfig)}[name]
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null"):
        return None
    if "bool" in str(kind):
        return value.lower() in ("1", "true", "yes", "on")
    if "int" in str(kind) and "float" not in str(kind):
        return int(value)
    if "float" in str(kind):
        return float(value)
    return value


def load_train_config(
    path: Path | None, overrides: dict[str, Any], stage: int | None = None
) -> TrainConfig:
    """The recipe's ``train`` keys, then its ``stage<N>`` keys, then ``overrides``; unknown
    keys are refused. A recipe without sections is read as one ``train`` section."""
    values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise InputError(f"training config {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise InputError(f"training config {str(path)!r} must be a mapping of keys")
        sections = {"train", "stage1", "stage2", "stage3"}
        if set(loaded) & sections:
            stray = sorted(set(loaded) - sections)
            if stray:
                raise InputError(
                    f"training config {str(path)!r}: unknown section(s) {', '.join(stray)}; "
                    "use train, stage1, stage2, stage3"
                )
            values.update(loaded.get("train") or {})
            values.update(loaded.get(f"stage{stage}") or {})
        else:
            values.update(loaded)
    values.update(overrides)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(
            f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        config = replace(TrainConfig(), **{k: _coerce(k, v) for k, v in values.items()})
    except (TypeError, ValueError) as error:
        raise InputError(f"invalid training setting: {error}") from error
    if config.prediction not in ("epsilon", "v_prediction", "sample"):
        raise InputError(
            f"prediction must be epsilon, v_prediction or sample, not {config.prediction!r}"
        )
    if config.batch_size < 1 or config.steps < 1 or config.learning_rate <= 0:
        raise InputError("batch_size and steps must be >= 1 and learning_rate > 0")
    return config
