"""A server lane (`relay.server.Lane`): the requests a connection answers itself, within the read that completes
them, and everything it leaves to the app; over raw sockets against a real server, with a lane that records what
it is given."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import pytest

from relay.api.hooks import HookLane
from relay.config import Config
from tests.api.test_http_limits import (
    LIMITS,
    WAIT,
    Recorder,
    connect,
    parse_head,
    read_response,
    read_to_close,
    refusal,
)
from tests.helpers import serve

LANE_PATH = "/lane"


class Call:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def answer(self, body: bytes) -> tuple[int, str]:
        self.lane.bodies.append(body)
        return 204, f"req_{len(self.lane.bodies)}"


class Lane:
    """Claims POST /lane; records the bodies it is given, and the lengths it was asked about."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.asked: list[tuple[str, int]] = []

    def claim(self, path: str, length: int) -> Call | None:
        self.asked.append((path, length))
        return Call(self) if path == LANE_PATH else None


class LaneApp(Recorder):
    """The recording app, with a lane in its state (as `build_app` puts the relay's)."""

    def __init__(self) -> None:
        super().__init__()
        self.state = SimpleNamespace(lane=Lane())


@pytest.fixture
def lane_server() -> Iterator[tuple[str, LaneApp]]:
    with ExitStack() as stack:
        app = LaneApp()
        base = stack.enter_context(
            serve(app, Config.model_validate({"server": {**LIMITS, "max_body_bytes": 1024, "keepalive_timeout_s": 30}}))
        )
        yield base, app


def request(path: str, body: bytes, *headers: str, version: str = "1.1", length: bool = True) -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: relay", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join([*lines, "", ""]).encode() + body


class Reader:
    """The answers on one connection, in order: (status, headers, body); interim (1xx) answers skipped. A 204 has
    no body; any other answer here states its length."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _more(self, deadline: float) -> None:
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = self.sock.recv(65536)
        assert chunk, f"closed after {self.data!r}"
        self.data += chunk

    def next(self) -> tuple[int, dict[str, str], bytes]:
        deadline = time.monotonic() + WAIT
        while True:
            while b"\r\n\r\n" not in self.data:
                self._more(deadline)
            head, _, self.data = self.data.partition(b"\r\n\r\n")
            status, headers = parse_head(head)
            if status >= 200:
                break
        length = 0 if status == 204 else int(headers["content-length"])
        while len(self.data) < length:
            self._more(deadline)
        body, self.data = self.data[:length], self.data[length:]
        return status, headers, body


def test_a_claimed_request_is_answered_by_the_connection_and_the_connection_is_kept(
    lane_server: tuple[str, LaneApp],
) -> None:
    base, app = lane_server
    with connect(base) as sock:
        answers = Reader(sock)
        sock.sendall(request(LANE_PATH, b'{"a": 1}'))
        status, headers, _ = answers.next()
        assert (status, headers["x-request-id"], answers.data) == (204, "req_1", b"")
        assert "connection" not in headers and "date" in headers and "server" in headers
        # the body in pieces, on the same connection
        whole = request(LANE_PATH, b'{"b": 2}')
        sock.sendall(whole[:-5])
        time.sleep(0.05)  # a second read: the body's end comes later
        sock.sendall(whole[-5:])
        status, headers, _ = answers.next()
        assert (status, headers["x-request-id"]) == (204, "req_2")
    assert app.state.lane.bodies == [b'{"a": 1}', b'{"b": 2}']
    assert app.received.empty()  # the app saw none of them


def test_pipelined_requests_are_answered_in_order_lane_and_app_alike(lane_server: tuple[str, LaneApp]) -> None:
    """One behind an answer of the app's under way goes to the app too (queued behind it, as pipelining is); once
    the connection is idle again the lane answers."""
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(request(LANE_PATH, b"1") + request("/echo", b"22") + request(LANE_PATH, b"333"))
        answers = Reader(sock)
        assert [answers.next()[::2] for _ in range(3)] == [(204, b""), (200, b'{"bytes": 2}'), (200, b'{"bytes": 3}')]
        sock.sendall(request(LANE_PATH, b"4444"))
        assert answers.next()[0] == 204
    assert app.state.lane.bodies == [b"1", b"4444"]


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (request("/echo", b"{}"), "a path the lane does not claim"),
        (request(LANE_PATH, b"x" * 1025), "over the body limit (the relay's app answers 413)"),
        (request(LANE_PATH, b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False), "in chunks"),
        (request(LANE_PATH, b"{}", "Expect: 100-continue"), "expecting 100"),
        (b"GET /lane HTTP/1.1\r\nHost: relay\r\n\r\n", "another method"),
        (request("/la%6ee", b"{}"), "a percent-encoded path"),
    ],
)
def test_anything_else_goes_to_the_app(lane_server: tuple[str, LaneApp], raw: bytes, why: str) -> None:
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(raw)
        status, _, _ = Reader(sock).next()
    assert status == 200, why
    assert app.state.lane.bodies == [], why
    path, _ = app.received.get(timeout=WAIT)
    assert path in ("/echo", "/lane"), why


def test_the_lane_is_asked_with_the_path_and_stated_length(lane_server: tuple[str, LaneApp]) -> None:
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(request("/echo", b"12345"))
        read_response(sock)
    assert app.state.lane.asked == [("/echo", 5)]


def test_a_request_behind_an_answer_under_way_goes_to_the_app(lane_server: tuple[str, LaneApp]) -> None:
    """The app's answer to /patient is still to come when the lane's request arrives: the app takes it, behind."""
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(request("/patient", b"1") + request(LANE_PATH, b"2"))
        answers = Reader(sock)
        assert answers.next()[0] == answers.next()[0] == 200
    assert app.state.lane.bodies == []


def test_http_1_0_is_answered_and_closed(lane_server: tuple[str, LaneApp]) -> None:
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(request(LANE_PATH, b"{}", version="1.0"))
        raw = read_to_close(sock)
    status, headers = parse_head(raw.partition(b"\r\n\r\n")[0])
    assert (status, headers["connection"]) == (204, "close")
    assert app.state.lane.bodies == [b"{}"]


def test_a_stalled_body_gets_408_and_is_never_given_to_the_lane(lane_server: tuple[str, LaneApp]) -> None:
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(request(LANE_PATH, b"{}")[:-1])
        refusal(read_to_close(sock), 408, "request_timeout")
    assert app.state.lane.bodies == []


def test_a_caller_that_goes_away_mid_body_is_not_given_to_the_lane(lane_server: tuple[str, LaneApp]) -> None:
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(request(LANE_PATH, b"{}")[:-1])
    with connect(base) as sock:  # the server is still there, and the lane took nothing from the first
        sock.sendall(request(LANE_PATH, b"ok"))
        assert Reader(sock).next()[0] == 204
    assert app.state.lane.bodies == [b"ok"]


# -- the relay's hook lane -----------------------------------------------------------------------------------------


class Hooks:
    """Stands for `UpstreamHooks`: one valid token, room for `room` calls, and the calls taken."""

    def __init__(self, room: int = 10) -> None:
        self.room_left = room
        self.taken: list[tuple[str, bytes]] = []

    def accepts(self, provider: str, token: str) -> bool:
        return (provider, token) == ("up", "good")

    def room(self, size: int) -> bool:
        return self.room_left > 0 and size <= 100

    def take(self, provider: str, body: bytes) -> None:
        self.room_left -= 1
        self.taken.append((provider, body))


class Metrics:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.requests = self.request_seconds = self

    def labels(self, *values: str) -> Metrics:
        self.seen.append(values)
        return self

    def inc(self) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


def test_the_hook_lane_claims_calls_with_a_valid_token_while_there_is_room() -> None:
    hooks, metrics = Hooks(room=1), Metrics()
    lane = HookLane(hooks, metrics)  # type: ignore[arg-type]
    for path, length in [
        ("/hooks/up/bad", 2),
        ("/hooks/nobody/good", 2),
        ("/hooks/up/good/more", 2),
        ("/hooks/up", 2),
        ("/v1/images/generations", 2),
        ("/hooks/up/good", 101),  # more than `room` takes: applied before its answer, the ordinary way
    ]:
        assert lane.claim(path, length) is None, path
    call = lane.claim("/hooks/up/good", 2)
    assert call is not None
    status, request = call.answer(b"{}")
    assert status == 204 and request.startswith("req_") and hooks.taken == [("up", b"{}")]
    assert ("/hooks/{provider}/{token}", "POST", "2xx") in metrics.seen  # counted as any request is
    assert lane.claim("/hooks/up/good", 2) is None  # no room left


def test_the_lanes_of_many_connections_do_not_mix(lane_server: tuple[str, LaneApp]) -> None:
    base, app = lane_server
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with connect(base) as sock:
                answers = Reader(sock)
                for i in range(20):
                    sock.sendall(request(LANE_PATH, f"{n}:{i}".encode()))
                    assert answers.next()[0] == 204
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(app.state.lane.bodies) == sorted(f"{n}:{i}".encode() for n in range(8) for i in range(20))
