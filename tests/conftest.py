from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from relay.store.db import Database
from tests.helpers import RunningRelay, check_ledgers_after_test, pg_database, relay_config, running_relay


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _ledger_balances() -> Iterator[None]:
    """After every test, the ledger of each SQLite database a test configuration used must balance."""
    yield
    check_ledgers_after_test()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RunningRelay]:
    """A relay on a loopback port with the in-process simulator and a key with 1000 credits."""
    with running_relay(relay_config(tmp_path)) as running:
        yield running


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated store, once on SQLite and once on PostgreSQL: the store tests run on both through one code path."""
    async with AsyncExitStack() as stack:
        if request.param == "postgres":
            url = await stack.enter_async_context(pg_database())
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / 'x' / 'relay.db'}"
        database = Database(url, pool_size=5)
        stack.push_async_callback(database.dispose)
        await database.migrate()
        await database.migrate()  # a second start finds the schema current
        yield database
