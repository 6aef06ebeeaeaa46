"""The hook lane (`relay.api.hooks.HookLane`): which calls it answers itself and which it leaves to the ordinary
stack, driven as ASGI with no server."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from relay.api.hooks import PATH, HookLane

pytestmark = pytest.mark.anyio

LIMIT = 1000


class Hooks:
    """Stands for `UpstreamHooks`: one valid token, and the calls taken."""

    def __init__(self, *, room: bool = True) -> None:
        self.room = room
        self.taken: list[tuple[str, bytes]] = []
        self.applied: list[tuple[str, bytes]] = []

    def accepts(self, provider: str, token: str) -> bool:
        return (provider, token) == ("up", "good")

    def take(self, provider: str, body: bytes) -> bool:
        if self.room:
            self.taken.append((provider, body))
        return self.room

    async def apply(self, provider: str, body: bytes) -> str:
        self.applied.append((provider, body))
        return "applied"


async def call(
    lane_hooks: Hooks, method: str, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
) -> tuple[bool, list[Message], Scope]:
    """Drive the lane once; whether it passed the call on, what it sent, and the scope after."""
    passed_on = False

    async def ordinary(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal passed_on
        passed_on = True

    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
    ]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": method, "path": path, "headers": headers}
    await HookLane(ordinary, lane_hooks, LIMIT)(scope, receive, send)  # type: ignore[arg-type]
    return passed_on, sent, scope


def length(n: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(n).encode())]


async def test_a_well_formed_call_with_a_valid_token_is_answered_by_the_lane() -> None:
    hooks = Hooks()
    passed_on, sent, scope = await call(hooks, "POST", "/hooks/up/good", [b'{"id":', b' "1"}'], length(11))
    assert not passed_on and hooks.taken == [("up", b'{"id": "1"}')]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] and sent[0]["status"] == 204
    assert scope["route"].path == PATH  # what Observe labels the request with


async def test_with_too_many_calls_being_applied_the_lane_applies_before_answering() -> None:
    hooks = Hooks(room=False)
    passed_on, sent, _ = await call(hooks, "POST", "/hooks/up/good", [b"{}"], length(2))
    assert not passed_on and hooks.applied == [("up", b"{}")] and sent[0]["status"] == 204


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/hooks/up/good", length(2)),  # another method: 405 from the router
        ("POST", "/hooks/up/bad", length(2)),  # a wrong token: 404
        ("POST", "/hooks/nobody/good", length(2)),
        ("POST", "/hooks/up/good/more", length(2)),
        ("POST", "/v1/images/generations", length(2)),
        ("POST", "/hooks/up/good", [(b"transfer-encoding", b"chunked")]),  # no stated length
        ("POST", "/hooks/up/good", length(LIMIT + 1)),  # over the limit: 413 from the body limit
        ("POST", "/hooks/up/good", [(b"content-length", b"1e3")]),
    ],
)
async def test_anything_else_goes_the_ordinary_way(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> None:
    hooks = Hooks()
    passed_on, sent, _ = await call(hooks, method, path, [b"{}"], headers)
    assert passed_on and sent == [] and hooks.taken == hooks.applied == []


async def test_a_caller_that_goes_away_mid_body_is_not_answered() -> None:
    hooks = Hooks()
    passed_on, sent, _ = await call(hooks, "POST", "/hooks/up/good", [], length(10))
    assert not passed_on and sent == [] and hooks.taken == []
