"""Active probes of provider health, and the record of its changes (`core.health` decides; this module acts).

One loop probes each provider whose probe is due (`Health.probe_at`: every `probe_interval_s` while it is set
aside, every `heartbeat_s`, if set, while healthy) with its dialect's cheap call (`Upstream.probe`), each probe in a
task of its own so that a slow provider holds up no other, and ends cool-downs on time (cooling -> half-open).

Each change of a provider's health is written to the store (`store.health`) by one writer, in order, the latest per
provider, so other processes (`mj-relay providers`) can read it. At start, what an earlier run recorded is taken
up: a provider it set aside stays set aside (one it found down is probed at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from relay.clock import Clock
from relay.core.background import cancel_all
from relay.core.health import State, Transition
from relay.core.providers import ProviderPool
from relay.core.text import storable
from relay.store.health import HealthRecord, HealthStore

log = logging.getLogger("relay.health")


def process_name() -> str:
    """Which relay process wrote a row: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Prober:
    def __init__(self, *, pool: ProviderPool, store: HealthStore, clock: Clock, process: str | None = None) -> None:
        self.pool = pool
        self.store = store
        self.clock = clock
        self.process = process or process_name()
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        self._closing = False
        self._pending: dict[str, HealthRecord] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        pool.on_transition = self._changed

    async def start(self) -> None:
        await self.restore()
        self._closing = False
        self._loop_task = asyncio.create_task(self._loop(), name="health:probes")
        self._writer_task = asyncio.create_task(self._writer(), name="health:writer")

    async def stop(self) -> None:
        await cancel_all(t for t in (self._loop_task, *self._probes.values()) if t is not None)
        self._loop_task, self._probes = None, {}
        if self._writer_task is not None:
            self._closing = True
            self._dirty.set()
            with contextlib.suppress(Exception):
                await self._writer_task
            self._writer_task = None
        await self.flush()

    async def restore(self) -> None:
        """Take up the health an earlier run (or another process) recorded for the configured providers."""
        try:
            records = await self.store.all()
        except Exception:
            log.exception("reading the recorded provider health failed")
            return
        for name in self.pool.names:
            record = records.get(name)
            if record is None or record.state not in {state.value for state in State}:
                continue
            self.pool.restore(name, State(record.state), record.since, record.reason, record.cooling_until)

    # -- the record ----------------------------------------------------------------------------------------------

    def _changed(self, provider: str, transition: Transition) -> None:
        self._pending[provider] = HealthRecord(
            provider=provider,
            state=transition.new.value,
            since=transition.at,
            reason=storable(transition.reason) or "",
            process=self.process,
            updated_at=self.clock.now(),
            cooling_until=transition.until,
        )
        self._dirty.set()
        self._wake.set()  # a provider set aside is probed from now on

    async def flush(self) -> None:
        """Write the changes not yet written (the latest of each provider)."""
        while self._pending:
            pending, self._pending = self._pending, {}
            for record in pending.values():
                try:
                    await self.store.record(record)
                except Exception:
                    log.exception("recording provider health failed", extra={"fields": {"provider": record.provider}})

    async def _writer(self) -> None:
        while not self._closing:
            await self._dirty.wait()
            self._dirty.clear()
            await self.flush()

    # -- probes --------------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock.now()
            wake_at: float | None = None
            for name in self.pool.names:
                self.pool.advance(name, now)
                if name in self._probes:
                    continue  # its probe is under way; when it ends, the loop looks again
                health = self.pool.health[name]
                due = health.probe_at()
                if due is not None and due <= now:
                    self._probes[name] = asyncio.create_task(self._probe(name), name=f"health:probe:{name}")
                    continue
                at = health.wake_at()
                if at is not None:
                    wake_at = at if wake_at is None else min(wake_at, at)
            await self._sleep(wake_at)

    async def _sleep_until(self, at: float) -> None:
        # How long is measured when the wait begins, not when the loop looked: time that passed in between (a turn
        # of the loop, or a test moving its clock) is not waited for again.
        await self.clock.sleep(max(0.0, at - self.clock.now()))

    async def _probe(self, name: str) -> None:
        try:
            await self.pool.probe(name)
        finally:
            self._probes.pop(name, None)
            self._wake.set()

    async def _sleep(self, until: float | None) -> None:
        """Until the clock reads `until` (forever for None), or something asks the loop to look again."""
        waits: list[asyncio.Task[object]] = [asyncio.create_task(self._wake.wait())]
        if until is not None:
            waits.append(asyncio.create_task(self._sleep_until(until)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
