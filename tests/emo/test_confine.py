"""Where a manifest's inputs may come from (emo/confine.py), as a table."""

from __future__ import annotations

from pathlib import Path

import pytest

from emo.confine import input_problem
from emo.settings import load_settings


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    allowed, other = tmp_path / "shared", tmp_path / "private"
    allowed.mkdir()
    other.mkdir()
    (other / "key.wav").write_bytes(b"x")
    (allowed / "escape.wav").symlink_to(other / "key.wav")  # leads out of the allowed folder
    (allowed / "anna.png").write_bytes(b"x")
    return {"allowed": allowed, "other": other}


# (uri, EMO_INPUT_ROOTS, EMO_INPUT_BUCKETS, from the inbox, refused because ...)
ROWS = [
    ("anna.png", None, None, False, None),
    ("anna.png", "", "", True, None),  # beside the manifest: always
    ("sub/anna.png", "", "", True, None),
    ("../secret.wav", None, None, False, None),  # a user's own submit may climb out
    ("../secret.wav", None, None, True, "climbs out of the manifest's folder"),
    ("a/../../secret.wav", "{allowed}", "emo", True, "climbs out"),
    ("%2e%2e/%2e%2e/etc/hostname", None, None, True, "climbs out"),  # URL-encoded
    ("{allowed}/anna.png", None, None, False, None),  # a user's own machine: anywhere
    ("{other}/key.wav", None, None, False, None),
    ("{other}/key.wav", None, None, True, "outside the folders inputs may come from"),
    ("{other}/key.wav", "{allowed}", None, False, "(allowed: {allowed}; EMO_INPUT_ROOTS)"),
    ("{allowed}/anna.png", "{allowed}", None, True, None),
    ("file://{allowed}/anna.png", "{allowed}", None, True, None),
    ("file://{other}/key.wav", "{allowed}", None, False, "outside the folders"),
    ("{allowed}/escape.wav", "{allowed}", None, False, "outside the folders"),  # symlink
    ("{allowed}/../private/key.wav", "{allowed}", None, False, "outside the folders"),
    ("/etc/passwd", "", None, False, "(allowed: none; EMO_INPUT_ROOTS)"),
    ("s3://emo/studio/anna.png", None, None, False, None),
    ("s3://emo/studio/anna.png", None, None, True, "bucket 'emo', which inputs may not"),
    ("s3://emo/studio/anna.png", None, "emo", True, None),
    ("s3://emo/studio/anna.png", None, "other, emo", False, None),
    ("s3://billing/invoices.wav", None, "emo", False, "(allowed: emo; EMO_INPUT_BUCKETS)"),
    ("s3://billing/invoices.wav", None, "", False, "(allowed: none; EMO_INPUT_BUCKETS)"),
]


@pytest.mark.parametrize(("uri", "roots", "buckets", "inbox", "refused"), ROWS)
def test_where_inputs_may_come_from(
    folders: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    uri: str,
    roots: str | None,
    buckets: str | None,
    inbox: bool,
    refused: str | None,
) -> None:
    names = {k: str(v) for k, v in folders.items()}
    for name, value in (("EMO_INPUT_ROOTS", roots), ("EMO_INPUT_BUCKETS", buckets)):
        if value is not None:
            monkeypatch.setenv(name, value.format(**names))
    problem = input_problem(uri.format(**names), settings=load_settings(), inbox=inbox)
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and refused.format(**names) in problem, problem
        assert uri.format(**names) in problem  # names the input as the manifest wrote it


def test_a_relative_input_is_judged_where_it_resolves(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit given another base (a deployment parameter) cannot reach outside the roots."""
    monkeypatch.setenv("EMO_INPUT_ROOTS", str(folders["allowed"]))
    settings = load_settings()
    inside, outside = str(folders["allowed"] / "anna.png"), str(folders["other"] / "key.wav")
    assert input_problem("anna.png", settings=settings, inbox=False, resolved=inside) is None
    problem = input_problem("key.wav", settings=settings, inbox=False, resolved=outside)
    assert problem is not None and problem.startswith(
        "'key.wav' resolves to a place inputs may not come from: "
    )
    assert "EMO_INPUT_ROOTS" in problem
