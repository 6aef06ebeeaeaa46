"""The relay over real HTTP upstreams: every dialect served by the simulator on loopback, failover between
providers, capacity, and jobs that fail, get lost or run past their deadline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from tests.helpers import bound_socket, relay_config, running_relay, serve

SECRET = "sim-secret-0001"


def provider(name: str, dialect: str, base: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "dialect": dialect, "base_url": base, "secret": SECRET, **extra}


@pytest.fixture
def upstreams() -> Iterator[dict[str, tuple[str, SimEngine]]]:
    """One simulator server per dialect, each with its own engine."""
    with ExitStack() as stack:
        found = {}
        for dialect in ("midjourney-proxy", "new-api", "mj-v1"):
            engine = SimEngine(SimSettings(fast_s=0.3, relax_s=0.5, tile_px=48))
            found[dialect] = (stack.enter_context(serve(build_sim_app(engine, dialect, SECRET))), engine)  # type: ignore[arg-type]
        yield found


@pytest.mark.parametrize("dialect", ["midjourney-proxy", "new-api", "mj-v1"])
def test_each_http_dialect_serves_the_openai_path(
    tmp_path: Path, upstreams: dict[str, tuple[str, SimEngine]], dialect: str
) -> None:
    base, engine = upstreams[dialect]
    config = relay_config(tmp_path, providers=[provider("up", dialect, base)])
    with running_relay(config) as relay:
        result = relay.openai().images.generate(model="mj-relax", prompt="a dune", size="1024x1536", n=2)
        assert len(result.data) == 2 and engine.submits == 1
        assert relay.jobs() == [("SUCCEEDED", None, "captured", "up")]
        assert relay.balance() == (999, 0)


def test_a_down_or_full_provider_hands_the_job_on(tmp_path: Path, upstreams: dict[str, tuple[str, SimEngine]]) -> None:
    closed = bound_socket()
    full_engine = SimEngine(SimSettings(capacity=1, fast_s=30))
    full_engine.submit_imagine({"prompt": "occupying the only slot"}, "fast")
    with serve(build_sim_app(full_engine, "midjourney-proxy", SECRET)) as full_base:
        config = relay_config(
            tmp_path,
            providers=[
                provider("down", "midjourney-proxy", f"http://127.0.0.1:{closed.getsockname()[1]}", priority=0),
                provider("full", "midjourney-proxy", full_base, priority=1),
                provider("good", "new-api", upstreams["new-api"][0], priority=2),
            ],
        )
        with running_relay(config) as relay:
            relay.openai().images.generate(model="mj-fast", prompt="a heron")
            assert relay.jobs() == [("SUCCEEDED", None, "captured", "good")]
    closed.close()


def test_no_provider_able_to_take_a_job_is_503_and_releases(tmp_path: Path) -> None:
    closed = bound_socket()
    config = relay_config(
        tmp_path, providers=[provider("down", "mj-v1", f"http://127.0.0.1:{closed.getsockname()[1]}")]
    )
    with running_relay(config) as relay:
        with pytest.raises(openai.InternalServerError) as caught:
            relay.openai().images.generate(model="mj-fast", prompt="a heron")
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "10"
        assert relay.jobs() == [("FAILED", "unavailable", "released", None)]
        assert relay.balance() == (1000, 0)
    closed.close()


def test_a_submit_that_may_have_run_is_never_sent_elsewhere(
    tmp_path: Path, upstreams: dict[str, tuple[str, SimEngine]]
) -> None:
    config = relay_config(
        tmp_path,
        providers=[
            provider("flaky", "midjourney-proxy", upstreams["midjourney-proxy"][0], priority=0),
            provider("spare", "mj-v1", upstreams["mj-v1"][0], priority=1),
        ],
    )
    with running_relay(config) as relay:
        with pytest.raises(openai.InternalServerError) as caught:
            relay.openai().images.generate(model="mj-fast", prompt="a heron sim:error")
        assert caught.value.status_code == 502
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert upstreams["mj-v1"][1].submits == 0
        assert relay.jobs() == [("FAILED", "unconfirmed", "released", None)]


def test_max_in_flight_spreads_concurrent_jobs(tmp_path: Path, upstreams: dict[str, tuple[str, SimEngine]]) -> None:
    config = relay_config(
        tmp_path,
        providers=[
            provider("one", "midjourney-proxy", upstreams["midjourney-proxy"][0], max_in_flight=1),
            provider("two", "new-api", upstreams["new-api"][0], priority=1, max_in_flight=1),
        ],
    )
    with running_relay(config) as relay:
        result = relay.openai().images.generate(model="mj-fast", prompt="a heron", n=8)
        assert len(result.data) == 8
        assert sorted(row[3] for row in relay.jobs()) == ["one", "two"]
        # Three jobs, room for two: the third finds no provider and ends at once; the request gets what ran.
        result = relay.openai().images.generate(model="mj-fast", prompt="a heron", n=10)
        assert len(result.data) == 8
        assert sorted(row[:2] for row in relay.jobs()[2:]) == [
            ("FAILED", "unavailable"),
            ("SUCCEEDED", None),
            ("SUCCEEDED", None),
        ]


def test_a_job_past_its_deadline_is_504_and_released(tmp_path: Path) -> None:
    config = relay_config(tmp_path, jobs={"poll_interval_s": 0.05, "deadline_s": {"fast": 0.5}})
    with running_relay(config) as relay:
        with pytest.raises(openai.InternalServerError) as caught:
            relay.openai().images.generate(model="mj-fast", prompt="a sloth sim:never")
        assert caught.value.status_code == 504 and caught.value.code == "timeout"
        assert relay.jobs() == [("FAILED", "timeout", "released", "sim")]


def test_a_job_the_upstream_forgets_is_502_and_released(tmp_path: Path) -> None:
    config = relay_config(tmp_path, jobs={"poll_interval_s": 0.05, "lost_after_s": 0.3})
    with running_relay(config) as relay:
        with pytest.raises(openai.InternalServerError) as caught:
            relay.openai().images.generate(model="mj-fast", prompt="a ghost sim:lose")
        assert caught.value.status_code == 502 and "lost" in caught.value.message
        assert relay.jobs() == [("FAILED", "lost", "released", "sim")]
        assert relay.balance() == (1000, 0)


def test_partial_results_when_one_of_several_jobs_fails(tmp_path: Path) -> None:
    config = relay_config(
        tmp_path,
        providers=[{"name": "sim", "dialect": "simulator", "simulator": {"fast_s": 0.3, "fail_rate": 0.5, "seed": 4}}],
    )
    with running_relay(config) as relay:
        result = relay.openai().images.generate(model="mj-fast", prompt="a meadow", n=8)
        states = sorted(row[0] for row in relay.jobs())
        assert states == ["FAILED", "SUCCEEDED"]
        assert len(result.data) == 4
        assert relay.balance() == (998, 0)
