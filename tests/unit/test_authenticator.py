"""The key cache in front of the database: a key looked up a moment ago is served from it, and never lost in it."""

from __future__ import annotations

from typing import Any

import pytest
from cachetools import TTLCache
from starlette.requests import Request

from relay.api.common import KEY_CACHE_TTL_S, Authenticator
from relay.store.keys import KeyRecord

pytestmark = pytest.mark.anyio

RECORD = KeyRecord(id="k1", name="test", prefix="sk-", balance=10, held=0, created_at=0.0, revoked_at=None)


class _Keys:
    def __init__(self) -> None:
        self.lookups = 0

    async def by_secret(self, token: str) -> KeyRecord | None:
        self.lookups += 1
        return RECORD if token == "sk-good" else None


class _Timer:
    """The cache's clock: it moves `step` seconds each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0
        self.step = 0.0

    def __call__(self) -> float:
        read, self.now = self.now, self.now + self.step
        return read


def _request() -> Request:
    headers = [(b"authorization", b"Bearer sk-good")]
    return Request({"type": "http", "method": "GET", "path": "/v1/models", "headers": headers})


async def test_a_cached_key_that_expires_as_it_is_read_is_still_served() -> None:
    """A key whose cache entry lapses between the cache's two reads (whether it holds the key, then the key) was a
    KeyError, answered as a 500 that the SDKs do not retry: the entry is read once, at one moment."""
    keys, timer = _Keys(), _Timer()
    auth = Authenticator(keys)  # type: ignore[arg-type]
    cache: TTLCache[str, Any] = TTLCache(maxsize=10, ttl=KEY_CACHE_TTL_S, timer=timer)
    auth._cache = cache
    assert await auth(_request()) == RECORD
    timer.now, timer.step = KEY_CACHE_TTL_S - 1e-6, 1e-5  # alive at one read, lapsed at the next
    assert await auth(_request()) == RECORD
    assert keys.lookups == 1  # the entry was alive when read, once
