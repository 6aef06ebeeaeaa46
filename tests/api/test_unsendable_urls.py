"""Client-given URLs the relay's HTTP client could not send (a control character, an unpaired surrogate, a NUL):
refused as a reference image (400, never 500) and as a `notifyHook` (never accepted, then silently not delivered);
an internationalised host name is reached, with its ASCII Host header."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.app import build_app
from tests.helpers import Receiver, RunningRelay, assert_ledger_balances, create_key, relay_config, serve, wait_for


@pytest.fixture
def public_dns_relay(tmp_path: Path) -> Iterator[RunningRelay]:
    """A relay whose client-given names all resolve to one public address (no network is used: each URL below
    fails before a connection is made)."""
    config = relay_config(tmp_path)
    key = create_key(config, 1000)
    app = build_app(config)

    async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address("93.184.215.14")]

    app.state.relay.egress._resolve = resolver
    with serve(app) as base:
        yield RunningRelay(base, config, key)
    assert_ledger_balances(config.database_url())


@pytest.mark.parametrize(
    "url",
    [
        "http://images.example/a\u0001b.png",  # a control character in the path
        "http://images.example/a\ud800.png",  # a lone surrogate in the path
        "http://b\u00fccher.example/x.png",  # an internationalised host name (its Host header is not ASCII)
        "http://images.example/x.png?q=\u0000",  # a NUL in the query
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_reference_url_the_client_cannot_send_is_a_400_not_a_500(
    public_dns_relay: RunningRelay, url: str, stream: bool
) -> None:
    relay = public_dns_relay
    body = {
        "model": "mj-fast",
        "stream": stream,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a cat"}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    }
    reply = httpx.post(
        relay.base + "/v1/chat/completions",
        content=json.dumps(body).encode(),  # ensure_ascii: a lone surrogate travels as \ud800
        headers={"Authorization": f"Bearer {relay.key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "invalid_image" and error["param"] == "messages", error
    assert relay.balance() == (1000, 0)
    assert relay.jobs() == []


def test_a_hook_on_an_internationalised_host_is_delivered_and_an_unsendable_one_refused(tmp_path: Path) -> None:
    """An IDN hook URL (a real kind of name) is accepted at submit; its deliveries must arrive (with the ASCII
    Host header), and a hook URL the client cannot send (a control character) must be refused at submit, not
    accepted and silently never delivered."""
    receiver = Receiver()
    config = relay_config(
        tmp_path,
        api={"references": {"allow_hosts": ["127.0.0.0/8"]}},
        hooks={"attempts": 1},
        providers=[{"name": "sim", "dialect": "simulator", "simulator": {"fast_s": 0.3, "tile_px": 32}}],
    )
    key = create_key(config, 1000)
    app = build_app(config)

    async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address("127.0.0.1")]

    app.state.relay.egress._resolve = resolver
    with serve(receiver.app()) as hooks, serve(app) as base:
        port = hooks.rsplit(":", 1)[1]
        headers = {"mj-api-secret": key}
        bad = httpx.post(
            base + "/mj/submit/imagine",
            json={"prompt": "a cat", "notifyHook": f"http://hooks.example:{port}/o\u0001k"},
            headers=headers,
        )
        assert bad.status_code == 400 and bad.json()["code"] == 4, bad.text
        reply = httpx.post(
            base + "/mj/submit/imagine",
            json={"prompt": "a hooked fox", "notifyHook": f"http://b\u00fccher.example:{port}/ok"},
            headers=headers,
        )
        assert reply.status_code == 200 and reply.json()["code"] == 1, reply.text
        task_id = str(reply.json()["result"])
        wait_for(lambda: any(t["status"] == "SUCCESS" for t in receiver.tasks(task_id)), timeout=15)
        with receiver.lock:
            hosts = {h["host"] for h, _ in receiver.deliveries}
        assert hosts == {f"xn--bcher-kva.example:{port}"}
    assert_ledger_balances(config.database_url())
