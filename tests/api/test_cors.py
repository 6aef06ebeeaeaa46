"""CORS as a browser meets it: a preflight from an allowed origin passes without a key and costs nothing, the
answers it allows carry the headers a page needs, and any other origin gets no CORS header at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.config import ConfigError, parse_config
from tests.helpers import RunningRelay, relay_config, running_relay

ALLOWED = "https://chat.example.com"
SDK_HEADERS = "authorization, content-type, x-stainless-os, x-stainless-retry-count, x-stainless-package-version"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RunningRelay]:
    config = relay_config(tmp_path, cors={"origins": [ALLOWED + "/", "http://localhost:3000"], "max_age_s": 900})
    with running_relay(config) as running:
        yield running


def preflight(base: str, path: str, origin: str, headers: str | bytes = SDK_HEADERS) -> httpx.Response:
    return httpx.options(
        base + path,
        headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers},
    )


def cors_headers(reply: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in reply.headers.items() if name.lower().startswith("access-control-")}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations", "/dashboard/billing/usage"])
def test_a_preflight_from_an_allowed_origin_passes_without_a_key(relay: RunningRelay, path: str) -> None:
    reply = preflight(relay.base, path, ALLOWED)
    assert reply.status_code == 204
    assert reply.headers["access-control-allow-origin"] == ALLOWED
    assert set(reply.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST", "OPTIONS"}
    allowed = set(reply.headers["access-control-allow-headers"].split(", "))
    assert {h.strip() for h in SDK_HEADERS.split(",")} <= allowed
    assert {"idempotency-key", "mj-api-secret"} <= allowed
    assert reply.headers["access-control-max-age"] == "900"
    assert reply.headers["vary"] == "Origin"
    assert "x-request-id" in reply.headers  # logged like any request
    assert relay.balance() == (1000, 0) and relay.jobs() == []


def test_a_preflight_allows_only_well_formed_stainless_headers(relay: RunningRelay) -> None:
    asked = "x-stainless-arch, x-evil, x-stainless-\u00e9, x-stainless-" + "a" * 80 + ", cookie"
    allowed = preflight(relay.base, "/v1/models", ALLOWED, asked.encode("latin-1")).headers[
        "access-control-allow-headers"
    ]
    assert "x-stainless-arch" in allowed
    assert "x-evil" not in allowed and "cookie" not in allowed and "aaaa" not in allowed


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.com",
        "https://chat.example.com.evil.com",
        "http://chat.example.com",  # another scheme is another origin
        "https://chat.example.com:8443",
        "https://CHAT.example.com",
        "null",
        "",
    ],
)
def test_other_origins_get_no_cors_headers(relay: RunningRelay, origin: str) -> None:
    reply = preflight(relay.base, "/v1/chat/completions", origin)
    assert reply.status_code == 405 and cors_headers(reply) == {}
    reply = httpx.get(relay.base + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {relay.key}"})
    assert reply.status_code == 200 and cors_headers(reply) == {}
    assert "origin" in reply.headers["vary"].lower()  # a cache must not hand this answer to an allowed origin


def test_answers_to_an_allowed_origin_can_be_read_by_the_page(relay: RunningRelay) -> None:
    auth = {"Authorization": f"Bearer {relay.key}"}
    reply = httpx.get(relay.base + "/v1/models", headers={"Origin": "http://localhost:3000", **auth})
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == "http://localhost:3000"
    exposed = {h.strip().lower() for h in reply.headers["access-control-expose-headers"].split(",")}
    assert {"retry-after", "x-request-id", "x-should-retry"} <= exposed
    assert "origin" in reply.headers["vary"].lower()
    # Errors too: a page must be able to read why it was refused.
    refused = httpx.get(relay.base + "/v1/models", headers={"Origin": ALLOWED})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ALLOWED


def test_the_admin_api_is_never_opened_to_other_origins(relay: RunningRelay) -> None:
    reply = preflight(relay.base, "/admin/api/keys", ALLOWED)
    assert cors_headers(reply) == {}


def test_without_configured_origins_there_is_no_cors(tmp_path: Path) -> None:
    with running_relay(relay_config(tmp_path)) as relay:
        reply = preflight(relay.base, "/v1/chat/completions", ALLOWED)
        assert reply.status_code == 405 and cors_headers(reply) == {}
        reply = httpx.get(relay.base + "/v1/models", headers={"Origin": ALLOWED})
        assert cors_headers(reply) == {}


def test_any_origin_with_a_star(tmp_path: Path) -> None:
    with running_relay(relay_config(tmp_path, cors={"origins": ["*"]})) as relay:
        reply = preflight(relay.base, "/v1/chat/completions", "https://anywhere.example")
        assert reply.status_code == 204 and reply.headers["access-control-allow-origin"] == "*"
        assert "vary" not in reply.headers
        reply = httpx.get(relay.base + "/v1/models", headers={"Origin": "https://anywhere.example"})
        assert reply.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in reply.headers  # the key travels in a header, not a cookie


@pytest.mark.parametrize(
    "origin", ["chat.example.com", "ftp://chat.example.com", "https://chat.example.com/app", "https://u@x.com", "null"]
)
def test_an_origin_that_is_not_scheme_host_port_is_refused_at_load(origin: str) -> None:
    with pytest.raises(ConfigError, match=r"cors\.origins"):
        parse_config(f"cors: {{origins: ['{origin}']}}")


def test_configured_origins_are_written_as_browsers_send_them() -> None:
    config = parse_config("cors: {origins: ['HTTPS://Chat.Example.com:443/', 'http://localhost:3000']}")
    assert config.cors.origins == ["https://chat.example.com", "http://localhost:3000"]
