"""The configured providers: one adapter each, how many jobs each is running, and timing of every upstream call."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from adapters import (
    HttpOptions,
    SubmitOutcome,
    SubmitRequest,
    TaskView,
    Upstream,
    UpstreamUnavailable,
    create_http_upstream,
)
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import Clock
from relay.config import Config, ProviderConfig
from relay.core.router import Candidate
from relay.metrics import Metrics

T = TypeVar("T")


def build_upstream(provider: ProviderConfig, config: Config, clock: Clock) -> Upstream:
    if provider.dialect == "simulator":
        sim = provider.simulator
        settings = (
            SimSettings(**{**sim.model_dump(), "banned_words": tuple(sim.banned_words)}) if sim else SimSettings()
        )
        return SimulatorUpstream(provider.name, SimEngine(settings, now=clock.now))
    assert provider.base_url is not None
    options = HttpOptions(
        base_url=provider.base_url,
        secret=provider.secret,
        connect_timeout_s=provider.connect_timeout_s,
        timeout_s=provider.timeout_s,
        max_connections=provider.max_connections,
        max_image_bytes=config.images.max_download_bytes,
        batch_size=provider.batch_size,
    )
    return create_http_upstream(
        provider.dialect,
        provider.name,
        options,
        mode_prefix=provider.mode_prefix,
        account_filter=provider.account_filter,
    )


class ProviderPool:
    def __init__(self, config: Config, metrics: Metrics, clock: Clock, upstreams: dict[str, Upstream] | None = None):
        self.config = config
        self.metrics = metrics
        self.settings = {p.name: p for p in config.providers}
        given = upstreams or {}
        self.upstreams = {p.name: given.get(p.name) or build_upstream(p, config, clock) for p in config.providers}
        self.in_flight = dict.fromkeys(self.settings, 0)
        for name in self.settings:
            metrics.in_flight.labels(name).set(0)

    @property
    def names(self) -> list[str]:
        return list(self.settings)

    def candidates(self) -> list[Candidate]:
        return [
            Candidate(
                name=p.name,
                modes=frozenset(p.modes),
                bots=frozenset(p.bots),
                priority=p.priority,
                weight=p.weight,
                in_flight=self.in_flight[p.name],
                max_in_flight=p.max_in_flight,
            )
            for p in self.settings.values()
        ]

    def acquire(self, name: str) -> None:
        self.in_flight[name] += 1
        self.metrics.in_flight.labels(name).inc()

    def release(self, name: str) -> None:
        if self.in_flight.get(name, 0) > 0:
            self.in_flight[name] -= 1
            self.metrics.in_flight.labels(name).dec()

    def poll_interval(self, name: str) -> float:
        return self.config.poll_interval(self.settings[name])

    # -- timed upstream calls ------------------------------------------------------------------------------------

    async def submit(self, name: str, request: SubmitRequest) -> SubmitOutcome:
        started = time.perf_counter()
        outcome = await self.upstreams[name].submit(request)
        self._observe(name, "submit", type(outcome).__name__.lower(), started)
        return outcome

    async def seed(self, name: str, upstream_id: str) -> str | None:
        return await self._read(name, "seed", self.upstreams[name].seed(upstream_id))

    async def fetch_many(self, name: str, upstream_ids: Sequence[str]) -> list[TaskView]:
        return await self._read(name, "fetch", self.upstreams[name].fetch_many(upstream_ids))

    async def download(self, name: str, url: str) -> bytes:
        return await self._read(name, "download", self.upstreams[name].download(url))

    async def _read(self, name: str, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await call
        except UpstreamUnavailable:
            self._observe(name, operation, "unavailable", started)
            raise
        self._observe(name, operation, "ok", started)
        return result

    def _observe(self, name: str, operation: str, outcome: str, started: float) -> None:
        self.metrics.upstream_seconds.labels(name, operation, outcome).observe(time.perf_counter() - started)

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()
