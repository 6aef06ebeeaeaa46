"""Relay processes on one PostgreSQL database tell each other what happened, with LISTEN/NOTIFY.

    mj_relay_jobs    every change a process writes (a job's state and progress), so that a waiter in another
                     process (a client's retry that came in there) learns of an ending at once; sent in batches
    mj_relay_hooks   an upstream hook call that came in to a process that does not follow its job, forwarded to
                     the one that does (the task JSON as it came, when it fits in a notification; else that
                     process reads the task now)

Each payload starts with the sending process's id; a process ignores its own. On SQLite there is one process and
nothing to tell.

The listening connection also carries the process's presence (`store.presence`): the lock that tells the others at
once that this process is gone when the connection is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url

from relay.core.background import cancel_all, let_finish
from relay.core.events import JobEvent, JobEvents
from relay.domain import JobState
from relay.store import presence
from relay.store.db import CONNECT_TIMEOUT_S

log = logging.getLogger("relay.broadcast")

JOBS = "mj_relay_jobs"
HOOKS = "mj_relay_hooks"
MAX_PAYLOAD = 7800  # PostgreSQL takes up to 8000 bytes
RECONNECT_S = 2.0  # how often the listening connection is checked


def connect_args(url: str) -> dict[str, Any]:
    """What asyncpg's `connect` is given for the database URL, as SQLAlchemy gives it to the engine's connections:
    each query parameter as the argument of that name (`ssl=require`). Given the URL itself, asyncpg reads it as a
    libpq DSN, where a parameter it does not know is sent to the server as a setting (the server refuses `ssl`), so
    one URL could not serve both."""
    _, args = asyncpg_dialect().create_connect_args(make_url(url))  # type: ignore[no-untyped-call]
    args.pop("prepared_statement_cache_size", None)  # SQLAlchemy's own
    return dict(args)


class Broadcast:
    def __init__(
        self,
        dsn: str,
        process_id: str,
        events: JobEvents,
        on_hook: Callable[[str, bytes | None, str], Awaitable[object]],
        now: Callable[[], float] = time.time,
    ) -> None:
        self.dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.process_id = process_id
        self.events = events
        self._on_hook = on_hook  # (provider, the call's body or None: read the task now, its upstream id)
        self._conn: asyncpg.Connection | None = None
        self._pending: list[str] = []
        self._flushing = False
        self._tasks: set[asyncio.Task[object]] = set()
        self._sending = asyncio.Lock()  # one statement at a time on the connection
        self._answered_at = 0.0  # (loop time) when a statement on it was last answered
        self._watch: asyncio.Task[None] | None = None
        self._now = now
        self._lock_key = presence.new_key()
        self.present = False  # whether this connection holds the process's presence lock

    async def start(self) -> None:
        await self._connect()
        self.events.listen(self._local)
        self._watch = asyncio.create_task(self._watch_connection(), name="broadcast:watch")

    async def _connect(self) -> None:
        # As long as a pool connection is waited for: one whose start goes unanswered (a path gone silent as it was
        # made) is given up on, and made again, not waited on for asyncpg's own minute.
        conn = await asyncpg.connect(**{"timeout": CONNECT_TIMEOUT_S, **connect_args(self.dsn)})
        try:
            async with asyncio.timeout(RECONNECT_S):  # a path gone silent just now: given up on, and made again
                await conn.add_listener(JOBS, self._heard_jobs)
                await conn.add_listener(HOOKS, self._heard_hook)
        except BaseException:  # failed, or the relay is stopping meanwhile: not handed over, so closed here
            conn.terminate()
            raise
        self._answered_at = asyncio.get_running_loop().time()
        self._conn = conn
        self.present = False
        await self._announce(conn)  # one that fails is tried again with the connection's next check

    async def _watch_connection(self) -> None:
        """A listening connection the server or the network dropped is made again; what was sent meanwhile is
        lost, and waiters fall back on reading the store after a quiet spell (`core.jobs.QUIET_S`)."""
        while True:
            await asyncio.sleep(RECONNECT_S)
            conn = self._conn
            if conn is not None and not conn.is_closed():
                if await self._answers(conn):
                    if not self.present:  # the lock was still held for the connection before this one
                        await self._announce(conn)
                    continue
                # Dead without being closed (a network path or a failed-over server that sends nothing back): no
                # notification comes through it, and none sent on it arrives. Dropped, and made again now.
                log.warning("the notification connection stopped answering")
                conn.terminate()
            try:
                await self._connect()
                log.warning("the notification connection was made again")
            except Exception:
                log.exception("the notification connection could not be made again")

    async def _announce(self, conn: asyncpg.Connection) -> None:
        """Take this process's presence lock on the connection and write its row (`store.presence`)."""
        if not await self._turn():
            return
        try:
            async with asyncio.timeout(RECONNECT_S):
                self.present = await presence.announce(conn, self.process_id, self._lock_key, self._now())
        except Exception:
            log.exception("this process's presence could not be written")
        finally:
            self._sending.release()

    async def _answers(self, conn: asyncpg.Connection) -> bool:
        """Whether the connection still answers (within RECONNECT_S, after the statements queued on it)."""
        if not await self._turn():
            return False
        try:
            async with asyncio.timeout(RECONNECT_S):
                await conn.execute(f'LISTEN "{JOBS}"')  # listening already: it changes nothing
            return True
        except Exception:
            return False
        finally:
            self._sending.release()

    async def _turn(self) -> bool:
        """The connection to send on, after the statements queued on it (held: release `_sending`); False when the
        statement being sent went unanswered for RECONNECT_S. A burst of sends it answers one by one is no silence."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(RECONNECT_S):
                    await self._sending.acquire()
                return True
            except TimeoutError:
                if loop.time() - self._answered_at >= RECONNECT_S:
                    return False

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def stop(self) -> None:
        if self._watch is not None:
            await cancel_all([self._watch])
            self._watch = None
        await let_finish(self._tasks, RECONNECT_S)  # a while: a send on a connection that died silently never ends
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=RECONNECT_S)  # a dead connection is aborted after that
            self._conn = None
        for task in list(self._tasks):  # a send still waiting failed with its connection
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- telling -------------------------------------------------------------------------------------------------

    def _local(self, change: JobEvent) -> None:
        if change.remote or self._conn is None:
            return
        self._pending.append(f"{change.job_id}:{change.state.value}:{change.progress}")
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush())

    async def _flush(self) -> None:
        """Send what piled up, in payloads that fit; changes made meanwhile go in the next."""
        try:
            while self._pending:
                items, self._pending = self._pending, []
                head = self.process_id + "|"
                batch: list[str] = []
                size = len(head)
                for item in items:
                    if batch and size + len(item) + 1 > MAX_PAYLOAD:
                        await self._notify(JOBS, head + ";".join(batch))
                        batch, size = [], len(head)
                    batch.append(item)
                    size += len(item) + 1
                if batch:
                    await self._notify(JOBS, head + ";".join(batch))
        finally:
            self._flushing = False

    async def forward_hook(self, owner: str, provider: str, upstream_id: str, body: bytes) -> None:
        """Hand an upstream hook call to the process that follows its job. The upstream id is the upstream's own
        text, which may hold a `|`: it goes percent-encoded. The body goes as the text of its JSON, in whichever
        encoding the call came (UTF-8 as good as always; UTF-16 or UTF-32, which the call's parser reads too, as
        bytes are full of NUL, which no notification carries), and arrives as UTF-8, which reads the same."""
        text = body.decode(json.detect_encoding(body), "replace")
        task = quote(upstream_id, safe="")
        payload = f"{owner}|{provider}|{task}|{text}"
        if len(payload.encode()) > MAX_PAYLOAD:
            payload = f"{owner}|{provider}|{task}|"  # too large to carry: the owner reads the task itself
        await self._notify(HOOKS, payload)

    async def _notify(self, channel: str, payload: str) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            return  # lost until the connection is made again (see `_watch_connection`)
        try:
            async with self._sending:
                await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
                self._answered_at = asyncio.get_running_loop().time()
        except Exception:
            log.exception("a notification was not sent", extra={"fields": {"channel": channel}})

    # -- hearing -------------------------------------------------------------------------------------------------

    def _heard_jobs(self, connection: object, pid: int, channel: str, payload: str) -> None:
        sender, _, body = payload.partition("|")
        if sender == self.process_id:
            return
        for item in body.split(";"):
            job_id, _, rest = item.partition(":")
            state, _, progress = rest.partition(":")
            try:
                change = JobEvent(job_id, JobState(state), int(progress), remote=True)
            except ValueError:
                continue
            self.events.publish(change)

    def _heard_hook(self, connection: object, pid: int, channel: str, payload: str) -> None:
        owner, provider, upstream_id, body = (payload.split("|", 3) + ["", "", ""])[:4]
        if owner != self.process_id or not provider:
            return
        self._spawn(self._on_hook(provider, body.encode() if body else None, unquote(upstream_id)))

    def _spawn(self, work: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
