"""A server lane (`relay.server.Lane`): the requests a connection answers itself, within the read that completes
them, and everything it leaves to the app; over raw sockets against a real server, with a lane that records what
it is given."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from types import SimpleNamespace

import pytest

from relay.api.hooks import HookLane
from relay.config import Config
from relay.metrics import Metrics
from relay.server import _empty_answer
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
from tests.helpers import bound_socket, running_server, serve, wait_for

LANE_PATH = "/lane"


class Call:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def answer(self, body: bytes) -> tuple[int, str]:
        self.lane.bodies.append(body)
        return 204, f"req_{len(self.lane.bodies)}"

    def stalled(self) -> None:
        self.lane.stalled += 1

    def gone(self) -> None:
        self.lane.gone += 1


class Lane:
    """Claims POST /lane; records the bodies it is given, and the lengths it was asked about."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.asked: list[tuple[str, int]] = []
        self.stalled = 0
        self.gone = 0
        self.claimed = threading.Event()

    def claim(self, path: str, length: int) -> Call | None:
        self.asked.append((path, length))
        if path != LANE_PATH:
            return None
        self.claimed.set()
        return Call(self)


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
    # the lane is asked only about a path it would read as the router does (no percent-escapes to decode)
    assert all("%" not in asked for asked, _ in app.state.lane.asked), why


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


def test_nothing_behind_a_lane_answer_that_closes_the_connection_is_taken(lane_server: tuple[str, LaneApp]) -> None:
    """HTTP/1.0 with `Connection: keep-alive` is kept alive by the parser but closed by the relay (as uvicorn closes
    it after any HTTP/1.0 answer): what follows in the same read was sent on a connection the answer closed."""
    base, app = lane_server
    first = request(LANE_PATH, b"1", "Connection: keep-alive", version="1.0")
    for behind in (request(LANE_PATH, b"2"), request("/echo", b"2")):
        with connect(base) as sock:
            sock.sendall(first + behind)
            raw = read_to_close(sock)
        status, headers = parse_head(raw.partition(b"\r\n\r\n")[0])
        assert (status, headers["connection"]) == (204, "close")
        assert raw.count(b"HTTP/1.1") == 1
    time.sleep(0.2)  # an app request started behind it would have been recorded by now
    assert app.state.lane.bodies == [b"1", b"1"]  # the lane took neither call behind
    assert app.received.empty()  # nor did the app run a request nobody could be answered


def test_a_stalled_body_gets_408_and_is_never_given_to_the_lane(lane_server: tuple[str, LaneApp]) -> None:
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(request(LANE_PATH, b"{}")[:-1])
        refusal(read_to_close(sock), 408, "request_timeout")
    assert app.state.lane.bodies == [] and app.state.lane.stalled == 1  # counted as a request that got 408


def test_a_caller_that_goes_away_mid_body_is_not_given_to_the_lane(lane_server: tuple[str, LaneApp]) -> None:
    base, app = lane_server
    with connect(base) as sock:
        sock.sendall(request(LANE_PATH, b"{}")[:-1])
    with connect(base) as sock:  # the server is still there, and the lane took nothing from the first
        sock.sendall(request(LANE_PATH, b"ok"))
        assert Reader(sock).next()[0] == 204
    assert app.state.lane.bodies == [b"ok"]
    wait_for(lambda: app.state.lane.gone == 1)  # told, to be counted as a request whose client left


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


def test_the_hook_lane_claims_calls_with_a_valid_token_while_there_is_room() -> None:
    hooks, metrics = Hooks(room=1), Metrics()
    lane = HookLane(hooks, metrics)  # type: ignore[arg-type]  # (`Hooks` stands for `UpstreamHooks`)
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
    counted = {"route": "/hooks/{provider}/{token}", "method": "POST", "status": "2xx"}
    assert metrics.registry.get_sample_value("mj_relay_http_requests_total", counted) == 1  # as any request is
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


# -- keep-alive and shutdown ---------------------------------------------------------------------------------------


@pytest.fixture
def quick_idle_server() -> Iterator[tuple[str, LaneApp]]:
    """Idle connections close after 0.25 s (shorter than /patient takes); bodies get 5 s."""
    with ExitStack() as stack:
        app = LaneApp()
        server = {**LIMITS, "max_body_bytes": 1024, "keepalive_timeout_s": 0.25, "body_timeout_s": 5}
        yield stack.enter_context(serve(app, Config.model_validate({"server": server}))), app


def test_calls_whose_answers_are_not_read_are_not_read_on() -> None:
    """Calls pipelined by a client that reads none of their answers: once more of the answers waits than the
    transport buffers, the connection takes no more calls until the client reads, as for requests the app answers.
    Before, the lane went on answering every call sent, holding each answer, until `body_timeout_s` dropped the
    connection: hundreds of thousands of calls on loopback, their answers held all that time."""
    app = LaneApp()
    listening = bound_socket()
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # the connections' kernel buffers: small, as the client's
        listening.setsockopt(socket.SOL_SOCKET, option, 16384)
    server = {**LIMITS, "max_body_bytes": 1024, "keepalive_timeout_s": 0.25, "body_timeout_s": 5}
    one = request(LANE_PATH, b"x")
    sent = 0
    with serve(app, Config.model_validate({"server": server}), listening) as base, socket.socket() as sock:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, not read meanwhile
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.connect((host, int(port)))
        sock.settimeout(1.0)  # far less than `body_timeout_s` (5 s here): a send that waits this long is refused
        calls = one * 1000
        try:
            while sent < 100_000_000:
                sent += sock.send(calls[sent % len(one) :])
        except TimeoutError:
            pass
        except ConnectionResetError:
            pytest.fail(f"the connection took every call until it was dropped: {len(app.state.lane.bodies)}")
        assert sent < 100_000_000, "the connection never stopped reading"
        complete = sent // len(one)
        sock.settimeout(WAIT)
        answered, data = 0, b""
        while answered < complete:  # the client reads: every call it sent whole is answered, in order
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {answered} of {complete} answers"
            data += chunk
            answered += data.count(b"HTTP/1.1 ")
            data = data[data.rfind(b"HTTP/1.1 ") + 1 :] if b"HTTP/1.1 " in data else data[-8:]
        assert answered == complete
    assert len(app.state.lane.bodies) + app.received.qsize() == complete


def test_an_answered_lane_call_leaves_the_connection_idle_and_closed_in_time(
    quick_idle_server: tuple[str, LaneApp],
) -> None:
    base, _ = quick_idle_server
    with connect(base) as sock:
        sock.sendall(request(LANE_PATH, b"1"))
        raw = read_to_close(sock)  # within WAIT: the idle timer was armed after the answer
    assert parse_head(raw.partition(b"\r\n\r\n")[0])[0] == 204


def test_a_request_right_behind_a_lane_call_is_not_cut_by_the_idle_timer(
    quick_idle_server: tuple[str, LaneApp],
) -> None:
    """In the same read as the lane's call: an app request that takes longer than the idle timeout, and a lane call
    whose body comes later than it."""
    base, app = quick_idle_server
    with connect(base) as sock:
        sock.sendall(request(LANE_PATH, b"1") + request("/patient", b"22"))
        answers = Reader(sock)
        assert answers.next()[0] == 204
        assert answers.next()[::2] == (200, b'{"bytes": 2, "receive": null}')
        second = request(LANE_PATH, b"333")
        sock.sendall(request(LANE_PATH, b"4") + second[:-2])
        assert answers.next()[0] == 204
        assert app.received.get(timeout=WAIT)[0] == "/patient"
        with pytest.raises(queue.Empty):  # longer than the idle timeout passes, and nothing else reaches the app
            app.received.get(timeout=0.5)
        sock.sendall(second[-2:])
        assert answers.next()[0] == 204
    assert app.state.lane.bodies == [b"1", b"4", b"333"]


def test_a_lane_call_whose_body_is_coming_when_the_server_stops_is_answered(tmp_path: object) -> None:
    app = LaneApp()
    config = Config.model_validate({"server": {**LIMITS, "max_body_bytes": 1024, "body_timeout_s": 5}})
    sock = bound_socket()
    port = sock.getsockname()[1]
    with running_server(app, config, sock, timeout_graceful_shutdown=5) as (base, server):
        with connect(base) as client:
            whole = request(LANE_PATH, b"late")
            client.sendall(whole[:-2])
            assert app.state.lane.claimed.wait(WAIT)  # its body is coming (before, the connection is idle: closed)
            server.should_exit = True
            while True:  # the server stops listening first: then it has told its connections
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
                except OSError:
                    break
            client.sendall(whole[-2:] + request(LANE_PATH, b"after"))  # one more behind it, in the same read
            raw = read_to_close(client)
        status, headers = parse_head(raw.partition(b"\r\n\r\n")[0])
        assert (status, headers["connection"]) == (204, "close")
        assert raw.count(b"HTTP/1.1") == 1
        assert app.state.lane.bodies == [b"late"]  # the call behind the closing answer was not taken


def test_a_body_that_keeps_coming_is_waited_for_piece_by_piece(lane_server: tuple[str, LaneApp]) -> None:
    """`body_timeout_s` (0.25 s here) bounds each wait for more of the body, not the whole body, as through the app."""
    base, app = lane_server
    whole = request(LANE_PATH, b"abc")
    with connect(base) as sock:
        sock.sendall(whole[:-3])
        for byte in (b"a", b"b", b"c"):  # 0.45 s in all, no wait longer than 0.15 s
            time.sleep(0.15)
            sock.sendall(byte)
        assert Reader(sock).next()[0] == 204
    assert app.state.lane.bodies == [b"abc"]


def test_a_lane_answer_carries_the_server_s_current_date() -> None:
    """The answer heads are made once per status, and made again when the server's default headers change (its
    `date`, every second)."""
    first = [(b"date", b"Fri, 04 Dec 2026 20:00:00 GMT"), (b"server", b"uvicorn")]
    later = [(b"date", b"Fri, 04 Dec 2026 20:00:01 GMT"), (b"server", b"uvicorn")]
    assert b"20:00:00" in _empty_answer(204, first, "req_1", True)
    assert b"20:00:00" in _empty_answer(204, first, "req_2", True)
    answer = _empty_answer(204, later, "req_3", True)
    assert b"20:00:01" in answer and b"20:00:00" not in answer and answer.endswith(b"x-request-id: req_3\r\n\r\n")
    assert b"connection: close" in _empty_answer(204, later, "req_4", False)
