"""Client hooks: a task's `notifyHook` gets the task, in the relay's shape, each time it changes.

Each delivery is a POST of the task JSON, signed with the key's hook secret: the header `X-MJ-Relay-Signature`
is `sha256=` and the hex HMAC-SHA256 of the exact body bytes. A try that does not get a 2xx status within
`hooks.timeout_s` (all of it: the address check, connecting, sending, the status line; the answer's body is never
read) has failed; it is tried again after `hooks.backoff_s`, doubling, up to `hooks.attempts` tries in all; then
that update is given up and the next one goes on. One key's receivers use at most `hooks.max_concurrent_per_key`
of the `hooks.max_concurrent` deliveries under way, so a slow receiver cannot hold up another key's, and a key has
at most `hooks.max_watched_per_key` tasks with a hook under way at once. Deliveries of one task go
one at a time and in order; what is sent is the task as it is at that moment, so a receiver slower than the job
gets its newest state rather than a backlog, and the same state is never sent twice. A read of the job that
fails is made again (`READ_AGAIN_S`), so a database that stops answering for a while loses no end. Hooks run
beside the job and never hold it up. Hook URLs obey the same rules as reference images (`core.egress`): no
private or local addresses unless allowed, checked when the task is submitted and again at each delivery.

Hooks come from the process that holds the job: one whose watch outlived its hold (another process took the job
over or adopted it, and watches it now) stops at the job's next change, or before trying a failed delivery
again, sending nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from relay.clock import Clock
from relay.config import HooksConfig
from relay.core.background import let_finish
from relay.core.egress import Egress, EgressRefused, pinned_client
from relay.core.events import JobEvent, JobEvents
from relay.core.text import unstorable
from relay.errors import InvalidRequest
from relay.logs import event
from relay.metrics import Metrics
from relay.store.jobs import JobRow, JobStore

log = logging.getLogger("relay.hooks")

SIGNATURE_HEADER = "X-MJ-Relay-Signature"
MAX_URL = 2048
# A read of a watched job that failed (the database restarting, failing over) is made again after this long,
# doubling up to READ_AGAIN_MAX_S, for as long as the watch lives: the news it was to bring may be the job's end,
# and no later change of the job would bring that again.
READ_AGAIN_S = 1.0
READ_AGAIN_MAX_S = 30.0
# Renders a job as the task a client sees: (row, base URL for image links, now) -> JSON-able dict.
Render = Callable[[JobRow, str, float], dict[str, Any]]


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(slots=True)
class _Watch:
    url: str
    secret: str
    base_url: str
    key_id: str
    pending: asyncio.Event = field(default_factory=asyncio.Event)
    sent: tuple[str, int] | None = None  # the last (state, progress) delivered
    worker: asyncio.Task[None] | None = None
    ended: bool = False  # the job's end was heard of: its delivery is this process's alone
    stale: asyncio.Future[None] | None = None  # the delivery under way of a state that is not the job's end


class Notifier:
    def __init__(
        self,
        *,
        config: HooksConfig,
        egress: Egress,
        events: JobEvents,
        store: JobStore,
        metrics: Metrics,
        clock: Clock,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.egress = egress
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.render: Render | None = None  # set by the app: the native surface's task shape
        self._watches: dict[str, _Watch] = {}
        self._watched: dict[str, int] = {}  # key id -> tasks with a hook under way
        self._reserved: dict[str, int] = {}  # key id -> hooked tasks being admitted
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._key_slots: dict[str, asyncio.Semaphore] = {}
        self._client = pinned_client(config.timeout_s, transport)
        self._closing = False
        events.listen(self._changed)

    async def check(self, url: str | None, key_id: str) -> str | None:
        """A hook URL fit to call, or None when none was given; raises InvalidRequest naming `notifyHook`. The
        key's bound is looked at here too, so a refusal comes before the lookup; it is held to by `reserve`."""
        if url is None or not url.strip():
            return None
        self._room(key_id)
        url = url.strip()
        if len(url) > MAX_URL or unstorable(url):
            raise InvalidRequest(f"notifyHook must be a URL of at most {MAX_URL} characters.", param="notifyHook")
        try:
            await self.egress.pin(url, owner=key_id)
        except EgressRefused as exc:
            raise InvalidRequest(f"notifyHook is refused: {exc}.", param="notifyHook") from None
        return url

    def _room(self, key_id: str) -> None:
        if self._watched.get(key_id, 0) + self._reserved.get(key_id, 0) >= self.config.max_watched_per_key:
            raise InvalidRequest(
                f"This key already has {self.config.max_watched_per_key} tasks with a notifyHook under way.",
                param="notifyHook",
            )

    def reserve(self, key_id: str) -> None:
        """Take one of the key's places for a hooked task about to be admitted (raises InvalidRequest when none is
        left), until `watch(..., reserved=True)` takes it up or `release` gives it back: submissions that arrive
        together cannot all pass the bound, as they would between a check and their admission."""
        self._room(key_id)
        self._reserved[key_id] = self._reserved.get(key_id, 0) + 1

    def release(self, key_id: str) -> None:
        left = self._reserved.get(key_id, 0) - 1
        if left > 0:
            self._reserved[key_id] = left
        else:
            self._reserved.pop(key_id, None)

    def watch(self, job_id: str, url: str, secret: str, base_url: str, key_id: str, *, reserved: bool = False) -> None:
        """Deliver the job's changes to `url` from now until it ends (`reserved`: in the place `reserve` took)."""
        if reserved:
            self.release(key_id)
        if job_id not in self._watches:
            self._watches[job_id] = _Watch(url, secret, base_url, key_id)
            self._watched[key_id] = self._watched.get(key_id, 0) + 1

    def _unwatch(self, job_id: str) -> None:
        watch = self._watches.pop(job_id, None)
        if watch is not None:
            left = self._watched.get(watch.key_id, 1) - 1
            if left > 0:
                self._watched[watch.key_id] = left
            else:
                self._watched.pop(watch.key_id, None)
                self._key_slots.pop(watch.key_id, None)

    def watching(self) -> int:
        return len(self._watches)

    def _changed(self, change: JobEvent) -> None:
        watch = self._watches.get(change.job_id)
        if watch is None:
            return
        watch.pending.set()
        if change.state.terminal:
            watch.ended = True
        if watch.worker is None or watch.worker.done():
            watch.worker = asyncio.create_task(self._deliver_all(change.job_id, watch), name="client-hook")

    async def _deliver_all(self, job_id: str, watch: _Watch) -> None:
        """Deliver the job's current state while there is news, in order; stop once its end was delivered."""
        unread = 0
        try:
            while watch.pending.is_set():
                watch.pending.clear()
                try:
                    row = await self.store.get(job_id)
                except Exception:
                    _unread(job_id)
                    watch.pending.set()
                    await self.clock.sleep(min(READ_AGAIN_S * 2**unread, READ_AGAIN_MAX_S))
                    unread += 1
                    continue
                unread = 0
                if row is None or self._held_elsewhere(row):
                    break
                if (row.state.value, row.progress) != watch.sent:
                    if row.state.terminal:
                        await self._deliver(row, watch)
                    elif self._closing and watch.ended:  # read before the end came: the end goes next, at once
                        watch.pending.set()
                        continue
                    else:
                        await self._deliver_stale(row, watch)
                    watch.sent = (row.state.value, row.progress)
                if row.state.terminal:
                    break
            else:
                return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("client hook failed", extra={"fields": {"job": job_id}})
        self._unwatch(job_id)

    async def _deliver_stale(self, row: JobRow, watch: _Watch) -> None:
        """Deliver a state that is not the job's end, as one `close` may give up (`watch.stale`) once the end is
        heard: the end's tries are then let finish, and must not wait for this one's."""
        delivery = watch.stale = asyncio.ensure_future(self._deliver(row, watch))
        try:
            await delivery
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not delivery.cancelled() or (task is not None and task.cancelling()):
                raise  # the worker itself is cancelled
        finally:
            watch.stale = None

    def _held_elsewhere(self, row: JobRow) -> bool:
        """Whether another process holds the job (its live lease; once the job ended, its owner: the process that
        held it last, or whose pending sweep ended it): that one sends its hooks (it took the job over, or adopted
        it while this one stalled, and watches it), so this watch stops."""
        if row.state.terminal:
            return row.owner not in (None, self.store.owner)
        return row.held_elsewhere(self.store.owner, self.clock.now())

    async def _deliver(self, row: JobRow, watch: _Watch) -> None:
        assert self.render is not None, "the app sets how tasks are rendered"
        body = json.dumps(self.render(row, watch.base_url, self.clock.now())).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "mj-relay",
            SIGNATURE_HEADER: sign(watch.secret, body),
        }
        for attempt in range(1, self.config.attempts + 1):
            if attempt > 1:
                await self.clock.sleep(self.config.backoff_s * 2 ** (attempt - 2))
                try:
                    now_row = await self.store.get(row.id)
                except Exception:  # not known now: tried again all the same, as the job was held here when read
                    _unread(row.id)
                else:
                    if now_row is None or self._held_elsewhere(now_row):
                        return  # another process holds the job now and sends its newer states: this one is stale
            key_slots = self._key_slots.setdefault(watch.key_id, asyncio.Semaphore(self.config.max_concurrent_per_key))
            async with key_slots, self._slots:
                try:
                    async with asyncio.timeout(self.config.timeout_s):
                        problem = await self._post(watch.url, body, headers, watch.key_id)
                except TimeoutError:
                    problem = "no answer in time"
            if problem is None:
                self.metrics.client_hooks.labels("delivered").inc()
                return
            self.metrics.client_hooks.labels("retried" if attempt < self.config.attempts else "failed").inc()
            event(log, "client hook not delivered", job=row.id, attempt=attempt, problem=problem)

    async def _post(self, url: str, body: bytes, headers: dict[str, str], key_id: str) -> str | None:
        """None when the receiver took the delivery; else what went wrong."""
        try:
            pinned = await self.egress.pin(url, owner=key_id)
        except EgressRefused as exc:
            return f"refused: {exc}"
        try:
            async with self._client.stream(
                "POST", pinned.target, content=body, headers={**headers, **pinned.headers}, extensions=pinned.extensions
            ) as response:  # the status is the answer: the body is never read
                status = response.status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if 200 <= status < 300 else f"HTTP {status}"

    async def close(self) -> None:
        # Deliveries under way are let finish, for as long as one delivery's tries may take: no other process sends
        # the end of a job that ended here (none takes an ended job over), so one dropped here is never sent.
        # A running job's are not: the process that follows it next (or this one, restarted) sends its later states.
        # They are given up first, with the delivery of an ended job's earlier state still under way (a receiver
        # that does not answer it, or fails it): the places they hold or wait for (the key's, and the relay's) go
        # to the ends, which go at once and have all that time for their own tries, rather than what the running
        # jobs' tries, ahead of them in the queue for a place, leave of it.
        self._closing = True
        running = [w.worker for w in self._watches.values() if not w.ended and w.worker is not None]
        for worker in running:
            worker.cancel()
        for watch in self._watches.values():
            if watch.ended and watch.stale is not None:
                watch.stale.cancel()
        config = self.config
        tries_s = config.attempts * config.timeout_s + config.backoff_s * (2 ** (config.attempts - 1) - 1)
        await let_finish((w.worker for w in self._watches.values() if w.ended and w.worker is not None), tries_s + 1.0)
        workers = [w.worker for w in self._watches.values() if w.worker is not None]
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        await self._client.aclose()


def _unread(job_id: str) -> None:
    """Log a read of a watched job that failed (called where it was caught)."""
    log.warning("reading a job for its client hook failed", exc_info=True, extra={"fields": {"job": job_id}})
