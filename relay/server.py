"""How the relay is served: uvicorn on httptools (and uvloop where installed), with the HTTP-layer limits a public
server needs and every refusal in OpenAI's error envelope.

    Limits          the five `server.*` settings below, as the protocol reads them
    ServeConfig     uvicorn's `Config` carrying the limits to each connection's protocol
    RelayProtocol   uvicorn's httptools protocol with the limits enforced
    RelayServer     uvicorn's `Server`, calling back once it is listening and the app has started
    Listener        a listening socket that takes every connection waiting on it at once (libuv takes one a turn)
    Lane            requests a connection answers itself, with no ASGI task (`app.state.lane`)
    bind()          the listening sockets for a host and port, made before anything else starts
    fit_connections()  the process's limit on open descriptors raised to what `max_connections` needs

What each limit does to a connection:

    max_header_bytes     request line and headers over this many bytes: 431, closed, as soon as the limit is
                         passed (httptools would otherwise buffer a header line of any size). Exact, except for a
                         pipelined request that begins inside a read, which may pass it by what is left of that read
    header_timeout_s     request headers not complete this long after the connection opened (or after the first
                         byte of the next request): 408 and closed; a connection that sends nothing gets the same.
                         The clock stops while an answer is due. The rest of a body that was answered without
                         being read gets as long, then the connection is closed without a word
    body_timeout_s       the app waiting in `receive()` this long for body bytes that do not come: 408 if no
                         answer has started, the connection closed, and the pending `receive()` gets
                         `http.disconnect`. Also how long the client may take nothing of an answer once more of
                         it waits than the transport buffers: then the connection is dropped
    keepalive_timeout_s  an idle keep-alive connection is closed (uvicorn's `timeout_keep_alive`)
    max_connections      one connection more than this gets 503 with `Retry-After: 1` (at its first bytes, or at
                         the header deadline) and is closed

A lane (upstream hook calls: a job makes eight or so, more than any other request it causes) claims a request when
its headers are complete, gets its body as the parser hands it over, and gives the answer's status when the body is
complete; the answer is written at once, within the same read, and nothing else runs for it. A lane takes only
what needs nothing of the ASGI stack: a request with a stated length within the body limit, without `Expect`, on a
connection with no answer under way and no answers waiting for the client to read them (anything else goes the
ordinary way). Its body gets `body_timeout_s` for each
wait for more of it, as through the app; a server stopping answers it before closing. An answer that closes the
connection (HTTP/1.0, `Connection: close`, a server stopping) takes nothing sent behind it, in the lane or the app.

An offer to switch protocols (`Upgrade`) is ignored, the request served as HTTP/1.1 with its body (uvicorn's
parser took the body for the next requests); a CONNECT is answered and its connection closed.

A request with `Expect: 100-continue` answered before the app read its body (a 413 from the stated length, a key
refused) closes the connection after the answer: its client sends no body, and the next request would be read as it.

Malformed HTTP gets 400 in the envelope (uvicorn answers it in plain text); 400 and 431 carry
`x-should-retry: false`. A refusal never interleaves with an answer under way: behind pipelined requests still being
answered, it is written once they are done.

What `RelayProtocol` relies on in `uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` (checked against
uvicorn 0.40 to 0.55; `pyproject.toml` pins that range):

- the constructor `(config, server_state, app_state, _loop)` and the attributes it sets: `app` (the ASGI app a
  request's task runs, read when its headers are complete), `loop`, `transport`, `flow` (`FlowControl`),
  `connections` (the server's set of open connections), `cycle` (the newest request's `RequestResponseCycle`),
  `pipeline`, `url`, `headers`, `server_state.default_headers`;
- the parser callbacks `on_message_begin`, `on_url` and `on_header` (which add to `url` and `headers`: a head
  parsed again after an upgrade offer puts them back), `on_headers_complete` (which may raise,
  making a parse error), `on_body`, `on_message_complete` (the connection feeds its parser itself, as uvicorn's
  `data_received` does, and replaces it after an upgrade offer); the hooks `connection_made`, `connection_lost`,
  `on_response_complete` (which starts the next pipelined request or arms the keep-alive timer), `shutdown`,
  `pause_writing` and `resume_writing` (which pause and resume the answers' writes), and
  `_unset_keepalive_if_required`; the attributes `parser` (its `get_method`, `get_http_version`,
  `should_keep_alive`, `should_upgrade`) and `expect_100_continue`, set by `on_header`;
- on a `RequestResponseCycle`: `response_started`, `response_complete`, `disconnected` and `message_event` (what
  `connection_lost` uses to wake a pending `receive()`);
- `uvicorn.Server.startup(sockets=[])` running the lifespan and setting `started` while listening on nothing of
  its own; `servers` (each `close()`d, then `wait_closed()`, at shutdown), `server_state`, `lifespan.state`;
  `Config(http=<protocol class>)`, its `http_protocol_class` and `backlog`.

Keep-alive, pipelining and flow control stay uvicorn's: the subclass adds state and timers around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http
import json
import logging
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from relay.config import ServerConfig
from relay.logs import event
from relay.middleware import ANSWERED

__all__ = [
    "Lane",
    "LaneCall",
    "Limits",
    "Listener",
    "RelayProtocol",
    "RelayServer",
    "ServeConfig",
    "bind",
    "fit_connections",
]

log = logging.getLogger("relay.http")

try:  # how many bytes a socket's send queue holds (Linux's SIOCOUTQ, the same number as TIOCOUTQ)
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - platforms without them
    _OUTQ = None


@dataclass(frozen=True, slots=True)
class Limits:
    """The HTTP limits of `server.*` in the configuration, as each connection reads them."""

    max_header_bytes: int = 32_768
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 4096
    max_body_bytes: int = 20_000_000  # the most a lane's request may bring (the app checks everything else's)

    @classmethod
    def of(cls, server: ServerConfig) -> Limits:
        return cls(
            max_header_bytes=server.max_header_bytes,
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
            keepalive_timeout_s=server.keepalive_timeout_s,
            max_connections=server.max_connections,
            max_body_bytes=server.max_body_bytes,
        )


class LaneCall(Protocol):
    """One request a lane claimed."""

    def answer(self, body: bytes) -> tuple[int, str]:
        """Take the whole body; the answer's status (sent with no body) and its `x-request-id`."""

    def stalled(self) -> None:
        """The body did not come in time: the connection answered 408 and closed."""

    def gone(self) -> None:
        """The caller went away before the body was complete: nothing is answered (told as a client that left)."""


class Lane(Protocol):
    def claim(self, path: str, length: int) -> LaneCall | None:
        """A POST to `path`, its body `length` bytes (within the body limit), that this lane answers; None for
        anything the app must answer."""


class ServeConfig(uvicorn.Config):
    """uvicorn's `Config` for the relay: `RelayProtocol` with the limits of `server` and the app's lane (its
    `state.lane`, if any), no WebSockets, no proxy headers, the lifespan on, logging left to the relay. Keyword
    arguments go to uvicorn's `Config`."""

    def __init__(self, app: ASGIApp, server: ServerConfig | None = None, **kwargs: Any) -> None:
        server = server or ServerConfig()
        self.limits = Limits.of(server)
        state = getattr(app, "state", None)
        self.lane: Lane | None = getattr(state, "lane", None) if state is not None else None
        options: dict[str, Any] = {
            "host": server.host,
            "port": server.port,
            "lifespan": "on",
            "log_config": None,
            "access_log": False,
            "proxy_headers": False,
            "timeout_graceful_shutdown": round(server.graceful_shutdown_s),
            # uvicorn annotates it int, and hands it to `loop.call_later`, which takes any number of seconds
            "timeout_keep_alive": server.keepalive_timeout_s,
            **kwargs,
        }
        super().__init__(app, http=RelayProtocol, ws="none", **options)


class RelayServer(uvicorn.Server):
    """uvicorn's `Server`; `on_ready` is called once the sockets accept connections and the app has started. The
    sockets it is given are served by `Listener`s."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:
            await super().startup()
        else:
            assert self.config.ssl is None, "the relay serves plain HTTP (TLS is its proxy's)"
            await super().startup(sockets=[])  # the lifespan, and the server's state: no listening of its own
            if self.started:
                loop = asyncio.get_running_loop()
                listeners: list[Listener | asyncio.AbstractServer] = []
                try:
                    for sock in sockets:
                        listeners.append(await self._listen(loop, sock))
                except BaseException:
                    for listener in listeners:
                        listener.close()
                    raise
                self.servers = cast(list[asyncio.base_events.Server], listeners)  # what `shutdown` closes
        if self.started and self.on_ready is not None:
            self.on_ready()

    async def _listen(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Listener | asyncio.AbstractServer:
        """A `Listener` on `sock`; on a loop that cannot watch a socket (Windows'), the loop's own server."""
        try:
            return Listener(loop, sock, self._protocol, self.config.backlog)
        except NotImplementedError:
            return await loop.create_server(self._protocol, sock=sock, backlog=self.config.backlog)

    def _protocol(self) -> asyncio.Protocol:
        """A new connection's protocol, as uvicorn makes it."""
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )


# The most connections a listener takes each time its socket is readable (asyncio takes up to its backlog).
ACCEPT_AT_ONCE = 128
# How long a listener stops taking connections when the process has no descriptor (or memory) left for one.
ACCEPT_PAUSE_S = 1.0
# What `accept` fails with when the process, not the connection, is at fault: taking more now would fail alike.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Listener:
    """A listening socket that takes every connection waiting on it each time it is readable, up to
    `ACCEPT_AT_ONCE`. uvloop's own server (libuv's) takes one connection per turn of the event loop, so a burst
    of a thousand connections took a thousand turns, each as long as the work the loop had then: behind the
    answers, hooks and writes of the connections taken before, the last ones waited a second and more. When the
    process cannot take a connection (no descriptor or memory left) taking pauses for `ACCEPT_PAUSE_S`, as
    asyncio's own server does; a connection that failed on its own (the client gave up, a network error) is
    skipped, as accept(2) asks. Each connection is handed to the loop (`connect_accepted_socket`, which sets
    TCP_NODELAY as its own server would) with its protocol; one opened after the listener closed is told the
    server is shutting down, as those open then were."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: Callable[[], asyncio.Protocol],
        backlog: int,
        pause_s: float = ACCEPT_PAUSE_S,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol = protocol
        self.pause_s = pause_s
        self._opening: set[asyncio.Task[Any]] = set()
        self._serving = True
        sock.setblocking(False)
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_AT_ONCE):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:  # that connection's own failure: the next may be fine
                    continue
                # the connections wait in the backlog meanwhile
                log.error("cannot take a connection; taking none for a while", extra={"fields": {"error": str(exc)}})
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(self.pause_s, self._resume)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket) -> None:
        try:
            _, protocol = await self.loop.connect_accepted_socket(self.protocol, conn)
        except Exception:
            log.exception("a connection could not be opened")
            conn.close()
            return
        shutdown = getattr(protocol, "shutdown", None)
        if not self._serving and callable(shutdown):
            shutdown()  # taken just before the server stopped, opened after it told the others to finish

    def _resume(self) -> None:
        if self._serving:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Take no more connections (the socket is its owner's to close)."""
        if self._serving:
            self._serving = False
            self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        """Wait until the connections taken before `close` are open (each then closes as the server has it)."""
        if self._opening:
            await asyncio.wait(set(self._opening))


# Descriptors the relay keeps for its own work beyond its clients' connections: the database, upstream and storage
# connections, image files, the listening sockets.
RESERVED_DESCRIPTORS = 256


def fit_connections(max_connections: int) -> int | None:
    """Raise the process's soft limit on open descriptors (as far as its hard limit allows) to `max_connections`
    and `RESERVED_DESCRIPTORS` more; the limit, when it stays below that. Under the usual soft limit (1024), a
    thousand idle connections, a quarter of the default `max_connections`, took every descriptor: the relay took
    no connection more, not even to refuse it, and could open none of its own files or sockets."""
    if sys.platform == "win32":
        return None
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + RESERVED_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return None
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    except (ValueError, OSError):
        raised = soft
    return raised if raised < wanted else None


def bind(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (as asyncio's `create_server` makes them); raises
    OSError, naming nothing, when the name does not resolve or an address cannot be taken."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _envelope(code: str, message: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


_BODY_STALLED = _envelope("request_timeout", "The request body was not received in time.")


class _EmptyAnswers:
    """The heads of answers without a body, made once per status while the server's default headers (its `date`,
    renewed every second) stay the same. The heads and the headers they were made with are swapped as one, so
    servers on several threads never take each other's."""

    def __init__(self) -> None:
        self._kept: tuple[list[tuple[bytes, bytes]] | None, dict[tuple[int, bool], bytes]] = (None, {})

    def __call__(self, status: int, defaults: list[tuple[bytes, bytes]], request_id: str, keep_alive: bool) -> bytes:
        made_with, made = self._kept
        if made_with is not defaults:
            made = {}
            self._kept = (defaults, made)
        head = made.get((status, keep_alive))
        if head is None:
            head = _head(status, defaults)
            if status != 204:
                head += b"content-length: 0\r\n"
            if not keep_alive:
                head += b"connection: close\r\n"
            head = made[(status, keep_alive)] = head + b"x-request-id: "
        return head + request_id.encode() + b"\r\n\r\n"


_empty_answer = _EmptyAnswers()


def _head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 answer's status line and these header lines (the blank line that ends the head not included)."""
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join(lines)


def _answer(status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 answer with a JSON body, closing the connection."""
    tail = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return _head(status, headers) + tail + body


class RelayProtocol(HttpToolsProtocol):
    """One connection. Between two requests it is `awaiting` request headers: from the connection's start, and
    from the end of each request's body (the next request's bytes may already be there, pipelined)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits if isinstance(config, ServeConfig) else Limits()
        self.lane = config.lane if isinstance(config, ServeConfig) else None
        self._inner_app = self.app
        self.app = self._app  # read by uvicorn when a request's headers are complete
        self._awaiting = True
        self._header_bytes = 0  # bytes fed to the parser since the current header section began
        self._boundary = False  # a request ended within the bytes being fed
        self._begun = False  # a request began after the last one ended
        self._deadline: asyncio.TimerHandle | None = None  # for the client: headers, or an unwanted body
        self._over_limit = False
        self._refused = False  # nothing more is parsed
        self._pending: bytes | None = None  # a refusal that waits for the answers before it
        self._call: LaneCall | None = None  # the request a lane claimed, while its body comes
        self._call_body: list[bytes] = []
        self._call_keep_alive = True
        self._unread: asyncio.TimerHandle | None = None  # for the client to read on, while writing is paused
        # The request whose upgrade offer was ignored, while its head is given to a new parser: its url and headers
        # as taken the first time, put back once the head is parsed again (the parser callbacks add to them).
        self._replaying: tuple[bytes, list[tuple[bytes, bytes]]] | None = None

    # -- connection --------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_limit = len(self.connections) > self.limits.max_connections
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_unread()
        call, self._call, self._call_body = self._call, None, []
        if call is not None:  # a request the lane claimed whose caller left mid-body: told, as the app tells one
            call.gone()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: a lane's request whose body is coming is answered, then the connection closed,
        as one through the app is (uvicorn closes any connection it sees no answer under way on)."""
        if self._call is not None:
            self._call_keep_alive = False
            return
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._over_limit:
            self._refuse(503, "service_unavailable", "The relay has too many open connections; retry shortly.")
            return
        if self._refused:
            return
        if self._deadline is None and (self._awaiting or (self.cycle is not None and self.cycle.response_complete)):
            self._arm()  # the next request's headers, or the rest of a body already answered
        limit = self.limits.max_header_bytes
        at = 0
        while at < len(data) and not self._refused and not self.transport.is_closing():
            # While headers are awaited, the parser is fed no more than the bytes left under the limit, so no
            # header line of any size is buffered. A body is fed a limit at a time too: the next request's headers
            # may follow its end in the same read, and are counted from there.
            room = limit - self._header_bytes if self._awaiting else limit
            piece = data[at : at + room]
            at += len(piece)
            self._boundary = False
            self._feed(piece)
            if not self._awaiting or self.transport.is_closing():
                continue
            if self._boundary:
                # A pipelined request began inside `piece`, at an offset the parser does not tell: count what it
                # has shown of it, and the line it holds back (`_held_line`).
                self._header_bytes = self._held_line(piece) if self._begun else 0
            else:
                self._header_bytes += len(piece)
            if self._header_bytes >= limit:
                self._refuse(
                    431,
                    "request_header_too_large",
                    f"The request headers are larger than the limit of {limit} bytes.",
                )

    def _held_line(self, piece: bytes) -> int:
        """The bytes of its head a request that began inside `piece` has shown so far (its headers not complete).
        The parser hands over the request line as it comes, but a header only once the next begins: the header line
        it holds is the one `piece` ends in or, when `piece` ends at a line's end, that line. It is a header's when a
        header came before it, or the request line (its URL, then its HTTP version) did; otherwise the line held is
        the request line itself, counted as its URL. Never counts a byte twice, nor one of the request before (the
        line before may be the last of its body, which may say " HTTP/" too)."""
        start = piece.rstrip(b"\r\n").rfind(b"\n") + 1
        shown = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        before = piece[piece.rfind(b"\n", 0, max(start - 1, 0)) + 1 : start]
        if self.headers or (self.url and b" " + self.url + b" HTTP/" in before):
            return shown + len(piece) - start
        return shown

    def pause_writing(self) -> None:
        """More of the answers is waiting than the transport buffers: the client must read some of it within each
        `body_timeout_s`, or the connection is dropped (a slow client that reads on keeps it, however long the
        answer takes). Closing it would not do: a transport closes once all it holds is written, so a client that
        reads nothing would keep its connection, and the answers held for it, for ever."""
        super().pause_writing()
        if self._unread is None:
            self._arm_unread()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_unread()

    def _arm_unread(self) -> None:
        self._unread = self.loop.call_later(self.limits.body_timeout_s, self._on_unread, self._unsent())

    def _unsent(self) -> int:
        """Bytes of the answers the client has not taken yet: the transport's, and (on Linux) those in the
        socket's send queue, which is where a slow reader's progress first shows."""
        waiting = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if _OUTQ is not None and sock is not None:
            with contextlib.suppress(OSError, ValueError):
                waiting += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
        return waiting

    def _disarm_unread(self) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None

    def _on_unread(self, waiting: int) -> None:
        if self._unsent() < waiting:  # the client took some: it has as long again
            self._arm_unread()
            return
        self._unread = None
        event(log, "http dropped", reason="the client read nothing of its answer in time")
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "invalid_request", "The request is not valid HTTP.")

    def _feed(self, data: bytes) -> None:
        """uvicorn's `data_received`, but for an upgrade offer, which the relay (serving no other protocol) ignores,
        as RFC 9110 §7.8 lets it."""
        self._unset_keepalive_if_required()
        fed: bytes | None = data
        while fed is not None:  # (a loop, not a recursion: a read may hold any number of such requests)
            try:
                self.parser.feed_data(fed)
                return
            except httptools.HttpParserUpgrade as upgrade:
                fed = self._ignore_upgrade(fed[upgrade.args[0] :])
            except httptools.HttpParserError:
                self.send_400_response("Invalid HTTP request received.")
                return

    def _ignore_upgrade(self, rest: bytes) -> bytes | None:
        """The parser stopped at the end of a request's headers for the protocol it offered to switch to (`Upgrade`
        with `Connection: upgrade`, as Java's RestClient and Ktor send `h2c` on every request), taking the request
        as complete with no body: uvicorn then ran it with an empty body, and read the body that followed as the
        next requests (one in it, sent to a proxy as a body, ran here as a request of its own). Its head, without
        `Upgrade`, is given to a new parser, with what followed it: the request gets its body, and what comes after
        is read as HTTP/1.1. A CONNECT's tunnel is no HTTP: it is answered (the app has no such route), and the
        connection closed after, reading nothing more. What the new parser is to be fed; None for nothing."""
        method = self.parser.get_method()
        if method == b"CONNECT" or self.cycle is None:
            self._refused = True
            if self.cycle is not None:
                self.cycle.keep_alive = False
            return None
        head = [method, b" ", self.url, b" HTTP/", self.parser.get_http_version().encode(), b"\r\n"]
        for name, value in self.headers:
            if name != b"upgrade":
                head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # httptools < 0.6.3
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._replaying = (self.url, list(self.headers))
        return b"".join(head) + rest

    # -- parser callbacks --------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refused or self._replaying is not None:
            return  # behind an answer that closed the connection (see `_answer_call`), or a head given again
        super().on_message_begin()
        # A lane answers inside the parser's callbacks, where the idle timer it armed would stay armed over a
        # request that follows in the same read: a request has begun, so the connection is not idle.
        self._unset_keepalive_if_required()
        self._begun = True
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if self._replaying is not None:  # the request's own head was taken the first time: now its body comes
            self.url, self.headers = self._replaying
            self._replaying = None
            return
        self._disarm()
        self._call = self._claimed()
        if self._call is None:
            super().on_headers_complete()  # may raise (a path that is not ASCII): then the headers are still awaited
        else:
            self._call_keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
            self._arm_body()
        self._awaiting = False
        self._header_bytes = 0

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        if self._call is not None:
            self._call_body.append(body)
            self._disarm()  # the body's deadline is for each wait for more of it, as through the app
            self._arm_body()
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused or (self.parser.should_upgrade() and self.parser.get_method() != b"CONNECT"):
            return  # an upgrade offer: the parser took no body, `_ignore_upgrade` reads the request's end
        if self._call is not None:
            self._answer_call()
        else:
            super().on_message_complete()
        self._awaiting = True
        self._header_bytes = 0
        self._boundary = True
        self._begun = False

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)  # then the next is started: an answer is under way again
        super().on_response_complete()
        if self._pending is not None and not queued and not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self.transport.write(self._pending)
            self.transport.close()

    # -- the lane ----------------------------------------------------------------------------------------------

    def _claimed(self) -> LaneCall | None:
        """The lane's call for the request whose headers just completed, if the lane answers it."""
        if (
            self.lane is None
            or self._busy()
            # Answers waiting that the client has not taken: the app answers it, so that the connection stops
            # reading (its answer waits, the requests behind it queue) instead of answering call after call unread.
            or self.flow.write_paused
            or self.expect_100_continue
            or self.parser.get_method() != b"POST"
            or self.parser.should_upgrade()
        ):
            return None
        length = b""
        for name, value in self.headers:
            if name == b"content-length" and not length:
                length = value
            elif name in (b"content-length", b"transfer-encoding"):
                return None  # a second length, or chunks: the ordinary way, whatever the parser made of it
        if not length.isdigit() or len(length) > 12 or int(length) > self.limits.max_body_bytes:
            return None
        try:
            path = httptools.parse_url(self.url).path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            return None
        if "%" in path:
            return None
        return self.lane.claim(path, int(length))

    def _answer_call(self) -> None:
        call, body = self._call, b"".join(self._call_body)
        assert call is not None
        self._call, self._call_body = None, []
        self._disarm()
        status, request = call.answer(body)
        self.transport.write(_empty_answer(status, self.server_state.default_headers, request, self._call_keep_alive))
        if not self._call_keep_alive:
            # The parser goes on with the rest of the read when it keeps the connection where the relay does not
            # (HTTP/1.0 with `keep-alive`, a server stopping): a request there was sent on a connection this answer
            # closes, and must be neither given to the lane nor started in the app, with no one to answer.
            self._refused = True
            self.transport.close()
            return
        self.on_response_complete()

    def _on_call_stalled(self) -> None:
        """A claimed request's body did not come in time: 408, as through the app, and the connection closed."""
        self._deadline = None
        if self._call is None or self.transport.is_closing():
            return
        call, self._call, self._call_body = self._call, None, []
        call.stalled()
        event(log, "http refused", status=408, code="request_timeout")
        self._refused = True
        self.transport.write(_answer(408, _BODY_STALLED, list(self.server_state.default_headers)))
        self.transport.close()

    # -- deadlines and refusals --------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._on_deadline)

    def _arm_body(self) -> None:
        self._deadline = self.loop.call_later(self.limits.body_timeout_s, self._on_call_stalled)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _busy(self) -> bool:
        """Whether a request on this connection is still being answered."""
        return self.cycle is not None and not self.cycle.response_complete

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._over_limit:
            self._refuse(503, "service_unavailable", "The relay has too many open connections; retry shortly.")
        elif self._busy():
            return  # the client waits for an answer; its next bytes arm a new deadline
        elif self._awaiting and (self._begun or self.cycle is None):  # a request begun, or none yet
            self._refuse(408, "request_timeout", "The request headers were not received in time.")
        else:
            self.transport.close()  # idle after an answer, or the rest of a body answered already: no answer due

    def _refuse(self, status: int, code: str, message: str) -> None:
        headers = list(self.server_state.default_headers)
        if status == 503:
            headers.append((b"retry-after", b"1"))
        elif status != 408:  # sent again, the same bytes get the same answer
            headers.append((b"x-should-retry", b"false"))
        kind = "server_error" if status >= 500 else "invalid_request_error"
        answer = _answer(status, _envelope(code, message, kind), headers)
        event(log, "http refused", status=status, code=code)
        self._refused = True
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not self._awaiting and self.pipeline and self.pipeline[0][0] is cycle:
            # The bytes refused are the body of a request queued behind answers under way: the refusal is its
            # answer, after theirs.
            self.pipeline.popleft()
            self._pending = answer
        elif cycle is not None and not self._awaiting:
            # The bytes refused are this request's body: it can never be complete.
            if not cycle.response_started and not self.pipeline:
                self.transport.write(answer)
                cast(dict[str, Any], cycle.scope)[ANSWERED] = status  # (an HTTPScope, typed without it)
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()
        elif self._busy():
            self._pending = answer  # after the answers under way, never in the middle of one
            self.flow.pause_reading()
        else:
            self.transport.write(answer)
            self.transport.close()

    # -- the app, with the body deadline -----------------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._inner_app(scope, receive, send)
            return
        body_done = started = stalled = asked = False

        async def timed_receive() -> Message:
            nonlocal body_done, stalled, asked
            asked = True
            if stalled:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(self.limits.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                stalled = True
                if not started:
                    scope[ANSWERED] = 408
                await self._body_stalled(send, answer=not started)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if stalled:
                return
            if message["type"] == "http.response.start":
                started = True
                # A client that sent `Expect: 100-continue` sends the body only once asked (uvicorn asks at the
                # first `receive()`): answered before, it sends none, and the parser would read its next request as
                # that body. The connection closes after the answer.
                if not asked and _expects_continue(scope):
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self._inner_app(scope, timed_receive, watched_send)

    async def _body_stalled(self, send: Send, answer: bool) -> None:
        event(log, "http refused", status=408, code="request_timeout")
        if not answer:
            self.transport.close()
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY_STALLED)).encode())]
        # `connection: close` makes uvicorn close the connection once the answer is written
        await send({"type": "http.response.start", "status": 408, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": _BODY_STALLED})


def _expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope["headers"])
