"""``emo train``: one of the paper's three stages, resumable, on one CPU, one GPU or several.

The loop: load the init bundle, check the data and the recipe agree with it, select what the
stage trains, then step (optimizer, LR warm-up, EMA, gradient clipping) until the stage's step
count, logging and checkpointing into the run directory (``run_dir``: rerunning the same
command continues from its checkpoint). At the end the stage's weights (the EMA's, when
enabled) are written as a bundle. The forward pass is ``stage_model``'s.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from emo.bundle import BundleInfo, load_bundle, save_bundle, scheduler_config
from emo.errors import InputError, SettingsError, TrainingDiverged
from emo.models.audio import context_frames
from emo.models.config import EMOConfig
from emo.training.config import TrainConfig
from emo.training.data import WindowSampler, WindowSpec, collate, read_index
from emo.training.run_dir import (
    append_log,
    load_checkpoint,
    open_run,
    run_identity,
    save_checkpoint,
)
from emo.training.stage_model import Batch, StageModel, rebuild_speed_encoder, stage_config
from emo.training.stages import select_trainable

log = logging.getLogger(__name__)
Logger = Callable[[dict[str, Any]], None]


def _check_continuity(init: BundleInfo, train: TrainConfig) -> None:
    """A bundle trained by an earlier stage fixes what the network predicts; a later stage
    whose recipe says otherwise would silently retrain it for another target."""
    if init.meta.get("made_by") != "emo train":
        return
    trained_for = (scheduler_config(init).get("prediction_type"), init.config.residual_to_reference)
    asked = (train.prediction, train.residual_to_reference)
    if trained_for != asked:
        raise InputError(
            f"{init.path} was trained to predict {trained_for[0]} "
            f"(residual_to_reference={trained_for[1]}); this stage asks for {asked[0]} "
            f"(residual_to_reference={asked[1]}): set prediction and residual_to_reference "
            "as in the earlier stages"
        )


def _check_rates(index: dict, fps: int, sample_rate: int, data: Path) -> None:
    if (index["fps"], index["sample_rate"]) != (fps, sample_rate):
        raise SettingsError(
            f"dataset {data} was prepared at {index['fps']} fps and {index['sample_rate']} Hz; "
            f"EMO_FPS / EMO_SAMPLE_RATE are {fps} and {sample_rate}"
        )


def _batches(loader: DataLoader, device: torch.device) -> Iterator[Batch]:
    for item in loader:
        yield Batch(**{k: v.to(device) for k, v in item.items()})


def train_stage(
    *,
    stage: int,
    data: Path,
    init: Path,
    output: Path,
    train: TrainConfig,
    run_dir: Path,
    fps: int = 25,
    sample_rate: int = 16000,
    on_log: Logger | None = None,
    stop_after: int | None = None,
) -> BundleInfo | None:
    """Train one stage from ``init``; returns the written bundle (None if ``stop_after``
    ended the run early: its checkpoint is on disk and the same call continues it)."""
    if output.exists():
        raise InputError(f"output bundle {output} already exists; choose a new -o path")
    index = read_index(data)
    if index["resolution"] != load_bundle_config(init).resolution:
        raise InputError(
            f"dataset {data} is {index['resolution']}px but the model "
            f"{init} is {load_bundle_config(init).resolution}px; prepare it at the model's size"
        )
    components, info = load_bundle(init)
    _check_continuity(info, train)
    _check_rates(index, fps, sample_rate, data)
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        # Stage 1 leaves some ReferenceNet layers without gradients (nothing reads them).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    open_run(run_dir, run_identity(stage, data, info, train), write=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    config = stage_config(info.config, train, stage, index)
    if stage == 3:
        rebuild_speed_encoder(components, config)
    torch.manual_seed(train.seed)
    model = StageModel(components, config, train, stage, fps)
    trained = select_trainable(
        components, stage, stage1_modules_in_stage2=train.train_stage1_modules_in_stage2
    )
    optimizer = torch.optim.AdamW(
        list(trained.values()), lr=train.learning_rate, weight_decay=train.weight_decay
    )
    warmup = max(1, train.warmup_steps)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    # The LR schedule counts optimizer steps (not samples across processes), so it is not
    # handed to accelerate's scheduler wrapper; it is checkpointed with the rest.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    ema = EMAModel(list(trained.values()), decay=train.ema_decay) if train.ema_decay else None
    start = load_checkpoint(accelerator, ema, run_dir)
    if start:
        log.info("resuming stage %d at step %d from %s", stage, start, run_dir)

    noise_config = {**scheduler_config(info), "prediction_type": train.prediction}
    scheduler = DDPMScheduler.from_config(noise_config)
    unwrapped: StageModel = accelerator.unwrap_model(model)
    spec = WindowSpec(
        frames=unwrapped.motion_frames + unwrapped.clip_frames,
        window=config.audio_window,
        context=context_frames(config.audio_context_seconds, fps),
        spf=sample_rate // fps,
    )
    rank = accelerator.process_index  # each process draws its own samples
    sampler = WindowSampler(data, spec, seed=(train.seed * 1_000_003 + start) * 64 + rank)
    loader = DataLoader(
        sampler, batch_size=train.batch_size, collate_fn=collate, num_workers=train.workers
    )
    generator = torch.Generator().manual_seed((train.seed * 7_919 + start) * 64 + rank)
    batches = _batches(loader, accelerator.device)
    model.train()
    components.vae.eval()
    components.wav2vec2.eval()
    window_loss, window_steps, started = 0.0, 0, time.perf_counter()
    last_step = min(train.steps, stop_after) if stop_after else train.steps
    step = start
    for step in range(start + 1, last_step + 1):
        loss = model(next(batches), scheduler, generator)
        accelerator.backward(loss)
        if train.grad_clip:
            accelerator.clip_grad_norm_(list(trained.values()), train.grad_clip)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(list(trained.values()))
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(f"loss became {loss.item()} at step {step}; lower learning_rate")
        window_loss, window_steps = window_loss + loss.item(), window_steps + 1
        if accelerator.is_main_process and (step % train.log_every == 0 or step == last_step):
            elapsed = time.perf_counter() - started
            record = {
                "stage": stage,
                "step": step,
                "loss": window_loss / window_steps,
                "lr": lr_schedule.get_last_lr()[0],
                "samples_per_second": window_steps * train.batch_size / elapsed,
            }
            append_log(run_dir, record)
            if on_log:
                on_log(record)
            window_loss, window_steps, started = 0.0, 0, time.perf_counter()
        if step % train.checkpoint_every == 0 or step == last_step:
            save_checkpoint(accelerator, ema, run_dir, step)
    if step < train.steps or not accelerator.is_main_process:
        return None
    if ema is not None:
        ema.copy_to(list(trained.values()))
    meta = {
        "made_by": "emo train",
        "stage": stage,
        "steps": train.steps,
        "init_sha256": info.sha256,
        "dataset": str(data.resolve()),
        "dataset_frames": index["frames"],
        "train": train.to_dict(),
        "history": [*info.meta.get("history", []), {"stage": stage, "steps": train.steps}],
    }
    components.eval()
    return save_bundle(components, config, output, scheduler_config=noise_config, meta=meta)


def load_bundle_config(path: Path) -> EMOConfig:
    from emo.bundle import read_bundle_info

    return read_bundle_info(path).config
