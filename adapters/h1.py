"""The relay's own HTTP/1.1 client for upstream calls: one keep-alive connection per lane, parsed by httptools.

Every finished job costs the relay two upstream calls in the hot path (its submit, its image download), and under a
burst the relay is bound by its own CPU. A call through httpx costs about 0.7 ms of it (the client's request and
response models, httpcore's pool and h11's parser, anyio's locks), several times the work of the call itself; this
client does what the adapters need and no more, in about a fifth of that:

- one request at a time per `Lane` (the adapters already hand out lanes), on a connection kept open while the
  server allows and reused for at most `IDLE_S` idle seconds (a server may close an idle one at any moment), a
  write (a submit, which is never sent twice) only `WRITE_IDLE_S`;
- `http` and `https` (TLS checked against the system's trust store, with the name of the host), HTTP proxies from
  the environment (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, as curl and httpx read them: an `https`
  target through a `CONNECT` tunnel);
- a bounded head (`MAX_HEAD_BYTES`) and body (`max_body`), a time limit for connecting and one for the whole
  exchange, redirects followed only when asked (image downloads), gzip and deflate bodies decoded within the same
  bound;
- where a call may connect, when asked (`Pin`: image downloads, on an upstream's word): each new connection, and
  each hop of a redirect, goes to the address the pin gives for its host (checked there), never to what the name
  resolves to later, with the URL's own host in `Host` and as the TLS server name; through a proxy, which resolves
  names itself, only an address (or `localhost`) written in the URL is asked about.

What goes wrong is an `HttpFailure` that says whether the request may have reached the server (`sent`), which is
what an adapter must know to decide whether a submit may be sent again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import re
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import cast
from urllib.parse import SplitResult, quote, unquote, urljoin, urlsplit
from urllib.request import getproxies_environment

import httptools

__all__ = ["HttpFailure", "Lane", "Pin", "Proxies", "Reply", "TooLarge", "host_of"]

# Where a call to a host and port may connect: the address to connect to (an IP address, or the host itself), or
# `HttpFailure` (not sent) when it may not connect there at all.
Pin = Callable[[str, int], Awaitable[str]]

# A kept-alive connection idle longer than this is closed rather than reused (httpx's default keep-alive expiry).
IDLE_S = 5.0
# A write goes on a kept connection only while it has been idle for less than this: servers close idle connections
# after 5 s (uvicorn, Node) or 2 s (gunicorn), and a request written as its server closes is never read; a read is
# made again then, but a write may have been taken, so it would fail as one that may have run.
WRITE_IDLE_S = 1.5
MAX_REDIRECTS = 5
# The most an answer may hold beyond its body's own bytes (its head and any interim answers', its trailers) and as
# much again as its body (the framing of its chunks): a few kilobytes in practice.
MAX_HEAD_BYTES = 262_144
REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = "mj-relay"
# Characters left as they are in a request's path and query (RFC 3986's unreserved and reserved ones, and `%` of
# what is encoded already); anything else is percent-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def sendable_in_header(value: str) -> bool:
    """Whether this client can send `value` as a header's value: Latin-1 (its request is written so), with no
    control character but the tab."""
    return _FORBIDDEN_IN_VALUE.search(value) is None and max(value, default="\0") <= "\xff"


class HttpFailure(Exception):
    """A call that got no complete answer. `sent`: the request may have reached the server (it was written on a
    connection that then failed or went silent); False only when it certainly did not (no connection was made).
    `timeout`: it ran out of time."""

    def __init__(self, reason: str, *, sent: bool, timeout: bool = False) -> None:
        super().__init__(reason)
        self.sent = sent
        self.timeout = timeout


class TooLarge(HttpFailure):
    """The answer's body is larger than the call allows."""

    def __init__(self) -> None:
        super().__init__("the answer is larger than allowed", sent=True)


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    auth: str | None = field(default=None, compare=False)  # a proxy's `Proxy-Authorization`, from its URL

    @property
    def authority(self) -> str:
        """What a `Host` header names: the port only when it is not the scheme's own."""
        default = 443 if self.scheme == "https" else 80
        return self._host if self.port == default else self.hostport

    @property
    def hostport(self) -> str:
        """`host:port`, as `CONNECT` names a tunnel's end."""
        return f"{self._host}:{self.port}"

    @property
    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address in brackets


def _origin(parts: SplitResult) -> _Origin:
    """Where a URL points, its host in ASCII (a name in another script as IDNA); `HttpFailure` when it points
    nowhere this client can go."""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpFailure(f"not an http(s) URL: {parts.scheme or 'no'} scheme", sent=False)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname if parts.hostname.isascii() else parts.hostname.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise HttpFailure("the URL's host or port cannot be used", sent=False) from None
    return _Origin(parts.scheme, host, port)


def _written_address(host: str) -> bool:
    """Whether a URL's host is an IP address or a name that is local wherever it is resolved (`localhost`), in
    any form a resolver (a proxy's) reads as one: an IPv4 address as `inet_aton` reads it (`2130706433`,
    `0177.0.0.1`, `127.1`, `0x7f.1`), a name with its final dot (`localhost.`)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            socket.inet_aton(host)
        except (OSError, ValueError):
            name = host.removesuffix(".")
            return name == "localhost" or name.endswith(".localhost")
    return True


def host_of(url: str) -> str:
    """The host an http(s) URL points at, as this client names it (lower case, in ASCII) and as a `Pin` is asked
    about it; `HttpFailure` when it points nowhere this client can go."""
    return _origin(_split(url)).host.lower()


def _split(url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket, and such
        raise HttpFailure("not a URL the client can call", sent=False) from None


@dataclass(frozen=True, slots=True)
class Proxies:
    """The HTTP proxies the environment names, read once: by scheme (`http`, `https`, `all`) and the hosts that
    bypass them (`no_proxy`)."""

    by_scheme: dict[str, str]
    bypass: tuple[str, ...]

    @classmethod
    def from_environment(cls) -> Proxies:
        found = getproxies_environment()
        bypass = tuple(part.strip().lower() for part in found.pop("no", "").split(",") if part.strip())
        return cls({k: v for k, v in found.items() if k in ("http", "https", "all")}, bypass)

    def bypassed(self, origin: _Origin) -> bool:
        """Whether `no_proxy` names the host (`*`, the host itself, or a domain it is in; with or without port)."""
        host = origin.host.lower()
        for entry in self.bypass:
            name, _, port = entry.partition(":") if entry.count(":") == 1 else (entry, "", "")
            if port and port != str(origin.port):
                continue
            name = name.lstrip("*").lstrip(".")
            if entry == "*" or host == name or host.endswith("." + name):
                return True
        return False

    def for_origin(self, origin: _Origin) -> _Origin | None:
        """The proxy to reach `origin` through, if any."""
        url = self.by_scheme.get(origin.scheme) or self.by_scheme.get("all")
        if not url or self.bypassed(origin):
            return None
        return _proxy(url)


@functools.cache
def _proxy(url: str) -> _Origin:
    """A proxy URL from the environment, parsed once: where it is, and its `Proxy-Authorization` if it holds
    credentials."""
    parts = _split(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":  # an https or socks proxy is not something this client speaks
        raise HttpFailure(f"unsupported proxy scheme {parts.scheme!r} (HTTP proxies only)", sent=False)
    proxy = _origin(parts)
    if parts.username is None:
        return proxy
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return replace(proxy, auth="Basic " + base64.b64encode(credentials).decode("ascii"))


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the answer being read on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # once the socket is gone
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._limit = 0
        self._received = 0  # bytes read of the answer so far
        self._framed = False  # the answer says where its body ends (a length, or chunks)
        self._in_head = False  # headers now are the answer's (after its body they are trailers: left alone)
        self._keep = False  # the server keeps the connection open after this answer
        self._head_only = False
        self._reply: Reply | None = None  # the answer, taken the moment its message is complete
        self._stray = False  # bytes of another message came after the answer: the connection is out of step
        self.received = False  # any byte of the current answer

    # -- asyncio.Protocol --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's subclasses

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # nothing asked: a server talking out of turn is not to be trusted further
            self.close()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(HttpFailure("the server switched protocols", sent=True))
        except httptools.HttpParserError as exc:
            self._fail(HttpFailure(f"malformed answer: {exc}", sent=True))
            self.close()  # also when the answer was complete already: what follows it is not to be trusted
        # What is not body (heads, interim answers' too, chunks' framing, trailers) is bounded as the body is: the
        # parser keeps every header it reads, and it is fed on until the call's time runs out.
        self._received += len(data)
        if self._reply is None and self._received - 2 * self._size > MAX_HEAD_BYTES:
            self._fail(HttpFailure("the answer's head or framing is larger than allowed", sent=True))
        if self._stray:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        if self._status >= 200 and not self._framed and exc is None and self._reply is None:
            self._complete()  # a body that runs to the connection's end: it did
            return
        self._fail(HttpFailure("the connection closed before the answer was complete", sent=True))

    # -- httptools callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._reply is not None:
            self._stray = True
        self._status, self._headers, self._body, self._size = 0, {}, [], 0
        self._framed = self._keep = False
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a trailer: it changes neither how the body read is decoded nor where a redirect goes
            return
        lowered = name.decode("latin-1").lower()
        text = self._headers[lowered] = value.decode("latin-1")
        # A length, or chunks as the last transfer coding; with any other coding the body runs to the connection's
        # end, as without either (RFC 9112, 6.3).
        if lowered == "content-length" or (
            lowered == "transfer-encoding" and text.rpartition(",")[2].strip().lower() == "chunked"
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._in_head = False
        self._status = self._parser.get_status_code()
        self._keep = self._parser.should_keep_alive()  # (the parser forgets it once the message is complete)
        if self._head_only:  # a proxy's answer to CONNECT: what follows is the tunnel
            self._complete()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limit:
            self._fail(TooLarge())
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # an interim answer (100 Continue, 103 Early Hints): the answer follows
            self._status = 0
            return
        self._complete()

    def _complete(self) -> None:
        if self._reply is None and self._status:
            self._reply = Reply(self._status, self._headers, b"".join(self._body))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- one exchange ------------------------------------------------------------------------------------------

    def _fail(self, failure: HttpFailure) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(failure)
            self.close()

    async def exchange(self, request: bytes, limit: int, *, head_only: bool = False) -> Reply:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter = asyncio.get_running_loop().create_future()
        self._status, self._headers, self._body, self._size, self._limit = 0, {}, [], 0, limit
        self._received = 0
        self._framed = self.received = self._keep = self._stray = False
        self._reply = None
        self._head_only = head_only
        self.transport.write(request)
        try:
            await self._waiter
        except BaseException:  # failed, timed out or cancelled: a late answer must never meet the next request
            self.close()
            raise
        finally:
            self._waiter = None
        reply, self._reply = self._reply, None
        self._parser, self._body = None, []
        if reply is None:  # (the waiter is only resolved with an answer taken)
            self.close()
            raise HttpFailure("no answer", sent=True)
        if (not self._keep or self._stray) and not head_only:
            self.close()
        return reply

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class Lane:
    """One request at a time, over a connection kept for the next request to the same origin."""

    def __init__(self, *, connect_timeout_s: float, tls: ssl.SSLContext, proxies: Proxies | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.tls = tls
        self.proxies = proxies or Proxies({}, ())
        self._connection: _Connection | None = None
        self._origin: _Origin | None = None
        self._written = False  # the current call wrote a request on a connection

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        timeout_s: float,
        max_body: int = 50_000_000,
        follow_redirects: bool = False,
        pin: Pin | None = None,
    ) -> Reply:
        """The server's answer; raises `HttpFailure`. `timeout_s` bounds the whole call, redirects included.
        `pin`, when given, says where each new connection (each hop's) goes."""
        if method == "HEAD":  # an answer to HEAD has no body whatever its headers say: not something to parse here
            raise HttpFailure("HEAD is not supported", sent=False)
        self._written = False
        try:
            async with asyncio.timeout(timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    reply = await self._once(method, url, headers or {}, body, max_body, pin)
                    location = reply.headers.get("location")
                    if not follow_redirects or reply.status not in REDIRECTS or not location:
                        return reply
                    try:
                        url = urljoin(url, location)
                    except ValueError:
                        raise HttpFailure("the redirect's Location is not a URL", sent=True) from None
                    if reply.status == 303:
                        method, body = "GET", b""
                raise HttpFailure("too many redirects", sent=True)
        except TimeoutError:
            self.close()
            # (out of time while the connection was being made, its address looked up or a tunnel opened: the
            # request was never written)
            raise HttpFailure("no answer in time", sent=self._written, timeout=True) from None

    async def _once(
        self, method: str, url: str, headers: dict[str, str], body: bytes, max_body: int, pin: Pin | None
    ) -> Reply:
        parts = _split(url)
        origin = _origin(parts)
        proxy = self.proxies.for_origin(origin)
        # What the URL holds beyond the characters a request line may carry (spaces, controls, other scripts) is
        # percent-encoded, as a browser does: a URL from an upstream cannot add to the request.
        target = quote(parts.path or "/", safe=_PATH_SAFE) + (
            f"?{quote(parts.query, safe=_QUERY_SAFE)}" if parts.query else ""
        )
        lines: list[str] = []
        if proxy is not None and pin is not None:
            # Through a proxy, the proxy looks the name up and connects (where one is used, the relay often cannot
            # resolve outside names itself, or resolves them wrongly): only an address or a local name written in
            # the URL is checked here, and the proxy is asked for the URL's own host.
            if _written_address(origin.host):
                await pin(origin.host, origin.port)
            pin = None
        if proxy is not None and origin.scheme == "http":
            target = f"http://{origin.authority}{target}"  # a plain-HTTP proxy takes the whole URL
            if proxy.auth:
                lines.append(f"Proxy-Authorization: {proxy.auth}")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.authority}", f"User-Agent: {USER_AGENT}", *lines]
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name) or _FORBIDDEN_IN_VALUE.search(value):
                raise HttpFailure(f"a header the client will not send: {name!r}", sent=False)
            lines.append(f"{name}: {value}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (0, 1):
            connection, reused = await self._connection_to(
                origin, proxy, pin, IDLE_S if method == "GET" else WRITE_IDLE_S
            )
            self._written = True
            try:
                reply = await connection.exchange(request, max_body)
            except HttpFailure as exc:
                # A kept-alive connection the server had just closed: nothing of an answer came. A call that reads
                # is made again at once on a new connection; one that writes may have been taken, so it is not.
                if reused and not connection.received and not exc.timeout and attempt == 0 and method == "GET":
                    continue
                raise
            connection.idle_since = asyncio.get_running_loop().time()
            return _decoded(reply, max_body)
        raise AssertionError("unreachable")

    async def _connection_to(
        self, origin: _Origin, proxy: _Origin | None, pin: Pin | None, idle_s: float
    ) -> tuple[_Connection, bool]:
        """A connection to `origin`: the kept one if it has been idle less than `idle_s`, or a new one (to the
        address `pin` gives, when given). A kept connection to the same origin was made under the same pin when it
        was made (a lane's calls that pin all give the same one), so it is used without asking again."""
        now = asyncio.get_running_loop().time()
        current = self._connection
        if current is not None:
            if self._origin == origin and not current.lost and now - current.idle_since < idle_s:
                return current, True
            current.close()
            self._connection = None
        address = await pin(origin.host, origin.port) if pin is not None else origin.host
        self._connection, self._origin = await self._connect(origin, proxy, address), origin
        return self._connection, False

    async def _connect(self, origin: _Origin, proxy: _Origin | None, address: str) -> _Connection:
        """A new connection to `origin` at `address` (directly, or through a proxy's tunnel), TLS checked
        against the origin's own host name."""
        loop = asyncio.get_running_loop()
        via = proxy or replace(origin, host=address)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    _Connection,
                    via.host,
                    via.port,
                    ssl=self.tls if proxy is None and origin.scheme == "https" else None,
                    server_hostname=origin.host if proxy is None and origin.scheme == "https" else None,
                )
                if proxy is not None and origin.scheme == "https":
                    try:
                        connection = await self._tunnel(connection, origin, proxy, address)
                    except BaseException:
                        connection.close()
                        raise
        except TimeoutError:
            raise HttpFailure("connecting took too long", sent=False, timeout=True) from None
        except (OSError, ssl.SSLError, UnicodeError, ValueError) as exc:  # (a name no resolver takes: UnicodeError)
            raise HttpFailure(f"cannot connect: {type(exc).__name__}", sent=False) from None
        return connection

    async def _tunnel(self, connection: _Connection, origin: _Origin, proxy: _Origin, address: str) -> _Connection:
        """Ask the proxy for a tunnel to `origin` at `address`, and speak TLS to the origin through it."""
        auth = f"Proxy-Authorization: {proxy.auth}\r\n" if proxy.auth else ""
        tunnel = replace(origin, host=address).hostport
        request = f"CONNECT {tunnel} HTTP/1.1\r\nHost: {tunnel}\r\n{auth}\r\n".encode("latin-1")
        try:
            reply = await connection.exchange(request, 65_536, head_only=True)
        except HttpFailure as exc:
            raise HttpFailure(f"the proxy failed: {exc}", sent=False) from None
        if not 200 <= reply.status < 300:
            connection.close()
            raise HttpFailure(f"the proxy refused the tunnel (HTTP {reply.status})", sent=False)
        assert connection.transport is not None
        loop = asyncio.get_running_loop()
        tunnelled = _Connection()
        transport = await loop.start_tls(connection.transport, tunnelled, self.tls, server_hostname=origin.host)
        assert transport is not None
        tunnelled.connection_made(transport)
        return tunnelled

    def close(self) -> None:
        """Close the kept connection (its socket goes at the loop's next turn)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def aclose(self) -> None:
        """Close the kept connection and wait until its socket is gone."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await connection.closed


def _decoded(reply: Reply, max_body: int) -> Reply:
    """The reply with a gzip or deflate body decoded, within the same size bound (the client asks for neither, but
    a server may send one anyway)."""
    encoding = reply.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return reply
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise HttpFailure(f"unsupported content-encoding {encoding!r}", sent=True)
    wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
    try:
        decoder = zlib.decompressobj(wbits)
        body = decoder.decompress(reply.body, max_body + 1)
    except zlib.error:
        try:  # "deflate" is sent raw by some servers
            decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            body = decoder.decompress(reply.body, max_body + 1)
        except zlib.error:
            raise HttpFailure("the answer's body could not be decoded", sent=True) from None
    if len(body) > max_body:
        raise TooLarge()
    return Reply(reply.status, reply.headers, body)
