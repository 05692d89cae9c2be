"""Orchestration overhead per segment: time outside the model, embedded and PostgreSQL + S3.

Renders one job of 7 segments (tiny model, 40 steps) through the real render_track flow, once
with the embedded defaults (SQLite, local directory store) and once with PostgreSQL and a
SeaweedFS S3 server, on a Prefect test server. For every segment: wall time between segment
completions, time inside the model, and the rest (motion-state download, H.264 encoding,
checkpoint upload and verification, database rows, Prefect task bookkeeping).

    .venv/bin/python bench/orchestration.py [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ASSETS = Path(__file__).resolve().parent.parent / "emo" / "assets"


class Timeline:
    """Progress listener: when each segment finished."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def step(self, clip: int, step: int, steps: int, total_clips: int) -> None:
        pass

    def segment(self, index: int, total: int, clips: range, total_clips: int) -> None:
        self.marks.append(time.perf_counter())

    def waiting(self, message: str) -> None:
        print(message)


def run(label: str, env: dict[str, str], folder: Path, steps: int) -> None:
    import flows.segments as render_module
    from emo import progress
    from emo.render import load_pipeline
    from emo.settings import get_settings
    from flows.context import _services
    from flows.render_track import render_track
    from flows.submit_batch import submit_batch

    os.environ.update(env)
    get_settings.cache_clear()
    _services.cache_clear()
    load_pipeline.cache_clear()
    audio = folder / "vocal.wav"
    t = np.arange(int(7.0 * 16000)) / 16000
    soundfile.write(
        audio, (0.3 * np.sin(2 * np.pi * 160 * t) * np.abs(np.sin(5 * t))).astype(np.float32), 16000
    )
    manifest = folder / "bench.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "name": label.replace(" + ", "-"),
                "jobs": [
                    {
                        "name": "bench",
                        "image": str(ASSETS / "demo_portrait.png"),
                        "audio": str(audio),
                        "face_box": [0.2, 0.15, 0.8, 0.85],
                        "steps": steps,
                        "segment_seconds": 1.0,
                    }
                ],
            }
        )
    )
    job_id = submit_batch(manifest=str(manifest), render=False)["jobs"]["bench"]

    model_seconds: list[float] = []
    original = render_module.render_segment

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            model_seconds.append(time.perf_counter() - start)

    render_module.render_segment = timed
    timeline = Timeline()
    progress.listen(timeline)
    start = time.perf_counter()
    try:
        load_pipeline.cache_clear()
        render_track(job_id=job_id)
    finally:
        progress.listen(None)
        render_module.render_segment = original
    # The first segment also loads inputs and weights; compare the ones after it.
    walls = np.diff([start, *timeline.marks])[1:]
    models = np.array(model_seconds[1:])
    outside = walls - models
    print(
        f"{label:>14}: {len(timeline.marks)} segments; per segment (after the first): wall "
        f"{walls.mean():.2f} s, model {models.mean():.2f} s, outside the model "
        f"{outside.mean():.3f} s = {outside.mean() / models.mean():.1%} of model time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    from tests.services import WeedServer, pg_create_database, pg_drop_database

    with (
        tempfile.TemporaryDirectory(prefix="emo-bench-") as scratch,
        prefect_test_harness(server_startup_timeout=120),
    ):
        root = Path(scratch)
        from emo.bundle import save_bundle
        from emo.models.components import build_components
        from emo.models.config import TINY

        # The tiny model, whatever demo model the package ships: this measures orchestration.
        save_bundle(build_components(TINY, seed=0), TINY, root / "tiny")
        os.environ["EMO_WEIGHTS"] = str(root / "tiny")
        (root / "embedded").mkdir()
        run(
            "embedded", {"EMO_HOME": str(root / "embedded" / "home")}, root / "embedded", args.steps
        )
        server = WeedServer(root / "weed")
        server.start()
        url = pg_create_database()
        try:
            from db import migrate

            migrate.upgrade(url)
            store = server.s3_store(bucket="bench")
            store.ensure_bucket()
            (root / "services").mkdir()
            run(
                "postgres + s3",
                {
                    "EMO_HOME": str(root / "services" / "home"),
                    "EMO_DATABASE_URL": url,
                    "EMO_STORE_URL": "s3://bench/studio",
                    "EMO_S3_ENDPOINT": server.endpoint,
                    "EMO_S3_ACCESS_KEY": server.access_key,
                    "EMO_S3_SECRET_KEY": server.secret_key,
                    "EMO_S3_SECURE": "false",
                },
                root / "services",
                args.steps,
            )
        finally:
            server.stop()
            pg_drop_database(url)


if __name__ == "__main__":
    main()
