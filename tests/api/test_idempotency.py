"""`Idempotency-Key` as an attacker and a careless client send it: another key's value, one value for two different
requests, values no client should send."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from tests.helpers import RunningRelay, create_key, sql

IMAGES = "/v1/images/generations"
CHAT = "/v1/chat/completions"
NATIVE = "/mj/submit/imagine"


def post(
    relay: RunningRelay, route: str, body: dict[str, Any], key: str | None = None, **headers: str
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key or relay.key}", **headers}
    return httpx.post(relay.base + route, json=body, headers=headers, timeout=30)


def urls(answer: httpx.Response) -> list[str]:
    return [item["url"].split("?")[0] for item in answer.json()["data"]]


def test_one_value_from_two_keys_is_two_requests(relay: RunningRelay) -> None:
    other = create_key(relay.config, name="other")
    body = {"model": "mj-fast", "prompt": "a lantern"}
    first = post(relay, IMAGES, body, **{"idempotency-key": "order-1"})
    second = post(relay, IMAGES, body, other, **{"idempotency-key": "order-1"})
    assert first.status_code == second.status_code == 200
    assert set(urls(first)).isdisjoint(urls(second))
    assert len(relay.jobs()) == 2
    (held,) = sql(relay.config, "SELECT balance FROM keys WHERE name = 'other'")
    assert held == (998,)
    # Each key's retry follows its own first attempt.
    assert urls(post(relay, IMAGES, body, other, **{"idempotency-key": "order-1"})) == urls(second)
    assert urls(post(relay, IMAGES, body, **{"idempotency-key": "order-1"})) == urls(first)
    assert len(relay.jobs()) == 2


@pytest.mark.parametrize(
    ("route", "first", "second"),
    [
        (IMAGES, {"model": "mj-fast", "prompt": "a red barn"}, {"model": "mj-fast", "prompt": "a blue barn"}),
        (IMAGES, {"model": "mj-fast", "prompt": "a red barn"}, {"model": "mj-relax", "prompt": "a red barn"}),
        (IMAGES, {"model": "mj-fast", "prompt": "a red barn"}, {"model": "mj-fast", "prompt": "a red barn", "n": 2}),
        (
            CHAT,
            {"model": "mj-fast", "messages": [{"role": "user", "content": "a red barn"}]},
            {"model": "mj-fast", "messages": [{"role": "user", "content": "a blue barn"}]},
        ),
    ],
    ids=["prompt", "model", "n", "chat"],
)
def test_one_value_for_another_body_is_refused(
    relay: RunningRelay, route: str, first: dict[str, Any], second: dict[str, Any]
) -> None:
    assert post(relay, route, first, **{"idempotency-key": "order-2"}).status_code == 200
    before = relay.balance()
    refused = post(relay, route, second, **{"idempotency-key": "order-2"})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert error["param"] is None or error["param"] == "Idempotency-Key"
    assert refused.headers["x-should-retry"] == "false"
    assert len(relay.jobs()) == 1
    assert relay.balance() == before
    # The first body with that value is still its retry, and follows its job.
    assert post(relay, route, first, **{"idempotency-key": "order-2"}).status_code == 200
    assert len(relay.jobs()) == 1


def test_one_value_on_another_route_is_another_request(relay: RunningRelay) -> None:
    assert (
        post(relay, IMAGES, {"model": "mj-fast", "prompt": "a mill"}, **{"idempotency-key": "order-3"}).status_code
        == 200
    )
    chat = {"model": "mj-fast", "messages": [{"role": "user", "content": "a mill"}]}
    assert post(relay, CHAT, chat, **{"idempotency-key": "order-3"}).status_code == 200
    assert len(relay.jobs()) == 2


def test_the_native_surface_does_not_read_the_header(relay: RunningRelay) -> None:
    """A native submit is answered with its task id as soon as the upstream took it; the header names nothing there:
    each submit is a task of its own, and another key's task stays out of reach."""
    other = create_key(relay.config, name="other")
    tasks = []
    for key in (relay.key, relay.key, other):
        answer = post(relay, NATIVE, {"prompt": "a lantern"}, key, **{"idempotency-key": "order-4"})
        assert answer.status_code == 200 and answer.json()["code"] == 1, answer.text
        tasks.append(answer.json()["result"])
    assert len(set(tasks)) == 3
    headers = {"authorization": f"Bearer {relay.key}", "idempotency-key": "order-4"}
    assert httpx.get(f"{relay.base}/mj/task/{tasks[2]}/fetch", headers=headers).status_code == 404


def raw_post(relay: RunningRelay, route: str, header: bytes) -> bytes:
    """A request with one header as raw bytes (httpx refuses some of them); the status line of its answer."""
    host, port = relay.base.removeprefix("http://").split(":")
    body = b'{"model": "mj-fast", "prompt": "a kite"}'
    request = (
        b"POST "
        + route.encode()
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + relay.key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + header
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize(
    "header",
    [
        b"Idempotency-Key: " + b"k" * 7000,
        "Idempotency-Key: заказ-17 ☃".encode(),
        b"Idempotency-Key: \xff\xfe\x80",
        b"Idempotency-Key: a\tb",
        b"Idempotency-Key: a\x01b",
        b"Idempotency-Key: a\x00b",
        b"Idempotency-Key: a\x7fb",
        b"Idempotency-Key:",
        b"Idempotency-Key:    ",
        b"Idempotency-Key: " + b"k" * 100_000,
    ],
    ids=["long", "utf8", "latin1", "tab", "soh", "nul", "del", "empty", "blank", "huge"],
)
@pytest.mark.parametrize("route", [IMAGES, NATIVE])
def test_a_hostile_value_is_refused_or_ignored_never_a_failure(relay: RunningRelay, route: str, header: bytes) -> None:
    status = raw_post(relay, route, header)
    code = int(status.split()[1])
    assert code in (200, 400, 431), status
    # Nothing of it stays behind: a plain request right after works.
    assert post(relay, IMAGES, {"model": "mj-fast", "prompt": "after"}).status_code == 200
