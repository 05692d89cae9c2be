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
