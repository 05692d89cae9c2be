"""``emo train``: one of the paper's three stages, resumable, on one CPU, one GPU or several.

The run directory (default ``runs/<output name>``) holds ``log.jsonl`` (one line per logged
step), ``run.json`` (what the run is: stage, data, init bundle hash, config) and
``checkpoint/`` (accelerate's model, optimizer, scheduler and RNG state plus the EMA and the
step), replaced atomically every ``checkpoint_every`` steps. Rerunning the same command
continues from there; a different command on the same run directory is refused. At the end
the stage's weights (the EMA's, when enabled) are written as a bundle.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader

from emo.bundle import BundleInfo, load_bundle, save_bundle, scheduler_config
from emo.errors import SettingsError
from emo.face import FACE_EXPAND, expand_box, face_mask
from emo.models.audio import clip_audio_features, context_frames
from emo.models.components import EMOComponents
from emo.models.conditioning import Conditioning
from emo.models.config import EMOConfig
from emo.models.speed import SpeedEncoder
from emo.training.config import TrainConfig
from emo.training.data import WindowSampler, WindowSpec, collate, read_index
from emo.training.objective import denoising_loss, target, timestep_weights
from emo.training.stages import select_trainable

log = logging.getLogger(__name__)
Logger = Callable[[dict[str, Any]], None]


@dataclass
class Batch:
    """One step's inputs on the device."""

    frames: torch.Tensor  # (B, T, R, R, 3) uint8
    reference: torch.Tensor  # (B, R, R, 3) uint8
    boxes: torch.Tensor  # (B, T, 4)
    speeds: torch.Tensor  # (B, T, K)
    audio: torch.Tensor  # (B, samples) float32


class StageModel(nn.Module):
    """The components as one module for accelerate, and the stage's training forward."""

    def __init__(
        self, components: EMOComponents, config: EMOConfig, train: TrainConfig, stage: int, fps: int
    ) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(components.modules())
        self.config, self.train_config, self.stage, self.fps = config, train, stage, fps
        self.motion_frames = 0 if stage == 1 else (train.motion_frames or config.motion_frames)
        self.clip_frames = 1 if stage == 1 else (train.clip_frames or config.clip_frames)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, R, R, 3) uint8 -> (N, C, h, w) VAE latents (frozen VAE)."""
        vae = self.parts["vae"]
        x = pixels.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1.0
        return vae.encode(x).latent_dist.sample() * vae.config.scaling_factor

    def audio_tokens(self, audio: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, samples) -> (B*f, K, D) tokens for the clip frames; some zeroed (dropout)."""
        cfg, batch = self.config, audio.shape[0]
        width = self.parts["audio_projection"].config.out_features
        if self.stage == 1:
            return audio.new_zeros(batch * self.clip_frames, cfg.audio_tokens, width)
        frames = self.motion_frames + self.clip_frames
        with torch.no_grad():
            features = torch.stack(
                [
                    clip_audio_features(
                        self.parts["wav2vec2"],
                        sample.cpu().numpy(),
                        layers=cfg.audio_layers,
                        energy_bands=cfg.audio_energy_bands,
                        clip_frames=frames,
                        window=cfg.audio_window,
                        context=context_frames(cfg.audio_context_seconds, self.fps),
                    )[self.motion_frames :]
                    for sample in audio
                ]
            )  # (B, f, K, L*H)
        tokens = self.parts["audio_projection"](features.to(audio.device))  # (B*f, K, D)
        keep = torch.rand(batch, generator=generator) >= self.train_config.audio_dropout
        keep = keep.to(tokens.device).repeat_interleave(self.clip_frames)
        return tokens * keep[:, None, None]

    def forward(
        self, batch: Batch, scheduler: DDPMScheduler, generator: torch.Generator
    ) -> torch.Tensor:
        cfg, train, parts = self.config, self.train_config, self.parts
        b, n, f = batch.frames.shape[0], self.motion_frames, self.clip_frames
        size = cfg.resolution
        reference_latents = self.latents(batch.reference)  # (B, C, h, w)
        latents = self.latents(batch.frames.flatten(0, 1)).unflatten(0, (b, n + f))  # (B,T,C,h,w)
        clean = latents[:, n:].permute(0, 2, 1, 3, 4)  # (B, C, f, h, w)
        if cfg.residual_to_reference:
            clean = clean - reference_latents[:, :, None]
        motion = None
        first_clip = bool(torch.rand((), generator=generator) < train.motion_dropout)
        if n and not first_clip:  # the first n frames play the previous clip's last frames
            motion = parts["reference_net"](latents[:, :n].flatten(0, 1)).maps
        # else: zero motion features, exactly what the first clip of a render sees
        conditioning = Conditioning(
            reference=parts["reference_net"](reference_latents).tokens,
            motion=motion,
            motion_frames=n,
            speed=parts["speed_encoder"](batch.speeds[:, n:].float()) if self.stage == 3 else None,
            temporal=self.stage != 1,
        )
        boxes = batch.boxes[:, n:]  # (B, f, 4)
        union = torch.cat([boxes[..., :2].amin(1), boxes[..., 2:].amax(1)], dim=-1)  # (B, 4)
        grown = [expand_box(tuple(box.tolist()), FACE_EXPAND) for box in union.cpu()]
        masks = torch.stack(  # grown as renders grow the portrait's face box
            [torch.from_numpy(face_mask(box, size, size)) for box in grown]
        ).to(clean.device)
        located = parts["face_locator"](masks[:, None])[:, :, None]  # (B, C, 1, h, w)

        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), generator=generator).to(clean.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = parts["backbone"](
            noisy + located, timesteps, self.audio_tokens(batch.audio, generator), conditioning
        )
        wanted = target(scheduler, train.prediction, clean, noise, timesteps)
        weights = timestep_weights(scheduler, train.prediction, timesteps, train.min_snr_gamma)
        return denoising_loss(
            prediction, wanted, weights=weights, boxes=boxes, mouth_weight=train.mouth_weight
        )


def stage_config(config: EMOConfig, train: TrainConfig, stage: int, index: dict) -> EMOConfig:
    """The model config this stage trains and exports (residual flag, clip layout, speed
    buckets)."""
    config = replace(
        config,
        residual_to_reference=train.residual_to_reference,
        clip_frames=train.clip_frames or config.clip_frames,
        motion_frames=train.motion_frames or config.motion_frames,
    )
    if stage == 3:  # speed layers are added: buckets from the dataset's speed distribution
        config = replace(
            config,
            speed_centers=tuple(index["speed_centers"]),
            speed_radii=tuple(index["speed_radii"]),
        )
    return config


def _rebuild_speed_encoder(components: EMOComponents, config: EMOConfig) -> None:
    old = components.speed_encoder
    new = SpeedEncoder(
        centers=config.speed_centers,
        radii=config.speed_radii,
        tokens=config.audio_tokens,
        dim=config.speed_dim,
    )
    new.load_state_dict(old.state_dict())
    components.speed_encoder = new.to(device=old.device)  # float32, as built


def _check_continuity(init: BundleInfo, train: TrainConfig) -> None:
    """A bundle trained by an earlier stage fixes what the network predicts; a later stage
    whose recipe says otherwise would silently retrain it for another target."""
    if init.meta.get("made_by") != "emo train":
        return
    trained_for = (scheduler_config(init).get("prediction_type"), init.config.residual_to_reference)
    asked = (train.prediction, train.residual_to_reference)
    if trained_for != asked:
        raise SettingsError(
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


def _run_identity(stage: int, data: Path, init: BundleInfo, train: TrainConfig) -> dict:
    return {
        "stage": stage,
        "data": str(data.resolve()),
        "init_sha256": init.sha256,
        "train": train.to_dict(),
    }


def _open_run(run_dir: Path, identity: dict, *, write: bool = True) -> None:
    path = run_dir / "run.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != identity:
            changed = sorted(k for k in identity if recorded.get(k) != identity[k])
            raise SettingsError(
                f"run directory {run_dir} belongs to another run (differs in "
                f"{', '.join(changed)}); pass a new --run-dir or the same arguments to resume"
            )
    if write:  # the main process only, on several GPUs
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=2))


def _save_checkpoint(
    accelerator: Accelerator, ema: EMAModel | None, run_dir: Path, step: int
) -> None:
    """Write the state beside the last checkpoint, then swap it in (main process)."""
    staging = run_dir / "checkpoint.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=False)  # every process takes part
    if accelerator.is_main_process:
        if ema is not None:
            torch.save(ema.state_dict(), staging / "ema.pt")
        (staging / "step.json").write_text(json.dumps({"step": step}))
        final, old = run_dir / "checkpoint", run_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, ema: EMAModel | None, run_dir: Path) -> int:
    final = run_dir / "checkpoint"
    if not (final / "step.json").is_file():  # a crash mid-swap leaves the previous one
        final = run_dir / "checkpoint.old"
    if not (final / "step.json").is_file():
        return 0
    accelerator.load_state(str(final))
    if ema is not None and (final / "ema.pt").is_file():
        ema.load_state_dict(torch.load(final / "ema.pt", weights_only=False))
    return int(json.loads((final / "step.json").read_text())["step"])


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
        raise SettingsError(f"output bundle {output} already exists; choose a new -o path")
    index = read_index(data)
    if index["resolution"] != load_bundle_config(init).resolution:
        raise SettingsError(
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
    _open_run(run_dir, _run_identity(stage, data, info, train), write=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    config = stage_config(info.config, train, stage, index)
    if stage == 3:
        _rebuild_speed_encoder(components, config)
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
    start = _load_checkpoint(accelerator, ema, run_dir)
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
            raise SettingsError(f"loss became {loss.item()} at step {step}; lower learning_rate")
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
            with (run_dir / "log.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if on_log:
                on_log(record)
            window_loss, window_steps, started = 0.0, 0, time.perf_counter()
        if step % train.checkpoint_every == 0 or step == last_step:
            _save_checkpoint(accelerator, ema, run_dir, step)
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
