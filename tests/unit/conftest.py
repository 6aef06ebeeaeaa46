"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.services import Relay
from relay.store.keys import KeyRecord
from tests.unit.test_jobs import SwitchableUpstream, relays_on_one_database


@pytest.fixture
async def relay_on_either(tmp_path: Path, postgres: bool) -> AsyncIterator[tuple[Relay, SwitchableUpstream, KeyRecord]]:
    """One relay on SQLite, or (`postgres`) on a fresh PostgreSQL database, in front of a switchable simulator, and a
    key of 100 credits. Parametrize `postgres` to use it."""
    upstream = SwitchableUpstream()
    async with relays_on_one_database(tmp_path, upstream, 1, postgres=postgres) as ((relay,), key):
        yield relay, upstream, key
