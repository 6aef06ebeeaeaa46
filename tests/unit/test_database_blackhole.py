"""A PostgreSQL connection whose network path goes silent (a firewall dropping its packets, sending no reset):
the relay's statements on it fail after the statement time limit instead of waiting until TCP gives up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from relay.clock import SystemClock
from relay.services import Relay
from relay.store.db import unavailable
from relay.store.jobs import NewJob
from tests.helpers import pg_database, relay_config

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


class Blackhole:
    """A TCP proxy to PostgreSQL that, while `silent`, forwards nothing either way and keeps every connection open."""

    def __init__(self, port: int) -> None:
        self.upstream_port = port
        self.silent = False
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink))
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if not self.silent:
                    sink.write(data)
        except OSError:
            pass
        finally:
            sink.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)


@contextlib.asynccontextmanager
async def relay_behind_blackhole(tmp_path: Path) -> AsyncIterator[tuple[Relay, Blackhole]]:
    """A relay on a fresh PostgreSQL database reached through a `Blackhole`, with a statement time limit of 1 s."""
    async with pg_database() as url:
        target = make_url(url)
        proxy = Blackhole(target.port or 5432)
        port = await proxy.start()
        proxied = target.set(port=port).render_as_string(hide_password=False)
        relay = Relay(relay_config(tmp_path, database={"url": proxied, "statement_timeout_s": 1}), SystemClock(), {})
        try:
            await relay.open()
            yield relay, proxy
        finally:
            proxy.silent = False
            await relay.close()
            await proxy.close()


async def test_a_statement_on_a_connection_gone_silent_fails_after_the_limit_and_the_relay_recovers(
    tmp_path: Path,
) -> None:
    async with relay_behind_blackhole(tmp_path) as (relay, proxy):
        key, _ = await relay.keys.create("k", 10, 0)
        proxy.silent = True
        read = asyncio.ensure_future(relay.keys.get(key.id))
        done, _ = await asyncio.wait({read}, timeout=20)  # without a limit: until TCP gives up
        assert read in done
        assert isinstance(read.exception(), Exception)
        proxy.silent = False  # the network path is back: new connections are made
        again = await asyncio.wait_for(relay.keys.get(key.id), 20)
        assert again is not None and again.id == key.id


async def test_a_batch_of_endings_on_a_connection_gone_silent_fails_together_after_one_limit(tmp_path: Path) -> None:
    """Endings are group-committed: a batch whose transaction waited out the statement time limit fails every
    ending of it then, instead of writing each again alone (each waiting out the limit in turn, on connections that
    cannot be made either, and the batches queued behind them with it). Ended again once the network is back, each
    job ends once and its hold is released once."""
    async with relay_behind_blackhole(tmp_path) as (relay, proxy):
        key, _ = await relay.keys.create("k", 100, 0)
        now = relay.clock.now()
        ids = [f"job_silent{i}" for i in range(6)]
        new = [NewJob(job_id, "r", "mj-fast", "fast", "MID_JOURNEY", "imagine", "p", 2, now + 600) for job_id in ids]
        assert await relay.store.open(key.id, new, now)
        proxy.silent = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        ends = [asyncio.ensure_future(relay.finisher.end(job_id, succeeded=False, fail_reason="x")) for job_id in ids]
        _, waiting = await asyncio.wait(ends, timeout=10)  # each ending alone: 6 limits, and connections
        took = loop.time() - started
        assert not waiting, f"{len(waiting)} of 6 endings still waiting after {took:.1f} s with a 1 s limit"
        assert took < 4, f"{took:.1f} s for one batch with a 1 s limit"
        assert all(unavailable(end.exception() or ValueError("ended")) for end in ends)
        proxy.silent = False
        again = await asyncio.wait_for(
            asyncio.gather(*(relay.finisher.end(job_id, succeeded=False, fail_reason="x") for job_id in ids)), 60
        )
        assert all(row is not None for row in again)  # nothing of the failed batch landed: each ends now, once
        after = await relay.keys.get(key.id)
        assert after is not None and (after.balance, after.held) == (100, 0)
