"""Events, logs and errors: small pieces with sharp edges."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from relay import logs
from relay.core.events import JobEvent, JobEvents
from relay.errors import ContentPolicy, DeadlineExceeded, InsufficientQuota, UpstreamFailed
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


def test_error_envelopes_say_whether_a_retry_helps() -> None:
    banned = ContentPolicy("no", param="prompt")
    assert banned.body() == {
        "error": {
            "message": "no",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": "content_policy_violation",
        }
    }
    assert banned.status == 400 and banned.response_headers() == {"x-should-retry": "false"}
    assert InsufficientQuota("x").response_headers() == {"x-should-retry": "false"}
    assert DeadlineExceeded("x").response_headers() == {"x-should-retry": "false"}
    assert UpstreamFailed("x").response_headers() == {}
    assert UpstreamFailed("x", retry=False, headers={"Retry-After": "1"}).response_headers() == {
        "Retry-After": "1",
        "x-should-retry": "false",
    }
