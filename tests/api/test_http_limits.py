"""HTTP-layer limits and refusals (relay/server.py), over raw sockets against a real server: malformed requests,
oversized headers, slow or silent clients, stalled bodies, idle keep-alive, too many connections. Every refusal is
OpenAI's envelope in JSON, and the connection closes after it."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from relay.config import Config
from tests.helpers import RunningRelay, relay_config, running_relay, serve

# Small enough that the whole file runs in a few seconds; the defaults are 32768, 10, 30, 5 and 4096.
LIMITS = {
    "max_header_bytes": 4096,
    "header_timeout_s": 0.25,
    "body_timeout_s": 0.25,
    "keepalive_timeout_s": 0.25,
    "max_connections": 50,
}
PATIENCE = 0.5  # longer than every timeout above: how long the patient route takes before and after the body
WAIT = 3.0  # how long a test waits on a socket for what it expects
LARGE = 32_000_000  # an answer no loopback connection's buffers hold


class Recorder:
    """An ASGI app that records what `receive()` gave each request (test thread reads `received`).

    /echo     reads the body, answers its size
    /stream   starts its answer, then reads the body, then ends the answer
    /early    answers without reading the body
    /patient  takes PATIENCE before reading the body, and waits PATIENCE for `receive()` after it
    /large    answers LARGE bytes, more than the kernel's buffers hold
    """

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, list[str]]] = queue.Queue()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen: list[str] = []
        try:
            await self.route(scope["path"], receive, send, seen)
        finally:
            self.received.put((scope["path"], seen))

    async def route(self, path: str, receive: Receive, send: Send, seen: list[str]) -> None:
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"started", "more_body": True})
            if await self.body(receive, seen) is not None:
                await send({"type": "http.response.body", "body": b"done"})
            return
        if path == "/large":
            headers = [(b"content-length", str(LARGE).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"x" * LARGE})
            return
        if path == "/patient":
            await self.idle(asyncio.Event().wait())
        body = b"" if path == "/early" else await self.body(receive, seen)
        if body is None:
            return
        if path == "/patient":
            early = await self.idle(receive())
            answer = {"bytes": len(body), "receive": early["type"] if early else None}
        else:
            answer = {"bytes": len(body)}
        data = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    @staticmethod
    async def body(receive: Receive, seen: list[str]) -> bytes | None:
        chunks = []
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def idle(awaitable: Awaitable[Any]) -> Message | None:
        """What an awaitable gives within PATIENCE, or None."""
        try:
            result: Message | None = await asyncio.wait_for(awaitable, PATIENCE)
            return result
        except TimeoutError:
            return None


Start = Callable[..., tuple[str, Recorder]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start a server for the Recorder app with LIMITS, overridden by keyword; gives (base URL, app)."""
    with ExitStack() as stack:

        def run(**server: Any) -> tuple[str, Recorder]:
            app = Recorder()
            config = Config.model_validate({"server": {**LIMITS, **server}})
            return stack.enter_context(serve(app, config)), app

        yield run


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=WAIT)


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails after WAIT seconds without)."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while chunks[-1:] != [b""]:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunks.append(sock.recv(65536))
    sock.close()
    return b"".join(chunks)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One answer with a content-length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of a body"
        body += chunk
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    line, *fields = head.decode("latin-1").split("\r\n")
    headers = {}
    for field in fields:
        name, _, value = field.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(line.split(" ")[1]), headers


def refusal(raw: bytes, status: int, code: str) -> dict[str, str]:
    """Check that `raw` is exactly one answer, a refusal in OpenAI's envelope that closes the connection."""
    head, _, body = raw.partition(b"\r\n\r\n")
    got, headers = parse_head(head)
    assert got == status, raw
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    kind = "server_error" if status >= 500 else "invalid_request_error"
    assert error == {"message": error["message"], "type": kind, "param": None, "code": code}
    assert error["message"]
    return headers


def get(path: str = "/echo", *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: relay", *extra, "", ""]).encode()


def post(path: str, length: int, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Length: {length}\r\n\r\n".encode() + body


# -- malformed requests --------------------------------------------------------------------------------------------


def test_malformed_http_gets_400_in_the_envelope_and_the_connection_closes(start: Start) -> None:
    base, _ = start()
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        with connect(base) as sock:
            sock.sendall(garbage)
            headers = refusal(read_to_close(sock), 400, "invalid_request")
        assert headers["x-should-retry"] == "false"


def test_every_server_the_tests_start_speaks_the_envelope(relay: RunningRelay) -> None:
    with connect(relay.base) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS hello on the plain port
        refusal(read_to_close(sock), 400, "invalid_request")


def test_a_malformed_body_is_refused_and_the_app_sees_a_disconnect(start: Start) -> None:
    base, app = start()
    with connect(base) as sock:
        head = b"POST /echo HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(head + b"5\r\nhello\r\nnot-a-chunk-size\r\n")
        refusal(read_to_close(sock), 400, "invalid_request")
    path, seen = app.received.get(timeout=WAIT)
    assert path == "/echo" and seen[-1] == "http.disconnect"


def test_a_bad_request_behind_one_in_progress_is_refused_after_its_answer(start: Start) -> None:
    base, _ = start()
    with connect(base) as sock:
        sock.sendall(post("/echo", 5, b"hello") + b"BOGUS\r\n\r\n")
        raw = read_to_close(sock)
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert parse_head(first)[0] == 200 and rest.startswith(b'{"bytes": 5}')
    refusal(rest.removeprefix(b'{"bytes": 5}'), 400, "invalid_request")


def test_a_malformed_body_behind_an_answer_under_way_is_refused_after_it(start: Start) -> None:
    base, app = start()
    with connect(base) as sock:
        head = b"POST /echo HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(post("/patient", 5, b"hello") + head + b"5\r\nhello\r\nnot-a-chunk-size\r\n")
        raw = read_to_close(sock)
    assert raw.startswith(b"HTTP/1.1 200 OK"), raw  # the answer under way is not cut
    answer = b'{"bytes": 5, "receive": null}'
    rest = raw.partition(b"\r\n\r\n")[2]
    assert rest.startswith(answer), raw
    refusal(rest.removeprefix(answer), 400, "invalid_request")
    assert app.received.get(timeout=WAIT) == ("/patient", ["http.request"])
    assert app.received.empty()  # the refused request never reached the app


# -- header size -----------------------------------------------------------------------------------------------------


def padded(total: int) -> bytes:
    """A GET whose request line and headers are exactly `total` bytes."""
    bare = get("/echo", "X-Pad: ")
    return get("/echo", "X-Pad: " + "p" * (total - len(bare)))


def test_headers_up_to_the_limit_are_served_and_one_byte_more_gets_431(start: Start) -> None:
    base, _ = start()
    with connect(base) as sock:
        sock.sendall(padded(4096))
        assert read_response(sock)[0] == 200
    with connect(base) as sock:
        sock.sendall(padded(4097))
        headers = refusal(read_to_close(sock), 431, "request_header_too_large")
    assert headers["x-should-retry"] == "false"


def test_431_comes_as_the_limit_is_passed_not_when_the_headers_end(start: Start) -> None:
    base, _ = start(header_timeout_s=30)
    with connect(base) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 4096)  # never ends: only the size can refuse it
        refusal(read_to_close(sock), 431, "request_header_too_large")


@pytest.mark.parametrize("apart", [False, True], ids=["one-write", "body-first"])
def test_headers_behind_the_end_of_a_body_get_431_as_any_others(start: Start, apart: bool) -> None:
    """A request's headers that come in the same read as the end of the body before them are counted too: they
    were parsed whole, however large, and counted from nothing at the next read."""
    base, _ = start(header_timeout_s=30)
    body = b"b" * 6000  # longer than the limit: the read goes on past it with the body still coming
    first = post("/echo", len(body), body)
    with connect(base) as sock:
        if apart:
            sock.sendall(first[:100])  # the read then begins in the body
            time.sleep(0.05)
            first = first[100:]
        sock.sendall(first + get("/echo", "X-Big: " + "a" * 20_000))
        raw = read_to_close(sock)
    assert raw.startswith(b"HTTP/1.1 200 OK") and b'{"bytes": 6000}' in raw, raw
    refusal(raw[raw.index(b"HTTP/1.1 431") :], 431, "request_header_too_large")


@pytest.mark.parametrize("cut", ["mid-line", "line-end"])
def test_a_header_line_begun_in_the_read_where_the_request_before_ended_is_counted(start: Start, cut: str) -> None:
    """A request that begins in the read where the one before it ends is counted from what the parser handed over
    of it: the header line it was still reading (which the parser keeps until the next one begins, however long)
    went uncounted, and a pipelined request got through with headers of nearly twice the limit."""
    base, _ = start(header_timeout_s=30)
    first = get("/echo")
    head = b"GET /echo HTTP/1.1\r\nHost: relay\r\nX-Big: "
    if cut == "mid-line":  # the first 4096 bytes end inside X-Big
        second = head + b"a" * 6000 + b"\r\n\r\n"
    else:  # the first 4096 bytes end right after X-Big's line, 4000 bytes long
        big = head + b"a" * (4096 - len(first) - len(head) - 2) + b"\r\n"
        second = big + b"X-More: " + b"b" * 3000 + b"\r\n\r\n"
    with connect(base) as sock:
        sock.sendall(first + second)
        raw = read_to_close(sock)
    assert raw.startswith(b"HTTP/1.1 200 OK"), raw
    assert raw.count(b"HTTP/1.1 ") == 2, raw
    refusal(raw[raw.index(b"HTTP/1.1 431") :], 431, "request_header_too_large")


def test_a_request_line_begun_behind_a_body_whose_last_line_names_http_is_counted_once(start: Start) -> None:
    """A body whose last line ends in a newline and says " HTTP/" (a prompt about HTTP/2), then a request whose
    request line the read ends in: that line is the request line, counted as its URL, not a header line after it.
    Taken for a header's, it was counted twice, and a request well under the limit was refused 431."""
    base, _ = start(header_timeout_s=30)
    body = b'{"prompt": "a neon sign reading HTTP/2"}\n'
    first = post("/echo", len(body), body)
    bare = get("/echo?q=", "Connection: close")
    second = get("/echo?q=" + "q" * (4050 - len(bare)), "Connection: close")
    assert len(second) == 4050 and len(first) + len(second) > 4096  # the first read ends inside its URL
    with connect(base) as sock:
        sock.sendall(first + second)
        raw = read_to_close(sock)
    assert raw.count(b"HTTP/1.1 200 OK") == 2, raw


def test_pipelined_requests_and_large_bodies_are_not_taken_for_large_headers(start: Start) -> None:
    base, _ = start()
    requests = [padded(300)] * 40  # 12000 bytes of headers in one write, none over the limit
    with connect(base) as sock:
        sock.sendall(b"".join(requests) + get("/echo", "Connection: close"))
        raw = read_to_close(sock)
    assert raw.count(b"HTTP/1.1 200 OK") == 41
    body = b"z" * 200_000
    with connect(base) as sock:
        sock.sendall(post("/echo", len(body), body))
        assert read_response(sock)[2] == b'{"bytes": 200000}'


# -- slow and silent clients -----------------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_gets_408_and_is_closed(start: Start) -> None:
    base, _ = start()
    with connect(base) as sock:
        refusal(read_to_close(sock), 408, "request_timeout")


def test_headers_sent_a_byte_at_a_time_time_out_from_the_connection_start(start: Start) -> None:
    base, _ = start()
    trickle = b"GET /echo HTTP/1.1\r\nHost: relay\r\nX-Slow: " + b"s" * 1000
    with connect(base) as sock:
        answer = b""
        for byte in trickle:  # one byte, then a short wait for an answer: far slower than the timeout allows
            sock.sendall(bytes([byte]))
            sock.settimeout(0.02)
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                continue
        assert answer, "the headers never timed out"
        sock.settimeout(WAIT)
        refusal(answer + read_to_close(sock), 408, "request_timeout")


def test_the_header_deadline_waits_while_an_answer_is_due(start: Start) -> None:
    base, _ = start()
    with connect(base) as sock:
        # the start of a next request behind a slow one: its headers are not late while the first is answered
        sock.sendall(post("/patient", 5, b"hello") + b"GET /echo HTTP/1.1\r\nHost: re")
        raw = read_to_close(sock)  # then idle keep-alive closes it, without a word
    head, _, body = raw.partition(b"\r\n\r\n")
    assert parse_head(head)[0] == 200 and json.loads(body) == {"bytes": 5, "receive": None}


def test_a_stalled_body_gets_408_and_the_app_sees_a_disconnect(start: Start) -> None:
    base, app = start()
    with connect(base) as sock:
        sock.sendall(post("/echo", 100, b"0123456789"))
        refusal(read_to_close(sock), 408, "request_timeout")
    assert app.received.get(timeout=WAIT) == ("/echo", ["http.request", "http.disconnect"])


def test_a_body_stalled_after_the_answer_started_closes_the_connection(start: Start) -> None:
    base, app = start()
    with connect(base) as sock:
        sock.sendall(post("/stream", 100, b"0123456789"))
        raw = read_to_close(sock)
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"started" in raw and b"done" not in raw and b" 408 " not in raw
    assert app.received.get(timeout=WAIT) == ("/stream", ["http.request", "http.disconnect"])


def test_the_body_deadline_runs_only_while_the_app_waits_for_the_body(start: Start) -> None:
    base, app = start()
    with connect(base) as sock:
        sock.sendall(post("/patient", 5, b"hello"))
        status, _, body = read_response(sock)
    # the app took PATIENCE before reading, then listened for a disconnect for as long: neither was cut short
    assert (status, json.loads(body)) == (200, {"bytes": 5, "receive": None})
    assert app.received.get(timeout=WAIT) == ("/patient", ["http.request"])


def test_the_rest_of_a_body_answered_early_is_not_awaited_for_ever(start: Start) -> None:
    base, _ = start()
    with connect(base) as sock:
        sock.sendall(post("/early", 1000, b"0123456789"))
        assert read_response(sock)[0] == 200
        sock.sendall(b"a")  # more of a body nobody reads: the keep-alive clock no longer runs
        assert read_to_close(sock) == b""


def test_an_answer_given_before_a_100_continue_closes_the_connection(start: Start) -> None:
    """A client that asked `Expect: 100-continue` and got its answer instead sends no body (RFC 9110 §10.1.1): the
    connection cannot go on, its parser waiting for those bytes. Before, it was kept, so the client's next request
    was read as the body nobody sent, discarded, and the connection closed without a word at the header deadline."""
    base, app = start(keepalive_timeout_s=30, header_timeout_s=30)
    with connect(base) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: relay\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n")
        raw = read_to_close(sock)  # long before either timeout
    status, headers = parse_head(raw.partition(b"\r\n\r\n")[0])
    assert (status, headers["connection"]) == (200, "close"), raw
    assert raw.count(b"HTTP/1.1") == 1  # no 100 Continue: the body was never asked for
    with connect(base) as sock:  # one that reads the body asks for it, and the connection goes on
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: relay\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        sock.settimeout(WAIT)
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        status, headers, body = read_response(sock)
        assert (status, body, headers.get("connection")) == (200, b'{"bytes": 5}', None)
        sock.sendall(get())
        assert read_response(sock)[0] == 200


def test_a_body_refused_before_a_100_continue_closes_the_connection(tmp_path: Path) -> None:
    """The relay's own 413 from the stated length, to a client waiting to send the body: it closes too."""
    with running_relay(relay_config(tmp_path, server={"max_body_bytes": 2048})) as relay, connect(relay.base) as sock:
        head = "POST /v1/images/generations HTTP/1.1\r\nHost: relay\r\nExpect: 100-continue\r\n"
        sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n".encode())
        raw = read_to_close(sock)
    status, headers = parse_head(raw.partition(b"\r\n\r\n")[0])
    assert (status, headers["connection"]) == (413, "close"), raw
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"


def test_idle_keep_alive_connections_are_closed(start: Start) -> None:
    base, _ = start()
    with connect(base) as sock:
        for _ in range(3):
            sock.sendall(get())
            assert read_response(sock)[0] == 200
        assert read_to_close(sock) == b""  # closed without a word


def test_an_answer_the_client_does_not_read_is_given_up_and_its_connection_closed(start: Start) -> None:
    base, _ = start(max_connections=1)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, never read
        stuck.connect((host, int(port)))
        stuck.sendall(get("/large"))
        deadline = time.monotonic() + WAIT
        while True:  # its place is free once the server gives up the answer nobody reads
            with connect(base) as sock:
                sock.sendall(get())
                if read_response(sock)[0] == 200:
                    break
            assert time.monotonic() < deadline, "a client that reads nothing held its connection"


def test_a_client_that_reads_its_answer_slowly_keeps_its_connection(start: Start) -> None:
    """The answer waits on the client far longer than `body_timeout_s` (0.25 s), but the client reads some of it
    within each: its connection stays (the only place, so another client is refused meanwhile)."""
    base, _ = start(max_connections=1)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect((host, int(port)))
        slow.sendall(get("/large"))
        slow.settimeout(WAIT)
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            assert slow.recv(4096)
            time.sleep(0.02)  # the client's own pace: about 200 kB/s, far from all of it in 0.25 s
        with connect(base) as other:
            other.sendall(get())
            refusal(read_to_close(other), 503, "service_unavailable")


# -- connections -----------------------------------------------------------------------------------------------------


def test_one_connection_over_the_limit_gets_503_and_is_closed(start: Start) -> None:
    base, _ = start(max_connections=2, keepalive_timeout_s=30, header_timeout_s=30)
    held = [connect(base), connect(base)]
    try:
        for sock in held:
            sock.sendall(get())
            assert read_response(sock)[0] == 200
        with connect(base) as sock:
            sock.sendall(get())
            headers = refusal(read_to_close(sock), 503, "service_unavailable")
        assert headers["retry-after"] == "1"
        held.pop().close()
        deadline = time.monotonic() + WAIT
        while True:  # the server learns of the close a moment later
            with connect(base) as sock:
                sock.sendall(get())
                if read_response(sock)[0] == 200:
                    break
            assert time.monotonic() < deadline, "a freed connection slot was not reused"
    finally:
        for sock in held:
            sock.close()


# -- upgrades --------------------------------------------------------------------------------------------------------


def upgrading(body: bytes, *extra: str) -> bytes:
    """A POST to /echo offering a switch to cleartext HTTP/2, as Java's RestClient and Ktor send every request."""
    lines = ["POST /echo HTTP/1.1", "Host: relay", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c"]
    lines += ["HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA", *extra, f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


def test_an_upgrade_offer_is_ignored_and_the_request_served_with_its_body(start: Start) -> None:
    """The relay switches to no other protocol, so the offer is ignored (RFC 9110 §7.8): the body is the request's,
    whether it comes with the headers or after them, and the connection goes on as HTTP/1.1."""
    base, app = start(keepalive_timeout_s=30)
    inner = get("/inner")  # a body that reads as a request: it must stay a body
    with connect(base) as sock:
        sock.sendall(upgrading(b"12345"))
        assert read_response(sock)[::2] == (200, b'{"bytes": 5}')
        whole = upgrading(inner)
        sock.sendall(whole[: -len(inner)])
        time.sleep(0.05)  # the body in a read of its own
        sock.sendall(inner)
        assert read_response(sock)[::2] == (200, b'{"bytes": %d}' % len(inner))
        sock.sendall(upgrading(b"abc") + get("/echo", "Connection: close"))  # one pipelined behind it
        raw = read_to_close(sock)
    assert raw.count(b"HTTP/1.1 200 OK") == 2 and b'{"bytes": 3}HTTP/1.1' in raw and raw.endswith(b'{"bytes": 0}')
    paths = [app.received.get(timeout=WAIT)[0] for _ in range(4)]
    assert paths == ["/echo"] * 4 and app.received.empty()  # /inner never ran


def test_an_upgrade_offer_without_a_body_or_in_chunks_is_served_and_so_is_what_follows(start: Start) -> None:
    base, app = start()
    offer = ("Connection: Upgrade", "Upgrade: websocket")
    chunked = b"POST /echo HTTP/1.1\r\nHost: relay\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
    chunked += b"Transfer-Encoding: chunked\r\n\r\n"
    with connect(base) as sock:
        sock.sendall(get("/echo", *offer) + chunked + b"3\r\nabc\r\n0\r\n\r\n" + get("/echo", "Connection: close"))
        raw = read_to_close(sock)
    assert raw.count(b"HTTP/1.1 200 OK") == 3 and b'{"bytes": 0}HTTP' in raw and b'{"bytes": 3}HTTP' in raw, raw
    assert [app.received.get(timeout=WAIT)[0] for _ in range(3)] == ["/echo"] * 3


def test_a_connect_is_answered_and_nothing_after_it_read(start: Start) -> None:
    base, app = start(keepalive_timeout_s=30)
    with connect(base) as sock:
        sock.sendall(b"CONNECT /echo HTTP/1.1\r\nHost: relay\r\n\r\n" + get("/inner"))
        raw = read_to_close(sock)  # closed after its answer, long before the idle timeout
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.count(b"HTTP/1.1") == 1 and b"connection: close" in raw
    assert app.received.get(timeout=WAIT)[0] == "/echo" and app.received.empty()


def test_a_read_full_of_upgrade_offers_is_served_in_order(start: Start) -> None:
    base, _ = start()
    with connect(base) as sock:
        sock.sendall(upgrading(b"x") * 1500 + get("/echo", "Connection: close"))
        raw = read_to_close(sock)
    assert raw.count(b'{"bytes": 1}') == 1500 and raw.endswith(b'{"bytes": 0}')
