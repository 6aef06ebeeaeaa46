"""The streamed chat answer on the wire: headers at once, role first, keep-alive comments, progress, images,
finish, [DONE]; a failure mid-stream ends the stream with a clear error."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from relay.app import build_app
from relay.config import Config
from relay.domain import FailureCode
from relay.errors import JobFailed
from relay.server import RelayServer
from relay.store.db import Unreachable
from tests.helpers import (
    RunningRelay,
    assert_ledger_balances,
    create_key,
    relay_config,
    running_relay,
    running_server,
    sql,
    wait_for,
)


def stream_lines(relay: RunningRelay, content: object, **extra: object) -> tuple[httpx.Response, list[str]]:
    with httpx.stream(
        "POST",
        relay.base + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {relay.key}", "Accept": "application/json"},
        json={"model": "mj-fast", "stream": True, "messages": [{"role": "user", "content": content}], **extra},
        timeout=30,
    ) as response:
        return response, [line for line in response.iter_lines() if line]


def payloads(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_the_stream_is_shaped_as_openai_chunks(relay: RunningRelay) -> None:
    response, lines = stream_lines(relay, "a paper crane")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert not any(line.startswith(("id:", "retry:", "event:")) for line in lines)
    chunks = payloads(lines)
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
    ]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    texts = [c["choices"][0]["delta"].get("content", "") for c in chunks]  # type: ignore[index]
    progress = [int(m) for t in texts for m in re.findall(r"Generating… (\d+)%", t)]
    assert progress[0] == 0 and progress == sorted(progress) and len(progress) >= 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]


def test_keep_alive_comments_fill_the_silence(tmp_path: Path) -> None:
    config = relay_config(
        tmp_path,
        api={"keepalive_s": 0.1},
        providers=[{"name": "sim", "dialect": "simulator", "poll_interval_s": 1.0, "simulator": {"fast_s": 0.5}}],
    )
    with running_relay(config) as relay:
        _, lines = stream_lines(relay, "a slow boat")
        assert ": keep-alive" in lines
        assert lines[-1] == "data: [DONE]"


def test_a_failure_mid_stream_is_shown_then_raised(relay: RunningRelay) -> None:
    _, lines = stream_lines(relay, "a bridge sim:fail")
    chunks = payloads(lines)
    errors = [c for c in chunks if "error" in c]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "upstream_error"  # type: ignore[index]
    assert any("**Error:**" in (c["choices"][0]["delta"].get("content") or "") for c in chunks if "choices" in c)  # type: ignore[index]
    assert_ends_with_error(lines, "upstream_error")
    client = relay.openai()
    with pytest.raises(openai.APIError) as caught:
        for _ in client.chat.completions.create(
            model="mj-fast", messages=[{"role": "user", "content": "a bridge sim:fail"}], stream=True
        ):
            pass
    assert "failed" in caught.value.message
    assert relay.balance() == (1000, 0)


def test_errors_before_the_stream_starts_keep_their_status(relay: RunningRelay) -> None:
    response, lines = stream_lines(relay, "so forbidden")
    assert response.status_code == 400 and json.loads(lines[0])["error"]["code"] == "content_policy_violation"


def test_image_parts_become_reference_images_and_imagine_is_dropped(relay: RunningRelay) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    reference = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [
        {"type": "text", "text": "/imagine a garden"},
        {"type": "image_url", "image_url": {"url": reference, "detail": "auto"}},
        {"type": "text", "text": "in spring"},
    ]
    response = httpx.post(
        relay.base + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {relay.key}"},
        json={"model": "mj-relax", "messages": [{"role": "user", "content": content}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert sql(relay.config, "SELECT prompt FROM jobs") == [("a garden in spring --relax",)]


def test_a_stream_whose_client_leaves_still_ends_its_job(relay: RunningRelay) -> None:
    with httpx.stream(
        "POST",
        relay.base + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {relay.key}"},
        json={"model": "mj-fast", "stream": True, "messages": [{"role": "user", "content": "a kite"}]},
    ) as response:
        next(response.iter_lines())
    wait_for(lambda: relay.jobs()[0][0] == "SUCCEEDED")
    assert relay.jobs() == [("SUCCEEDED", None, "captured", "sim")]
    assert relay.balance() == (998, 0)


def test_a_stream_whose_client_leaves_is_logged_and_counted_as_closed_by_the_client(
    relay: RunningRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """A streamed answer its client left before its end is a request whose client went away (499), as one left
    waiting unstreamed is: not a 200 that the logs and the metrics count as answered."""

    def logged() -> list[int]:
        return [
            r.__dict__["fields"]["status"]
            for r in caplog.records
            if r.getMessage() == "request" and r.__dict__["fields"]["route"] == "/v1/chat/completions"
        ]

    with caplog.at_level(logging.INFO):
        with httpx.stream(
            "POST",
            relay.base + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {relay.key}"},
            json={"model": "mj-fast", "stream": True, "messages": [{"role": "user", "content": "a sloth sim:slow"}]},
        ) as response:
            next(response.iter_lines())
        wait_for(lambda: logged() != [])
        assert logged() == [499]
        _, lines = stream_lines(relay, "a kite")  # read to its end: answered
        assert lines[-1] == "data: [DONE]"
        wait_for(lambda: len(logged()) == 2)
        assert logged() == [499, 200]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    metrics = httpx.get(relay.base + "/metrics").text
    assert 'route="/v1/chat/completions",status="4xx"' in metrics
    wait_for(lambda: [row[0] for row in relay.jobs()] == ["SUCCEEDED", "SUCCEEDED"])
    assert relay.balance() == (996, 0)


def assert_ends_with_error(lines: list[str], code: str) -> dict[str, Any]:
    """The stream's last event is its one error, OpenAI-shaped, and no `[DONE]` says it ended well."""
    assert "data: [DONE]" not in lines, lines[-3:]
    last = json.loads(lines[-1].removeprefix("data: "))
    assert set(last) == {"error"} and set(last["error"]) == {"message", "type", "param", "code"}, last
    assert last["error"]["code"] == code, last
    assert sum(1 for chunk in payloads(lines) if "error" in chunk) == 1
    return last["error"]  # type: ignore[no-any-return]


def sdk_stream_error(relay: RunningRelay, prompt: str) -> openai.APIError:
    """What the official SDK raises while reading the stream of `prompt` (it must raise)."""
    client = relay.openai()
    stream = client.chat.completions.create(
        model="mj-fast", messages=[{"role": "user", "content": prompt}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    return caught.value


@contextmanager
def relay_and_server(config: Config, **options: Any) -> Iterator[tuple[RunningRelay, Any, RelayServer]]:
    """`running_relay`, with the app (to reach its services) and the server (to stop it)."""
    key = create_key(config)
    app = build_app(config)
    with running_server(app, **options) as (base, server):
        relay = RunningRelay(base, config, key)
        try:
            yield relay, app, server
        finally:
            for client in relay.clients:
                client.close()
    assert_ledger_balances(config.database_url())


def counted_unavailable(relay: RunningRelay) -> float:
    text = httpx.get(relay.base + "/metrics", timeout=30).text
    return next(
        float(line.split()[1]) for line in text.splitlines() if line.startswith("mj_relay_database_unavailable_total ")
    )


def test_a_deadline_passing_mid_stream_ends_it_with_a_timeout_error(tmp_path: Path) -> None:
    config = relay_config(tmp_path, jobs={"poll_interval_s": 0.05, "deadline_s": {"fast": 0.5}})
    with running_relay(config) as relay:
        _, lines = stream_lines(relay, "a glacier sim:never")
        error = assert_ends_with_error(lines, "timeout")
        assert error["type"] == "server_error"
        caught = sdk_stream_error(relay, "a glacier sim:never")
        assert caught.code == "timeout" and caught.type == "server_error"
        assert relay.balance() == (1000, 0)


def test_a_database_unavailable_mid_stream_ends_it_with_a_503_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with relay_and_server(relay_config(tmp_path)) as (relay, app, _):
        service = app.state.relay.jobs

        async def unreachable(generation: object) -> list[object]:
            raise Unreachable("connection refused by 10.0.0.7:5432") from OSError(111, "Connection refused")

        service.results = unreachable
        caplog.set_level(logging.INFO)
        caplog.clear()
        response, lines = stream_lines(relay, "a harbour")
        caught = sdk_stream_error(relay, "a harbour")
        assert response.status_code == 200
        error = assert_ends_with_error(lines, "service_unavailable")
        assert error["type"] == "server_error" and "database" in error["message"]
        assert "10.0.0.7" not in error["message"] and "refused" not in error["message"]
        assert caught.code == "service_unavailable" and caught.message == error["message"]

        def chats() -> list[int]:
            records = [r for r in caplog.records if r.getMessage() == "request"]
            return [r.fields["status"] for r in records if r.fields["route"] == "/v1/chat/completions"]  # type: ignore[attr-defined]

        wait_for(lambda: len(chats()) == 2)
        assert chats() == [200, 200]  # what was sent: no 503 that never was
        assert counted_unavailable(relay) == 2  # once per stream, not once more by the middleware
        assert len([r for r in caplog.records if r.getMessage() == "database unavailable"]) == 2
        assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]


def test_an_internal_error_mid_stream_ends_it_with_a_500_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with relay_and_server(relay_config(tmp_path)) as (relay, app, _):

        async def broken(generation: object) -> list[object]:
            raise RuntimeError("secret internals at /srv/relay")

        app.state.relay.jobs.results = broken
        caplog.clear()
        response, lines = stream_lines(relay, "a lantern")
        assert response.status_code == 200
        error = assert_ends_with_error(lines, "internal_error")
        assert error["type"] == "server_error" and "secret" not in error["message"]
        caught = sdk_stream_error(relay, "a lantern")
        assert caught.code == "internal_error" and "secret" not in caught.message
        unhandled = [r for r in caplog.records if r.getMessage() == "unhandled error"]
        assert len(unhandled) == 2 and all(r.exc_info for r in unhandled)
        assert counted_unavailable(relay) == 0


def test_a_prompt_refused_as_its_job_runs_names_messages(tmp_path: Path) -> None:
    """An upstream may refuse a prompt only once its job is running (a failure reason that says banned): told in
    the stream or in the answer, that error names `messages`, where a chat's prompt is."""
    with relay_and_server(relay_config(tmp_path)) as (relay, app, _):

        async def banned(generation: object) -> list[object]:
            raise JobFailed(FailureCode.BANNED, "Midjourney refused the prompt: banned word")

        app.state.relay.jobs.results = banned
        _, lines = stream_lines(relay, "a harbour")
        assert assert_ends_with_error(lines, "content_policy_violation")["param"] == "messages"
        with pytest.raises(openai.BadRequestError) as caught:
            relay.openai().chat.completions.create(model="mj-fast", messages=[{"role": "user", "content": "a harbour"}])
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "messages"


def test_a_relay_stopping_mid_stream_ends_it_with_a_503_error(tmp_path: Path) -> None:
    """SIGTERM: the stream goes on for the graceful shutdown (its job may end meanwhile); past that, it is ended
    with the error, not cut (which the SDK reports as a connection error, and other clients may not at all)."""
    config = relay_config(
        tmp_path, providers=[{"name": "sim", "dialect": "simulator", "simulator": {"fast_s": 60, "tile_px": 64}}]
    )
    with relay_and_server(config, timeout_graceful_shutdown=1) as (relay, _, server):
        body = {"model": "mj-fast", "stream": True, "messages": [{"role": "user", "content": "a long voyage"}]}
        headers = {"Authorization": f"Bearer {relay.key}"}
        with httpx.stream("POST", relay.base + "/v1/chat/completions", headers=headers, json=body, timeout=30) as raw:
            raw_lines = raw.iter_lines()
            assert next(raw_lines).startswith("data: {")
            stream = relay.openai().chat.completions.create(
                model="mj-fast", messages=[{"role": "user", "content": "a long voyage"}], stream=True
            )
            first = next(iter(stream))
            assert first.choices[0].delta.role == "assistant"
            server.stop()
            with pytest.raises(openai.APIError) as caught:
                for _ in stream:
                    pass
            assert not isinstance(caught.value, openai.APIConnectionError), caught.value
            assert caught.value.code == "service_unavailable" and caught.value.type == "server_error"
            lines = [line for line in raw_lines if line]  # the body ends whole: no protocol error here
        assert_ends_with_error(lines, "service_unavailable")


@pytest.mark.parametrize("route", ["images", "chat"])
def test_a_request_still_waiting_when_the_relay_stops_is_answered_503_in_its_envelope(
    tmp_path: Path, route: str
) -> None:
    """Unstreamed, a request still waiting past the graceful shutdown was cut with the server's plain-text 500; it
    is answered 503 (`Retry-After`) in its envelope, which the SDKs retry, and a retry follows its job."""
    config = relay_config(
        tmp_path, providers=[{"name": "sim", "dialect": "simulator", "simulator": {"fast_s": 60, "tile_px": 64}}]
    )
    with relay_and_server(config, timeout_graceful_shutdown=1) as (relay, _, server):
        client = relay.openai()
        failures: list[BaseException] = []

        def call() -> None:
            try:
                if route == "images":
                    client.images.generate(model="mj-fast", prompt="a long voyage")
                else:
                    client.chat.completions.create(
                        model="mj-fast", messages=[{"role": "user", "content": "a long voyage"}]
                    )
            except BaseException as exc:
                failures.append(exc)

        waiting = threading.Thread(target=call)
        waiting.start()
        wait_for(lambda: relay.balance()[1] > 0)  # held: the request waits for its job
        server.stop()
        waiting.join(30)
        assert not waiting.is_alive()
        (failure,) = failures
        assert isinstance(failure, openai.InternalServerError), repr(failure)
        assert failure.status_code == 503 and failure.response.headers["retry-after"] == "1"
        assert failure.code == "service_unavailable" and failure.type == "server_error"
