"""The house rules a reader relies on, checked over the source tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A query written outside db/: SQLAlchemy's select(), or a session asked for rows directly.
QUERY = re.compile(r"(?<![.\w])select\(|\.query\(|session\.execute\(|\.scalars?\(")


def test_every_query_lives_in_db() -> None:
    """The CLI, the flows and the benchmarks reach the job database through db/'s keyword-only
    functions, so a change of schema is made and reviewed in one place."""
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("emo", "flows", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if QUERY.search(line)
    ]
    assert found == []


def test_render_track_is_its_recipe() -> None:
    """The render flow's file is the recipe a reader follows top to bottom: the flow and its
    wiring, each step a task of its own module (the UI shows the same steps)."""
    source = (ROOT / "flows" / "render_track.py").read_text()
    assert len(source.splitlines()) < 300
    assert source.count("@flow(") == 1 and "@task" not in source
