"""The simulator's `notifyHook` calls, as midjourney-proxy makes them: a POST of the whole task JSON to the URL a
submit named, each time the task changes (it starts running, each progress step, its end), once, unsigned, never
retried, the answer ignored. midjourney-proxy posts from a pool of threads (`notifyPoolSize`, 10) through Spring's
`RestTemplate` over the JDK's `HttpURLConnection`, which keeps connections to a host open and reuses them, and
sends a POST again once when a kept connection turns out closed before any answer; so does the simulator, with
`lanes` calls under way at once.

Each call made is timed (`timings`, the last `TIMINGS_KEPT`): how long it waited for a lane, and how long the
receiver took to answer it. A receiver slower to answer than calls come makes them queue for the lanes, as they
queue for midjourney-proxy's threads; `summary` gives those waits, which `GET /sim/stats?since=` reports.

Faults can be injected, to test a receiver that must be idempotent and order-tolerant and a relay that must fall
back on polling:

    drop        the share of calls never made
    duplicate   the share of calls made twice
    reorder     the share of calls held back by `reorder_s`, so they arrive after later ones
    delay_s     added to every call
    progress    whether progress steps are sent, or only the start and the end

Time is injected (`now`, `sleep`), as in the engine: tests move it by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from adapters.simulator.engine import SimEngine
from adapters.simulator.tasks import SimTask

Post = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HookSettings:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_s: float = 0.5
    delay_s: float = 0.0
    progress: bool = True
    timeout_s: float = 5.0
    lanes: int = 32  # calls under way at once (midjourney-proxy: `notifyPoolSize`, 10)
    seed: int | None = None


# How many calls' timings are kept (the newest).
TIMINGS_KEPT = 100_000


@dataclass(frozen=True, slots=True)
class CallTiming:
    at: float  # when the call was due (after any injected delay), by the engine's clock
    waited: float  # seconds it waited for a lane
    took: float  # seconds from its start to its answer (or its failure)
    ending: bool  # the call says its task ended (SUCCESS or FAILURE)


def summary(timings: Iterable[CallTiming], since: float) -> dict[str, Any]:
    """The calls due at `since` or later: how many, and the p50 and p99 of their waits for a lane and of the
    receiver's answers (ms); the waits of the calls that end a task apart, as a job's lateness waits on them."""
    chosen = [timing for timing in timings if timing.at >= since]

    def marks(values: list[float]) -> list[float]:
        if not values:
            return []
        ordered = sorted(values)
        return [
            round(ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] * 1000, 1) for share in (0.5, 0.99)
        ]

    return {
        "calls": len(chosen),
        "wait_ms": marks([timing.waited for timing in chosen]),
        "answer_ms": marks([timing.took for timing in chosen]),
        "ending_wait_ms": marks([timing.waited for timing in chosen if timing.ending]),
    }


class _NoAnswer(Exception):
    """The connection was closed before any answer came."""


class HookSender:
    def __init__(
        self,
        engine: SimEngine,
        settings: HookSettings,
        image_base: str,
        *,
        post: Post | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.image_base = image_base
        self._sleep = sleep
        self._rng = random.Random(settings.seed)
        self._post = post or self._http_post
        self._tasks: set[asyncio.Task[None]] = set()
        self._lanes = asyncio.Semaphore(settings.lanes)
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self.sent = 0  # calls made (duplicates counted twice, drops not)
        # Changes called (a duplicated one once, a dropped one not), and of them the tasks' endings: a follower woken
        # late (a busy loop) calls only the change it sees then, so how many a task gets is counted, not assumed.
        self.changes = 0
        self.endings = 0
        self.timings: deque[CallTiming] = deque(maxlen=TIMINGS_KEPT)
        engine.watchers.append(self.watch)

    def watch(self, task: SimTask) -> None:
        """Follow a task whose timeline just started; its changes are called to its hook. Called by the engine
        from within a running event loop (a submit or a confirmation being answered)."""
        if not task.notify_hook:
            return
        self._spawn(self._follow(task.id, task.notify_hook, task.changes(self.settings.progress)))

    def _spawn(self, work: Awaitable[None]) -> None:
        job = asyncio.ensure_future(work)
        self._tasks.add(job)
        job.add_done_callback(self._tasks.discard)

    async def _follow(self, task_id: str, url: str, moments: list[float]) -> None:
        sent: tuple[object, object] | None = None
        for moment in moments:
            # A timer may fire a little before the wall clock the engine reads reaches its time: the view taken
            # then would not show the change yet (an "end" call still saying IN_PROGRESS, and no call after it).
            while (wait := moment - self.engine.now()) > 0:
                await self._sleep(wait)
            view = self.engine.task(task_id, self.image_base)
            if view is None:  # forgotten (sim:lose)
                return
            # Woken late (a busy loop, a task quicker than its steps), it may see a change already called, or the
            # end: each status and progress is called once, as midjourney-proxy does.
            if (view["status"], view["progress"]) == sent:
                continue
            sent = (view["status"], view["progress"])
            ending = view["status"] in ("SUCCESS", "FAILURE")
            self._send(url, json.dumps(view).encode(), ending)
            if ending:
                return

    def _send(self, url: str, body: bytes, ending: bool) -> None:
        draw = self._rng.random
        if draw() < self.settings.drop:
            return
        self.changes += 1
        self.endings += ending
        copies = 2 if draw() < self.settings.duplicate else 1
        held = self.settings.reorder_s if draw() < self.settings.reorder else 0.0
        for _ in range(copies):
            self._spawn(self._call(url, body, self.settings.delay_s + held, ending))

    async def _call(self, url: str, body: bytes, after: float, ending: bool) -> None:
        if after > 0:
            await self._sleep(after)
        self.sent += 1
        due = self.engine.now()
        async with self._lanes:
            started = self.engine.now()
            with contextlib.suppress(Exception):  # once, no retry, whatever the receiver says
                await self._post(url, body)
            self.timings.append(CallTiming(due, started - due, self.engine.now() - started, ending))

    async def _http_post(self, url: str, body: bytes) -> None:
        """One HTTP/1.1 POST on a kept connection to the receiver (or a new one), its answer read and ignored."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            return  # the simulator calls plain-HTTP receivers only
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        where = (parts.hostname, parts.port or 80)
        async with asyncio.timeout(self.settings.timeout_s):
            kept = self._idle.get(where)
            if kept:
                reader, writer = kept.pop()
                try:
                    await self._exchange(where, reader, writer, request)
                    return
                except _NoAnswer:  # closed by the receiver while kept: made again once, as the JDK does
                    pass
            reader, writer = await asyncio.open_connection(*where)
            await self._exchange(where, reader, writer, request)

    async def _exchange(
        self, where: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> None:
        """Send the request and read the answer; the connection is kept for the next call when the answer allows."""
        keep = done = False
        try:
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            if not status:
                raise _NoAnswer
            length, keep = 0, not status.startswith(b"HTTP/1.0")
            while (line := await reader.readline()) not in (b"\r\n", b""):
                field, _, value = line.decode("latin-1").partition(":")
                name = field.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and "close" in value.lower():
                    keep = False
                elif name == "transfer-encoding":
                    keep = False  # a body in chunks is not read here: the connection is not used again
            await reader.readexactly(length)
            done = True
        except ConnectionError:
            raise _NoAnswer from None
        finally:  # kept only once its answer was read whole (not after a timeout or a cut)
            if keep and done:
                self._idle.setdefault(where, []).append((reader, writer))
            else:
                writer.close()

    async def aclose(self) -> None:
        for job in list(self._tasks):
            job.cancel()
        for job in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job
        for kept in self._idle.values():
            for _, writer in kept:
                writer.close()
        self._idle.clear()
