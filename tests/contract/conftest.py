from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contract.worlds import DIALECTS, Env, world


@pytest.fixture(params=DIALECTS)
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    async with world(request.param) as running:
        yield running
