"""Relay processes on one PostgreSQL database tell each other what happened, with LISTEN/NOTIFY.

    mj_relay_jobs    every change a process writes (a job's state and progress), so that a waiter in another
                     process (a client's retry that came in there) learns of an ending at once; sent in batches
    mj_relay_hooks   an upstream hook call that came in to a process that does not follow its job, forwarded to
                     the one that does (the task JSON as it came, when it fits in a notification; else that
                     process reads the task now)

Each payload starts with the sending process's id; a process ignores its own. On SQLite there is one process and
nothing to tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from relay.core.events import JobEvent, JobEvents
from relay.domain import JobState

log = logging.getLogger("relay.broadcast")

JOBS = "mj_relay_jobs"
HOOKS = "mj_relay_hooks"
MAX_PAYLOAD = 7800  # PostgreSQL takes up to 8000 bytes


class Broadcast:
    def __init__(
        self,
        dsn: str,
        process_id: str,
        events: JobEvents,
        on_hook: Callable[[str, bytes | None, str], Awaitable[object]],
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

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self.dsn)
        await self._conn.add_listener(JOBS, self._heard_jobs)
        await self._conn.add_listener(HOOKS, self._heard_hook)
        self.events.listen(self._local)

    async def stop(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

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
        """Hand an upstream hook call to the process that follows its job."""
        text = body.decode("utf-8", "replace")
        payload = f"{owner}|{provider}|{upstream_id}|{text}"
        if len(payload.encode()) > MAX_PAYLOAD:
            payload = f"{owner}|{provider}|{upstream_id}|"  # too large to carry: the owner reads the task itself
        await self._notify(HOOKS, payload)

    async def _notify(self, channel: str, payload: str) -> None:
        if self._conn is None:
            return
        try:
            async with self._sending:
                await self._conn.execute("SELECT pg_notify($1, $2)", channel, payload)
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
        self._spawn(self._on_hook(provider, body.encode() if body else None, upstream_id))

    def _spawn(self, work: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
