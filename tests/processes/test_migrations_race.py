"""Two relay processes started at the same moment against one PostgreSQL database (fresh, or from an older
schema) both upgrade it and both come up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.helpers import database_at, free_port, pg_database_sync, stop_process
from tests.processes.helpers import SIGNING, wait_ready, write_config


def settings(tmp_path: Path, database: str, i: int) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path / f"data-{i}"),
        "images": {"signing_secret": SIGNING},
        "database": {"url": database, "pool_size": 2},
        "providers": [{"name": "sim", "dialect": "simulator"}],
    }


def start_two(tmp_path: Path, database: str) -> tuple[list[subprocess.Popen[bytes]], list[int], list[Path]]:
    files = [write_config(tmp_path / f"relay-{i}.yaml", settings(tmp_path, database, i)) for i in range(2)]
    ports = [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MJ_RELAY_")}
    logs = [tmp_path / f"relay-{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with logs[i].open("ab") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "relay", "serve", "--config", str(files[i]), "--port", str(ports[i])],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    return procs, ports, logs


def pg(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def version(url: str) -> list[str]:
    conn = await asyncpg.connect(pg(url))
    try:
        return [row[0] for row in await conn.fetch("SELECT version_num FROM alembic_version")]
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("round_", range(2))
def test_two_processes_starting_together_on_a_fresh_database_both_start(tmp_path: Path, round_: int) -> None:
    with pg_database_sync() as database:
        procs, ports, logs = start_two(tmp_path, database)
        try:
            for i in range(2):
                wait_ready(procs[i], f"http://127.0.0.1:{ports[i]}/readyz", logs[i])
            assert asyncio.run(version(database)) == ["0013"]
        finally:
            for proc in procs:
                stop_process(proc)


@pytest.mark.postgres
def test_two_processes_starting_together_on_an_older_database_both_start(tmp_path: Path) -> None:
    """The database is at 0007; both processes are let at it at the same moment (an operator's lock on
    alembic_version holds them until both wait), as after a rolling deploy of a new version."""
    with pg_database_sync() as database:
        asyncio.run(database_at(database, "0007"))

        async def scenario() -> None:
            holder = await asyncpg.connect(pg(database))
            watcher = await asyncpg.connect(pg(database))
            tx = holder.transaction()
            await tx.start()
            await holder.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
            procs, ports, logs = start_two(tmp_path, database)
            try:
                deadline = time.monotonic() + 30
                # Both processes are waiting (on the lock, or on each other) before either is let go.
                while (
                    await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                    < 2
                ):
                    assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
                    assert time.monotonic() < deadline, "the two processes never both waited"
                    await asyncio.sleep(0.02)
                await tx.rollback()
                for i in range(2):
                    await asyncio.to_thread(wait_ready, procs[i], f"http://127.0.0.1:{ports[i]}/readyz", logs[i])
                assert await version(database) == ["0013"]
            finally:
                for proc in procs:
                    stop_process(proc)
                await holder.close()
                await watcher.close()

        asyncio.run(scenario())
