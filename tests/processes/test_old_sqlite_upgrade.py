"""`mj-relay serve` on a SQLite database made by the first release (schema 0001), with a key and a job in it."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.helpers import database_at, free_port, stop_process
from tests.processes.helpers import SIGNING, wait_ready, write_config

FIRST_RELEASE_ROWS = (  # a key and a finished job, as the first release wrote them
    (
        "INSERT INTO keys (id, name, key_hash, prefix, balance, held, created_at) "
        "VALUES ('key_old', 'test', 'h', 'sk-mjr-x', 98, 0, 1)"
    ),
    (
        "INSERT INTO jobs (id, request_id, key_id, model, mode, bot, action, prompt, state, progress, "
        "price, hold_state, created_at, updated_at, deadline_at) VALUES ('job_old_aaaaaaaa', 'r', "
        "'key_old', 'mj-fast', 'fast', 'MID_JOURNEY', 'imagine', 'p', 'SUCCEEDED', 100, 2, 'captured', "
        "1, 2, 3)"
    ),
)


def test_serve_upgrades_a_first_release_sqlite_database_with_jobs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db_file = data / "relay.db"
    asyncio.run(database_at(f"sqlite+aiosqlite:///{db_file}", "0001", *FIRST_RELEASE_ROWS))
    config = write_config(
        tmp_path / "relay.yaml",
        {
            "data_dir": str(data),
            "database": {"url": f"sqlite+aiosqlite:///{db_file}"},
            "images": {"signing_secret": SIGNING},
            "providers": [{"name": "sim", "dialect": "simulator"}],
        },
    )
    port = free_port()
    log = tmp_path / "relay.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MJ_RELAY_")}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/readyz", log)
    finally:
        stop_process(proc)
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0013",)]
        assert conn.execute("SELECT id, key_id FROM jobs").fetchall() == [("job_old_aaaaaaaa", "key_old")]
        assert conn.execute("SELECT count(*) FROM keys WHERE hook_secret LIKE 'whsec_%'").fetchall() == [(1,)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
