"""A database that cannot be reached or does not answer (PostgreSQL down or restarting, its connections cut, a
statement past `database.statement_timeout_s`, SQLite's file locked by another process past the relay's retries):
requests are answered 503 with `Retry-After` in their surface's envelope, without internals, counted and logged as
such; nothing is held or started; once the database is back, requests go through again."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from relay.store.db import Unreachable, unavailable
from tests.helpers import (
    CuttableProxy,
    RunningRelay,
    pg_database_sync,
    relay_config,
    running_relay,
    sql,
    wait_for,
)

IMAGINE = {"model": "mj-fast", "prompt": "a lighthouse"}


def call(relay: RunningRelay, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {relay.key}"}
    return httpx.request(method, relay.base + path, headers=headers, json=body, timeout=60)


def assert_openai_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert "x-should-retry" not in response.headers  # a retry is what helps
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "service_unavailable"
    assert "database" in error["message"]
    for internal in ("SQL", "sqlite", "asyncpg", "Errno", "127.0.0.1", "SELECT", "UPDATE", "locked", "Traceback"):
        assert internal not in error["message"], error["message"]


def assert_native_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    body = response.json()
    assert set(body) == {"code", "description", "properties", "result"}
    assert body["code"] == 23 and body["result"] is None
    assert "database" in body["description"] and "SQL" not in body["description"]


def counted(relay: RunningRelay) -> float:
    text = httpx.get(relay.base + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("mj_relay_database_unavailable_total "):
            return float(line.split()[1])
    raise AssertionError("no mj_relay_database_unavailable_total in /metrics")


def test_a_sqlite_file_locked_by_another_process_answers_503_and_holds_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = relay_config(tmp_path)
    with running_relay(config) as relay:
        assert call(relay, "GET", "/mj/task/nope/fetch").status_code == 404  # the key is looked up and remembered
        holder = sqlite3.connect(config.database_url().split(":///", 1)[1], isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the CLI (or an operator's sqlite3) holds the write lock
        try:
            caplog.clear()
            assert_openai_unavailable(call(relay, "POST", "/v1/images/generations", IMAGINE))
            assert_native_unavailable(call(relay, "POST", "/mj/submit/imagine", {"prompt": "a lighthouse"}))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert counted(relay) == 2
        unavailable_lines = [r for r in caplog.records if r.getMessage() == "database unavailable"]
        assert len(unavailable_lines) == 2 and not any(r.exc_info for r in unavailable_lines)
        assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]
        # The hold was rolled back, certainly written nowhere: its jobs are not ended again (under the same lock).
        assert not [r for r in caplog.records if "failed admission" in r.getMessage()]
        assert relay.balance() == (1000, 0) and relay.jobs() == []  # nothing held, nothing started
        assert call(relay, "POST", "/mj/submit/imagine", {"prompt": "a lighthouse"}).json()["code"] == 1


@contextlib.contextmanager
def behind_proxy(url: str) -> Iterator[tuple[str, CuttableProxy]]:
    target = make_url(url)
    proxy = CuttableProxy(target.port or 5432)
    port = proxy.start()
    try:
        yield target.set(port=port).render_as_string(hide_password=False), proxy
    finally:
        proxy.close()


@pytest.mark.postgres
def test_postgresql_going_down_answers_503_on_both_surfaces_and_readyz_says_so(tmp_path: Path) -> None:
    with pg_database_sync() as url, behind_proxy(url) as (proxied, proxy):
        config = relay_config(tmp_path, database={"url": proxied})
        with running_relay(config) as relay:
            proxy.refuse()
            assert_openai_unavailable(call(relay, "POST", "/v1/images/generations", IMAGINE))
            assert_native_unavailable(call(relay, "POST", "/mj/submit/imagine", {"prompt": "a lighthouse"}))
            assert_native_unavailable(call(relay, "GET", "/mj/task/nope/fetch"))
            ready = httpx.get(relay.base + "/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["database"] is False
            assert counted(relay) == 3
            proxy.restore()
            wait_for(lambda: httpx.get(relay.base + "/readyz", timeout=30).status_code == 200, timeout=30)
            assert relay.balance() == (1000, 0) and relay.jobs() == []  # nothing held, nothing started
            done = call(relay, "POST", "/v1/images/generations", IMAGINE)
            assert done.status_code == 200, done.text
            assert sql(config, "SELECT count(*) FROM jobs")[0][0] == 1


class _Orig(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Unreachable("connect failed"), True),
        (OperationalError("UPDATE keys", {}, _Orig("database is locked")), True),
        (OperationalError("SELECT 1", {}, _Orig("unable to open database file")), True),
        (OperationalError("SELECT 1", {}, _Orig("terminating connection", "57P01")), True),
        (OperationalError("SELECT 1", {}, _Orig("connection failure", "08006")), True),
        (OperationalError("SELECT 1", {}, _Orig("too many connections", "53300")), True),
        (OperationalError("SELECT 1", {}, _Orig("closed"), connection_invalidated=True), True),
        (OperationalError("SELECT x FROM nope", {}, _Orig("no such table: nope")), False),  # a bug on SQLite
        (ProgrammingError("SELECT", {}, _Orig('relation "nope" does not exist', "42P01")), False),
        (IntegrityError("INSERT", {}, _Orig("duplicate key value", "23505")), False),
        (RuntimeError("a bug"), False),
        (OSError("an image store"), False),  # not the database's: raised outside it
    ],
)
def test_only_the_database_failing_counts_as_its_being_unavailable(error: BaseException, expected: bool) -> None:
    assert unavailable(error) is expected
