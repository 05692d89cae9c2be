"""Weights bundles: one directory per model, every component in its own subfolder.

    BUNDLE/emo.json              configuration, component list, content hash, provenance
    BUNDLE/<component>/...       save_pretrained output (config.json + safetensors)
    BUNDLE/scheduler/...         the noise schedule the model was trained with

The hash (sha256) covers every file of every component and the model configuration, and is
recorded by every output made with the bundle. Metadata (where it came from, evaluation)
does not change it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import Wav2Vec2Model

from emo.errors import InputError
from emo.models.audio import AudioProjection
from emo.models.backbone import Backbone
from emo.models.components import EMOComponents, build_components, vae_class
from emo.models.config import EMOConfig, get_config
from emo.models.face_locator import FaceLocator
from emo.models.reference_net import ReferenceNet
from emo.models.speed import SpeedEncoder
from emo.store.base import sha256_stream

BUNDLE_FILE = "emo.json"
FORMAT_VERSION = 1
COMPONENT_CLASSES = {
    "backbone": Backbone,
    "reference_net": ReferenceNet,
    "face_locator": FaceLocator,
    "audio_projection": AudioProjection,
    "speed_encoder": SpeedEncoder,
    "vae": AutoencoderKL,
    "wav2vec2": Wav2Vec2Model,
}
HASHED_DIRS = (*COMPONENT_CLASSES, "scheduler")


@dataclass
class BundleInfo:
    """What ``emo.json`` says about a bundle."""

    path: Path
    config: EMOConfig
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)
    # The configuration exactly as emo.json records it: what the hash covers, so a field
    # added to EMOConfig later (with a default) does not invalidate bundles made before it.
    recorded_config: dict[str, Any] | None = None


def content_hash(path: Path, config: EMOConfig | dict[str, Any]) -> str:
    """sha256 over the model configuration and every component file (path and content)."""
    recorded = config.to_dict() if isinstance(config, EMOConfig) else config
    digest = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode())
    for folder in HASHED_DIRS:
        for file in sorted((path / folder).rglob("*")):
            if file.is_file():
                with open(file, "rb") as stream:
                    file_hash = sha256_stream(stream)
                digest.update(f"{file.relative_to(path).as_posix()}\0{file_hash}\n".encode())
    return digest.hexdigest()


def _drop_load_path(config_file: Path) -> None:
    """diffusers records where a model was loaded from; that must not change the hash."""
    document = json.loads(config_file.read_text())
    if document.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def save_bundle(
    components: EMOComponents,
    config: EMOConfig,
    path: Path | str,
    *,
    scheduler_config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> BundleInfo:
    """Write a bundle (atomically: built in a sibling temp dir, then renamed into place)."""
    path = require_new_bundle_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for f in fields(components):
            module = getattr(components, f.name)
            if dtype is not None:
                module = module.to(dtype)
            module.save_pretrained(staging / f.name, safe_serialization=True)
            _drop_load_path(staging / f.name / "config.json")
        DDIMScheduler.from_config(scheduler_config or config.scheduler).save_pretrained(
            staging / "scheduler"
        )
        info = BundleInfo(
            path=path, config=config, sha256=content_hash(staging, config), meta=meta or {}
        )
        document = {
            "format": FORMAT_VERSION,
            "config": config.to_dict(),
            "sha256": info.sha256,
            "components": list(COMPONENT_CLASSES),
            "meta": info.meta,
        }
        (staging / BUNDLE_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def require_new_bundle_path(path: Path | str) -> Path:
    """``path`` as a Path; a clear error if something is there (bundles are never overwritten)."""
    path = Path(path)
    if path.exists():
        raise InputError(f"bundle directory {path} already exists; choose a new -o path")
    return path


def read_bundle_info(path: Path | str) -> BundleInfo:
    """Read ``emo.json``; a missing or broken bundle is a clear error naming the path."""
    path = Path(path)
    document_path = path / BUNDLE_FILE
    if not document_path.is_file():
        raise InputError(
            f"{path} is not a weights bundle (no {BUNDLE_FILE}); set EMO_WEIGHTS or --weights "
            "to a directory made by `emo weights init` or `emo train`"
        )
    return parse_bundle_info(document_path.read_text(), path)


def parse_bundle_info(text: str, path: Path) -> BundleInfo:
    """``emo.json``'s text as a ``BundleInfo`` of the bundle at ``path`` (read from anywhere:
    a finishing run reads a pinned bundle's from the store without its weights)."""
    try:
        document = json.loads(text)
        config = EMOConfig.from_dict(document["config"])
        return BundleInfo(
            path=path,
            config=config,
            sha256=document["sha256"],
            meta=document.get("meta", {}),
            recorded_config=document["config"],
        )
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"weights bundle {path} has an unreadable {BUNDLE_FILE}: {error}"
        ) from None


def verify_bundle(info: BundleInfo) -> None:
    """Raise unless the files on disk still hash to the recorded value."""
    actual = content_hash(info.path, info.recorded_config or info.config)
    if actual != info.sha256:
        raise InputError(
            f"weights bundle {info.path} is damaged or was edited: content hash "
            f"{actual[:12]} != recorded {info.sha256[:12]}"
        )


def load_bundle(
    path: Path | str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> tuple[EMOComponents, BundleInfo]:
    """Load every component of a bundle onto ``device`` in ``dtype``, in eval mode."""
    info = read_bundle_info(path)
    if verify:
        verify_bundle(info)
    classes = {**COMPONENT_CLASSES, "vae": vae_class(info.config)}
    modules = {
        name: cls.from_pretrained(info.path / name, torch_dtype=dtype)
        for name, cls in classes.items()
    }
    components = EMOComponents(**modules).to(device, dtype).eval()
    return components, info


def scheduler_config(info: BundleInfo) -> dict[str, Any]:
    """The bundle's noise-schedule configuration."""
    return dict(DDIMScheduler.load_config(info.path / "scheduler"))


def upgrade_bundle(
    source: Path | str, output: Path | str, config_name: str | None = None
) -> BundleInfo:
    """Bring a bundle up to today's configuration without losing its training.

    Configuration fields added since the bundle was made (absent from its ``emo.json``) take
    the values of the configuration it was made from (``config_name``, default the name it
    records); every network is rebuilt with them, the bundle's tensors are copied in, and
    the tensors that are new (zero-initialised where the layer says so, e.g. the audio time
    embedding) keep their initial values. A tensor whose shape changed, or that the new
    networks no longer have, is an error: nothing trained is lost silently. A bundle that is
    already current is copied unchanged (so a recipe can always upgrade). The scheduler and
    the training history are kept; an evaluation is dropped if networks were added (it was
    earned without them) and ``meta.upgraded`` records what changed.
    """
    require_new_bundle_path(output)  # before the (slow) loading and rebuilding
    components, info = load_bundle(source)
    recorded = info.recorded_config or info.config.to_dict()
    target = get_config(config_name or str(recorded.get("name")))
    if recorded.get("name") != target.name:
        raise InputError(
            f"{info.path} is a {recorded.get('name')!r} model; upgrade it with "
            f"--config {recorded.get('name')}"
        )
    added = {f.name: getattr(target, f.name) for f in fields(EMOConfig) if f.name not in recorded}
    config = replace(info.config, **added)
    fresh = build_components(config)
    new_tensors = []
    for name, module in fresh.modules().items():
        old, new = getattr(components, name).state_dict(), module.state_dict()
        if lost := sorted(set(old) - set(new)):
            raise InputError(f"{info.path}: the upgraded {name} has no {lost[0]}")
        for key, tensor in old.items():
            if tensor.shape != new[key].shape:
                raise InputError(
                    f"{info.path}: {name}.{key} is {tuple(tensor.shape)}, the upgraded "
                    f"network wants {tuple(new[key].shape)}"
                )
        new_tensors += [f"{name}.{key}" for key in new if key not in old]
        module.load_state_dict({**new, **old})
    meta = {k: v for k, v in info.meta.items() if k != "evaluation" or not new_tensors}
    meta["upgraded"] = {"from_sha256": info.sha256, "fields": added, "new_tensors": new_tensors}
    return save_bundle(fresh, config, output, scheduler_config=scheduler_config(info), meta=meta)


def export_bundle(
    bundle: Path,
    output: Path,
    *,
    half: bool,
    recipes: list[dict[str, str]],
    evaluation: dict[str, Any] | None,
    sampling: dict[str, Any],
) -> BundleInfo:
    """A copy of ``bundle`` for shipping: float16 if ``half``, recording the training recipes
    (file name and text, in the order they ran) and the evaluation's summary, with the
    sampling defaults (``steps``, ``guidance_scale``, ``continuation_strength``; None keeps
    the bundle's) its evaluation was run with."""
    components, info = load_bundle(bundle)
    config = replace(info.config, **{k: v for k, v in sampling.items() if v is not None})
    meta = dict(info.meta)
    if recipes:
        meta["recipe"] = recipes[0] if len(recipes) == 1 else recipes
    if evaluation is not None:
        meta["evaluation"] = {k: v for k, v in evaluation.items() if k != "per_video"}
    return save_bundle(
        components,
        config,
        output,
        scheduler_config=scheduler_config(info),
        meta=meta,
        dtype=torch.float16 if half else None,
    )
