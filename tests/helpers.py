"""Test helpers: real servers on loopback sockets, a hand-moved clock, and a relay ready to call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
import openai
import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from relay.app import build_app
from relay.config import Config
from relay.server import RelayServer, ServeConfig
from relay.services import Relay
from relay.store import ledger
from relay.store.db import MIGRATIONS, Database
from relay.store.jobs import JobRow
from relay.store.keys import KeyStore


class FakeClock:
    """A clock that moves only when the test moves it; `sleep` returns once the test has moved it far enough."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        due = [(at, f) for at, f in self._sleepers if at <= self.t]
        self._sleepers = [(at, f) for at, f in self._sleepers if at > self.t]
        for _, future in due:
            if not future.done():
                future.set_result(None)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:  # due already: back at the next turn of the loop, as asyncio's own sleep(0)
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, future))
        await future


PG_URL = os.environ.get("MJ_RELAY_TEST_PG_URL", "")


async def _pg_admin(statement: str) -> None:
    admin = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def ledger_breaks(url: str) -> list[str]:
    """What `mj-relay ledger check` finds wrong in the database at `url` (nothing: []). A database the relay never
    set up (no ledger yet) has nothing to check."""
    db = Database(url, pool_size=1)
    try:
        async with db.engine.connect() as conn:
            has_ledger = await conn.run_sync(lambda sync: sync.dialect.has_table(sync, "ledger"))
        if not has_ledger:
            return []
        return (await ledger.check(db.engine)).breaks
    finally:
        await db.dispose()


def assert_ledger_balances(url: str) -> None:
    """Fail the test when the ledger of the database at `url` does not balance, naming every break."""
    breaks = asyncio.run(ledger_breaks(url))
    assert not breaks, "the ledger does not balance:\n  " + "\n  ".join(breaks)


@asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards; skips when none is configured. A test
    that ends well has its ledger checked before the database goes."""
    if not PG_URL:
        pytest.skip("set MJ_RELAY_TEST_PG_URL to run the PostgreSQL tests")
    name = "mjr_test_" + secrets.token_hex(6)
    await _pg_admin(f'CREATE DATABASE "{name}"')
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
        breaks = await ledger_breaks(url)
        assert not breaks, "the ledger does not balance:\n  " + "\n  ".join(breaks)
    finally:
        await _pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextmanager
def pg_database_sync() -> Iterator[str]:
    if not PG_URL:
        pytest.skip("set MJ_RELAY_TEST_PG_URL to run the PostgreSQL tests")
    name = "mjr_test_" + secrets.token_hex(6)
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
        assert_ledger_balances(url)
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def stop_process(proc: subprocess.Popen[Any], wait_s: float = 15) -> None:
    """End a process as an operator would: SIGTERM, then SIGKILL if it will not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A loopback port free right now, for a process the test starts (which binds it itself)."""
    sock = bound_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


class PromptServer(RelayServer):
    """`RelayServer` as the tests run it: `stop()` starts its shutdown at once, where `should_exit` alone is seen
    at uvicorn's next tick (up to a tenth of a second later, for each of the hundreds of servers the tests stop).
    Ticks still come every tenth of a second while it runs."""

    _loop: asyncio.AbstractEventLoop | None = None
    _woken: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._woken = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), 0.1)
            should_exit = await self.on_tick(counter)

    def stop(self) -> None:
        """From any thread: shut down now."""
        self.should_exit = True
        loop, woken = self._loop, self._woken
        if loop is not None and woken is not None:
            with contextlib.suppress(RuntimeError):  # its loop has already closed
                loop.call_soon_threadsafe(woken.set)


@contextmanager
def serve(app: ASGIApp, config: Config | None = None, sock: socket.socket | None = None) -> Iterator[str]:
    """Run an ASGI app on a loopback port in a thread, as `mj-relay serve` runs the relay (uvicorn with the relay's
    protocol and the HTTP limits of `config.server`, the defaults without one); yields its base URL. `sock`, bound
    beforehand (`bound_socket`), lets a test know the address before the app is built."""
    with running_server(app, config, sock) as (base, _):
        yield base


@contextmanager
def running_server(
    app: ASGIApp, config: Config | None = None, sock: socket.socket | None = None, **options: Any
) -> Iterator[tuple[str, RelayServer]]:
    """`serve`, yielding the server too (for a test that stops it, or looks at its state); `options` go to
    `ServeConfig` (a graceful shutdown of 2 s unless said)."""
    sock = sock or bound_socket()
    port = sock.getsockname()[1]
    ready = threading.Event()
    options.setdefault("timeout_graceful_shutdown", 2)
    server = PromptServer(ServeConfig(app, config.server if config else None, **options), on_ready=ready.set)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not ready.wait(0.05):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.stop()
        thread.join(15)
        sock.close()


# The SQLite databases of the configurations made for the running test; their ledgers are checked after it
# (`check_ledgers_after_test`, an autouse fixture in conftest). PostgreSQL ones are checked by `pg_database`.
_CONFIGURED: list[Config] = []


def check_ledgers_after_test() -> None:
    """Check the ledger of every SQLite database the test's configurations used; forget them."""
    configs, _CONFIGURED[:] = list(_CONFIGURED), []
    seen: set[str] = set()
    for config in configs:
        url = config.database_url()
        path = url.split(":///", 1)[1] if url.startswith("sqlite") and ":///" in url else ""
        if url in seen or not path or not Path(path).exists():
            continue
        seen.add(url)
        assert_ledger_balances(url)


def relay_config(tmp_path: Path, **sections: Any) -> Config:
    """A configuration for tests: everything under tmp_path, a quick simulator, fast polling. The ledger of its
    database is checked after the test."""
    data: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "providers": [
            {
                "name": "sim",
                "dialect": "simulator",
                "simulator": {"fast_s": 0.3, "relax_s": 0.6, "turbo_s": 0.2, "tile_px": 64},
            }
        ],
        "jobs": {"poll_interval_s": 0.05},
    }
    data.update(sections)
    config = Config.model_validate(data)
    _CONFIGURED.append(config)
    return config


def create_key(config: Config, quota: int = 1000, name: str = "test", **policies: Any) -> str:
    """A key (with `models`, `rpm`, `expires_at` when given); returns its secret."""

    async def run() -> str:
        db = Database(config.database_url())
        try:
            await db.migrate()
            _, secret = await KeyStore(db.engine).create(name, quota, time.time(), **policies)
            return secret
        finally:
            await db.dispose()

    return asyncio.run(run())


def sql(config: Config, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read (or poke) the relay's database directly, as an operator would."""
    url = config.database_url()
    if url.startswith("postgresql"):

        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                return [tuple(row) for row in await conn.fetch(query.replace("?", "$1"), *args)]
            finally:
                await conn.close()

        return asyncio.run(run())
    with sqlite3.connect(url.split(":///", 1)[1]) as conn:
        return list(conn.execute(query, args).fetchall())


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll a condition of a real, running system until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.02)


@dataclass
class RunningRelay:
    base: str
    config: Config
    key: str
    clients: list[openai.OpenAI] = field(default_factory=list)

    def openai(self, key: str | None = None) -> openai.OpenAI:
        """The official SDK pointed at this relay (closed when the relay stops); no retries, so every call is one."""
        client = openai.OpenAI(base_url=self.base + "/v1", api_key=key or self.key, max_retries=0, timeout=30)
        self.clients.append(client)
        return client

    def balance(self) -> tuple[int, int]:
        (row,) = sql(self.config, "SELECT balance, held FROM keys WHERE name = 'test'")
        return int(row[0]), int(row[1])

    def jobs(self) -> list[tuple[Any, ...]]:
        return sql(self.config, "SELECT state, error_code, hold_state, provider FROM jobs ORDER BY created_at, id")


@contextmanager
def running_relay(
    config: Config, quota: int = 1000, sock: socket.socket | None = None, **kwargs: Any
) -> Iterator[RunningRelay]:
    """A relay serving `config` on a loopback port, with a key of `quota` credits named `test`. When the block ends
    well, the relay stops and its ledger must balance (`mj-relay ledger check`), or the test fails."""
    key = create_key(config, quota)
    with serve(build_app(config, **kwargs), sock=sock) as base:
        relay = RunningRelay(base, config, key)
        try:
            yield relay
        finally:
            for client in relay.clients:
                client.close()
    assert_ledger_balances(config.database_url())


class Receiver:
    """A client's hook endpoint: `/ok` records each delivery, `/fail` answers 500 and counts."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.failed: list[bytes] = []
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def ok(request: Request) -> Response:
            body = await request.body()
            with self.lock:
                self.deliveries.append((dict(request.headers), body))
            return Response(status_code=204)

        async def fail(request: Request) -> Response:
            body = await request.body()
            with self.lock:
                self.failed.append(body)
            return Response(status_code=500)

        return Starlette(routes=[Route("/ok", ok, methods=["POST"]), Route("/fail", fail, methods=["POST"])])

    def tasks(self, task_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body in self.deliveries if json.loads(body)["id"] == task_id]


async def database_at(url: str, revision: str, *statements: str) -> None:
    """A database with the schema of an older `revision` (as an older release left it), and `statements` run in it."""
    db = Database(url, pool_size=1)

    def upgrade(connection: Any) -> None:
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(upgrade)
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await db.dispose()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One chunk of a PNG, with its length and checksum."""
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_start(width: int, height: int) -> bytes:
    """The beginning of a PNG that says it is `width` x `height` pixels (8-bit RGB): its signature and header."""
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG that says it is `width` x `height` pixels: its header, a few rows of image data and its end marker
    (what a decompression bomb looks like before it is decoded)."""
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4)
    return png_start(width, height) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


async def ended_row(relay: Relay, job_id: str) -> JobRow:
    """A job's row once it has ended, as `relay` reads it (looked at every 50 ms; bound it with a timeout)."""
    while True:
        row = await relay.store.get(job_id)
        assert row is not None
        if row.state.terminal:
            return row
        await asyncio.sleep(0.05)


class CuttableProxy:
    """A TCP proxy to a server on a loopback port (PostgreSQL, the S3 server), on a port of its own (in a thread of
    its own), that can be made to
    `refuse` connections (its open ones closed, new ones refused: a server that is down), to be `silent` (its open
    ones closed, new ones accepted and then never read from nor answered: packets dropped on the way), and be
    `restore`d on the same port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.mode: Literal["pass", "silent"] = "pass"
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Future[None]] = set()
        self.port = 0
        self.swallowed = 0  # connections taken while silent

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> int:
        self.thread.start()
        self._run(self._listen())
        return self.port

    def refuse(self) -> None:
        self._run(self._cut())

    def silent(self) -> None:
        self._run(self._cut())
        self.mode = "silent"
        self._run(self._listen())

    def restore(self) -> None:
        self._run(self._cut())
        self.mode = "pass"
        self._run(self._listen())

    def close(self) -> None:
        self._run(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _run(self, work: Any) -> None:
        asyncio.run_coroutine_threadsafe(work, self.loop).result(10)

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _keep(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        if self.mode == "silent":
            self.swallowed += 1
            return  # held open, never read: what the client sends fills the buffers, nothing comes back
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            self._keep(self._pipe(source, sink))

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
        sink.transport.abort()
