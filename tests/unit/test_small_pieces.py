"""Events, logs and errors: small pieces with sharp edges."""

from __future__ import annotations

import asyncio
import json
import logging

import click
import pytest

from relay import logs
from relay.api.mj.errors import render as render_mj
from relay.api.openai.errors import render
from relay.cli import _parse_when
from relay.core.background import cancel_all, every
from relay.core.events import JobEvent, JobEvents
from relay.domain import FailureCode
from relay.errors import (
    AuthenticationFailed,
    InsufficientQuota,
    InvalidRequest,
    JobFailed,
    NotFound,
    ServiceUnavailable,
)
from relay.store.jobs import JobState

pytestmark = pytest.mark.anyio


async def test_events_reach_only_subscribers_until_they_leave() -> None:
    hub = JobEvents()
    first, second = hub.subscribe(["a", "b"]), hub.subscribe(["b"])
    hub.publish(JobEvent("b", JobState.IN_PROGRESS, 15))
    hub.publish(JobEvent("c", JobState.IN_PROGRESS, 15))
    assert (await first.next(0.1)) == (await second.next(0.1)) == JobEvent("b", JobState.IN_PROGRESS, 15)
    assert await first.next(0.01) is None
    first.close()
    second.close()
    assert len(hub) == 0


async def test_a_waiting_subscriber_wakes_on_an_event_and_a_cancelled_wait_leaves_nothing_behind() -> None:
    hub = JobEvents()
    waiter = hub.subscribe(["a"])
    waiting = asyncio.ensure_future(waiter.next(5))
    await asyncio.sleep(0)
    hub.publish(JobEvent("a", JobState.IN_PROGRESS, 31))
    assert await asyncio.wait_for(waiting, 1) == JobEvent("a", JobState.IN_PROGRESS, 31)
    cancelled = asyncio.ensure_future(waiter.next(5))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    hub.publish(JobEvent("a", JobState.SUCCEEDED, 100))  # kept for the next wait
    assert await waiter.next(0.01) == JobEvent("a", JobState.SUCCEEDED, 100)
    waiter.close()


def test_log_lines_are_json_and_never_carry_known_secrets() -> None:
    logs.redact(["upstream-secret-123", "", "short"])
    record = logging.LogRecord("relay", logging.INFO, __file__, 1, "calling with upstream-secret-123", None, None)
    record.fields = {"provider": "a", "note": "short is fine"}
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["msg"] == "calling with ***" and line["provider"] == "a" and line["note"] == "short is fine"
    assert line["level"] == "info" and line["ts"].endswith("Z")


def test_a_secret_json_must_escape_is_scrubbed_from_log_lines() -> None:
    """A configured secret may hold a quote or a backslash (a hand-typed admin token or provider secret): JSON
    writes those escaped, so the line never holds the secret as configured, and scrubbing that alone left it whole
    for anyone who reads the line as the JSON it is."""
    secret = 'pa"ss\\word-42'
    logs.redact([secret])
    record = logging.LogRecord("relay", logging.INFO, __file__, 1, f"calling with {secret}", None, None)
    record.fields = {"header": f"Bearer {secret}"}
    line = logs.JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["msg"] == "calling with ***" and entry["header"] == "Bearer ***"
    assert json.dumps(secret)[1:-1] not in line


def test_a_secret_that_holds_another_is_scrubbed_whole() -> None:
    """Secrets are told to the logs in no particular order (the signing secrets first, then the providers', the
    bucket's and the admin token): one that another begins with, scrubbed first, must not leave the rest of the
    longer one in the line."""
    logs.redact(["relay-signing-7"])
    logs.redact(["relay-signing-7-and-the-rest-of-it"])
    record = logging.LogRecord("relay", logging.INFO, __file__, 1, "relay-signing-7-and-the-rest-of-it", None, None)
    assert json.loads(logs.JsonFormatter().format(record))["msg"] == "***"


def test_error_envelopes_say_whether_a_retry_helps() -> None:
    banned = render(JobFailed(FailureCode.BANNED, "no"))
    assert banned.body == {
        "error": {
            "message": "no",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": "content_policy_violation",
        }
    }
    assert banned.status == 400 and banned.headers == {"x-should-retry": "false"}
    assert render(InsufficientQuota("x")).headers == {"x-should-retry": "false"}
    assert render(JobFailed(FailureCode.TIMEOUT, "x")).headers == {"x-should-retry": "false"}
    assert render(JobFailed(FailureCode.FAILED, "x")).headers == {}
    assert render(JobFailed(FailureCode.UNCONFIRMED, "x")).headers == {"x-should-retry": "false"}
    assert render(JobFailed(FailureCode.UNAVAILABLE, "x")).headers == {"retry-after": "10"}
    # never sent (its relay process went away): the SDKs' retry, a second on, starts the request afresh
    interrupted = render(JobFailed(FailureCode.INTERRUPTED, "x"))
    assert interrupted.status == 503 and interrupted.headers == {"retry-after": "1"}
    assert render(ServiceUnavailable("x", retry_after=3)).headers == {"retry-after": "3"}


def test_the_native_envelope_carries_midjourney_proxy_codes_with_the_same_status() -> None:
    cases = [
        (InsufficientQuota("short"), 429, 25),
        (JobFailed(FailureCode.BANNED, "no"), 400, 24),
        (JobFailed(FailureCode.UNAVAILABLE, "busy"), 503, 23),
        (InvalidRequest("bad", param="prompt"), 400, 4),
        (NotFound("gone", what="task"), 404, 3),
        (JobFailed(FailureCode.FAILED, "failed"), 502, 9),
        (AuthenticationFailed("who"), 401, 4),
    ]
    for error, status, code in cases:
        rendered = render_mj(error)
        assert (rendered.status, rendered.body["code"]) == (status, code), error
        assert rendered.body == {"code": code, "description": error.message, "properties": {}, "result": None}


def test_an_error_quoting_text_that_cannot_be_encoded_still_renders() -> None:
    rendered = render(InvalidRequest("Invalid value for 'a\ud800'", param="a\ud800"))
    assert json.loads(rendered.to_bytes())["error"]["param"] == "a\ud800"


def test_a_duration_an_operator_writes_is_read_within_a_hundred_years() -> None:
    assert _parse_when("30d", 1_000_000_000.0, "--since", ago=True) == 1_000_000_000.0 - 30 * 86400
    assert _parse_when("2w", 0.0, "--expires") == 14 * 86400
    for typed in ("9" * 400 + "d", "5300w"):  # past a float's range; past a century
        with pytest.raises(click.BadParameter, match="at most 100 years"):
            _parse_when(typed, 0.0, "--since", ago=True)


async def test_a_periodic_round_that_raises_is_logged_and_the_next_one_comes(caplog: pytest.LogCaptureFixture) -> None:
    naps: list[float] = []
    rounds: list[int] = []
    done = asyncio.Event()

    async def nap(seconds: float) -> None:
        naps.append(seconds)

    async def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise OSError("the database went away")
        if len(rounds) == 3:
            done.set()
            await asyncio.Event().wait()  # parked until cancelled

    with caplog.at_level(logging.ERROR, logger="relay.test"):
        task = asyncio.create_task(every(nap, 5.0, work, logging.getLogger("relay.test"), "a round failed", {"n": 1}))
        await asyncio.wait_for(done.wait(), 5)
        await cancel_all([task])
    assert rounds == [0, 1, 2] and naps == [5.0, 5.0, 5.0]
    (failed,) = [r for r in caplog.records if r.name == "relay.test"]
    assert failed.getMessage() == "a round failed" and failed.exc_info is not None
    assert getattr(failed, "fields", None) == {"n": 1}
    assert task.cancelled()
