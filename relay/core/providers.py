"""The configured providers: one adapter each, how many jobs each is running, their health, and timing of every
upstream call.

Every upstream call goes through the pool, so the pool feeds each provider's health (`core.health`) with what the
answers say: a submit's outcome, a status read, seed or download that failed or worked, a probe. A change of health
is counted in the metrics, logged, and handed to `on_transition` (the prober writes it down). A provider that is
`down` is not sent submits at all: a follow-up pinned to it gets `Retryable` without a call. One that is cooling
still gets the follow-ups of jobs it ran (no other provider can run them); new jobs are routed around both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from adapters import (
    HttpOptions,
    Listed,
    Retryable,
    SubmitOutcome,
    SubmitRequest,
    TaskView,
    Upstream,
    UpstreamUnavailable,
    create_http_upstream,
)
from adapters.h1 import HttpFailure, Pin
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import Clock
from relay.config import Config, ProviderConfig
from relay.core.egress import LOOKUP_THREADS, Egress, EgressRefused
from relay.core.health import STATES, Health, Signal, State, Transition, submit_signal
from relay.core.router import Candidate, can_run
from relay.logs import event
from relay.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger("relay.health")

# What a follow-up pinned to a provider that is down is answered with (no call is made); clients may see it.
DOWN_REASON = "the provider that ran the parent task is down"


def download_egress(config: Config) -> Egress:
    """The rules for downloading finished images from hosts other than their provider's own: the upstream names
    the URL, so only public addresses, or the hosts `images.download_hosts` lists. One provider's downloads may
    take every lookup thread (they are the provider's, not a client's)."""
    return Egress(False, config.images.download_hosts, lookups_per_owner=LOOKUP_THREADS)


def download_pin(egress: Egress, provider: str) -> Pin:
    """Where a provider's image downloads may connect (see `HttpOptions.download_pin`): the address `egress`
    checked, or a refusal the download fails with."""

    async def pin(host: str, port: int) -> str:
        try:
            return await egress.address(host, port, owner=provider)
        except EgressRefused as exc:
            raise HttpFailure(f"the image URL was refused: {exc}", sent=False) from None

    return pin


def build_upstream(provider: ProviderConfig, config: Config, clock: Clock, egress: Egress | None = None) -> Upstream:
    """The adapter of a provider; its image downloads to other hosts than its own obey `egress` (by default
    `download_egress(config)`)."""
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
        download_pin=download_pin(egress or download_egress(config), provider.name),
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
        egress = download_egress(config)
        self.upstreams = {
            p.name: given.get(p.name) or build_upstream(p, config, clock, egress) for p in config.providers
        }
        self.in_flight = dict.fromkeys(self.settings, 0)
        # Jobs other relay processes on the same database run on each provider (refreshed by core.coordination):
        # `max_in_flight` counts them too.
        self.elsewhere = dict.fromkeys(self.settings, 0)
        for name in self.settings:
            metrics.in_flight.labels(name).set(0)
        self.clock = clock
        self.health = {p.name: Health(config.health_of(p), clock.now()) for p in config.providers}
        for name in self.settings:
            self._show(name)
        # Called with each change of a provider's health (the prober records it).
        self.on_transition: Callable[[str, Transition], None] = lambda provider, transition: None

    @property
    def names(self) -> list[str]:
        return list(self.settings)

    def carries_mode(self, name: str) -> bool:
        """Whether the provider runs a submit in the mode sent (else a button runs in its parent's mode)."""
        return self.upstreams[name].carries_mode

    def runs(self, mode: str, bot: str, *, prompt_less: bool = False) -> bool:
        """Whether any provider runs a task of `mode` and `bot` in that mode, whatever its health (`can_run`)."""
        return any(
            can_run(p.modes, p.bots, self.carries_mode(p.name), mode=mode, bot=bot, prompt_less=prompt_less)
            for p in self.settings.values()
        )

    def candidates(self) -> list[Candidate]:
        now = self.clock.now()
        for name in self.settings:
            self.advance(name, now)
        return [
            Candidate(
                name=p.name,
                modes=frozenset(p.modes),
                bots=frozenset(p.bots),
                priority=p.priority,
                weight=p.weight,
                in_flight=self.in_flight[p.name] + self.elsewhere[p.name],
                max_in_flight=p.max_in_flight,
                available=self.health[p.name].routable(),
                carries_mode=self.carries_mode(p.name),
            )
            for p in self.settings.values()
        ]

    def acquire(self, name: str) -> None:
        self.in_flight[name] += 1
        self.metrics.of(self.metrics.in_flight, name).inc()

    def release(self, name: str) -> None:
        if self.in_flight.get(name, 0) > 0:
            self.in_flight[name] -= 1
            self.metrics.of(self.metrics.in_flight, name).dec()

    def poll_interval(self, name: str) -> float:
        return self.config.poll_interval(self.settings[name])

    # -- timed upstream calls ------------------------------------------------------------------------------------

    async def submit(self, name: str, request: SubmitRequest, *, trial: bool = False) -> SubmitOutcome:
        """One submit to a provider. `trial`: the caller took the provider's half-open trial already (with its
        slot, `Health.begin_submit`); else this call takes it when it is free. Only the call that holds the trial
        gives it back when it ends without an answer: another one (a follow-up pinned here while the trial is under
        way) leaves it to the trial's own answer, and no new job is routed here meanwhile."""
        health = self.health[name]
        self.advance(name, self.clock.now())
        if health.state is State.DOWN:
            return Retryable(DOWN_REASON, sent=False)
        trial = health.begin_submit() or trial
        started = time.perf_counter()
        try:
            outcome = await self.upstreams[name].submit(request)
        except BaseException:
            if trial:
                health.abandon_submit()
            raise
        if isinstance(outcome, Retryable) and outcome.withheld:  # the provider saw nothing: it says nothing of it
            if trial:
                health.abandon_submit()
            return outcome
        self._observe(name, "submit", type(outcome).__name__.lower(), started)
        signal, reason = submit_signal(outcome)
        self._apply(name, health.observe(signal, self.clock.now(), reason, submit=True))
        return outcome

    async def probe(self, name: str) -> bool:
        """One active probe of a provider (`Upstream.probe`); its result moves the provider's health."""
        started = time.perf_counter()
        try:
            ok = await self.upstreams[name].probe()
        except UpstreamUnavailable:
            ok = False
        except Exception:  # a bug in an adapter: the probe proved nothing
            log.exception("probe failed", extra={"fields": {"provider": name}})
            ok = False
        self._observe(name, "probe", "ok" if ok else "failed", started)
        self._apply(name, self.health[name].probed(ok, self.clock.now()))
        return ok

    async def seed(self, name: str, upstream_id: str) -> str | None:
        return await self._read(name, "seed", self.upstreams[name].seed(upstream_id))

    async def fetch_many(self, name: str, upstream_ids: Sequence[str]) -> list[TaskView]:
        return await self._read(name, "fetch", self.upstreams[name].fetch_many(upstream_ids))

    async def download(self, name: str, url: str) -> bytes:
        return await self._read(name, "download", self.upstreams[name].download(url))

    async def list_tasks(self, name: str) -> Listed | None:
        """The provider's list of its tasks (`Upstream.list_tasks`), for jobs left maybe sent. Not a sign of the
        provider's health either way: the list is read only after a process died, and one too large to read says
        nothing of the provider's submits and reads."""
        return await self._read(name, "list", self.upstreams[name].list_tasks(), health=False)

    async def _read(self, name: str, operation: str, call: Awaitable[T], *, health: bool = True) -> T:
        """One read, timed; its outcome moves the provider's health unless `health` is False."""
        started = time.perf_counter()
        try:
            result = await call
        except UpstreamUnavailable as exc:
            self._observe(name, operation, "unavailable", started)
            if health:
                self._apply(name, self.health[name].observe(Signal.ERROR, self.clock.now(), f"{operation}: {exc}"))
            raise
        self._observe(name, operation, "ok", started)
        if health:
            self._apply(name, self.health[name].observe(Signal.OK, self.clock.now()))
        return result

    def _observe(self, name: str, operation: str, outcome: str, started: float) -> None:
        self.metrics.of(self.metrics.upstream_seconds, name, operation, outcome).observe(time.perf_counter() - started)

    # -- health --------------------------------------------------------------------------------------------------

    def advance(self, name: str, now: float) -> None:
        """Let time move a provider's health (a cool-down that is over)."""
        self._apply(name, self.health[name].advance(now))

    def restore(self, name: str, state: State, since: float, reason: str, until: float | None) -> None:
        """Take up the health another run recorded for a provider (see `Health.restore`)."""
        self.health[name].restore(state, since, reason, until)
        self._show(name)

    def _apply(self, name: str, transitions: list[Transition]) -> None:
        for transition in transitions:
            self.metrics.provider_transitions.labels(name, transition.new.value).inc()
            event(
                log,
                "provider health changed",
                provider=name,
                state=transition.new.value,
                previous=transition.old.value,
                until=transition.until,
                reason=transition.reason,
            )
            self.on_transition(name, transition)
        if transitions:
            self._show(name)

    def _show(self, name: str) -> None:
        current = self.health[name].state
        for state in STATES:
            self.metrics.provider_health.labels(name, state.value).set(1 if state is current else 0)

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()
