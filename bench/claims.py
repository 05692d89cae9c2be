"""Job claims per second on PostgreSQL with 16 concurrent workers, and double claims (must be 0).

Each worker process claims queued jobs (FOR UPDATE SKIP LOCKED + lease, one transaction per
claim) until none is left. Uses a throwaway database on the server named by EMO_TEST_PG_URL
(default postgres@127.0.0.1:5432) and drops it afterwards.

    .venv/bin/python bench/claims.py [--jobs 2000] [--workers 16]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db import migrate  # noqa: E402
from db.batches import JobSpec, register_batch  # noqa: E402
from db.engine import make_engine, session_factory  # noqa: E402
from tests.services import claim_until_empty, pg_create_database, pg_drop_database  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    url = pg_create_database()
    try:
        migrate.upgrade(url)
        engine = make_engine(url)
        with session_factory(engine)() as session:
            specs = [
                JobSpec(name=f"j{i}", image_uri="i.png", audio_uri="a.wav", priority=i % 3)
                for i in range(args.jobs)
            ]
            register_batch(
                session=session, name="bench", manifest_sha256="0" * 64, jobs=specs, actor="bench"
            )
        engine.dispose()
        context = multiprocessing.get_context("spawn")
        start, results = context.Barrier(args.workers + 1), context.Queue()
        processes = [
            context.Process(target=claim_until_empty, args=(url, f"w{n}", start, results))
            for n in range(args.workers)
        ]
        for process in processes:
            process.start()
        start.wait()
        began = time.perf_counter()
        outcomes = [results.get() for _ in processes]
        for process in processes:
            process.join()
        elapsed = max(done for done, _ in outcomes) - began
        claimed = [job for _, jobs in outcomes for job in jobs]
        doubles = sum(n - 1 for n in Counter(claimed).values() if n > 1)
        busiest = max(len(jobs) for _, jobs in outcomes)
        print(f"{args.workers} workers, {args.jobs} jobs on PostgreSQL")
        print(
            f"claimed {len(claimed)} in {elapsed:.2f} s = {len(claimed) / elapsed:.0f} claims/s"
            f" (includes each worker's final empty polls)"
        )
        print(
            f"double claims: {doubles}; unclaimed: {args.jobs - len(set(claimed))}; "
            f"busiest worker took {busiest / len(claimed):.1%} of the jobs"
        )
    finally:
        pg_drop_database(url)


if __name__ == "__main__":
    main()
