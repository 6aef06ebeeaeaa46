"""An upstream hook call forwarded to the process that follows its job arrives as it was taken: its upstream id
and its body are the upstream's bytes, and may hold anything the call's parser reads (a `|`, JSON in UTF-16)."""

from __future__ import annotations

import asyncio
import json

import pytest

from adapters.replies import parse_hook
from relay.core.broadcast import Broadcast
from relay.core.events import JobEvents
from tests.helpers import pg_database

pytestmark = pytest.mark.anyio


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("upstream_id", "encoding"),
    [("1320098173412546", "utf-8"), ("task|7", "utf-8"), ("a|b|c", "utf-8"), ("1320098173412546", "utf-16")],
)
async def test_a_forwarded_call_carries_its_upstream_id_and_body_whatever_they_hold(
    upstream_id: str, encoding: str
) -> None:
    async with pg_database() as url:
        heard: asyncio.Queue[tuple[str, bytes | None, str]] = asyncio.Queue()

        async def on_hook(provider: str, body: bytes | None, upstream_id: str) -> None:
            heard.put_nowait((provider, body, upstream_id))

        sender = Broadcast(url, "p-send", JobEvents(), on_hook)
        owner = Broadcast(url, "p-own", JobEvents(), on_hook)
        await owner.start()
        await sender.start()
        try:
            task = {"id": upstream_id, "status": "IN_PROGRESS", "progress": "42%", "prompt": "a | b"}
            body = json.dumps(task).encode(encoding)
            sent = parse_hook(body)
            assert sent is not None and sent.upstream_id == upstream_id  # what the receiving process read
            await sender.forward_hook("p-own", "acct", upstream_id, body)
            provider, carried, carried_id = await asyncio.wait_for(heard.get(), 10)
            assert (provider, carried_id) == ("acct", upstream_id)
            assert carried is not None and parse_hook(carried) == sent
        finally:
            await sender.stop()
            await owner.stop()
