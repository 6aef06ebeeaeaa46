"""What the relay writes to its logs: never its own hook tokens, never more than a line's worth of an upstream's
words or of a request's path, and no internal error (a traceback) for a client's mistake."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from relay import logs
from relay.core.upstream_hooks import hook_token
from relay.metrics import Metrics
from relay.middleware import as_relay_error
from relay.store.db import Unreachable
from tests.helpers import RunningRelay, relay_config, running_relay, serve

SIGNING = "a-signing-secret-of-the-relay-and-no-other"


def _echoing_upstream(padding: int) -> Starlette:
    """A Midjourney-proxy that refuses every submit with a 503 whose description repeats the request's notifyHook,
    then `padding` characters more (as an upstream's error page may be long)."""

    async def refuse(request: Request) -> JSONResponse:
        hook = (await request.json()).get("notifyHook")
        description = f"cannot call notifyHook {hook} now " + "x" * padding
        return JSONResponse({"code": 9, "description": description, "result": None}, status_code=503)

    return Starlette(routes=[Route("/mj/submit/imagine", refuse, methods=["POST"])])


def _imagine_refused(relay: RunningRelay) -> None:
    """A native imagine, which the upstream refuses."""
    reply = httpx.post(
        relay.base + "/mj/submit/imagine", json={"prompt": "a heron"}, headers={"mj-api-secret": relay.key}, timeout=30
    )
    assert reply.status_code >= 400


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The captured records as the relay writes them."""
    formatter = logs.JsonFormatter()
    return [formatter.format(record) for record in caplog.records]


def test_the_relay_s_hook_token_an_upstream_repeats_is_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serve(_echoing_upstream(0)) as upstream:
        provider = {"name": "up", "dialect": "midjourney-proxy", "base_url": upstream, "secret": "s" * 16}
        config = relay_config(
            tmp_path,
            providers=[provider],
            server={"public_url": "http://relay.example"},
            images={"signing_secret": SIGNING},
        )
        with caplog.at_level(logging.INFO), running_relay(config) as relay:
            _imagine_refused(relay)
    refusals = [json.loads(line) for line in _lines(caplog) if '"submit not accepted"' in line]
    assert refusals and "cannot call notifyHook http://relay.example/hooks/up/" in refusals[0]["reason"]
    assert not [line for line in _lines(caplog) if hook_token(SIGNING, "up") in line]


def test_an_upstream_s_long_refusal_makes_no_long_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An upstream's error page or description may be as long as an answer may be (megabytes): the relay logs the
    start of it, as a provider's health keeps it, not a line a log shipper would cut or drop."""
    with serve(_echoing_upstream(1_000_000)) as upstream:
        provider = {"name": "up", "dialect": "midjourney-proxy", "base_url": upstream, "secret": "s" * 16}
        with caplog.at_level(logging.INFO), running_relay(relay_config(tmp_path, providers=[provider])) as relay:
            _imagine_refused(relay)
    refusals = [json.loads(line) for line in _lines(caplog) if '"submit not accepted"' in line]
    assert refusals and refusals[0]["reason"].startswith("cannot call notifyHook")
    assert max(len(line) for line in _lines(caplog)) < 2000


@pytest.mark.parametrize("error", [Unreachable("the database did not answer: OSError: refused"), RuntimeError("a bug")])
def test_a_long_path_makes_no_long_log_line_of_a_request_s_failure(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """A request's path is the client's to make as long as the request line may be (32 KB, or a megabyte): the line
    that logs its failure (a database that cannot serve each request of an outage, with any key, unknown keys
    included; a bug) holds the start of it."""
    path = "/v1/models/" + "m" * 30_000
    with caplog.at_level(logging.INFO):
        as_relay_error(error, path, Metrics())
    (line,) = _lines(caplog)
    logged = json.loads(line)["path"]
    assert logged.startswith("/v1/models/mmm") and len(logged) <= 300


def test_a_reference_url_whose_host_is_no_name_is_refused_not_an_internal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A host written as punycode that decodes to no name (`xn--zz`) passes the URL parser, and only the HTTP
    client's sending finds it wrong: refused as the client's mistake where the rules let a URL through unresolved,
    not a 500 and an error line with a traceback for every such request."""
    config = relay_config(tmp_path, api={"references": {"allow_private": True}})
    with caplog.at_level(logging.INFO), running_relay(config) as relay:
        content = [
            {"type": "text", "text": "a heron"},
            {"type": "image_url", "image_url": {"url": "http://xn--zz/a.png"}},
        ]
        reply = httpx.post(
            relay.base + "/v1/chat/completions",
            json={"model": "mj-fast", "messages": [{"role": "user", "content": content}]},
            headers={"Authorization": f"Bearer {relay.key}"},
            timeout=30,
        )
        assert reply.status_code == 400, reply.text
        assert "not a valid URL" in reply.json()["error"]["message"]
    assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]
