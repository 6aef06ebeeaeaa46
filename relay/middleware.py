"""Pure ASGI middleware, outermost first:

Observe     one log line and the metrics per request, an `x-request-id` on every answer
Guard       every error becomes an answer in the request's surface envelope, and is never re-raised: an
            exception that escaped would make the server close the keep-alive connection, losing the client's
            next request on it. A client that hangs up mid-request is neither an error nor a 5xx (499). A database
            that cannot serve now (down, unreachable, too slow, locked) is a 503 with `Retry-After`, counted and
            logged in one line without its statement; any other error a 500, logged with its traceback. An error
            after the answer started can only end it (the chat's stream tells its own errors, `as_relay_error`).
            A request still unanswered when the server cancels it (its graceful shutdown over) is answered 503
            `STOPPING` in its envelope, as it goes, instead of the server's plain-text 500.
BodyLimit   a body over the limit is refused (413) before the route reads it
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.api.errors import render
from relay.errors import DatabaseUnavailable, InternalError, PayloadTooLarge, RelayError, ServiceUnavailable
from relay.logs import event, quoted
from relay.metrics import Metrics
from relay.store.db import unavailable

log = logging.getLogger("relay.http")
# What a request still waiting when the server cancels it (the relay stopping, its graceful shutdown over) is told.
# Its jobs go on (another process, or this one's successor, follows them): a retry is answered with their images.
STOPPING = ServiceUnavailable("The relay is stopping; retry shortly.", retry_after=1)

# The status recorded for a request whose client went away before an answer (nginx's convention).
CLIENT_CLOSED = 499
_DISCONNECTED = "mj_relay.disconnected"
# The status the server answered a request with itself, in the app's stead, when its body could never be complete
# (it stopped coming, or was not valid HTTP): the app hears of it as a client that went away, but the client was
# told this, and the request is logged and counted with it (`relay.server`).
ANSWERED = "mj_relay.answered"


class BodyLimit:
    """A body over `limit` bytes is refused: at once from Content-Length, or while it streams."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > self.limit:
            raise self._error()
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than the limit of {self.limit} bytes.")


class Guard:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = False

        async def watched_send(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:
            scope[_DISCONNECTED] = True
        except asyncio.CancelledError:
            if not started:  # told in its envelope, then cancelled on (a client that left reads nothing of it)
                with contextlib.suppress(Exception):
                    await _answer(scope, send, STOPPING)
            raise
        except Exception as exc:
            error = as_relay_error(exc, scope.get("path"), self.metrics)
            if started:  # the answer is under way: all that can be done is to end it
                if not ended:
                    with contextlib.suppress(Exception):
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await _answer(scope, send, error)


async def _answer(scope: Scope, send: Send, error: RelayError) -> None:
    """Answer `error` in the envelope of the request's surface."""
    rendered = render(scope.get("path", ""), error)
    body = rendered.to_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in rendered.headers.items()]
    await send({"type": "http.response.start", "status": rendered.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def as_relay_error(exc: Exception, path: str | None, metrics: Metrics) -> RelayError:
    """What the client is told of `exc`: a domain error as it is; a database that cannot serve now as
    `DatabaseUnavailable` (counted, and logged in one line); anything else as an internal error (a bug), its details
    in the log only. Called once per failure: by `Guard`, or by a stream that ends itself with the error."""
    if isinstance(exc, RelayError):
        return exc
    if unavailable(exc):
        metrics.database_unavailable.inc()
        # The driver's own words (a refused connection, "database is locked"), not the statement's text.
        cause = exc.__cause__ or getattr(exc, "orig", None) or exc
        reason = (str(cause).splitlines() or [""])[0][:200]
        fields = {"path": quoted(path), "error": type(cause).__name__, "reason": reason}
        log.warning("database unavailable", extra={"fields": fields})
        return DatabaseUnavailable()
    log.error("unhandled error", exc_info=exc, extra={"fields": {"path": quoted(path)}})
    return InternalError("The relay hit an internal error; it has been logged.")


def request_id() -> str:
    """An id for one request, for its log line and its `x-request-id`: unique enough to find it by, and secret to
    nobody (it is made for every request, so it is cheap: no system call)."""
    return f"req_{random.getrandbits(64):016x}"


def observed(metrics: Metrics, request: str, method: str, template: str, status: int, seconds: float) -> None:
    """A request's log line and metrics, once it is answered."""
    metrics.of(metrics.requests, template, method, f"{status // 100}xx").inc()
    metrics.of(metrics.request_seconds, template).observe(seconds)
    event(log, "request", request_id=request, method=method, route=template, status=status, ms=round(seconds * 1000, 1))


class Observe:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request = request_id()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message).append("x-request-id", request)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if scope.get(ANSWERED):
                status = scope[ANSWERED]
            elif scope.get(_DISCONNECTED):
                status = CLIENT_CLOSED
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            observed(self.metrics, request, scope["method"], template, status, time.perf_counter() - started)
