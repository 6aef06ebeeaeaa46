"""A listening connection that dies without closing (a network partition, a database behind a failed-over
address): the relay must notice and listen again, or waiters in it hear of other processes' endings only by their
quiet-spell fallback, and forwarded hooks never, for as long as the dead connection looks open."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import asyncpg
import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.core.broadcast import JOBS, RECONNECT_S
from relay.core.jobs import Attempt
from relay.services import Relay
from tests.helpers import pg_database, relay_config


class _Proxying(Protocol):
    async def start(self) -> int: ...

    async def close(self) -> None: ...


P = TypeVar("P", bound=_Proxying)

pytestmark = pytest.mark.anyio


class Proxy:
    """A TCP proxy to PostgreSQL whose open connections can be frozen: bytes stop flowing both ways, and nothing is
    closed (as when a network path dies silently). Connections made after the freeze flow normally."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen: list[asyncio.Event] = []  # one per connection: set = frozen
        self.server: asyncio.AbstractServer | None = None
        self.handlers: list[asyncio.Task[object]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        for frozen in self.frozen:
            frozen.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        self.writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.append(up_writer)
        frozen = asyncio.Event()
        self.frozen.append(frozen)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    if frozen.is_set():
                        await asyncio.Event().wait()  # never: the bytes go nowhere, the sockets stay open
                    sink.write(data)
                    await sink.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.sleep(0)
        if self.server is not None:
            await self.server.wait_closed()


async def listening_through_a_proxy(
    stack: contextlib.AsyncExitStack,
    folder: Path,
    url: str,
    upstreams: dict[str, Any],
    kind: Callable[[str, int], P],
) -> tuple[Relay, P]:
    """A relay on the database at `url` whose listening connection (only) goes through a proxy (`kind`)."""
    relay = Relay(relay_config(folder, database={"url": url}), SystemClock(), upstreams)
    parts = urlsplit(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    proxy = kind(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    stack.push_async_callback(proxy.close)
    assert relay.broadcast is not None
    relay.broadcast.dsn = relay.broadcast.dsn.replace(f"{parts.hostname}:{parts.port or 5432}", f"127.0.0.1:{port}")
    return relay, proxy


@pytest.mark.postgres
async def test_a_listening_connection_that_died_silently_is_made_again(tmp_path: Path) -> None:
    """Relay B's listening connection dies silently while a client's retry at B waits for a job relay A follows.
    Long before the job ends (more than RECONNECT_S), B should be listening again, and hear of the ending at once;
    instead it keeps the dead connection (its /readyz says notifications are fine) and the waiter hears of the
    ending only at its next quiet spell."""
    engine = SimEngine(SimSettings(fast_s=6.0, tile_px=16))
    upstream = SimulatorUpstream("sim", engine)
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(pg_database())
        a = Relay(relay_config(tmp_path / "a", database={"url": url}), SystemClock(), {"sim": upstream})
        b, proxy = await listening_through_a_proxy(stack, tmp_path / "b", url, {"sim": upstream}, Proxy)
        for relay in (a, b):
            await relay.open()
            stack.push_async_callback(relay.close)
        key, _ = await a.keys.create("k", 100, 0)
        spec = a.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        first = await a.jobs.start(key, spec, Attempt("one-body", retry=False))
        retry = await b.jobs.start(key, spec, Attempt("one-body", retry=True))  # follows A's job
        assert retry.job_ids == first.job_ids and not b.lifecycle.following(retry.job_ids[0])

        proxy.freeze()  # B's listening connection is dead from now on, though nothing closed it
        started = time.monotonic()

        async def wait(relay: Relay, generation: object) -> float:
            await relay.jobs.wait(generation)  # type: ignore[arg-type]
            return time.monotonic() - started

        heard_a, heard_b = await asyncio.wait_for(asyncio.gather(wait(a, first), wait(b, retry)), 40)
        first.close()
        retry.close()
        # and B can still stop: closing its listening connection must not wait for ever on the dead one
        stopped = True
        try:
            await asyncio.wait_for(b.broadcast.stop(), 10)
        except TimeoutError:
            stopped = False
        assert heard_b - heard_a < 1.0 and stopped, {"heard_a": heard_a, "heard_b": heard_b, "stopped": stopped}


@pytest.mark.postgres
async def test_a_relay_whose_listening_connection_died_silently_can_still_stop(tmp_path: Path) -> None:
    """The connection dies silently, a change is sent on it (and never answered), and the relay is stopped before
    it noticed: the stop must not wait for ever on that send or on closing the connection."""
    from relay.core.events import JobEvent
    from relay.domain import JobState

    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(pg_database())
        b, proxy = await listening_through_a_proxy(stack, tmp_path / "b", url, {}, Proxy)
        await b.open()
        proxy.freeze()
        b.events.publish(JobEvent("job_somewhere", JobState.IN_PROGRESS, 50))  # sent on the dead connection
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(b.broadcast.stop())
        try:
            done, _ = await asyncio.wait([stopping], timeout=10)
            assert done, "stopping the broadcast still waits, 10 s on, on the dead connection"
        finally:
            if not stopping.done() and b.broadcast._conn is not None:
                b.broadcast._conn.terminate()  # let the test end
            await asyncio.gather(stopping, return_exceptions=True)
            await b.close()


COUNT_CONNECTIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
TERMINATE_ALL = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


class SlowListenProxy:
    """A TCP proxy to PostgreSQL that, once `hold()` is called, keeps back the server's answer to a LISTEN sent on a
    connection made from then on (a slow network, or a busy server) until `release()`. A side that closes closes the
    other."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.holding = False
        self.listen_held = asyncio.Event()  # a LISTEN is waiting for its answer
        self.released = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.handlers: list[asyncio.Task[object]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.released.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        held = asyncio.Event()
        holding = self.holding

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, to_client: bool) -> None:
            try:
                while data := await source.read(65536):
                    if not to_client and holding and b"LISTEN" in data:
                        held.set()
                        self.listen_held.set()
                    if to_client and held.is_set():
                        await self.released.wait()
                    sink.write(data)
                    await sink.drain()
            except Exception:
                pass
            finally:
                sink.transport.abort()  # this side closed: so is the other

        try:
            await asyncio.gather(pipe(reader, up_writer, to_client=False), pipe(up_reader, writer, to_client=True))
        finally:
            up_writer.transport.abort()
            writer.transport.abort()

    async def close(self) -> None:
        self.release()
        if self.server is not None:
            self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


async def listening_through_proxy(
    stack: contextlib.AsyncExitStack, tmp_path: Path
) -> tuple[Relay, SlowListenProxy, asyncpg.Connection]:
    """A relay (not yet opened) on a fresh PostgreSQL database whose listening connections go through a
    `SlowListenProxy`, and an admin connection to that database; all closed with `stack`."""
    url = await stack.enter_async_context(pg_database())
    relay, proxy = await listening_through_a_proxy(stack, tmp_path, url, {}, SlowListenProxy)
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    stack.push_async_callback(admin.close)
    return relay, proxy, admin


@pytest.mark.postgres
async def test_a_relay_stopped_while_it_listens_again_leaves_no_connection_behind(tmp_path: Path) -> None:
    """The relay's backends are terminated (an operator clearing the database's sessions), and the relay is stopped
    (SIGTERM) while it is making its listening connection again, its LISTEN not yet answered. Once stopped, no
    connection of its should be left on the database; instead the new connection, never handed over, stays open
    (and listening, once its LISTEN is answered) for as long as the process lives."""
    async with contextlib.AsyncExitStack() as stack:
        relay, proxy, admin = await listening_through_proxy(stack, tmp_path)
        await relay.open()
        closed = False
        try:
            proxy.hold()
            assert await admin.fetchval(TERMINATE_ALL) >= 1
            await asyncio.wait_for(proxy.listen_held.wait(), 10)  # listening again, its LISTEN unanswered
            await asyncio.wait_for(relay.close(), 30)
            closed = True
            proxy.release()
            left = -1
            for _ in range(20):  # a closed connection leaves pg_stat_activity a moment after
                left = await admin.fetchval(COUNT_CONNECTIONS)
                if left == 0:
                    break
                await asyncio.sleep(0.1)
            assert left == 0, f"{left} connection(s) of the stopped relay are still on the database"
        finally:
            if not closed:
                await relay.close()


@pytest.mark.postgres
async def _listens_again(relay: Relay, admin: asyncpg.Connection, within_s: float) -> None:
    """The relay listens again within `within_s` (checked every tenth of a second), and hears another process's end."""
    assert relay.broadcast is not None
    started = time.monotonic()
    while not relay.broadcast.connected and time.monotonic() - started < within_s:
        await asyncio.sleep(0.1)
    assert relay.broadcast.connected, f"still not listening {time.monotonic() - started:.1f} s on"
    waiter = relay.events.subscribe(["job_elsewhere"])
    await admin.execute("SELECT pg_notify($1, $2)", JOBS, "another-process|job_elsewhere:SUCCEEDED:100")
    heard = await waiter.next(1.0)
    waiter.close()
    assert heard is not None and heard.state.terminal


async def test_a_listening_connection_whose_listen_goes_unanswered_is_made_again(tmp_path: Path) -> None:
    """The relay's backends are terminated, and the connection it makes again never has its LISTEN answered (a server
    or network path that went silent just then). The relay should give up on it and make another within a few
    RECONNECT_S, and hear other processes' endings through it at once; instead it waits on that LISTEN for ever,
    listening to nothing."""
    async with contextlib.AsyncExitStack() as stack:
        relay, proxy, admin = await listening_through_proxy(stack, tmp_path)
        await relay.open()
        stack.push_async_callback(relay.close)
        before = await admin.fetchval(COUNT_CONNECTIONS)  # its pool's, and the listening one
        proxy.hold()
        await admin.fetchval(TERMINATE_ALL)
        await asyncio.wait_for(proxy.listen_held.wait(), 10)
        proxy.holding = False  # connections made from now on are answered; the held one never is
        await _listens_again(relay, admin, 4 * RECONNECT_S)
        await asyncio.sleep(0.2)  # the connection given up on leaves pg_stat_activity a moment after
        after = await admin.fetchval(COUNT_CONNECTIONS)
        assert after <= before, f"{before} connections before, {after} after listening again"


@pytest.mark.postgres
async def test_the_listening_connection_takes_the_database_url_as_the_engine_does(tmp_path: Path) -> None:
    """A database URL with a parameter of asyncpg's connect in its query (`ssl`, how TLS is asked for): the engine's
    connections took it as that argument, but the listening connection read the URL as a libpq DSN, which sends a
    parameter it does not know to the server as a setting, and the server refused `ssl` ("cannot be changed now"):
    the relay did not start, and no URL asked both for TLS."""
    async with pg_database() as url, contextlib.AsyncExitStack() as stack:
        engine = SimEngine(SimSettings(fast_s=0.2, tile_px=16))
        config = relay_config(tmp_path, database={"url": url + "?ssl=disable"})
        relay = Relay(config, SystemClock(), {"sim": SimulatorUpstream("sim", engine)})
        await relay.open()
        stack.push_async_callback(relay.close)
        assert relay.broadcast is not None
        # and it listens: another process's notification is heard
        heard = asyncio.Event()
        relay.events.listen(lambda event: heard.set())
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        stack.push_async_callback(conn.close)
        await conn.execute(f"SELECT pg_notify('{JOBS}', 'p-elsewhere|j_1:SUCCEEDED:100')")
        await asyncio.wait_for(heard.wait(), 10)


class SilentConnectProxy(SlowListenProxy):
    """A `SlowListenProxy` that, while holding, keeps back every answer of the server on a connection made then
    (its start-up too: a network path that went silent as the connection was being made)."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.holding:
            await super()._serve(reader, writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        self.listen_held.set()  # a connection is being made, and will never hear back
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self.released.wait()
        finally:
            writer.transport.abort()


@pytest.mark.postgres
async def test_a_listening_connection_whose_start_goes_unanswered_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's backends are terminated, and the connection it makes again never hears back from the server, not
    even at its start (a server or network path that went silent just then). The relay should give up on it and
    listen again through a new one once the path is back, as a pool connection gives up after CONNECT_TIMEOUT_S;
    instead it waits on that start for asyncpg's own minute, listening to nothing, its /readyz failing. (The limit
    is cut to 2 s here, for the test's time.)"""
    from relay.core import broadcast

    monkeypatch.setattr(broadcast, "CONNECT_TIMEOUT_S", 2.0)
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(pg_database())
        relay, proxy = await listening_through_a_proxy(stack, tmp_path, url, {}, SilentConnectProxy)
        admin = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        stack.push_async_callback(admin.close)
        await relay.open()
        stack.push_async_callback(relay.close)
        proxy.hold()
        await admin.fetchval(TERMINATE_ALL)
        await asyncio.wait_for(proxy.listen_held.wait(), 10)
        proxy.holding = False  # connections made from now on are answered; the silent one never is
        await _listens_again(relay, admin, broadcast.CONNECT_TIMEOUT_S + 3 * RECONNECT_S)
