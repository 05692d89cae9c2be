"""One table of bad inputs, each given to the ``emo`` command as a studio engineer would.

Every row makes a real file, manifest, setting or command line, runs ``emo`` in-process (the
console script's own entry point, ``emo.cli.run``) against this test's real PostgreSQL, S3
server and Prefect server, and asserts what the user relies on: exit code 2 (3 for a service
that cannot be reached), exactly one line on stderr naming their input and what to do, no
traceback, and nothing registered in the database, stored, or left behind.

``pytest -rP`` shows each row's line.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from PIL import Image
from sqlalchemy import create_engine, text

from tests.conftest import write_wav
from tests.flows.conftest import ASSETS, Studio, clear_caches, speech

BOX = [0.2, 0.15, 0.8, 0.85]
GOOD = {"name": "anna", "image": "anna.png", "audio": "song.wav", "face_box": BOX}


@dataclass(frozen=True)
class Row:
    """``make`` writes the row's files into the folder and returns the arguments to ``emo``."""

    make: Callable[[Path], list[str]]
    says: tuple[str, ...]  # fragments the one line must hold: the input, and what to do
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


# -- what the rows are made of ----------------------------------------------------------------


def batch(*jobs: dict, name: str = "spring", suffix: str = "yaml") -> Callable[[Path], list[str]]:
    """A manifest of ``jobs`` (each over the good job) beside the portrait and the track."""

    def make(folder: Path) -> list[str]:
        path = folder / f"batch.{suffix}"
        rows = [{**GOOD, **job} for job in jobs]
        document = {"name": name, "jobs": rows}
        path.write_text(json.dumps(document) if suffix == "json" else yaml.safe_dump(document))
        return ["submit", str(path)]

    return make


def job(**fields: object) -> Callable[[Path], list[str]]:
    return batch(fields)


def raw(content: bytes | str, suffix: str = "yaml") -> Callable[[Path], list[str]]:
    """A manifest file with exactly this content."""

    def make(folder: Path) -> list[str]:
        path = folder / f"batch.{suffix}"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return ["submit", str(path)]

    return make


def with_file(kind: str, name: str, write: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """The good job with its image or audio replaced by ``name``, made by ``write``."""

    def make(folder: Path) -> list[str]:
        write(folder / name)
        return batch({kind: name})(folder)

    return make


def command(*args: str) -> Callable[[Path], list[str]]:
    """An ``emo`` command line; ``{dir}`` is the row's folder."""

    def make(folder: Path) -> list[str]:
        return [a.format(dir=folder) for a in args]

    return make


def write_text(content: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(content)


def write_bytes(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def png_cut_in_half(path: Path) -> None:
    data = (ASSETS / "demo_portrait.png").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def image_of(size: tuple[int, int], mode: str = "RGB") -> Callable[[Path], None]:
    return lambda path: Image.new(mode, size).save(path)


def animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (128, 128), (40 * i, 80, 120)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def wav(seconds: float) -> Callable[[Path], None]:
    return lambda path: write_wav(path, speech(seconds)) and None


def wav_with_nan(path: Path) -> None:
    audio = speech(3.0)
    audio[8000:8100] = np.nan
    soundfile.write(path, audio, 16000, subtype="FLOAT")


def wav_whose_header_lies(path: Path) -> None:
    """3 s of samples under a header that says 30 s (the RIFF and data sizes rewritten)."""
    write_wav(path, speech(3.0))
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    claimed = 30 * 16000 * 2
    data[at + 4 : at + 8] = struct.pack("<I", claimed)
    data[4:8] = struct.pack("<I", claimed + at)
    path.write_bytes(bytes(data))


def flac_cut_in_half(path: Path) -> None:
    soundfile.write(path.with_suffix(".tmp.flac"), speech(3.0), 16000, format="FLAC")
    data = path.with_suffix(".tmp.flac").read_bytes()
    path.with_suffix(".tmp.flac").unlink()
    path.write_bytes(data[: len(data) // 2])


def silent_video(path: Path) -> None:
    from emo.media import ffmpeg_exe

    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25",
         "-t", "1", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip


HLS = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nsong.wav\n#EXT-X-ENDLIST\n"
CONCAT = "ffconcat version 1.0\nfile 'song.wav'\n"


def deep_json(folder: Path) -> list[str]:
    path = folder / "batch.json"
    path.write_text('{"name": "deep", "jobs": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return ["submit", str(path)]


def fifty_megabytes(folder: Path) -> list[str]:
    path = folder / "batch.yaml"
    with path.open("w") as out:
        out.write(yaml.safe_dump({"name": "huge", "jobs": [GOOD]}))
        out.write(("# " + "x" * 1022 + "\n") * 50 * 1024)
    return ["submit", str(path)]


CSV = 'name,image,audio,steps\nanna,anna.png,song.wav,=HYPERLINK("http://x")\n'

# -- the table ---------------------------------------------------------------------------------

ROWS: dict[str, Row] = {
    # manifests
    "speed NaN": Row(job(speed=float("nan")), ("batch.yaml", "'anna'", "speed is a level")),
    "speed -5": Row(job(speed=-5), ("batch.yaml", "speed is a level from 0 to 1")),
    "speed []": Row(job(speed=[]), ("batch.yaml", "speed is a level from 0 to 1")),
    "seed true": Row(job(seed=True), ("batch.yaml", "seed", "a number is needed")),
    "steps 'ten'": Row(job(steps="ten"), ("batch.yaml", "steps", "integer")),
    "steps over the limit": Row(job(steps=1000), ("'anna'", "steps", "EMO_MAX_STEPS")),
    "segment under a clip": Row(job(segment_seconds=0.0001), ("'anna'", "segment")),
    "unknown field": Row(job(stpes=10), ("batch.yaml", "stpes", "not permitted")),
    "no audio field": Row(batch({"audio": None}), ("batch.yaml", "audio")),
    "no jobs": Row(raw("name: spring\njobs: []\n"), ("batch.yaml", "jobs")),
    "not YAML": Row(raw("name: [spring\njobs:\n"), ("batch.yaml", "cannot be read as yaml")),
    "not a mapping": Row(raw("- anna\n"), ("batch.yaml", "mapping with name and jobs")),
    "unknown format": Row(raw("name: x", "txt"), ("batch.txt", ".yaml, .json or .csv")),
    "no such manifest": Row(command("submit", "{dir}/nowhere.yaml"), ("nowhere.yaml", "not exist")),
    "nested 100,000 deep": Row(deep_json, ("batch.json", "nested too deeply")),
    "50 MB": Row(fifty_megabytes, ("batch.yaml", "limit is 10 MB", "split")),
    "duplicate names": Row(batch({}, {}), ("batch.yaml", "'anna'", "must be unique")),
    "names differ by case": Row(batch({}, {"name": "ANNA"}), ("'ANNA'", "ignoring case")),
    "CSV formula": Row(raw(CSV, "csv"), ("batch.csv", "formula", "export the sheet")),
    "name with a slash": Row(job(name="a/../b"), ("batch.yaml", "name", "letters, digits")),
    "name of 201 bytes": Row(job(name="é" * 101), ("batch.yaml", "at most 200 bytes")),
    "name with a control": Row(job(name="anna\u202egpj.exe"), ("batch.yaml", "letters, digits")),
    "name ending in a newline": Row(job(name="anna\n"), ("batch.yaml", "letters, digits")),
    "batch name empty": Row(batch({}, name=""), ("batch.yaml", "name")),
    "face_box booleans": Row(job(face_box=[True, 0, 1, 1]), ("batch.yaml", "face_box")),
    # images
    "image is text": Row(
        with_file("image", "a.png", write_text("hello")), ("a.png", "not an image")
    ),
    "image truncated": Row(with_file("image", "a.png", png_cut_in_half), ("a.png", "truncated")),
    "image empty": Row(with_file("image", "a.png", write_bytes(b"")), ("a.png", "empty")),
    "image 1x1": Row(with_file("image", "a.png", image_of((1, 1))), ("a.png", "at least 64")),
    "pixel bomb": Row(
        with_file("image", "a.png", image_of((10_000, 10_000), "1")),
        ("a.png", "EMO_MAX_IMAGE_PIXELS", "scale it down"),
    ),
    "animated GIF": Row(with_file("image", "a.gif", animated_gif), ("a.gif", "animated", "still")),
    "image missing": Row(job(image="gone.png"), ("gone.png", "does not exist")),
    "image is audio": Row(job(image="song.wav"), ("song.wav", "not an image")),
    # audio
    "audio is text": Row(with_file("audio", "a.wav", write_text("la la")), ("a.wav", "give a wav")),
    "audio empty": Row(with_file("audio", "a.wav", write_bytes(b"")), ("a.wav", "empty")),
    "audio truncated": Row(with_file("audio", "a.flac", flac_cut_in_half), ("a.flac", "trunc")),
    "header lies": Row(
        with_file("audio", "a.wav", wav_whose_header_lies),
        ("a.wav", "truncated or corrupt", "export it again"),
    ),
    "audio 0.1 s": Row(with_file("audio", "a.wav", wav(0.1)), ("a.wav", "longer track")),
    "audio NaN": Row(with_file("audio", "a.wav", wav_with_nan), ("a.wav", "not numbers")),
    "audio over the limit": Row(
        with_file("audio", "a.wav", wav(3.0)),
        ("a.wav", "EMO_MAX_TRACK_SECONDS", "split it"),
        env={"EMO_MAX_TRACK_SECONDS": "2"},
    ),
    "HLS as .wav": Row(with_file("audio", "a.wav", write_text(HLS)), ("a.wav", "give a wav")),
    "concat as .wav": Row(with_file("audio", "a.wav", write_text(CONCAT)), ("a.wav", "playlist")),
    "video without sound": Row(with_file("audio", "a.mp4", silent_video), ("a.mp4", "no audio")),
    "audio missing": Row(job(audio="gone.wav"), ("gone.wav", "does not exist")),
    "audio is an image": Row(job(audio="anna.png"), ("anna.png", "not in a format emo reads")),
    # settings
    "EMO_MAX_STEPS": Row(batch({}), ("EMO_MAX_STEPS",), env={"EMO_MAX_STEPS": "-1"}),
    "EMO_DISPATCH": Row(batch({}), ("EMO_DISPATCH",), env={"EMO_DISPATCH": "banana"}),
    "EMO_SEGMENT_SECONDS": Row(
        batch({}), ("EMO_SEGMENT_SECONDS",), env={"EMO_SEGMENT_SECONDS": "x"}
    ),
    "EMO_S3_ENDPOINT": Row(batch({}), ("EMO_S3_ENDPOINT",), env={"EMO_S3_ENDPOINT": "a b:9"}),
    "EMO_GPU_CLASS": Row(batch({}), ("EMO_GPU_CLASS",), env={"EMO_GPU_CLASS": "abacus"}),
    "EMO_WEIGHTS": Row(batch({}), ("EMO_WEIGHTS", "nowhere"), env={"EMO_WEIGHTS": "/nowhere"}),
    "EMO_FFMPEG": Row(
        batch({}), ("EMO_FFMPEG", "/opt/nowhere/ffmpeg"), env={"EMO_FFMPEG": "/opt/nowhere/ffmpeg"}
    ),
    "database down": Row(
        batch({}),
        ("127.0.0.1:1", "EMO_DATABASE_URL", "emo:***@"),  # the password hidden
        env={"EMO_DATABASE_URL": "postgresql+psycopg://emo:pw-canary-3@127.0.0.1:1/emo"},
        code=3,
    ),
    # command lines
    "render --steps 0": Row(
        command("render", "{dir}/anna.png", "{dir}/song.wav", "-o", "{dir}/o.mp4", "--steps", "0"),
        ("--steps",),
    ),
    "render without -o": Row(command("render", "{dir}/anna.png", "{dir}/song.wav"), ("--output",)),
    "render a missing track": Row(
        command("render", "{dir}/anna.png", "{dir}/gone.wav", "-o", "{dir}/o.mp4"),
        ("gone.wav", "does not exist"),
    ),
    "submit --allow-cost -1": Row(
        command("submit", "{dir}/x.yaml", "--allow-cost", "-1"), ("--allow-cost",)
    ),
    "resume an unknown job": Row(command("resume", "feedface"), ("feedface", "its id")),
    "an unknown option": Row(command("status", "--colour"), ("--colour", "emo status --help")),
}


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture
def entry_point(console_state: None) -> Callable[[list[str]], int]:
    """``emo.cli.run``; ``console_state`` puts back what it sets for the process."""
    from emo.cli import run

    return run


def _registered(studio: Studio) -> dict[str, int]:
    engine = create_engine(studio.env["EMO_DATABASE_URL"])
    with engine.connect() as connection:
        counts = {
            table: connection.execute(text(f"select count(*) from {table}")).scalar_one()
            for table in ("batches", "jobs", "segments")
        }
    engine.dispose()
    return counts


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_a_bad_input_is_one_line_naming_it_and_nothing_is_kept(
    row: Row,
    studio: Studio,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    entry_point: Callable[[list[str]], int],
) -> None:
    folder = tmp_path / "studio folder"
    folder.mkdir()
    shutil.copy(studio.portrait, folder / "anna.png")
    write_wav(folder / "song.wav", speech(3.0))
    args = row.make(folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    for name, value in row.env.items():
        monkeypatch.setenv(name, value)
    clear_caches()

    code = entry_point(args)

    out, err = capfd.readouterr()
    print(err.strip())  # the table of what each row printed: pytest -rP
    assert code == row.code, err
    assert "Traceback" not in err + out
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for fragment in row.says:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    for part in (str(studio.home), "/scratch/"):
        assert part not in err, "names emo's own copy, not the user's file"
    assert "pw-canary" not in err, "prints a password"
    for name in row.env:
        monkeypatch.delenv(name)
    clear_caches()
    assert _registered(studio) == {"batches": 0, "jobs": 0, "segments": 0}
    assert list(studio.store.list()) == []
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    left = [p for p in studio.home.rglob("*") if p.is_file() and "prefect" not in p.parts]
    assert left == [], "emo wrote files for a refused input"


def test_a_manifest_in_the_store_is_sized_before_it_is_downloaded(
    studio: Studio,
    capfd: pytest.CaptureFixture[str],
    entry_point: Callable[[list[str]], int],
) -> None:
    big = yaml.safe_dump({"name": "huge", "jobs": [GOOD]}).encode() + b"#" * 11 * 2**20
    studio.store.put_bytes("manifests/huge.yaml", big)
    for key, says in (("huge.yaml", "is 11.0 MB; the limit is 10 MB"), ("gone.yaml", "not exist")):
        code = entry_point(["submit", f"{studio.store.url}/manifests/{key}"])
        err = capfd.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"manifests/{key}: " in err and says in err
    assert _registered(studio) == {"batches": 0, "jobs": 0, "segments": 0}
