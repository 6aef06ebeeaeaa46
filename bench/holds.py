"""Holds per second: a job admitted (its price held, the job inserted, a `hold` ledger row) and then ended (captured,
its `capture` row), as the relay does it; prints figures, asserts nothing.

    .venv/bin/python bench/holds.py                                                      # SQLite (a temp file)
    .venv/bin/python bench/holds.py --pg postgresql+asyncpg://postgres@127.0.0.1:5432/test   # and PostgreSQL

Many concurrent "requests" each admit one job through the relay's own group commit (`core.batch.Batcher` over
`JobStore.open_many`) and end it through another (`finish_many`), so concurrent holds and captures share
transactions as they do under load in one relay process. `--keys` spreads the jobs over several keys and `--lanes`
runs several group-commit lanes (one Batcher pair each, as several relay processes on one database would).
The ledger is checked at the end (`ledger check`). For PostgreSQL, a scratch database is made next to the one named
and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.core.batch import Batcher
from relay.store import ledger
from relay.store.db import Database
from relay.store.jobs import Admission, Ending, JobRow, JobStore, NewJob
from relay.store.keys import KeyStore

PRICE = 2


async def run(url: str, jobs: int, concurrency: int, keys: int, lanes: int) -> tuple[float, float]:
    """Returns (seconds, holds per second)."""
    db = Database(url, pool_size=max(lanes * 2, 4))
    await db.migrate()
    key_ids = [(await KeyStore(db.engine).create(f"bench{k}", jobs * PRICE, time.time()))[0].id for k in range(keys)]
    store = JobStore(db.engine, owner="bench")
    admit = [Batcher[Admission, bool](lambda b: store.open_many(b, time.time()), "admit") for _ in range(lanes)]
    finish = [
        Batcher[Ending, JobRow | None](lambda b: store.finish_many(b, time.time()), "finish") for _ in range(lanes)
    ]
    counter = iter(range(jobs))
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        lane = w % lanes
        for i in counter:
            job_id = f"job{i:012d}"
            job = NewJob(job_id, job_id, "mj-fast", "fast", "MID_JOURNEY", "imagine", "p", PRICE, time.time() + 600)
            assert await admit[lane](Admission(key_ids[i % keys], (job,)))
            assert await finish[lane](Ending(job_id, True)) is not None
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    seconds = time.perf_counter() - started
    for lane in range(lanes):
        await admit[lane].close()
        await finish[lane].close()
    report = await ledger.check(db.engine)
    await db.dispose()
    print(f"  {report.summary()}")
    return seconds, done / seconds


async def _pg_admin(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--pg", default="", help="a PostgreSQL URL (postgresql+asyncpg://...) to run there too")
    parser.add_argument("--keys", type=int, default=1, help="keys the PostgreSQL run spreads the jobs over")
    parser.add_argument("--lanes", type=int, default=1, help="group-commit lanes of the PostgreSQL run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}"
        print(f"SQLite: {args.jobs} jobs, {args.concurrency} concurrent, one key, one writer")
        seconds, rate = asyncio.run(run(url, args.jobs, args.concurrency, keys=1, lanes=1))
        print(f"  {seconds:.2f} s: {rate:,.0f} holds/s (hold + capture)")
    if args.pg:
        name = "mjr_bench_" + secrets.token_hex(4)
        asyncio.run(_pg_admin(args.pg, f'CREATE DATABASE "{name}"'))
        try:
            url = args.pg.rsplit("/", 1)[0] + "/" + name
            print(f"PostgreSQL: {args.jobs} jobs, {args.concurrency} concurrent, {args.keys} keys, {args.lanes} lanes")
            seconds, rate = asyncio.run(run(url, args.jobs, args.concurrency, keys=args.keys, lanes=args.lanes))
            print(f"  {seconds:.2f} s: {rate:,.0f} holds/s (hold + capture)")
        finally:
            asyncio.run(_pg_admin(args.pg, f'DROP DATABASE "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
