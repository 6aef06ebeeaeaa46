"""The relay's own HTTP/1.1 client (`adapters.h1`), against servers on loopback that say exactly what each test
needs: keep-alive and its failures, bodies framed every way, limits, encodings, redirects, time limits, proxies and
TLS (a certificate made with `openssl` for the test)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import shutil
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from adapters import h1
from adapters.h1 import HttpFailure, Lane, Proxies, TooLarge

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    """One request's line, headers and body; None when the client closed the connection."""
    line = await reader.readline()
    if not line:
        return None
    headers: dict[str, str] = {}
    while (header := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = header.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line.decode().strip(), headers, body


def answer(status: int = 200, body: bytes = b"", *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@asynccontextmanager
async def server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A server on a loopback port that runs `handler` for each connection; yields the port."""
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.append(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    listener = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=tls)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await listener.wait_closed()


def lane(**kwargs: object) -> Lane:
    return Lane(connect_timeout_s=2, tls=ssl.create_default_context(), **kwargs)  # type: ignore[arg-type]


class Counting:
    """A keep-alive server that answers every request with its path, counting connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while (request := await read_request(reader)) is not None:
            self.requests.append(request)
            writer.write(answer(200, request[0].split()[1].encode()))
            await writer.drain()


# -- keep-alive ------------------------------------------------------------------------------------------------------


async def test_requests_share_one_kept_alive_connection() -> None:
    counting = Counting()
    async with server(counting) as port:
        client = lane()
        for path in ("/a", "/b", "/c"):
            reply = await client.request("GET", f"http://127.0.0.1:{port}{path}", timeout_s=2)
            assert (reply.status, reply.body) == (200, path.encode())
        await client.aclose()
    assert counting.connections == 1
    line, headers, _ = counting.requests[0]
    assert line == "GET /a HTTP/1.1" and headers["host"] == f"127.0.0.1:{port}"


async def test_a_connection_idle_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h1, "IDLE_S", 0.0)
    counting = Counting()
    async with server(counting) as port:
        client = lane()
        for _ in range(2):
            await client.request("GET", f"http://127.0.0.1:{port}/", timeout_s=2)
        await client.aclose()
    assert counting.connections == 2


async def test_a_write_is_not_sent_on_a_connection_its_server_may_be_closing_as_idle() -> None:
    # Servers close a connection idle for 5 s (uvicorn, Node) or 2 s (gunicorn): a request written as its server
    # closes it is never read. A read is made again; a write (a submit) may have been taken, so it failed as one that
    # may have run. Here the server closes as the second request comes, as its idle timer would.
    connections = 0

    async def closes_as_the_second_comes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(answer(200, b"first"))
        await writer.drain()
        await read_request(reader)

    async with server(closes_as_the_second_comes) as port:
        client = lane()
        url = f"http://127.0.0.1:{port}/"
        await client.request("GET", url, timeout_s=2)
        assert client._connection is not None
        client._connection.idle_since -= 3.0  # idle for three seconds since
        reply = await client.request("POST", url, body=b"{}", timeout_s=2)
        await client.aclose()
    assert (reply.status, reply.body, connections) == (200, b"first", 2)


async def test_a_connection_the_server_closed_is_replaced() -> None:
    connections = 0

    async def one_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(answer(200, b"ok"))  # says nothing of closing, then closes
        await writer.drain()

    async with server(one_each) as port:
        client = lane()
        for _ in range(3):
            reply = await client.request("GET", f"http://127.0.0.1:{port}/", timeout_s=2)
            assert reply.body == b"ok"
            await asyncio.sleep(0.05)  # the close reaches the client
        await client.aclose()
    assert connections == 3


class DropsSecond:
    """Answers the first request on each connection; takes the second and closes without a word (a server that
    closed a kept-alive connection just as the client reused it)."""

    def __init__(self) -> None:
        self.connections = 0
        self.seen: list[str] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = await read_request(reader)
        assert first is not None
        self.seen.append(first[0])
        writer.write(answer(200, b"first"))
        await writer.drain()
        second = await read_request(reader)
        if second is not None:
            self.seen.append(second[0])


async def test_a_read_on_a_connection_closed_underneath_is_made_again() -> None:
    drops = DropsSecond()
    async with server(drops) as port:
        client = lane()
        url = f"http://127.0.0.1:{port}/task"
        assert (await client.request("GET", url, timeout_s=2)).body == b"first"
        assert (await client.request("GET", url, timeout_s=2)).body == b"first"  # on a new connection
        await client.aclose()
    assert drops.connections == 2


async def test_a_write_on_a_connection_closed_underneath_may_have_been_sent() -> None:
    drops = DropsSecond()
    async with server(drops) as port:
        client = lane()
        url = f"http://127.0.0.1:{port}/mj/submit/imagine"
        assert (await client.request("POST", url, body=b"{}", timeout_s=2)).body == b"first"
        with pytest.raises(HttpFailure) as failure:
            await client.request("POST", url, body=b"{}", timeout_s=2)
        await client.aclose()
    assert failure.value.sent and not failure.value.timeout  # it reached the server: not sent again
    assert drops.seen == ["POST /mj/submit/imagine HTTP/1.1"] * 2 and drops.connections == 1


# -- bodies ----------------------------------------------------------------------------------------------------------


async def reply_with(raw: bytes, *, close: bool = False, max_body: int = 1000) -> h1.Reply:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()
        if close:
            writer.close()
        else:
            await reader.read()

    async with server(handler) as port:
        client = lane()
        try:
            return await client.request("GET", f"http://127.0.0.1:{port}/", timeout_s=2, max_body=max_body)
        finally:
            await client.aclose()


async def test_a_chunked_body_is_joined() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert (await reply_with(raw)).body == b"abcde"


async def test_a_body_that_runs_to_the_connections_end_is_read_whole() -> None:
    reply = await reply_with(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", close=True)
    assert reply.body == b"until the end"


@pytest.mark.parametrize("coding", ["identity", "gzip"])
async def test_a_body_whose_transfer_coding_is_not_chunked_runs_to_the_connections_end(coding: str) -> None:
    """A transfer coding that does not end in `chunked` does not frame the body (RFC 9112, 6.3): it runs to the
    connection's end, as an answer without a length does."""
    raw = f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n".encode()
    body = gzip.compress(b"until the end") if coding == "gzip" else b"until the end"
    reply = await reply_with(raw + body, close=True)
    assert reply.body == body


async def test_a_trailer_does_not_change_the_answer_s_headers() -> None:
    # Trailers come after the body: one named as a header (Content-Encoding, Location) would otherwise change how
    # the body already read is decoded, or where a redirect goes.
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: image\r\n\r\n"
        b"5\r\nplain\r\n0\r\nContent-Encoding: gzip\r\nX-Kind: trailer\r\n\r\n"
    )
    reply = await reply_with(raw)
    assert reply.body == b"plain" and reply.headers.get("x-kind") == "image"
    assert "content-encoding" not in reply.headers


async def test_a_cut_body_is_a_failure() -> None:
    with pytest.raises(HttpFailure) as failure:
        await reply_with(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True)
    assert failure.value.sent


@pytest.mark.parametrize(
    "raw",
    [
        answer(200, b"x" * 1001),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"x" * 1001 + b"\r\n0\r\n\r\n",
    ],
)
async def test_a_body_over_the_limit_is_refused(raw: bytes) -> None:
    with pytest.raises(TooLarge):
        await reply_with(raw)


async def test_gzip_and_deflate_bodies_are_decoded() -> None:
    packed = gzip.compress(b'{"code": 1}')
    assert (await reply_with(answer(200, packed, "Content-Encoding: gzip"))).body == b'{"code": 1}'
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = raw_deflate.compress(b"deflated") + raw_deflate.flush()
    assert (await reply_with(answer(200, deflated, "Content-Encoding: deflate"))).body == b"deflated"


async def test_a_compressed_body_is_bounded_after_decoding() -> None:
    bomb = gzip.compress(b"\0" * 100_000)
    assert len(bomb) < 1000  # small on the wire
    with pytest.raises(TooLarge):
        await reply_with(answer(200, bomb, "Content-Encoding: gzip"), max_body=1000)


async def test_an_unknown_encoding_or_a_broken_answer_is_a_failure() -> None:
    with pytest.raises(HttpFailure, match="content-encoding"):
        await reply_with(answer(200, b"?", "Content-Encoding: br"))
    with pytest.raises(HttpFailure, match="malformed"):
        await reply_with(b"NOT HTTP AT ALL\r\n\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Pad: ",  # one header without end
        b"HTTP/1.1 200 OK\r\n",  # header after header
        b"",  # interim answer after interim answer
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Pad: ",  # a trailer without end
    ],
)
async def test_an_answer_whose_head_never_ends_is_refused_early(head: bytes) -> None:
    """The head of an answer (and its trailers) is bounded as its body is: a server (an image host an upstream
    names) that sends headers without end is refused after `MAX_HEAD_BYTES`, not held in memory until the call's
    time runs out."""
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(head)
        number = 0
        while sent < 40 * h1.MAX_HEAD_BYTES:
            if head.endswith(b": "):
                piece = b"a" * 16_384
            elif head:
                piece = b"".join(b"X-%d: %s\r\n" % (number + i, b"b" * 100) for i in range(128))
            else:
                piece = b"HTTP/1.1 100 Continue\r\n\r\n" * 512
            number += 128
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
        await reader.read()

    async with server(endless) as port:
        client = lane()
        with pytest.raises(HttpFailure) as failure:
            await client.request("GET", f"http://127.0.0.1:{port}/", timeout_s=5)
        await client.aclose()
    assert not failure.value.timeout and "head" in str(failure.value)


# -- redirects -------------------------------------------------------------------------------------------------------


async def test_redirects_are_followed_only_when_asked() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            method, path, _ = request[0].split()
            if path == "/loop":
                writer.write(answer(302, b"", "Location: /loop"))
            elif path == "/start":
                writer.write(answer(303 if method == "POST" else 302, b"", "Location: /image.png"))
            else:
                writer.write(answer(200, f"{method} {path}".encode()))
            await writer.drain()

    async with server(handler) as port:
        client = lane()
        base = f"http://127.0.0.1:{port}"
        assert (await client.request("GET", base + "/start", timeout_s=2)).status == 302
        followed = await client.request("GET", base + "/start", timeout_s=2, follow_redirects=True)
        assert followed.body == b"GET /image.png"
        posted = await client.request("POST", base + "/start", body=b"x", timeout_s=2, follow_redirects=True)
        assert posted.body == b"GET /image.png"  # 303: see the other place, with a GET
        with pytest.raises(HttpFailure, match="too many redirects"):
            await client.request("GET", base + "/loop", timeout_s=2, follow_redirects=True)
        await client.aclose()


async def test_only_http_urls_are_called() -> None:
    with pytest.raises(HttpFailure) as failure:
        await lane().request("GET", "ftp://127.0.0.1/x", timeout_s=1)
    assert not failure.value.sent


# -- time and connections --------------------------------------------------------------------------------------------


async def test_nobody_listening_is_a_failure_before_sending() -> None:
    async with server(Counting()) as port:
        pass  # closed again: nothing listens there now
    with pytest.raises(HttpFailure) as failure:
        await lane().request("POST", f"http://127.0.0.1:{port}/", body=b"{}", timeout_s=2)
    assert not failure.value.sent and not failure.value.timeout


async def test_a_server_that_never_answers_runs_out_of_time_after_sending() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with server(silent) as port:
        client = lane()
        started = asyncio.get_running_loop().time()
        with pytest.raises(HttpFailure) as failure:
            # Time enough to connect and send on a loaded machine (0.3 s once ran out while connecting: not sent).
            await client.request("POST", f"http://127.0.0.1:{port}/", body=b"{}", timeout_s=1.0)
        assert asyncio.get_running_loop().time() - started < 3
        await client.aclose()
    assert failure.value.timeout and failure.value.sent


async def test_a_call_whose_time_runs_out_before_its_connection_is_made_was_not_sent() -> None:
    """The call's own time limit may run out while its connection is still being made (a proxy slow to open the
    tunnel, a connection time limit as long as the call's): the request was never written, so a submit is free to
    go to another provider."""
    asked = asyncio.Event()

    async def silent_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # the CONNECT, never answered
        asked.set()
        await reader.read()

    async with server(silent_proxy) as proxy_port:
        client = Lane(
            connect_timeout_s=30,
            tls=ssl.create_default_context(),
            proxies=Proxies({"https": f"http://127.0.0.1:{proxy_port}"}, ()),
        )
        with pytest.raises(HttpFailure) as failure:
            await client.request("POST", "https://upstream.example/mj/submit/imagine", body=b"{}", timeout_s=0.3)
        await client.aclose()
    assert asked.is_set()
    assert failure.value.timeout and not failure.value.sent


# -- proxies ---------------------------------------------------------------------------------------------------------


def test_no_proxy_names_hosts_domains_ports_and_everything() -> None:
    origin = h1._origin(h1.urlsplit("https://api.example.com:8443/x"))
    assert Proxies({}, ("example.com",)).bypassed(origin)
    assert Proxies({}, (".example.com",)).bypassed(origin)
    assert Proxies({}, ("api.example.com:8443",)).bypassed(origin)
    assert Proxies({}, ("*",)).bypassed(origin)
    assert not Proxies({}, ("api.example.com:443",)).bypassed(origin)
    assert not Proxies({}, ("ample.com", "other.org")).bypassed(origin)


def test_proxies_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.corp")
    proxies = Proxies.from_environment()
    assert proxies.for_origin(h1._origin(h1.urlsplit("https://cdn.example/x"))) == h1._Origin(
        "http", "proxy.internal", 3128
    )
    assert proxies.for_origin(h1._origin(h1.urlsplit("https://a.corp/x"))) is None
    assert proxies.for_origin(h1._origin(h1.urlsplit("http://cdn.example/x"))) is None  # no HTTP_PROXY
    monkeypatch.setenv("HTTP_PROXY", "socks5://proxy.internal:1080")
    with pytest.raises(HttpFailure, match="HTTP proxies only"):
        Proxies.from_environment().for_origin(h1._origin(h1.urlsplit("http://cdn.example/x")))


async def test_a_plain_http_call_goes_through_the_proxy_with_the_whole_url() -> None:
    counting = Counting()
    async with server(counting) as proxy_port:
        client = lane(proxies=Proxies({"http": f"http://127.0.0.1:{proxy_port}"}, ()))
        reply = await client.request("GET", "http://upstream.example:8080/mj/task/1/fetch", timeout_s=2)
        await client.aclose()
    assert reply.body == b"http://upstream.example:8080/mj/task/1/fetch"
    line, headers, _ = counting.requests[0]
    assert line == "GET http://upstream.example:8080/mj/task/1/fetch HTTP/1.1"
    assert headers["host"] == "upstream.example:8080"


async def test_through_a_proxy_a_pinned_call_names_its_host_and_only_a_written_address_is_checked() -> None:
    """Where a proxy carries the calls, the proxy resolves names (the relay often cannot resolve outside names
    there, or resolves them wrongly): a pinned call is not looked up here; an address or a local name written in
    the URL is still checked, and a refused one is never sent."""
    asked: list[str] = []

    async def pin(host: str, port: int) -> str:
        asked.append(host)
        if host in ("169.254.169.254", "localhost"):
            raise HttpFailure("refused", sent=False)
        return host

    counting = Counting()
    async with server(counting) as proxy_port:
        client = lane(proxies=Proxies({"http": f"http://127.0.0.1:{proxy_port}"}, ()))
        reply = await client.request("GET", "http://cdn.example/a.png", timeout_s=2, pin=pin)
        assert reply.body == b"http://cdn.example/a.png"
        for refused in ("http://169.254.169.254/latest/meta-data/", "http://localhost:6379/"):
            with pytest.raises(HttpFailure) as failure:
                await client.request("GET", refused, timeout_s=2, pin=pin)
            assert not failure.value.sent
        await client.aclose()
    assert asked == ["169.254.169.254", "localhost"]
    assert [line for line, _, _ in counting.requests] == ["GET http://cdn.example/a.png HTTP/1.1"]


async def test_through_a_proxy_an_address_written_in_any_form_a_resolver_reads_is_checked() -> None:
    """A proxy reads `2130706433`, `0177.0.0.1`, `127.1` or `0x7f.1` as resolvers do (as 127.0.0.1), and
    `localhost.` as `localhost`: addresses and local names written in the URL all the same, which only the forms
    `ipaddress` reads (and `localhost` without its final dot) were checked as, so an image URL in any other form
    was sent to the proxy, which connected to its own loopback."""
    from relay.core.egress import Egress
    from relay.core.providers import download_pin

    pin = download_pin(Egress(False, []), "sim")
    counting = Counting()
    async with server(counting) as proxy_port:
        client = lane(proxies=Proxies({"http": f"http://127.0.0.1:{proxy_port}"}, ()))
        for host in ("2130706433", "0177.0.0.1", "127.1", "0x7f.1", "localhost.", "sub.localhost."):
            with pytest.raises(HttpFailure) as failure:
                await client.request("GET", f"http://{host}:6379/", timeout_s=5, pin=pin)
            assert not failure.value.sent, host
        await client.aclose()
    assert counting.requests == []


# -- TLS -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test's certificate (Debian: apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-keyout", str(key), "-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def tls_server_and_client(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = certificate
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    return served, ssl.create_default_context(cafile=str(cert))


async def test_https_checks_the_servers_certificate(certificate: tuple[Path, Path]) -> None:
    served, trusting = tls_server_and_client(certificate)
    async with server(Counting(), tls=served) as port:
        trusted = Lane(connect_timeout_s=2, tls=trusting)
        reply = await trusted.request("GET", f"https://localhost:{port}/secure", timeout_s=5)
        assert reply.body == b"/secure"
        await trusted.aclose()
        stranger = Lane(connect_timeout_s=2, tls=ssl.create_default_context())  # does not know the certificate
        with pytest.raises(HttpFailure) as failure:
            await stranger.request("GET", f"https://localhost:{port}/secure", timeout_s=5)
        assert not failure.value.sent
        await stranger.aclose()


async def test_https_goes_through_a_proxys_tunnel(certificate: tuple[Path, Path]) -> None:
    served, trusting = tls_server_and_client(certificate)
    asked: list[str] = []

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        assert request is not None
        asked.append(request[0])
        host, _, port = request[0].split()[1].rpartition(":")
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer), return_exceptions=True)

    async with server(Counting(), tls=served) as port, server(tunnel) as proxy_port:
        client = Lane(connect_timeout_s=2, tls=trusting, proxies=Proxies({"https": f"127.0.0.1:{proxy_port}"}, ()))
        for path in ("/one", "/two"):
            reply = await client.request("GET", f"https://localhost:{port}{path}", timeout_s=5)
            assert reply.body == path.encode()
        await client.aclose()
    assert asked == [f"CONNECT localhost:{port} HTTP/1.1"]  # one tunnel, kept for both requests


async def test_an_untrusted_url_cannot_add_to_the_request_and_headers_are_checked() -> None:
    counting = Counting()
    async with server(counting) as port:
        client = lane()
        odd = f"http://127.0.0.1:{port}/cdn/a b\u00e9.png?x=1 2&y=%41"
        reply = await client.request("GET", odd, timeout_s=2)
        assert reply.status == 200
        with pytest.raises(HttpFailure) as failure:
            await client.request("GET", f"http://127.0.0.1:{port}/", headers={"X-A": "1\r\nX-B: 2"}, timeout_s=2)
        assert not failure.value.sent
        with pytest.raises(HttpFailure):
            await client.request("GET", f"http://127.0.0.1:{port}/", headers={"Bad Name": "1"}, timeout_s=2)
        await client.aclose()
    assert [line for line, _, _ in counting.requests] == ["GET /cdn/a%20b%C3%A9.png?x=1%202&y=%41 HTTP/1.1"]


async def test_interim_answers_are_skipped_and_bytes_after_the_answer_end_the_connection() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + answer(200, b"0123456789")
    reply = await reply_with(raw)
    assert (reply.status, reply.body) == (200, b"0123456789") and "link" not in reply.headers

    connections = 0

    async def extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await read_request(reader) is not None:
            writer.write(answer(200, b"ok") + answer(500, b"evil"))  # one answer too many
            await writer.drain()

    async with server(extra) as port:
        client = lane()
        for _ in range(2):
            reply = await client.request("GET", f"http://127.0.0.1:{port}/", timeout_s=2)
            assert (reply.status, reply.body) == (200, b"ok")
            await asyncio.sleep(0.05)
        await client.aclose()
    assert connections == 2  # the first connection, out of step, was not used again


async def test_a_cancelled_call_leaves_no_connection_a_late_answer_could_reach() -> None:
    release = asyncio.Event()

    async def slow_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while (request := await read_request(reader)) is not None:
            n += 1
            if n == 2:
                await release.wait()
            writer.write(answer(200, request[0].split()[1].encode()))
            await writer.drain()

    async with server(slow_second) as port:
        client = lane()
        base = f"http://127.0.0.1:{port}"
        assert (await client.request("GET", base + "/a", timeout_s=2)).body == b"/a"
        call = asyncio.ensure_future(client.request("GET", base + "/b", timeout_s=5))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        assert (await client.request("GET", base + "/c", timeout_s=2)).body == b"/c"
        await client.aclose()


@pytest.mark.parametrize(
    "url",
    ["http://[::1/x.png", "http://" + "a" * 70 + ".example/x.png", "http://127.0.0.1:99999/x", "http:///x"],
)
async def test_a_url_no_request_can_be_made_of_is_a_failure_before_sending(url: str) -> None:
    with pytest.raises(HttpFailure) as failure:
        await lane().request("GET", url, timeout_s=1)
    assert not failure.value.sent


async def test_a_host_in_another_script_is_sent_as_idna_and_head_is_refused() -> None:
    assert h1._origin(h1.urlsplit("https://例子.测试/a.png")).host == "xn--fsqu00a.xn--0zwm56d"
    with pytest.raises(HttpFailure, match="HEAD"):
        await lane().request("HEAD", "http://127.0.0.1/", timeout_s=1)


async def test_a_bad_redirect_location_is_a_failure() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(302, b"", "Location: http://[oops/"))
            await writer.drain()

    async with server(handler) as port:
        client = lane()
        with pytest.raises(HttpFailure, match="Location"):
            await client.request("GET", f"http://127.0.0.1:{port}/x", timeout_s=2, follow_redirects=True)
        await client.aclose()


async def test_a_proxys_credentials_are_sent_to_it() -> None:
    counting = Counting()
    async with server(counting) as proxy_port:
        proxies = Proxies({"http": f"http://us%40er:p%3Ass@127.0.0.1:{proxy_port}"}, ())
        client = lane(proxies=proxies)
        await client.request("GET", "http://upstream.example/mj/task/1/fetch", timeout_s=2)
        await client.aclose()
    _, headers, _ = counting.requests[0]
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
