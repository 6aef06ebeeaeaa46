"""Provider health in the relay, with the clock moved by hand: the pool feeds each answer to the state machine and
routes around what it sets aside; the prober probes, ends cool-downs and records each change in a real SQLite
store (and PostgreSQL when one is configured)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adapters import (
    WITHHELD,
    Accepted,
    Bot,
    ClientError,
    Listed,
    Mode,
    ProviderUnusable,
    Retryable,
    SubmitOutcome,
    SubmitRequest,
    TaskView,
    UploadOutcome,
    UpstreamUnavailable,
)
from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.config import Config
from relay.core.health import State, Transition
from relay.core.jobs import ImageSpec
from relay.core.prober import Prober
from relay.core.providers import DOWN_REASON, ProviderPool
from relay.errors import JobFailed
from relay.metrics import Metrics
from relay.services import Relay
from relay.store.db import Database
from relay.store.health import HealthRecord, HealthStore
from relay.store.keys import KeyRecord
from tests.helpers import FakeClock, pg_database, relay_config

pytestmark = pytest.mark.anyio

REQUEST = SubmitRequest(kind="imagine", prompt="a heron --fast")


@dataclass
class Scripted:
    """An upstream whose answers the test sets: submits, status reads, downloads and probes."""

    name: str
    outcome: SubmitOutcome = Accepted("1")
    readable: bool = True
    probe_ok: bool = True
    submits: int = 0
    probes: int = 0
    gate: asyncio.Event | None = None  # a submit waits for it when set
    raises: bool = False
    carries_mode: bool = True

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        self.submits += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.raises:
            raise RuntimeError("a bug")
        return self.outcome

    async def upload(self, images: Sequence[str], mode: Mode, bot: Bot) -> UploadOutcome:
        raise NotImplementedError

    async def seed(self, upstream_id: str) -> str | None:
        return None

    def parse_hook(self, body: bytes) -> TaskView | None:
        return None

    async def fetch(self, upstream_id: str) -> TaskView | None:
        return None

    async def fetch_many(self, upstream_ids: Sequence[str]) -> list[TaskView]:
        if not self.readable:
            raise UpstreamUnavailable("POST answered HTTP 502")
        return []

    async def list_tasks(self) -> Listed | None:
        return None

    async def download(self, url: str) -> bytes:
        if not self.readable:
            raise UpstreamUnavailable("image download answered HTTP 404")
        return b"png"

    async def probe(self) -> bool:
        self.probes += 1
        return self.probe_ok

    async def aclose(self) -> None:
        return None


@dataclass
class World:
    config: Config
    clock: FakeClock
    pool: ProviderPool
    metrics: Metrics
    up: dict[str, Scripted]
    seen: list[tuple[str, Transition]] = field(default_factory=list)

    def routable(self) -> list[str]:
        return sorted(c.name for c in self.pool.candidates() if c.available)

    def gauge(self, provider: str, state: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "mj_relay_provider_health", {"provider": provider, "state": state}
        )

    def moved(self, provider: str, state: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "mj_relay_provider_health_transitions_total", {"provider": provider, "state": state}
        )


def make_world(tmp_path: Path, **health: Any) -> World:
    providers = [{"name": name, "dialect": "simulator"} for name in ("a", "b")]
    config = relay_config(
        tmp_path, providers=providers, health={"cooldown_s": 30, "probe_interval_s": 10, "errors_to_cool": 3, **health}
    )
    clock, metrics = FakeClock(), Metrics()
    up = {name: Scripted(name) for name in ("a", "b")}
    pool = ProviderPool(config, metrics, clock, dict(up))
    world = World(config, clock, pool, metrics, up)
    pool.on_transition = lambda provider, transition: world.seen.append((provider, transition))
    return world


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop run (probe and writer tasks, database I/O) until `condition` holds; the clock does not
    move meanwhile."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition did not hold")


class Recording(HealthStore):
    """The real store, noting each write."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.written: list[tuple[str, str]] = []

    async def record(self, record: HealthRecord) -> None:
        await super().record(record)
        self.written.append((record.provider, record.state))


async def test_an_unusable_answer_sets_the_provider_aside_in_routing_and_metrics(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    assert world.routable() == ["a", "b"] and world.gauge("a", "healthy") == 1 and world.gauge("a", "down") == 0
    world.up["a"].outcome = ProviderUnusable("upstream refused the credentials (HTTP 401)")
    assert await world.pool.submit("a", REQUEST) == world.up["a"].outcome
    assert world.routable() == ["b"]
    assert [(p, t.new, t.reason) for p, t in world.seen] == [
        ("a", State.COOLING, "upstream refused the credentials (HTTP 401)")
    ]
    assert (world.gauge("a", "cooling"), world.gauge("a", "healthy"), world.moved("a", "cooling")) == (1, 0, 1)
    assert world.gauge("b", "healthy") == 1


async def test_accepted_and_refused_requests_are_the_provider_working(tmp_path: Path) -> None:
    world = make_world(tmp_path, errors_to_cool=2)
    world.up["a"].outcome = Retryable("cannot connect: ConnectError")
    await world.pool.submit("a", REQUEST)
    for outcome in (Accepted("1"), ClientError("banned prompt", banned=True)):
        world.up["a"].outcome = outcome
        await world.pool.submit("a", REQUEST)
        world.up["a"].outcome = Retryable("HTTP 503")
        await world.pool.submit("a", REQUEST)  # one error after a success: never two in a row
    assert world.routable() == ["a", "b"] and world.seen == []
    await world.pool.submit("a", REQUEST)
    assert world.routable() == ["b"]


async def test_failed_status_reads_and_downloads_count_as_errors(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.up["a"].readable = False
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable):
            await world.pool.fetch_many("a", ["1"])
    assert world.routable() == ["a", "b"]
    with pytest.raises(UpstreamUnavailable):
        await world.pool.download("a", "http://cdn/x.png")
    assert world.routable() == ["b"]
    ((_, moved),) = world.seen
    assert moved.reason == "3 read errors in a row, the last: download: image download answered HTTP 404"


async def test_a_half_open_provider_takes_one_trial_at_a_time_and_recovers_by_it(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    a = world.up["a"]
    a.outcome = ProviderUnusable("no balance")
    await world.pool.submit("a", REQUEST)
    world.clock.advance(29)
    assert world.routable() == ["b"]
    world.clock.advance(1)
    assert world.routable() == ["a", "b"] and world.gauge("a", "half-open") == 1
    a.outcome, a.gate = Accepted("2"), asyncio.Event()
    trial = asyncio.create_task(world.pool.submit("a", REQUEST))
    await until(lambda: a.submits == 2)
    assert world.routable() == ["b"]  # the trial is under way: no second job meanwhile
    await world.pool.fetch_many("a", ["1"])  # a status read that works decides nothing
    assert world.pool.health["a"].state is State.HALF_OPEN
    a.gate.set()
    assert await trial == Accepted("2")
    assert world.routable() == ["a", "b"] and world.gauge("a", "healthy") == 1
    assert [t.new for _, t in world.seen] == [State.COOLING, State.HALF_OPEN, State.HEALTHY]


async def test_a_trial_that_raises_lets_the_next_one_through(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.up["a"].outcome = ProviderUnusable("no balance")
    await world.pool.submit("a", REQUEST)
    world.clock.advance(30)
    world.up["a"].raises = True
    with pytest.raises(RuntimeError):
        await world.pool.submit("a", REQUEST)
    assert world.routable() == ["a", "b"]


async def test_only_the_submit_holding_the_trial_gives_it_back_when_it_ends_unanswered(tmp_path: Path) -> None:
    """A half-open provider's trial is under way when a follow-up pinned to it is sent too (no other provider can
    run it): that call did not take the trial, and when it ends without an answer (a bug, or cancelled) the trial
    is still under way, so no new job is routed there meanwhile."""
    world = make_world(tmp_path)
    a = world.up["a"]
    a.outcome = ProviderUnusable("no balance")
    await world.pool.submit("a", REQUEST)
    world.clock.advance(30)
    assert world.routable() == ["a", "b"]
    gate = asyncio.Event()
    a.outcome, a.gate = Accepted("2"), gate
    trial = asyncio.create_task(world.pool.submit("a", REQUEST))
    await until(lambda: a.submits == 2)
    a.gate, a.raises = None, True  # the follow-up meets a bug in the adapter
    with pytest.raises(RuntimeError):
        await world.pool.submit("a", REQUEST)
    assert world.routable() == ["b"]  # the trial is still under way
    a.raises = False
    gate.set()
    assert await trial == Accepted("2")
    assert world.routable() == ["a", "b"] and world.pool.health["a"].state is State.HEALTHY


async def test_a_follow_up_still_reaches_a_cooling_provider_but_never_a_down_one(tmp_path: Path) -> None:
    world = make_world(tmp_path, probes_to_down=1)
    a = world.up["a"]
    a.outcome = ProviderUnusable("no balance")
    await world.pool.submit("a", REQUEST)
    a.outcome = Accepted("7")
    assert await world.pool.submit("a", REQUEST) == Accepted("7") and a.submits == 2
    assert world.pool.health["a"].state is State.COOLING  # a pinned follow-up is no trial
    a.probe_ok = False
    await world.pool.probe("a")
    assert world.pool.health["a"].state is State.DOWN and world.gauge("a", "down") == 1
    assert await world.pool.submit("a", REQUEST) == Retryable(DOWN_REASON, sent=False)
    assert a.submits == 2


# -- the prober ----------------------------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Recording]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'health.db'}")
    await db.migrate()
    yield Recording(db.engine)
    await db.dispose()


async def test_probes_take_a_provider_down_and_bring_it_back_and_every_change_is_recorded(
    tmp_path: Path, store: Recording
) -> None:
    world = make_world(tmp_path, probes_to_down=2)
    prober = Prober(pool=world.pool, store=store, clock=world.clock, process="test-host:1")
    await prober.start()
    try:
        a, clock = world.up["a"], world.clock
        clock.advance(100)
        a.outcome, a.probe_ok = Retryable("cannot connect: ConnectError"), False
        for _ in range(3):
            await world.pool.submit("a", REQUEST)
        assert world.pool.health["a"].state is State.COOLING and a.probes == 0  # healthy: never probed
        await until(lambda: store.written == [("a", "cooling")])
        clock.advance(10)
        await until(lambda: a.probes == 1)
        clock.advance(10)
        await until(lambda: store.written[-1] == ("a", "down"))
        assert world.pool.health["a"].state is State.DOWN and world.routable() == ["b"]
        a.probe_ok = True
        clock.advance(10)
        await until(lambda: store.written[-1] == ("a", "half-open"))
        assert world.routable() == ["a", "b"] and a.probes == 3 and world.up["b"].probes == 0
    finally:
        await prober.stop()
    assert store.written == [("a", "cooling"), ("a", "down"), ("a", "half-open")]
    record = (await store.all())["a"]
    assert (record.state, record.reason, record.process) == ("half-open", "a probe answered", "test-host:1")
    assert record.since == world.clock.now() and record.cooling_until is None


async def test_a_cooldown_ends_on_time_without_any_traffic(tmp_path: Path, store: Recording) -> None:
    world = make_world(tmp_path, probe_interval_s=1000)
    prober = Prober(pool=world.pool, store=store, clock=world.clock)
    await prober.start()
    try:
        world.up["a"].outcome = ProviderUnusable("HTTP 401")
        await world.pool.submit("a", REQUEST)
        world.clock.advance(29.5)
        await until(lambda: store.written == [("a", "cooling")])
        assert world.pool.health["a"].state is State.COOLING
        world.clock.advance(0.5)
        await until(lambda: world.pool.health["a"].state is State.HALF_OPEN)
        assert world.gauge("a", "half-open") == 1 and world.up["a"].probes == 0
    finally:
        await prober.stop()
    assert (await store.all())["a"].state == "half-open"


async def test_healthy_providers_get_a_heartbeat_when_configured(tmp_path: Path, store: Recording) -> None:
    world = make_world(tmp_path, heartbeat_s=60, probes_to_down=2)
    prober = Prober(pool=world.pool, store=store, clock=world.clock)
    await prober.start()
    try:
        world.up["b"].probe_ok = False
        world.clock.advance(60)
        await until(lambda: world.up["a"].probes == 1 and world.up["b"].probes == 1)
        world.clock.advance(60)
        await until(lambda: world.pool.health["b"].state is State.DOWN)
        assert world.pool.health["a"].state is State.HEALTHY and world.routable() == ["a"]
    finally:
        await prober.stop()
    assert set(await store.all()) == {"b"}


async def test_a_heartbeat_that_falls_due_as_the_prober_goes_to_sleep_is_kept(
    tmp_path: Path, store: Recording, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock reaches the next heartbeat between the prober's look at its providers and the start of its wait:
    the wait, due already, ends at once and the providers are probed."""
    world = make_world(tmp_path, heartbeat_s=60, probes_to_down=2)
    prober = Prober(pool=world.pool, store=store, clock=world.clock)
    sleep_until = prober._sleep_until
    moved: list[float] = []

    async def late(at: float) -> None:
        if world.up["b"].probes == 1 and not moved:  # the first heartbeat done: the next is looked at
            moved.append(at)
            world.clock.advance(at - world.clock.now())
        await sleep_until(at)

    monkeypatch.setattr(prober, "_sleep_until", late)
    await prober.start()
    try:
        world.up["b"].probe_ok = False
        world.clock.advance(60)
        await until(lambda: world.pool.health["b"].state is State.DOWN)
        assert moved and world.up["a"].probes == 2
    finally:
        await prober.stop()


async def test_a_recorded_state_is_taken_up_at_start_and_a_down_provider_probed_at_once(
    tmp_path: Path, store: Recording
) -> None:
    world = make_world(tmp_path)
    now = world.clock.now()
    await store.record(HealthRecord("a", "down", now - 500, "3 probes in a row failed", "other:9", now - 500))
    await store.record(HealthRecord("b", "cooling", now - 5, "HTTP 401", "other:9", now - 5, now + 25))
    await store.record(HealthRecord("gone", "down", now - 5, "no longer configured", "other:9", now - 5))
    prober = Prober(pool=world.pool, store=store, clock=world.clock)
    await prober.start()
    try:
        assert world.pool.health["b"].state is State.COOLING and world.gauge("b", "cooling") == 1
        await until(lambda: world.up["a"].probes == 1)
        await until(lambda: world.pool.health["a"].state is State.HALF_OPEN)
        assert world.routable() == ["a"]
    finally:
        await prober.stop()


async def test_a_write_older_than_the_row_does_not_step_it_back(store: Recording) -> None:
    await store.record(HealthRecord("a", "down", 20.0, "3 probes in a row failed", "p:1", 20.0))
    await store.record(HealthRecord("a", "cooling", 10.0, "HTTP 401", "p:2", 21.0, 40.0))
    assert (await store.all())["a"].state == "down"
    await store.record(HealthRecord("a", "half-open", 30.0, "a probe answered", "p:2", 30.0))
    record = (await store.all())["a"]
    assert (record.state, record.since, record.process, record.cooling_until) == ("half-open", 30.0, "p:2", None)


@pytest.mark.postgres
async def test_the_record_works_on_postgresql() -> None:
    async with pg_database() as url:
        db = Database(url, pool_size=2)
        try:
            await db.migrate()
            store = HealthStore(db.engine)
            await store.record(HealthRecord("a", "cooling", 10.0, "HTTP 401", "p:1", 10.0, 40.0))
            await store.record(HealthRecord("a", "healthy", 5.0, "late", "p:2", 50.0))
            await store.record(HealthRecord("b", "down", 12.0, "3 probes in a row failed", "p:2", 12.0))
            got = await store.all()
            assert (got["a"].state, got["a"].cooling_until, got["b"].state) == ("cooling", 40.0, "down")
        finally:
            await db.dispose()


class Gated(SimulatorUpstream):
    """The simulator, with submits held at a gate; counts the submits that arrived."""

    def __init__(self) -> None:
        super().__init__("sim", SimEngine(SimSettings(fast_s=0.2, tile_px=16)))
        self.gate = asyncio.Event()
        self.arrived = 0

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        self.arrived += 1
        await self.gate.wait()
        return await super().submit(request)


@contextlib.asynccontextmanager
async def slotted(
    tmp_path: Path, upstreams: dict[str, Any], providers: list[dict[str, Any]] | None = None
) -> AsyncIterator[tuple[Relay, KeyRecord, ImageSpec]]:
    """A relay on PostgreSQL whose providers have `max_in_flight` (a job reserves its slot by a database write
    before its submit), a key, and a one-job request."""
    providers = providers or [{"name": "sim", "dialect": "simulator", "max_in_flight": 10}]
    async with pg_database() as url:
        relay = Relay(relay_config(tmp_path, database={"url": url}, providers=providers), SystemClock(), upstreams)
        await relay.open()
        try:
            key, _ = await relay.keys.create("k", 100, 0)
            yield relay, key, relay.jobs.plan(model="mj-fast", prompt="a kite", n=1)
        finally:
            await relay.close()


@pytest.mark.postgres
async def test_a_half_open_provider_gets_one_trial_while_slots_are_reserved(tmp_path: Path) -> None:
    """With `max_in_flight` on PostgreSQL, a job reserves its provider slot by a database write before its submit:
    jobs routed meanwhile must not take a half-open provider's trial too; and a job whose reservation is refused
    gives the trial back."""
    upstream = Gated()
    async with slotted(tmp_path, {"sim": upstream}) as (relay, key, spec):
        try:
            health = relay.pool.health["sim"]
            health.restore(State.HALF_OPEN, relay.clock.now(), "the cool-down is over", None)
            slots = relay.submitter.slots
            assert slots is not None
            take = slots.take

            async def refused_once(job_id: str, provider: str, limit: int, now: float) -> bool:
                slots.take = take  # type: ignore[method-assign]
                return False

            slots.take = refused_once  # type: ignore[method-assign]
            with pytest.raises(JobFailed):
                await relay.jobs.start(key, spec)
            assert health.routable()  # the refused reservation gave the trial back
            starts = [asyncio.ensure_future(relay.jobs.start(key, spec)) for _ in range(5)]
            # one takes the trial; the others, routed while its slot was reserved, find no provider to take them
            # (the one with the trial reaches the upstream after its reservation's write, perhaps after the others)
            await until(lambda: sum(start.done() for start in starts) == 4 and upstream.arrived >= 1)
            assert upstream.arrived == 1
            upstream.gate.set()
            for generation in await asyncio.gather(*starts, return_exceptions=True):
                if not isinstance(generation, BaseException):
                    generation.close()
            assert health.state is State.HEALTHY
        finally:
            upstream.gate.set()


class Failing(SimulatorUpstream):
    """The simulator, whose next submit raises (a bug in an adapter)."""

    def __init__(self) -> None:
        super().__init__("sim", SimEngine(SimSettings()))
        self.raises = True

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        if self.raises:
            self.raises = False
            raise RuntimeError("a bug")
        return await super().submit(request)


@pytest.mark.postgres
async def test_a_trial_taken_with_its_slot_is_given_back_when_its_submit_raises(tmp_path: Path) -> None:
    """With `max_in_flight` on PostgreSQL, the trial is taken with the slot, before the submit: a submit that then
    ends without an answer gives it back, so the provider is not left half-open with a trial no one runs."""
    async with slotted(tmp_path, {"sim": Failing()}) as (relay, key, spec):
        health = relay.pool.health["sim"]
        health.restore(State.HALF_OPEN, relay.clock.now(), "the cool-down is over", None)
        with pytest.raises(JobFailed):
            await relay.jobs.start(key, spec)
        assert health.state is State.HALF_OPEN and health.routable()
        generation = await relay.jobs.start(key, spec)
        generation.close()
        assert health.state is State.HEALTHY


class Unusable(SimulatorUpstream):
    """The simulator, answering every submit "unusable" (no balance); tells when it has answered."""

    def __init__(self, name: str) -> None:
        super().__init__(name, SimEngine(SimSettings()))
        self.submits = 0
        self.answered = asyncio.Event()

    async def submit(self, request: SubmitRequest) -> SubmitOutcome:
        self.submits += 1
        self.answered.set()
        return ProviderUnusable("the upstream account has no balance")


@pytest.mark.postgres
async def test_a_provider_set_aside_while_a_job_reserved_its_slot_is_not_sent_that_job(tmp_path: Path) -> None:
    """With `max_in_flight` on PostgreSQL, a job reserves its provider's slot by a database write before its
    submit: a provider that answered another job "unusable" meanwhile is set aside, and the job goes elsewhere
    rather than to it."""
    broke = Unusable("broke")
    providers = [
        {"name": "broke", "dialect": "simulator", "max_in_flight": 10, "priority": 0},
        {"name": "sim", "dialect": "simulator", "max_in_flight": 10, "priority": 1},
    ]
    async with slotted(tmp_path, {"broke": broke}, providers) as (relay, key, spec):
        slots = relay.submitter.slots
        assert slots is not None
        take, reserving = slots.take, set()

        async def late(job_id: str, provider: str, limit: int, now: float) -> bool:
            reserving.add((job_id, provider))
            if provider == "broke" and len([1 for _, p in reserving if p == "broke"]) == 2:
                await broke.answered.wait()  # the second job's slot is written after the first was answered
            return await take(job_id, provider, limit, now)

        slots.take = late  # type: ignore[method-assign]
        starts = [asyncio.ensure_future(relay.jobs.start(key, spec)) for _ in range(2)]
        generations = await asyncio.gather(*starts)
        for generation in generations:
            generation.close()
        assert relay.pool.health["broke"].state is State.COOLING
        assert broke.submits == 1


async def test_a_submit_the_relay_withheld_says_nothing_of_the_provider(tmp_path: Path) -> None:
    """Withheld before it left (its job was another process's by then): no error counted, and a half-open
    provider's trial it took is free again for the next job."""
    world = make_world(tmp_path, errors_to_cool=1)
    world.up["a"].outcome = Retryable(WITHHELD, withheld=True)
    for _ in range(3):
        assert await world.pool.submit("a", REQUEST) == world.up["a"].outcome
    assert world.routable() == ["a", "b"] and world.seen == []
    world.up["a"].outcome = Retryable("cannot connect: ConnectError")
    await world.pool.submit("a", REQUEST)
    world.clock.advance(31)
    world.pool.advance("a", world.clock.now())
    assert world.pool.health["a"].state is State.HALF_OPEN
    world.up["a"].outcome = Retryable(WITHHELD, withheld=True)
    await world.pool.submit("a", REQUEST)
    assert world.pool.health["a"].state is State.HALF_OPEN and not world.pool.health["a"].trial
