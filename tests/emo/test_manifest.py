"""Manifest validation: every problem reported at once, with its place."""

from __future__ import annotations

import json

import pytest

from emo.manifest import ManifestError, parse_manifest

YAML = b"""
name: spring-campaign
defaults: {steps: 30, guidance: 3.5, speed: 0.02}
jobs:
  - {name: anna-song, image: anna.png, audio: song.wav, seed: 7}
  - {name: ben.talk, image: s3://studio/ben.png, audio: file:///vocals/ben.flac,
     speed: [[0, 0.01], [30, 0.05]], steps: 20, format: mov}
"""


def test_yaml_json_and_csv_parse_with_defaults() -> None:
    manifest, sha = parse_manifest(YAML, source="batch.yaml")
    assert manifest.name == "spring-campaign" and len(sha) == 64
    anna, ben = manifest.jobs
    assert manifest.job_options(anna) == {"steps": 30, "guidance": 3.5, "speed": 0.02, "seed": 7}
    assert manifest.job_options(ben)["steps"] == 20
    assert manifest.job_options(ben)["speed"] == [(0.0, 0.01), (30.0, 0.05)]
    as_json = json.dumps(
        {"name": "b", "jobs": [{"name": "x", "image": "i.png", "audio": "a.wav"}]}
    ).encode()
    assert parse_manifest(as_json, source="b.json")[0].jobs[0].name == "x"
    csv = b'name,image,audio,seed,face_box\nx,i.png,a.wav,3,"0.1,0.1,0.6,0.7"\ny,j.png,b.wav,,\n'
    manifest, _ = parse_manifest(csv, source="/in/studio-b.csv")
    assert manifest.name == "studio-b" and manifest.jobs[0].seed == 3
    assert manifest.jobs[0].face_box == (0.1, 0.1, 0.6, 0.7) and manifest.jobs[1].seed is None


def test_every_bad_job_is_reported_with_its_place() -> None:
    bad = b"""
name: broken
jobs:
  - {name: ok, image: a.png, audio: a.wav}
  - {name: ../escape, image: a.png, audio: a.wav}
  - {name: no-audio, image: a.png}
  - {name: bad-steps, image: a.png, audio: a.wav, steps: 0, format: avi}
  - {image: a.png, audio: a.wav}
"""
    with pytest.raises(ManifestError) as caught:
        parse_manifest(bad, source="broken.yaml")
    problems = caught.value.problems
    text = str(caught.value)
    assert len(problems) == 5, text
    assert "job '../escape' (row 2), name" in text
    assert "job 'no-audio' (row 3), audio: Field required" in text
    assert "job 'bad-steps' (row 4), steps" in text and "job 'bad-steps' (row 4), format" in text
    assert "job row 5, name: Field required" in text


ROW = b"name: x\njobs: [{name: a, image: i, audio: a, "


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"name: x\njobs:\n - {name: a, image: i, audio: a}\n - {name: a, image: j, audio: b}\n",
            "name already used by row 1",
        ),
        (b"name: x\njobs: []\n", "jobs"),
        (b"just a string", "top level must be a mapping"),
        (
            b"name: x\njobs: [{name: a, image: i, audio: a, face_box: [0.5, 0, 0.2, 1]}]\n",
            "face_box",
        ),
        (b"name: x\njobs: [{name: a, image: i, audio: a, colour: red}]\n", "colour"),
        (b"{not yaml: [", "cannot be read as yaml"),
        (ROW + b"seed: true}]\n", "seed: a number is needed, not true/false"),
        (ROW + b"steps: false}]\n", "steps: a number is needed"),
        (ROW + b"guidance: true}]\n", "guidance: a number is needed"),
        (ROW + b"face_box: [true, 0, 1, 1]}]\n", "face_box is four numbers, not true/false"),
        (ROW + b"speed: .nan}]\n", "speed: speed is a level from 0 to 1"),
        (ROW + b"speed: -5}]\n", "speed: speed is a level from 0 to 1"),
        (ROW + b"speed: 7}]\n", "speed: speed is a level from 0 to 1"),
        (ROW + b"speed: []}]\n", "speed: speed is a level from 0 to 1"),
        (ROW + b"speed: [[0, 0.1], [0, 0.2]]}]\n", "with the seconds increasing"),
        (ROW + b"speed: [[-1, 0.1]]}]\n", "seconds from 0"),
        (ROW + b"speed: [[0, 2]]}]\n", "seconds from 0"),
        (ROW + b"guidance: .inf}]\n", "guidance: Input should be a finite number"),
        (ROW + b"segment_seconds: .nan}]\n", "segment_seconds: Input should be a finite number"),
        (ROW + b"face_box: [.nan, 0, 1, 1]}]\n", "face_box.0: Input should be a finite number"),
        (
            b"name: x\njobs:\n - {name: Anna, image: i, audio: a}\n"
            b" - {name: anna, image: j, audio: b}\n",
            r"job 'anna' \(row 2\): name already used by row 1 \(names are compared ignoring",
        ),
        (b"name: x\njobs: " + b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
        (b"name: x\njobs: []\n#" + b"x" * (10 * 2**20), "is 10.0 MB; the limit is 10 MB"),
    ],
)
def test_bad_manifests(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        parse_manifest(data, source="m.yaml")
    assert len(caught.value.problems) == 1, caught.value.problems  # one message per problem


def test_a_deep_json_manifest_and_a_csv_formula_are_refused() -> None:
    with pytest.raises(ManifestError, match="nested too deeply"):
        parse_manifest(b"[" * 100_000 + b"]" * 100_000, source="m.json")
    csv = b'name,image,audio\na,=HYPERLINK("http://x"),v.wav\nb,p.png,v.wav\n'
    with pytest.raises(ManifestError, match="job row 1, image: .* is a spreadsheet formula"):
        parse_manifest(csv, source="m.csv")
    for cell in (b"@SUM(A1)", b"+cmd|x", b"-cmd|x"):
        with pytest.raises(ManifestError, match="spreadsheet formula"):
            parse_manifest(b"name,image,audio\na,p.png," + cell + b"\n", source="m.csv")
    fine = b"name,image,audio,priority\na,p.png,v.wav,-5\n"  # a negative number is a number
    assert parse_manifest(fine, source="m.csv")[0].jobs[0].priority == -5


def test_speed_levels_and_points_from_yaml_and_csv_are_kept() -> None:
    manifest, _ = parse_manifest(ROW + b"speed: [[0, 0.01], [30, 0.05]]}]\n", source="m.yaml")
    assert manifest.jobs[0].speed == [(0.0, 0.01), (30.0, 0.05)]
    csv = b'name,image,audio,speed,seed\na,p.png,v.wav,0.03,7\nb,p.png,v.wav,"[[0, 0.1]]",8\n'
    manifest, _ = parse_manifest(csv, source="m.csv")
    assert [job.speed for job in manifest.jobs] == [0.03, [(0.0, 0.1)]]
    assert [job.seed for job in manifest.jobs] == [7, 8]


def test_unknown_format() -> None:
    with pytest.raises(ManifestError, match=".yaml, .json or .csv"):
        parse_manifest(b"x", source="m.txt")


def test_the_manifest_itself_is_confined_wherever_it_is_named_from(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative manifest path is judged where it resolves (the working folder), like an
    absolute one; a file:// URL is decoded as input URLs are."""
    from emo.manifest import read_manifest_source
    from emo.settings import load_settings

    allowed, elsewhere = tmp_path / "inbox", tmp_path / "home"
    allowed.mkdir()
    elsewhere.mkdir()
    (elsewhere / "batch.yaml").write_text("name: x\njobs: []\n")
    (allowed / "my batch.yaml").write_text("name: y\njobs: []\n")
    monkeypatch.setenv("EMO_INPUT_ROOTS", str(allowed))
    monkeypatch.chdir(elsewhere)
    settings = load_settings()
    with pytest.raises(ManifestError, match="resolves to a place inputs may not come from"):
        read_manifest_source("batch.yaml", settings)
    with pytest.raises(ManifestError, match="EMO_INPUT_ROOTS"):
        read_manifest_source(str(elsewhere / "batch.yaml"), settings)
    data, base = read_manifest_source(f"file://{allowed}/my%20batch.yaml", settings)
    assert data == b"name: y\njobs: []\n" and base == str(allowed)
