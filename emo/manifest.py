"""Batch manifests (YAML, JSON or CSV): what a studio submits.

    name: spring-campaign
    defaults: {steps: 40, guidance: 3.5, speed: 0.02, format: mp4}
    jobs:
      - name: anna-song
        image: portraits/anna.png          # local path (relative to the manifest), file:// or s3://
        audio: s3://studio/vocals/song.wav
        seed: 7
        speed: [[0, 0.01], [30, 0.05]]     # (time in seconds, level) points, or one level

A CSV manifest has one job per row (columns as the job fields) and takes its batch name from
the file name. Validation reports every problem in one pass with its place (job name or row,
field); nothing is registered while any job is invalid.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from emo.confine import input_problem
from emo.errors import EmoError, ObjectNotFound
from emo.settings import Settings

# A job's name names its output file and a batch's its folder: letters (with their combining
# marks) and digits of any script, '_', '-' and '.'; at most 200 bytes of UTF-8 (file systems
# allow 255 per name).
NAME_PUNCTUATION = frozenset("-_.")
MAX_NAME_BYTES = 200
# A cell a spreadsheet would run: =, @, or + / - not starting a number.
FORMULA = re.compile(r"[=@]|[+-](?![\d.])")
MAX_MANIFEST_BYTES = 10 * 1024 * 1024  # about 50,000 jobs; a bigger batch is split
SPEED_HELP = "speed is a level from 0 to 1, or a list of [seconds, level] points"
Finite = Annotated[float, Field(allow_inf_nan=False)]
SpeedPoints = list[tuple[float, float]]


class ManifestError(EmoError):
    """A manifest is invalid; the message lists every problem with its place."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = [re.sub(r"\s*\n\s*", " ", p) for p in problems]  # one line each
        if len(self.problems) == 1:
            super().__init__(f"manifest {source}: {self.problems[0]}")
            return
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"manifest {source} has {len(problems)} problems:\n{listing}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_level(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


def name_character(char: str) -> bool:
    """Whether ``char`` may be part of a name: a letter, digit or combining mark of any script
    (Devanagari and Tamil vowel signs are marks), or one of ``NAME_PUNCTUATION``."""
    return char.isalnum() or char in NAME_PUNCTUATION or unicodedata.category(char) in ("Mn", "Mc")


def safe_name(value: str, use: str) -> str:
    """``value`` in Unicode normal form C if it can name a file on any system; else
    ``ValueError`` saying what a name may hold (``use``: what the name is for)."""
    name = unicodedata.normalize("NFC", value)  # one spelling of "é", whatever typed it
    valid = name not in ("", ".", "..") and all(name_character(c) for c in name)
    if not valid or len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(
            f"use letters, digits, '-', '_' and '.' only, at most {MAX_NAME_BYTES} bytes ({use})"
        )
    return name


class JobOptions(BaseModel):
    """Parameters a job may set; a batch's ``defaults`` may set the same ones."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: Finite | None = Field(None, ge=0, le=50)
    scheduler: Literal["ddim", "dpm++", "euler", "pndm", "unipc"] | None = None
    speed: float | SpeedPoints | None = None
    segment_seconds: Finite | None = Field(None, gt=0, le=3600)
    face_box: tuple[Finite, Finite, Finite, Finite] | None = None
    face_policy: Literal["error", "full_frame"] | None = None
    format: Literal["mp4", "mov", "png"] | None = None
    priority: int | None = Field(None, ge=-1000, le=1000)

    @field_validator("seed", "steps", "priority", "guidance", "segment_seconds", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML's true/false would otherwise count as 1/0
            raise ValueError("a number is needed, not true/false")
        return value

    @field_validator("speed", mode="before")
    @classmethod
    def _speed(cls, value: Any) -> Any:
        """One clear message for every bad speed (a union type would give one per branch)."""
        if isinstance(value, str):  # CSV cells
            value = value.strip()
            try:
                value = json.loads(value) if value.startswith("[") else float(value)
            except ValueError:
                raise ValueError(f"{value!r}: {SPEED_HELP}") from None
        if value is None:
            return value
        if _is_level(value):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(SPEED_HELP)
        for point in value:
            ok = isinstance(point, list | tuple) and len(point) == 2 and _is_level(point[1])
            if not ok or not _is_number(point[0]) or point[0] < 0:
                raise ValueError(f"{point!r}: {SPEED_HELP}, seconds from 0")
        if any(b[0] <= a[0] for a, b in itertools.pairwise(value)):
            raise ValueError("speed points are [seconds, level] with the seconds increasing")
        return value

    @field_validator("face_box", mode="before")
    @classmethod
    def _box_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [float(v) for v in value.replace(";", ",").split(",")]
        if isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value):
            raise ValueError("face_box is four numbers, not true/false")
        return value

    @field_validator("face_box", mode="after")
    @classmethod
    def _box_order(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None:
            x0, y0, x1, y1 = value
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError("face_box is x0,y0,x1,y1 as fractions with x0<x1 and y0<y1")
        return value


class JobEntry(JobOptions):
    """One portrait + one vocal track -> one output named ``name``."""

    name: str
    image: str = Field(min_length=1)
    audio: str = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return safe_name(value, "it names the output file")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    defaults: JobOptions = Field(default_factory=JobOptions)
    jobs: list[JobEntry] = Field(min_length=1)
    # How the batch shares the GPUs with other batches (``db.fair_share``; `emo share` changes
    # them later): the highest priority is served first; batches of one priority split the
    # slots in proportion to their weights, each at most ``max_concurrent`` at once.
    priority: int = Field(0, ge=-1000, le=1000)
    weight: Finite = Field(1.0, gt=0, le=1000)
    max_concurrent: int | None = Field(None, ge=1, le=100000)
    tenant: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("priority", "weight", "max_concurrent", mode="before")
    @classmethod
    def _share_not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("a number is needed, not true/false")
        return value

    @field_validator("name")
    @classmethod
    def _safe_batch_name(cls, value: str) -> str:
        return safe_name(value, "it names the batch's folder")

    def job_options(self, job: JobEntry) -> dict[str, Any]:
        """The job's parameters with the batch defaults filled in (unset ones omitted)."""
        merged = self.defaults.model_dump(exclude_none=True)
        merged.update(job.model_dump(exclude_none=True, exclude={"name", "image", "audio"}))
        return merged


def _parse(data: bytes, kind: str, source: str) -> dict[str, Any]:
    text = data.decode("utf-8-sig")
    if kind == "csv":
        rows = [
            {k.strip(): v.strip() for k, v in row.items() if k and v and v.strip()}
            for row in csv.DictReader(io.StringIO(text))
        ]
        formulas = [
            f"job row {number}, {key}: {value[:40]!r} is a spreadsheet formula; export the "
            "sheet with values, not formulas"
            for number, row in enumerate(rows, start=1)
            for key, value in row.items()
            if FORMULA.match(value)
        ]
        if formulas:
            raise ManifestError(source, formulas)
        return {"name": Path(source).stem, "jobs": rows}
    loaded = json.loads(text) if kind == "json" else yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ManifestError(source, ["the top level must be a mapping with name and jobs"])
    return loaded


def _place(document: dict[str, Any], location: tuple[Any, ...]) -> str:
    if len(location) >= 2 and location[0] == "jobs" and isinstance(location[1], int):
        jobs = document.get("jobs") or []
        row = location[1]
        name = jobs[row].get("name") if row < len(jobs) and isinstance(jobs[row], dict) else None
        where = f"job {name!r} (row {row + 1})" if name else f"job row {row + 1}"
        field = ".".join(str(p) for p in location[2:])
        return f"{where}, {field}" if field else where
    return ".".join(str(p) for p in location) or "manifest"


def manifest_too_big(size: int) -> str:
    """The problem of a manifest of ``size`` bytes, over ``MAX_MANIFEST_BYTES``."""
    limit = MAX_MANIFEST_BYTES / 2**20
    return f"is {size / 2**20:.1f} MB; the limit is {limit:g} MB: split the batch"


def parse_manifest(data: bytes, *, source: str, kind: str | None = None) -> tuple[Manifest, str]:
    """Validate manifest bytes; return it with its sha256 (the batch's identity)."""
    kind = kind or Path(source).suffix.lower().lstrip(".").replace("yml", "yaml")
    if kind not in ("yaml", "json", "csv"):
        raise ManifestError(source, ["unknown format: name the file .yaml, .json or .csv"])
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(source, [manifest_too_big(len(data))])
    try:
        document = _parse(data, kind, source)
    except (ValueError, yaml.YAMLError, csv.Error) as error:
        raise ManifestError(source, [f"cannot be read as {kind}: {error}"]) from None
    except RecursionError:
        raise ManifestError(source, ["is nested too deeply to be a manifest"]) from None
    try:
        manifest = Manifest.model_validate(document)
    except ValidationError as error:
        problems = [
            f"{_place(document, tuple(e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        ]
        raise ManifestError(source, problems) from None
    seen: dict[str, int] = {}
    duplicates = []
    for row, job in enumerate(manifest.jobs, start=1):
        key = job.name.casefold()  # outputs a.mp4 and A.mp4 collide on case-blind disks
        if key in seen:
            duplicates.append(
                f"job {job.name!r} (row {row}): name already used by row "
                f"{seen[key]} (names are compared ignoring case); job names must be unique"
            )
        seen.setdefault(key, row)
    if duplicates:
        raise ManifestError(source, duplicates)
    return manifest, hashlib.sha256(data).hexdigest()


def read_manifest_source(source: str, settings: Settings) -> tuple[bytes, str]:
    """Manifest bytes from a path, file:// or s3:// URI; and the base for relative inputs.
    The manifest itself must come from where inputs may (EMO_INPUT_ROOTS, EMO_INPUT_BUCKETS)."""
    parsed = urlparse(source)
    local = Path(unquote(parsed.path) if parsed.scheme == "file" else source)
    resolved = None if parsed.scheme == "s3" else str(local.absolute())  # a relative path too
    problem = input_problem(source, settings=settings, inbox=False, resolved=resolved)
    if problem is not None:
        raise ManifestError(source, [f"the manifest {problem}"])
    if parsed.scheme == "s3":
        from emo.store import open_store

        store = open_store(f"s3://{parsed.netloc}", settings)
        key = parsed.path.lstrip("/")
        try:
            size = store.stat(key).size
        except ObjectNotFound:
            raise ManifestError(source, ["object does not exist"]) from None
        if size > MAX_MANIFEST_BYTES:  # refused before it is downloaded
            raise ManifestError(source, [manifest_too_big(size)])
        data = store.get_bytes(key, limit=MAX_MANIFEST_BYTES + 1)  # it may grow after stat
        if len(data) > MAX_MANIFEST_BYTES:  # it grew after stat: still never read whole
            raise ManifestError(source, [manifest_too_big(store.stat(key).size)])
        return data, source.rsplit("/", 1)[0]
    path = local
    if not path.is_file():
        raise ManifestError(source, ["file does not exist"])
    if path.stat().st_size > MAX_MANIFEST_BYTES:  # refused before it is read into memory
        raise ManifestError(source, [manifest_too_big(path.stat().st_size)])
    return path.read_bytes(), str(path.parent.absolute())
