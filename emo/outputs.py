"""A job's final video: where each render puts it, how it is checked, how the user gets it.

Each render writes its output under its own lease epoch (``output_prefix``); the job row's
``output_uri`` names the one that counts, so a render that lost its job never overwrites the
delivered video. The user's copy is written only after the job is recorded succeeded, by
atomic replacement: a failure never leaves a half-written file where a finished one was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from emo import media
from emo.errors import EmoError, MediaError
from emo.plan import SegmentPlan
from emo.store.local import atomic_copy, atomic_write


def output_prefix(job_id: str, epoch: int) -> str:
    """Where the render of one epoch puts the final video, QC report and sidecar."""
    return f"jobs/{job_id}/output/e{epoch:06d}/"


def check_assembled(video: Path, plan: SegmentPlan) -> None:
    """The final video has exactly ceil(samples / samples per frame) frames and the audio's
    duration; anything else (a segment of another plan spliced in) fails the job."""
    info = media.probe(video)
    audio = info.first("audio")
    seconds = plan.total_samples / plan.sample_rate
    problems = []
    if info.video_frames != plan.total_frames:
        problems.append(f"{info.video_frames} frames, the track needs {plan.total_frames}")
    if audio is None or abs(audio.duration - seconds) > media.TRUNCATION_TOLERANCE_SECONDS:
        found = "no audio" if audio is None else f"{audio.duration:.3f} s of audio"
        problems.append(f"{found}, the track lasts {seconds:.3f} s")
    if problems:
        raise MediaError(f"assembled video {video.name} is wrong: {'; '.join(problems)}")


def publish_output(final: Path, output: Path, sidecar: dict[str, Any]) -> Path:
    """Copy the result where the user asked, with its sidecar JSON beside it (``.zip`` PNG
    frames: unpacked into a folder); returns what was written."""
    if final.suffix == ".zip":
        target = output if output.suffix == "" else output.with_suffix("")
        replace_frame_folder(final, target)
    else:
        target = output
        atomic_copy(final, target)
    atomic_write(
        target.with_name(target.stem + ".json"),
        json.dumps(sidecar, indent=2, sort_keys=True).encode(),
    )
    return target


def replace_frame_folder(archive: Path, target: Path) -> None:
    """Unpack PNG frames next to ``target``, then swap them in; never delete a user's files.

    ``target`` may be missing, empty, or a frame folder this command wrote before
    (``frame_*.png`` only); anything else in it is refused with a clear error.
    """
    if target.exists():
        names = [p.name for p in target.iterdir()] if target.is_dir() else []
        foreign = [name for name in names if not name.startswith("frame_")]
        if not target.is_dir() or foreign:
            raise EmoError(
                f"output {str(target)!r} exists and is not a frame folder from emo "
                f"(holds {', '.join(sorted(foreign)[:3]) or 'a file'}); choose a new folder"
            )
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.unpack_archive(archive, staging)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
