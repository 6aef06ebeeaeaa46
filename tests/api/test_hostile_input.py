"""Every byte a client controls is hostile: text a database cannot store, absurd numbers, deep nesting, a client
that hangs up, odd paths. Each gets a clear answer in its surface's envelope, changes nothing, and leaves the
connection and every other request unharmed."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import ValidationError

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from relay.api.openai.chat import ChatRequest
from relay.app import build_app
from tests.helpers import (
    RunningRelay,
    create_key,
    pg_database_sync,
    png_chunk,
    png_start,
    relay_config,
    running_relay,
    serve,
    wait_for,
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db_relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningRelay]:
    if request.param == "sqlite":
        with running_relay(relay_config(tmp_path)) as relay:
            yield relay
        return
    with pg_database_sync() as url, running_relay(relay_config(tmp_path, database={"url": url})) as relay:
        yield relay


def test_text_that_cannot_be_stored_is_refused_alone_while_30_others_succeed(any_db_relay: RunningRelay) -> None:
    relay = any_db_relay
    keys = [create_key(relay.config, 100, name=f"k{i}") for i in range(30)]
    bad_bodies = [b'{"prompt": "a \\ud800 b"}', b'{"prompt": "a \\u0000 b"}', b'{"prompt": "ok", "size": "\\udfff"}']

    def good(key: str) -> int:
        reply = httpx.post(
            relay.base + "/v1/images/generations",
            json={"prompt": "a calm sea", "model": "mj-fast"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        return reply.status_code

    def bad(body: bytes) -> httpx.Response:
        return httpx.post(
            relay.base + "/v1/images/generations",
            content=body,
            headers={"Authorization": f"Bearer {relay.key}", "Content-Type": "application/json"},
            timeout=60,
        )

    with ThreadPoolExecutor(40) as pool:
        goods = [pool.submit(good, key) for key in keys]
        bads = [pool.submit(bad, body) for body in bad_bodies]
        assert [f.result() for f in goods] == [200] * 30
        refused = [f.result() for f in bads]
    for reply in refused:
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] in ("prompt", "size")
    assert relay.balance() == (1000, 0)  # the sender of the bad text paid nothing and holds nothing


@pytest.mark.parametrize("expires", ["%C2%B2", "9" * 4301, "-1", "1e9", "%F0%9F%98%80"])
def test_a_malformed_link_expiry_is_a_403_not_a_500(relay: RunningRelay, expires: str) -> None:
    reply = httpx.get(f"{relay.base}/files/job_abcdefgh/grid.png?exp={expires}&sig=x")
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "invalid_signature"


def _raw(base: str, payload: bytes, reads: int = 1) -> list[bytes]:
    """Send raw bytes on one connection; the answers read back, one per `reads`."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        answers, buffer = [], b""
        while len(answers) < reads:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, rest = buffer.split(b"\r\n\r\n", 1)
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                if len(rest) < length:
                    break
                answers.append(head + b"\r\n\r\n" + rest[:length])
                buffer = rest[length:]
        return answers


def test_deeply_nested_json_is_a_400_and_the_connection_serves_the_next_request(relay: RunningRelay) -> None:
    deep = b'{"prompt": "x", "n": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    host = relay.base.removeprefix("http://")
    first = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: "
        + host.encode()
        + b"\r\nAuthorization: Bearer "
        + relay.key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(deep)).encode()
        + b"\r\n\r\n"
        + deep
    )
    second = b"GET /healthz HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
    answers = _raw(relay.base, first + second, reads=2)
    assert len(answers) == 2, answers
    assert answers[0].startswith(b"HTTP/1.1 400") and b"nests more than" in answers[0]
    assert answers[1].startswith(b"HTTP/1.1 200")
    shallow = httpx.post(
        relay.base + "/v1/images/generations",
        json={"prompt": "x", "extra": [[[[["ok"]]]]]},
        headers={"Authorization": f"Bearer {relay.key}"},
        timeout=30,
    )
    assert shallow.status_code == 200  # ordinary nesting is fine


def test_an_unhandled_error_is_a_500_in_the_envelope_and_keeps_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from relay.api.openai import models

    async def broken(request: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(models, "list_models", broken)  # before the app is built: its route takes this one
    with running_relay(relay_config(tmp_path)) as relay:
        host = relay.base.removeprefix("http://")
        boom = b"GET /v1/models HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
        fine = b"GET /healthz HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
        answers = _raw(relay.base, boom + fine, reads=2)
    assert len(answers) == 2, answers
    assert answers[0].startswith(b"HTTP/1.1 500") and b'"code": "internal_error"' in answers[0]
    assert b"a bug" not in answers[0]
    assert answers[1].startswith(b"HTTP/1.1 200")
    assert [r for r in caplog.records if r.getMessage() == "unhandled error"]


def images_head(host: str, key: str, framing: bytes) -> bytes:
    """The head of an image request on the wire, its body framed by `framing` (a length, or chunks)."""
    return (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: "
        + host.encode()
        + b"\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nContent-Type: application/json\r\n"
        + framing
        + b"\r\n\r\n"
    )


def test_a_client_that_hangs_up_mid_body_is_not_an_error(relay: RunningRelay, caplog: pytest.LogCaptureFixture) -> None:
    host = relay.base.removeprefix("http://")
    with caplog.at_level(logging.INFO):
        hostname, port = host.split(":")
        with socket.create_connection((hostname, int(port)), timeout=10) as sock:
            sock.sendall(images_head(host, relay.key, b"Content-Length: 5000") + b'{"prompt": ')
        wait_for(
            lambda: any(r.getMessage() == "request" and r.__dict__["fields"]["status"] == 499 for r in caplog.records)
        )
    assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]
    metrics = httpx.get(relay.base + "/metrics").text
    assert 'route="/v1/images/generations",status="4xx"' in metrics
    assert 'route="/v1/images/generations",status="5xx"' not in metrics


@pytest.mark.parametrize(
    ("framing", "body", "status"),
    [
        (b"Content-Length: 5000", b'{"prompt": ', 408),  # it stops coming
        (b"Transfer-Encoding: chunked", b'b\r\n{"prompt": \r\nzz\r\n', 400),  # it is not valid HTTP
    ],
)
def test_a_body_the_server_refuses_is_logged_as_what_it_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, framing: bytes, body: bytes, status: int
) -> None:
    """A body that stops coming, or that is not valid HTTP, is answered by the server (408, 400), and the app hears
    of it as a disconnect: the request's line must say what the client was told, not 499, as if it had hung up."""
    config = relay_config(tmp_path, server={"body_timeout_s": 0.3})
    key = create_key(config)
    with caplog.at_level(logging.INFO), serve(build_app(config), config) as base:
        host = base.removeprefix("http://")
        hostname, port = host.split(":")
        with socket.create_connection((hostname, int(port)), timeout=10) as sock:
            sock.sendall(images_head(host, key, framing) + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 %d " % status)
        wait_for(lambda: [r for r in caplog.records if r.getMessage() == "request"])
    statuses = [r.__dict__["fields"]["status"] for r in caplog.records if r.getMessage() == "request"]
    assert statuses == [status]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "mj-fast", "messages": [{"role": "user", "content": "a sloth sim:never"}]}),
        ("/v1/images/generations", {"model": "mj-fast", "prompt": "a sloth sim:never"}),
    ],
)
def test_a_waiting_request_whose_client_hangs_up_ends_at_once(
    relay: RunningRelay, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, object]
) -> None:
    """A request waiting for its job ends as soon as its client hangs up (the job runs on without it), so it holds
    no task, and no graceful shutdown, until the job ends."""
    host = relay.base.removeprefix("http://")
    hostname, port = host.split(":")
    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {relay.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    with caplog.at_level(logging.INFO):
        with socket.create_connection((hostname, int(port)), timeout=10) as sock:
            sock.sendall(head.encode() + raw)
            wait_for(lambda: [row[0] for row in relay.jobs()] == ["IN_PROGRESS"])
        wait_for(
            lambda: any(r.getMessage() == "request" and r.__dict__["fields"]["status"] == 499 for r in caplog.records),
            timeout=5,
        )
    assert relay.jobs() == [("IN_PROGRESS", None, "held", "sim")]  # the job goes on, still held
    assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]


@pytest.mark.parametrize("path", ["/v1/models/", "/v1/images/generations/", "/mj/task/list-by-condition/"])
def test_a_trailing_slash_is_a_404_in_the_envelope_not_a_redirect(relay: RunningRelay, path: str) -> None:
    reply = httpx.request(
        "GET" if "models" in path else "POST", relay.base + path, headers={"Authorization": f"Bearer {relay.key}"}
    )
    assert reply.status_code == 404 and reply.headers["content-type"] == "application/json"
    body = reply.json()
    if path.startswith("/mj/"):  # the native envelope: a path not served is code 4 (3 is an unknown task)
        assert body["code"] == 4 and "without the trailing slash" in body["description"]
    else:
        assert "without the trailing slash" in body["error"]["message"]


def test_a_prompt_of_only_flags_and_an_empty_model_are_refused_uncharged(relay: RunningRelay) -> None:
    client = relay.openai()
    for prompt in ("--fast", "  --ar 16:9 --relax ", "--v 6 --q 2"):
        with pytest.raises(openai.BadRequestError, match="only parameters"):
            client.images.generate(model="mj-fast", prompt=prompt)
    for model in ("", " "):
        reply = httpx.post(
            relay.base + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "a koi"}]},
            headers={"Authorization": f"Bearer {relay.key}"},
        )
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found", reply.text
    assert relay.balance() == (1000, 0) and relay.jobs() == []


def test_a_prompt_that_asks_midjourney_for_several_jobs_is_refused_uncharged(relay: RunningRelay) -> None:
    # Midjourney runs `--repeat N` (`--r N`) N times, and a {a, b} permutation once for each option, while a
    # request is priced as one job.
    client = relay.openai()
    several = ("a cat --repeat 3", "a cat --r 40 --ar 2:3", "a {red, blue} bird", "a bird --ar {1:1, 16:9}")
    for prompt in several:
        with pytest.raises(openai.BadRequestError, match="several jobs"):
            client.images.generate(model="mj-fast", prompt=prompt)
    with pytest.raises(openai.BadRequestError, match="several jobs"):
        client.chat.completions.create(model="mj-fast", messages=[{"role": "user", "content": "a fox \u2014r 2"}])
    reply = httpx.post(
        relay.base + "/mj/submit/imagine", json={"prompt": "a {cat, dog}"}, headers={"mj-api-secret": relay.key}
    )
    assert reply.status_code == 400 and "several jobs" in reply.json()["description"], reply.text
    assert relay.balance() == (1000, 0) and relay.jobs() == []
    # Braces without a choice in them, or with the comma escaped, and --relax or --raw are one job.
    for prompt in ("a {single} heron", "a {red\\, blue} heron", "a heron --raw --relax"):
        client.images.generate(model="mj-fast", prompt=prompt)
    assert len(relay.jobs()) == 3


def test_a_provider_that_refuses_the_credentials_is_named_in_the_log_without_its_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = SimEngine(SimSettings(fast_s=0.2, tile_px=16))
    with serve(build_sim_app(engine, "midjourney-proxy", "the-right-secret")) as upstream:
        provider = {
            "name": "acct-x",
            "dialect": "midjourney-proxy",
            "base_url": upstream,
            "secret": "a-wrong-secret-value",
        }
        with caplog.at_level(logging.INFO), running_relay(relay_config(tmp_path, providers=[provider])) as relay:
            reply = httpx.post(
                relay.base + "/v1/images/generations",
                json={"prompt": "a heron"},
                headers={"Authorization": f"Bearer {relay.key}"},
                timeout=30,
            )
            assert reply.status_code == 503
    refusals = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "submit not accepted"]
    assert refusals and refusals[0]["provider"] == "acct-x" and "401" in refusals[0]["reason"]
    assert "a-wrong-secret-value" not in caplog.text


def _answered_while_health_is_checked(relay: RunningRelay, path: str, body: bytes) -> tuple[httpx.Response, float]:
    """One client's body sent to `path`, with `/healthz` asked meanwhile: its answer, and the longest a health
    check waited."""
    answer: list[httpx.Response] = []

    def send() -> None:
        headers = {"Authorization": f"Bearer {relay.key}", "Content-Type": "application/json"}
        answer.append(httpx.post(relay.base + path, content=body, headers=headers, timeout=120))

    sender = threading.Thread(target=send)
    sender.start()
    worst = 0.0
    with httpx.Client(base_url=relay.base, timeout=120) as client:
        while sender.is_alive():
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.02)
    sender.join()
    return answer[0], worst


def _many(head: bytes, value: bytes, count: int) -> bytes:
    return head + b",".join([value] * count) + b"]}"


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [  # each within the 20 MB body limit, from a key whose credits are never touched
        (
            "/v1/images/generations",
            _many(b'{"prompt": "a cat", "junk": [', b"[]", 6_600_000),
            "more than 100000 values",
        ),
        (
            "/v1/chat/completions",
            _many(b'{"model": "mj-fast", "messages": [', b"{}", 6_600_000),
            "more than 100000 values",
        ),
        (
            "/v1/chat/completions",
            _many(b'{"model": "mj-fast", "messages": [', b"0", 9_900_000),
            "more than 100000 values",
        ),
        ("/v1/chat/completions", _many(b'{"model": "mj-fast", "messages": [', b"0", 99_000), "messages.0"),
        ("/mj/task/list-by-condition", _many(b'{"ids": [', b"true", 99_000), "ids"),
    ],
    ids=["arrays", "empty-messages", "numbers", "numbers-within-bound", "native-ids"],
)
def test_a_body_of_countless_tiny_values_is_refused_without_holding_up_other_requests(
    relay: RunningRelay, path: str, body: bytes, says: str
) -> None:
    """Parsing, bounding the depth of and validating millions of values held the event loop for 7-26 s."""
    reply, worst = _answered_while_health_is_checked(relay, path, body)
    assert reply.status_code == 400 and says in reply.text, reply.text[:300]
    assert relay.balance() == (1000, 0) and relay.jobs() == []
    assert worst < 1.5, f"a health check waited {worst:.1f} s behind one client's body"


def test_a_reference_image_of_countless_chunks_is_checked_without_holding_up_other_requests(
    relay: RunningRelay,
) -> None:
    """Pillow reads a PNG chunk by chunk in Python: 800,000 empty ones (9.6 MB) held the event loop for 2-3 s."""
    image = png_start(8, 8) + png_chunk(b"prVt", b"") * 800_000  # and no end
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "text", "text": "a cat"}, {"type": "image_url", "image_url": {"url": url}}]
    body = json.dumps({"model": "mj-fast", "messages": [{"role": "user", "content": content}]}).encode()
    reply, worst = _answered_while_health_is_checked(relay, "/v1/chat/completions", body)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_image", reply.text[:300]
    assert relay.balance() == (1000, 0) and relay.jobs() == []
    assert worst < 1.0, f"a health check waited {worst:.1f} s behind one client's image"


def test_a_string_that_never_ends_is_counted_without_holding_up_other_requests(relay: RunningRelay) -> None:
    """Counting values found each string by its closing quote: in a string never closed, the search scanned the
    rest of the body again from each quote escaped in it. This 120 kB body held the event loop for about 20 s (a
    20 MB one, for days); the search keeps the GIL, so the time shows in the answer's, not a health check's."""
    body = b'{"prompt": "a cat", "junk": "' + b'\\"' * 10_000 + b"," * 100_001
    reply, worst = _answered_while_health_is_checked(relay, "/v1/images/generations", body)
    held = max(worst, reply.elapsed.total_seconds())
    assert held < 1.5, f"one client's body held the relay for {held:.1f} s"
    assert reply.status_code == 400 and "could not parse the JSON body" in reply.text, reply.text[:300]
    assert relay.balance() == (1000, 0) and relay.jobs() == []


def test_a_chat_body_of_many_bad_messages_is_refused_at_the_first() -> None:
    """One error is enough: collecting one per message cost 0.4 s of the event loop for 100,000 of them."""
    with pytest.raises(ValidationError) as refused:
        ChatRequest.model_validate({"model": "mj-fast", "messages": [0] * 1000})
    assert refused.value.error_count() == 1


def test_a_chat_history_quoting_a_pasted_csv_is_not_refused_as_too_many_values(relay: RunningRelay) -> None:
    """The bound on values counted commas inside strings too: six values, 180,000 commas in one string."""
    # A chat UI sends the whole conversation: earlier, the user pasted a 1.3 MB CSV (60,000 rows of 3 commas) into
    # another model's chat; now they ask mj-fast for an image. Six JSON values, 180,000 commas inside one string.
    csv = "\n".join(f"2024-01-{i % 28 + 1:02d},{i},{i * 3 % 997},ok" for i in range(60_000))
    body = {
        "model": "mj-fast",
        "messages": [
            {"role": "user", "content": "Summarise this CSV:\n" + csv},
            {"role": "assistant", "content": "It holds 60,000 rows of daily readings."},
            {"role": "user", "content": "a calm sea at dawn"},
        ],
    }
    raw = json.dumps(body).encode()
    assert len(raw) < 2_000_000 and raw.count(b",") > 100_000
    reply = httpx.post(
        relay.base + "/v1/chat/completions",
        content=raw,
        headers={"Authorization": f"Bearer {relay.key}", "Content-Type": "application/json"},
        timeout=120,
    )
    assert "values" not in reply.text, reply.text[:300]
    assert reply.status_code == 200, reply.text[:300]


_RELAY_LINK = "https://relay.example/files/1234567890123456/grid.png?exp=9999999999&sig=" + "s" * 43 + " "


@pytest.mark.parametrize(
    ("path", "prompt"),
    [
        ("/mj/submit/imagine", _RELAY_LINK * (19_000_000 // len(_RELAY_LINK))),
        ("/mj/submit/imagine", "a cat --fast " * (19_000_000 // 13)),
        ("/mj/submit/shorten", "a cat --fast " * (19_000_000 // 13)),
    ],
    ids=["imagine-links", "imagine-flags", "shorten-flags"],
)
def test_a_native_prompt_far_over_the_limit_is_refused_without_holding_up_other_requests(
    relay: RunningRelay, path: str, prompt: str
) -> None:
    """A native prompt was read for the relay's own image links (each signature checked) and for mode flags before
    its length was: a 19 MB prompt of links held the event loop for seconds, only to be refused as too long."""
    reply, worst = _answered_while_health_is_checked(relay, path, json.dumps({"prompt": prompt}).encode())
    assert reply.status_code == 400 and "the limit is 4000" in reply.json()["description"], reply.text[:300]
    assert relay.balance() == (1000, 0) and relay.jobs() == []
    assert worst < 0.5, f"a health check waited {worst:.1f} s behind one client's prompt"


def test_a_list_of_countless_task_ids_is_read_without_holding_up_other_requests(relay: RunningRelay) -> None:
    """A native list names as many ids as the body holds values, every one read from the store (500 at a time)."""
    ids = b",".join(b'"%d"' % (10**15 + index) for index in range(99_000))
    reply, worst = _answered_while_health_is_checked(relay, "/mj/task/list-by-condition", b'{"ids": [' + ids + b"]}")
    assert reply.status_code == 200 and reply.json() == [], reply.text[:300]
    # (under coverage on the 2-core CI machine, with the other worker busy, a health check waited 1.7-1.9 s)
    assert worst < 3.0, f"a health check waited {worst:.1f} s behind one client's list"
