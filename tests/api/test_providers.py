"""The relay over real HTTP upstreams: every dialect served by the simulator on loopback, failover between
providers, capacity, provider health, and jobs that fail, get lost or run past their deadline."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import re
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from relay.config import Config
from tests.helpers import RunningRelay, bound_socket, relay_config, running_relay, serve, sql, wait_for

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
        assert relay.jobs() == [("FAILED", "unavailable", "released", "down")]  # the provider it was tried at
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
            relay.openai().images.generate(model="mj-fast", prompt="a heron sim:crash")
        ended_as_possibly_run(relay, caught.value, "flaky", spare=upstreams["mj-v1"][1])


def ended_as_possibly_run(
    relay: RunningRelay, error: openai.InternalServerError, sent_to: str, spare: SimEngine
) -> None:
    """The job may have run at the provider that took it (`sent_to`, which its row names): a 502 the SDK does not
    retry, nothing sent to the spare provider, the job ended unconfirmed and its credits released."""
    assert error.status_code == 502
    assert error.response.headers["x-should-retry"] == "false"
    assert spare.submits == 0
    assert relay.jobs() == [("FAILED", "unconfirmed", "released", sent_to)]


def answering(app: ASGIApp, status: int, body: bytes) -> ASGIApp:
    """The app, with every submit still made there but its answer replaced (as a gateway in front of it answers)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "/submit/" not in scope["path"]:
            await app(scope, receive, send)
            return

        async def dropped(message: Any) -> None:
            pass

        await app(scope, receive, dropped)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


@pytest.mark.parametrize(
    ("status", "body"),
    [
        # the server's own "taken" answer, sent with an error status
        (500, b'{"code": 1, "description": "Submit success", "properties": {}, "result": "1234567890123456789"}'),
        # a gateway's JSON page: it timed out waiting for the server, which may have taken the task
        (504, b'{"code": 504, "message": "Gateway Time-out"}'),
    ],
)
def test_a_5xx_whose_code_is_no_refusal_is_never_sent_elsewhere(
    tmp_path: Path, upstreams: dict[str, tuple[str, SimEngine]], status: int, body: bytes
) -> None:
    engine = SimEngine(SimSettings(fast_s=0.3, tile_px=48))
    with serve(answering(build_sim_app(engine, "midjourney-proxy", SECRET), status, body)) as base:
        config = relay_config(
            tmp_path,
            providers=[
                provider("gated", "midjourney-proxy", base, priority=0),
                provider("spare", "mj-v1", upstreams["mj-v1"][0], priority=1),
            ],
        )
        with running_relay(config) as relay:
            with pytest.raises(openai.InternalServerError) as caught:
                relay.openai().images.generate(model="mj-fast", prompt="a heron")
            ended_as_possibly_run(relay, caught.value, "gated", spare=upstreams["mj-v1"][1])
            assert engine.submits == 1


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


# -- provider health ---------------------------------------------------------------------------------------------


def counting(app: ASGIApp, paths: list[str]) -> ASGIApp:
    """The app, noting the path of every HTTP request it gets."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            paths.append(scope["path"])
        await app(scope, receive, send)

    return wrapped


def health_states(relay: RunningRelay) -> dict[str, str]:
    """Each provider's health state as `/metrics` shows it."""
    text = httpx.get(relay.base + "/metrics").text
    found = re.findall(r'^mj_relay_provider_health\{provider="([^"]+)",state="([^"]+)"\} 1\.0$', text, re.M)
    return dict(found)


def transitions(relay: RunningRelay, name: str) -> dict[str, float]:
    text = httpx.get(relay.base + "/metrics").text
    pattern = rf'^mj_relay_provider_health_transitions_total\{{provider="{name}",state="([^"]+)"\}} (\S+)$'
    return {state: float(count) for state, count in re.findall(pattern, text, re.M)}


def rebind(port: int) -> socket.socket:
    """A listening socket on a port a stopped server had."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def test_a_provider_refusing_credentials_is_cooled_after_one_job_and_tried_once_after_its_cooldown(
    tmp_path: Path, upstreams: dict[str, tuple[str, SimEngine]]
) -> None:
    paths: list[str] = []
    engine = SimEngine(SimSettings(fast_s=0.3, tile_px=48))
    with serve(counting(build_sim_app(engine, "midjourney-proxy", SECRET), paths)) as refusing_base:
        config = relay_config(
            tmp_path,
            providers=[
                provider("refusing", "midjourney-proxy", refusing_base, secret="a-wrong-secret", priority=0),
                provider("good", "new-api", upstreams["new-api"][0], priority=1),
            ],
            health={"cooldown_s": 4, "probe_interval_s": 600},
        )

        def submits() -> int:
            return sum(1 for path in paths if "/submit/" in path)

        with running_relay(config) as relay:
            client = relay.openai()
            client.images.generate(model="mj-fast", prompt="a heron")
            assert submits() == 1
            assert health_states(relay) == {"refusing": "cooling", "good": "healthy"}
            # Three jobs at once, all within the cool-down: none of them touches the refusing provider.
            assert len(client.images.generate(model="mj-fast", prompt="a heron", n=10).data) == 10
            assert submits() == 1 and health_states(relay)["refusing"] == "cooling"
            wait_for(lambda: health_states(relay)["refusing"] == "half-open", timeout=15)
            client.images.generate(model="mj-fast", prompt="a heron")  # the trial, then the good provider
            assert submits() == 2 and health_states(relay)["refusing"] == "cooling"
            assert [row[3] for row in relay.jobs()] == ["good"] * 5
            assert engine.submits == 0
            assert transitions(relay, "refusing") == {"cooling": 2.0, "half-open": 1.0}
            wait_for(lambda: sql(config, "SELECT state FROM provider_health") == [("cooling",)])
            ((since, until, reason),) = sql(config, "SELECT since, cooling_until, reason FROM provider_health")
            assert until - since == pytest.approx(8)  # the failed trial doubled the cool-down
            assert reason == "the trial failed: upstream refused the credentials (HTTP 401)"
            assert "a-wrong-secret" not in reason


def limiting(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """The app behind a gateway that refuses request bodies over `max_bytes` as nginx does (HTTP 413, its page)."""
    page = b"<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>"

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        length = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if scope["type"] != "http" or int(length) <= max_bytes:
            await app(scope, receive, send)
            return
        headers = [(b"content-type", b"text/html"), (b"content-length", str(len(page)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": page})

    return wrapped


def test_a_request_too_large_for_a_provider_is_refused_without_setting_the_provider_aside(tmp_path: Path) -> None:
    engine = SimEngine(SimSettings(fast_s=0.3, tile_px=48))
    picture = io.BytesIO()
    Image.frombytes("RGB", (160, 160), random.Random(7).randbytes(160 * 160 * 3)).save(picture, format="PNG")
    large = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    with serve(limiting(build_sim_app(engine, "midjourney-proxy", SECRET), 50_000)) as base:
        config = relay_config(tmp_path, providers=[provider("gated", "midjourney-proxy", base)])
        with running_relay(config) as relay:
            with httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30) as native:
                reply = native.post("/mj/submit/imagine", json={"prompt": "a cat", "base64Array": [large]})
            assert reply.status_code == 400 and reply.json()["code"] == 4, reply.text
            assert "HTTP 413" in reply.json()["description"]
            assert health_states(relay) == {"gated": "healthy"}
            # Another client's request is served as before.
            assert len(relay.openai().images.generate(model="mj-fast", prompt="a heron").data) == 1
            assert engine.submits == 1


def test_an_image_the_upstreams_cannot_upload_fails_as_the_clients_without_setting_providers_aside(
    tmp_path: Path,
) -> None:
    """trueai answers code 9 "上传图片到discord失败" when it cannot upload a submit's images (often the image itself:
    too large, a format Discord refuses). One client sending such an image again and again must not cool every
    provider for everyone else: the job tries one more provider, then ends as the client's (400, code 4), uncharged."""
    paths: dict[str, list[str]] = {name: [] for name in ("first", "second", "third")}
    engines = {name: SimEngine(SimSettings(fast_s=0.3, tile_px=48)) for name in paths}
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), "teal").save(picture, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    with ExitStack() as stack:
        bases = {
            name: stack.enter_context(serve(counting(build_sim_app(engines[name], "midjourney-proxy", SECRET), seen)))
            for name, seen in paths.items()
        }
        config = relay_config(
            tmp_path,
            providers=[provider(name, "midjourney-proxy", bases[name], priority=i) for i, name in enumerate(bases)],
            health={"errors_to_cool": 2, "probe_interval_s": 600},
        )
        with running_relay(config) as relay:
            before = relay.balance()
            with httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30) as native:
                for _ in range(4):
                    body = {"prompt": "a cat sim:upload-failed", "base64Array": [image]}
                    reply = native.post("/mj/submit/imagine", json=body)
                    assert reply.status_code == 400 and reply.json()["code"] == 4, reply.text
                    assert "reference image" in reply.json()["description"]
                    assert "上传图片到discord失败" in reply.json()["description"]
            # Each job went to two providers, no further; none of them was set aside, and nothing was charged.
            submits = {name: sum(1 for path in seen if "/submit/" in path) for name, seen in paths.items()}
            assert submits == {"first": 4, "second": 4, "third": 0}
            assert health_states(relay) == {"first": "healthy", "second": "healthy", "third": "healthy"}
            assert relay.balance() == before
            assert {row[:3] for row in relay.jobs()} == {("FAILED", "rejected", "released")}
            # Another client's request is served by the first provider as before.
            assert len(relay.openai().images.generate(model="mj-fast", prompt="a heron").data) == 1
            assert relay.jobs()[-1] == ("SUCCEEDED", None, "captured", "first")


def test_an_image_one_account_cannot_upload_goes_to_the_next_provider(
    tmp_path: Path, upstreams: dict[str, tuple[str, SimEngine]]
) -> None:
    """A failed upload may be one account's passing fault (Discord answering it 5xx): the next provider runs it."""
    refused = json.dumps({"code": 9, "description": "上传图片到discord失败", "result": None}).encode()
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), "teal").save(picture, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    engine = SimEngine(SimSettings(fast_s=0.3, tile_px=48))
    with serve(answering(build_sim_app(engine, "midjourney-proxy", SECRET), 200, refused)) as base:
        config = relay_config(
            tmp_path,
            providers=[
                provider("flaky", "midjourney-proxy", base, priority=0),
                provider("good", "new-api", upstreams["new-api"][0], priority=1),
            ],
        )
        with running_relay(config) as relay:
            with httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30) as native:
                reply = native.post("/mj/submit/imagine", json={"prompt": "a cat", "base64Array": [image]})
            assert reply.status_code == 200 and reply.json()["code"] == 1, reply.text
            wait_for(lambda: relay.jobs()[0][0] == "SUCCEEDED")
            assert relay.jobs() == [("SUCCEEDED", None, "captured", "good")]
            assert health_states(relay) == {"flaky": "healthy", "good": "healthy"}


def test_a_provider_whose_server_stops_goes_down_by_probes_and_comes_back_when_it_restarts(tmp_path: Path) -> None:
    sock = bound_socket()
    port = sock.getsockname()[1]
    engine = SimEngine(SimSettings(fast_s=0.3, tile_px=48))
    app = build_sim_app(engine, "midjourney-proxy", SECRET)
    config = relay_config(
        tmp_path,
        providers=[provider("only", "midjourney-proxy", f"http://127.0.0.1:{port}")],
        health={"heartbeat_s": 0.1, "probe_interval_s": 0.1, "probes_to_down": 2, "errors_to_cool": 50},
    )
    with running_relay(config) as relay:
        native = httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30)
        with serve(app, sock=sock):
            relay.openai().images.generate(model="mj-fast", prompt="a heron")
            assert health_states(relay) == {"only": "healthy"}
            (parent,) = sql(config, "SELECT id FROM jobs")
            buttons = native.get(f"/mj/task/{parent[0]}/fetch").json()["buttons"]
            upscale = next(b["customId"] for b in buttons if "upsample::1" in b["customId"])
        wait_for(lambda: health_states(relay) == {"only": "down"})
        with pytest.raises(openai.InternalServerError) as caught:
            relay.openai().images.generate(model="mj-fast", prompt="a heron")
        assert caught.value.status_code == 503 and caught.value.code == "service_unavailable"
        # A follow-up pinned to a provider that is down is refused without a call to it.
        reply = native.post("/mj/submit/action", json={"taskId": parent[0], "customId": upscale})
        assert reply.status_code == 503, reply.text
        assert engine.submits == 1
        with serve(app, sock=rebind(port)):
            wait_for(lambda: health_states(relay) == {"only": "half-open"})
            relay.openai().images.generate(model="mj-fast", prompt="a heron")
            assert health_states(relay) == {"only": "healthy"} and engine.submits == 2
            assert transitions(relay, "only") == {"down": 1.0, "half-open": 1.0, "healthy": 1.0}
        native.close()


@pytest.mark.parametrize(
    ("first", "second", "status"),
    [("unavailable", "unconfirmed", 502), ("lost", "unconfirmed", 502), ("unavailable", "timeout", 504)],
)
def test_a_request_whose_jobs_all_failed_is_not_retried_when_one_of_them_may_run(
    tmp_path: Path, first: str, second: str, status: int
) -> None:
    """Of a request's two jobs, the first is refused (queue full), or taken and then lost: a retry may run it. The
    second's submit is answered by a gateway's empty 502 (the upstream may have run it), or it is taken and passes
    its deadline (the upstream may still run it). The answer must be the second's, which says not to retry: the
    SDK's retry would start both afresh, and the second could run twice upstream."""
    configs: list[Config] = []
    arrived: list[tuple[str, Send]] = []
    both = asyncio.Event()
    sim = build_sim_app(SimEngine(SimSettings(fast_s=0.3, tile_px=48)), "midjourney-proxy", SECRET)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "/submit/" not in scope["path"]:
            await sim(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        arrived.append((json.loads(body)["state"], send))
        if len(arrived) == 2:
            both.set()
        await both.wait()
        ((order,),) = sql(configs[0], "SELECT job_ids FROM attempts")
        state = next(state for state, sender in arrived if sender is send)
        answers = {
            "unavailable": {"code": 23, "description": "queue is full", "result": None},
            "lost": {"code": 1, "description": "Submit success", "result": "4040404040"},  # unknown when asked
        }
        outcome = first if state == json.loads(order)[0] else second
        if outcome == "timeout":  # the simulator takes it, and it never finishes

            async def replay() -> Message:
                return {"type": "http.request", "body": body.replace(b"a heron", b"a heron sim:never")}

            await sim(scope, replay, send)
        elif outcome == "unconfirmed":
            await send({"type": "http.response.start", "status": 502, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
        else:
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps(answers[outcome]).encode()})

    with serve(upstream) as base:
        configs.append(
            relay_config(
                tmp_path,
                providers=[provider("gated", "midjourney-proxy", base)],
                jobs={"poll_interval_s": 0.05, "lost_after_s": 0.3, "deadline_s": {"fast": 1.5}},
            )
        )
        with running_relay(configs[0]) as relay:
            with pytest.raises(openai.APIStatusError) as caught:
                relay.openai().with_options(max_retries=0).images.generate(model="mj-fast", prompt="a heron", n=8)
            assert caught.value.status_code == status, caught.value
            assert caught.value.response.headers.get("x-should-retry") == "false"
            assert sorted(row[1] for row in relay.jobs()) == sorted([first, second])
            assert relay.balance() == (1000, 0)
