"""Recorded upstream replies, served over HTTP on a loopback port: the adapters reach them through their own HTTP
client, as they reach a provider.

    with replaying() as upstream:
        route = upstream.post("/mj/submit/imagine").respond(json={"code": 1, "result": "17"})
        ...                                   # an adapter with base_url=upstream.base calls it
        route.calls.last.request.headers      # what it sent

A route is matched by method and path (or a regular expression over the path); a reply is given as keywords or as
an `httpx.Response` (its status, headers and body are sent); `hang()` answers nothing until the client gives up.
A request no route matches is answered 599, so a test that expected a call sees its outcome change.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tests.helpers import serve


@dataclass(frozen=True)
class Sent:
    method: str
    path: str
    headers: httpx.Headers
    content: bytes


@dataclass(frozen=True)
class Call:
    request: Sent


class Calls(list[Call]):
    @property
    def last(self) -> Call:
        return self[-1]


@dataclass
class Route:
    method: str
    path: str | None
    pattern: re.Pattern[str] | None
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    hangs: bool = False
    calls: Calls = field(default_factory=Calls)

    @property
    def call_count(self) -> int:
        return len(self.calls)

    def matches(self, method: str, path: str) -> bool:
        if method != self.method:
            return False
        return path == self.path if self.pattern is None else bool(self.pattern.fullmatch(path))

    def respond(
        self,
        status: int = 200,
        *,
        json: Any = None,
        text: str | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Route:
        kwargs: dict[str, Any] = {"headers": headers}
        if json is not None:
            kwargs["json"] = json
        elif text is not None:
            kwargs["text"] = text
        elif content is not None:
            kwargs["content"] = content
        return self.mock(httpx.Response(status, **kwargs))

    def mock(self, reply: httpx.Response) -> Route:
        self.status, self.body = reply.status_code, reply.content
        self.headers = [(k, v) for k, v in reply.headers.items() if k.lower() not in ("content-length",)]
        return self

    def hang(self) -> Route:
        self.hangs = True
        return self


class Replay:
    def __init__(self) -> None:
        self.base = ""
        self.routes: list[Route] = []
        self._lock = threading.Lock()

    def get(self, path: str | None = None, *, url__regex: str | None = None) -> Route:
        return self._route("GET", path, url__regex)

    def post(self, path: str | None = None, *, url__regex: str | None = None) -> Route:
        return self._route("POST", path, url__regex)

    def _route(self, method: str, path: str | None, regex: str | None) -> Route:
        route = Route(method, path, re.compile(regex) if regex is not None else None)
        with self._lock:
            self.routes.append(route)
        return route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        with self._lock:
            route = next((r for r in reversed(self.routes) if r.matches(request.method, request.url.path)), None)
        if route is None:
            await Response(b"no recorded reply", status_code=599)(scope, receive, send)
            return
        route.calls.append(Call(Sent(request.method, request.url.path, httpx.Headers(request.headers.raw), body)))
        if route.hangs:
            await asyncio.sleep(3600)
        response = Response(route.body, status_code=route.status)
        for name, value in route.headers:
            response.headers.append(name, value)
        await response(scope, receive, send)


@contextmanager
def replaying() -> Iterator[Replay]:
    replay = Replay()
    with serve(replay) as base:
        replay.base = base
        yield replay
