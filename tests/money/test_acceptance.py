"""Money through real HTTP, on SQLite and PostgreSQL: exact holds under a burst, captures that match successes, and
a ledger that balances after both (checked by `running_relay` when each block ends, as after every test)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.config import Config
from tests.helpers import assert_ledger_balances, pg_database_sync, relay_config, running_relay, sql

PRICE = 2  # mj-fast imagine


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The `database` section of the configuration: the default SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield {}
        return
    with pg_database_sync() as url:
        yield {"database": {"url": url, "pool_size": 20}}


async def _burst(base: str, key: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        headers = {"Authorization": f"Bearer {key}"}
        return await asyncio.gather(*(client.post("/v1/images/generations", json=b, headers=headers) for b in bodies))


@contextmanager
def _relay(tmp_path: Path, database: dict[str, Any], quota: int, **simulator: Any) -> Iterator[Any]:
    settings = {"fast_s": 0.3, "tile_px": 32, **simulator}
    config = relay_config(
        tmp_path, providers=[{"name": "sim", "dialect": "simulator", "simulator": settings}], **database
    )
    with running_relay(config, quota=quota) as relay:
        yield relay


def _ledger_sum(config: Config, kind: str) -> int:
    (row,) = sql(config, f"SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE kind = '{kind}'")
    return int(row[0])


def test_200_concurrent_requests_with_quota_for_20_jobs_admit_exactly_20(
    tmp_path: Path, database: dict[str, Any]
) -> None:
    with _relay(tmp_path, database, quota=20 * PRICE) as relay:
        bodies = [{"model": "mj-fast", "prompt": f"a lantern {i}"} for i in range(200)]
        replies = asyncio.run(_burst(relay.base, relay.key, bodies))
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == 20
        refused = [r for r in replies if r.status_code != 200]
        assert len(refused) == 180
        assert all(r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota" for r in refused)
        assert all(r.headers["x-should-retry"] == "false" for r in refused)
        assert relay.balance() == (0, 0)
        assert len(relay.jobs()) == 20
        assert _ledger_sum(relay.config, "hold") == _ledger_sum(relay.config, "capture") == 20 * PRICE
    assert_ledger_balances(relay.config.database_url())


def test_with_30_percent_of_jobs_failing_only_successes_are_captured(tmp_path: Path, database: dict[str, Any]) -> None:
    with _relay(tmp_path, database, quota=1000, fail_rate=0.3, seed=7) as relay:
        bodies = [{"model": "mj-fast", "prompt": f"a harbour {i}"} for i in range(60)]
        replies = asyncio.run(_burst(relay.base, relay.key, bodies))
        ok = sum(r.status_code == 200 for r in replies)
        failed = sum(r.status_code == 502 for r in replies)
        assert ok + failed == 60 and failed > 0 and ok > 0
        states = [row[0] for row in relay.jobs()]
        assert states.count("SUCCEEDED") == ok and states.count("FAILED") == failed
        assert relay.balance() == (1000 - ok * PRICE, 0)
        assert _ledger_sum(relay.config, "capture") == ok * PRICE
        assert _ledger_sum(relay.config, "release") == failed * PRICE
        metrics = httpx.get(relay.base + "/metrics").text
        assert f'mj_relay_credits_captured_total{{kind="imagine",model="mj-fast"}} {float(ok * PRICE)}' in metrics
        assert f'mj_relay_credits_released_total{{kind="imagine",model="mj-fast"}} {float(failed * PRICE)}' in metrics
        assert "mj_relay_holds_open 0.0" in metrics
    assert_ledger_balances(relay.config.database_url())
