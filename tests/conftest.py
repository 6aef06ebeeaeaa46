from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RunningRelay, check_ledgers_after_test, relay_config, running_relay


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
