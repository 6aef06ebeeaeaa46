"""The LISTEN connection's probe does not take the wait behind sends queued on a live connection for silence: a
burst of forwarded hooks would get a healthy connection terminated, and every send in the queue would fail."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from relay.core.broadcast import RECONNECT_S, Broadcast
from relay.core.events import JobEvents
from tests.helpers import pg_database

pytestmark = pytest.mark.anyio


@pytest.mark.postgres
async def test_a_live_connection_busy_with_a_burst_of_sends_is_not_taken_for_dead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with pg_database() as url:
        heard: list[str] = []

        async def on_hook(provider: str, body: bytes | None, upstream_id: str) -> None:
            heard.append(upstream_id)

        sender = Broadcast(url, "p-send", JobEvents(), on_hook)
        owner = Broadcast(url, "p-own", JobEvents(), on_hook)
        await owner.start()
        await sender.start()
        try:
            caplog.set_level(logging.WARNING, "relay.broadcast")
            conn = sender._conn
            assert conn is not None
            # A burst of upstream hooks this process forwards to the one that follows their jobs: each a
            # statement of its own on the one connection, queued behind one another.
            count = 40_000  # enough to outlast RECONNECT_S on a fast machine (20,000 took 1.7 s on one)
            body = b'{"id": "x", "status": "IN_PROGRESS", "progress": "42%"}'
            started = time.monotonic()
            sends = [asyncio.create_task(sender.forward_hook("p-own", "acct", f"u{i}", body)) for i in range(count)]
            await asyncio.sleep(0)
            answered = await sender._answers(conn)
            probe_s = time.monotonic() - started
            await asyncio.gather(*sends)
            total_s = time.monotonic() - started
            assert total_s > RECONNECT_S, f"the burst took {total_s:.1f} s: too short to show anything"
            assert not conn.is_closed()
            assert answered, (
                f"a live connection that answered {count} statements in {total_s:.1f} s was judged dead after "
                f"{probe_s:.1f} s of waiting its turn"
            )
        finally:
            await sender.stop()
            await owner.stop()
