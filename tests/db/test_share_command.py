"""`emo share`: how batches share the GPUs, and changing a live batch's share (in process,
through the console script's entry point, on a real PostgreSQL job database)."""

from __future__ import annotations

from db.batches import BatchShare, JobSpec, register_batch
from db.engine import make_engine, session_factory
from db.models import Batch, Event
from tests.conftest import emo_in_process


def _register(url: str, name: str, jobs: int, share: BatchShare | None = None) -> str:
    specs = [JobSpec(name=f"{name}{i}", image_uri="i.png", audio_uri="a.wav") for i in range(jobs)]
    with session_factory(make_engine(url))() as session:
        batch, _ = register_batch(
            session=session,
            name=name,
            manifest_sha256=name.encode().hex().ljust(64, "0"),
            jobs=specs,
            actor="t",
            share=share,
        )
        return batch.id


def test_share_lists_batches_and_rushes_one(pg_url: str) -> None:
    env = {"EMO_DATABASE_URL": pg_url}
    _register(pg_url, "feature", 12, BatchShare(tenant="acme"))
    promo = _register(pg_url, "promo", 3, BatchShare(weight=2.0, max_concurrent=1))

    listed = emo_in_process("share", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if "feature" in line or "promo" in line]
    assert "acme" in lines[0] and "12" in lines[0]  # 12 held, none dispatched yet
    cells = [cell.strip() for cell in lines[1].split("│")]
    assert cells[4:7] == ["0", "2", "1"]  # priority, weight, max

    rushed = emo_in_process("share", "promo", "--priority", "10", "--max-concurrent", "0", env=env)
    assert rushed.returncode == 0, rushed.stderr
    assert rushed.stdout.index("promo") < rushed.stdout.index("feature")  # served first now
    with session_factory(make_engine(pg_url))() as session:
        batch = session.get(Batch, promo)
        assert (batch.priority, batch.weight, batch.max_concurrent) == (10, 2.0, None)
        (event,) = session.query(Event).filter(Event.kind == "batch.share").all()
        assert event.detail["after"] == {"priority": 10, "max_concurrent": None}


def test_share_names_what_is_wrong(pg_url: str) -> None:
    env = {"EMO_DATABASE_URL": pg_url}
    _register(pg_url, "feature", 1)
    unknown = emo_in_process("share", "nosuch", "--weight", "2", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines() == [
        "error: no batch matches 'nosuch' (give its id, a prefix or its name)"
    ]
    nameless = emo_in_process("share", "--weight", "2", env=env)
    assert nameless.returncode == 2 and "name the BATCH" in nameless.stderr
    assert "Traceback" not in unknown.stderr + nameless.stderr
    bad = emo_in_process("share", "feature", "--weight", "0", env=env)
    assert bad.returncode == 2 and "--weight" in bad.stderr
