"""Reference images from clients: data URLs and http(s) downloads, with limits and the private-address guard."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import ipaddress
import random
import socket
import threading
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from relay.config import ReferencesConfig
from relay.core.egress import Egress, EgressRefused, IPAddress, Lookups, public
from relay.core.references import ReferenceLoader
from relay.errors import InvalidRequest
from tests.helpers import bound_socket, serve

pytestmark = pytest.mark.anyio


def png(size: int = 8) -> bytes:
    """A PNG of noise (so it does not compress away): size x size pixels."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), random.Random(size).randbytes(size * size * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def images(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "hop":
        return RedirectResponse("/img/ok")
    if name == "loop":
        return RedirectResponse("/img/loop")
    if name == "big":
        return Response(png(400))
    if name == "text":
        return Response(b"hello", media_type="text/plain")
    if name == "missing":
        return Response(status_code=404)
    if name == "hosted" and not request.headers["host"].startswith("images.example:"):
        return Response(status_code=421)
    return Response(png(), media_type="image/png")


@pytest.fixture(scope="module")
def server() -> AsyncIterator[str]:
    with serve(Starlette(routes=[Route("/img/{name}", images)])) as base:
        yield base


async def load(urls: list[str], **config: object) -> tuple[str, ...]:
    loader = ReferenceLoader(ReferencesConfig(**config))  # type: ignore[arg-type]
    try:
        return await loader.load(urls, "key")
    finally:
        await loader.aclose()


async def refused(urls: list[str], **config: object) -> str:
    with pytest.raises(InvalidRequest) as caught:
        await load(urls, **config)
    assert caught.value.param == "messages"
    return caught.value.message


async def test_a_data_url_comes_back_as_a_checked_data_url() -> None:
    assert await load([data_url(png(), "image/jpeg")]) == (data_url(png()),)  # the real type wins


async def test_bad_data_urls_are_refused() -> None:
    assert "not a readable image" in await refused([data_url(b"hello")])
    assert "base64-encoded image" in await refused(["data:text/plain;base64,aGVsbG8="])
    assert "invalid base64" in await refused(["data:image/png;base64,@@@"])
    assert "larger than" in await refused([data_url(png(400))], max_bytes=1024)
    assert "At most 1" in await refused([data_url(png()), data_url(png())], max_count=1)
    assert "http(s) URL or a data URL" in await refused(["ftp://x/y.png"])
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="BMP")
    assert "PNG, JPEG, WebP or GIF" in await refused([data_url(gif.getvalue())])


async def test_private_addresses_are_refused_by_default(server: str) -> None:
    assert "private or local" in await refused([server + "/img/ok"])
    assert "private or local" in await refused(["http://[::1]:9/x.png"])
    assert "does not resolve" in await refused(["http://no-such-host.invalid/x.png"])


async def test_allowed_hosts_are_fetched_with_limits(server: str) -> None:
    assert await load([server + "/img/ok"], allow_hosts=["127.0.0.0/8"]) == (data_url(png()),)
    assert await load([server + "/img/hop"], allow_private=True) == (data_url(png()),)
    assert await load([server.replace("127.0.0.1", "localhost") + "/img/ok"], allow_hosts=["localhost"])
    assert "redirects too often" in await refused([server + "/img/loop"], allow_private=True)
    assert "larger than" in await refused([server + "/img/big"], allow_private=True, max_bytes=2048)
    assert "not a readable image" in await refused([server + "/img/text"], allow_private=True)
    assert "HTTP 404" in await refused([server + "/img/missing"], allow_private=True)


async def test_a_request_s_reference_images_are_downloaded_together() -> None:
    """They were downloaded one after another: a few slow hosts held the request (a streamed chat's very headers)
    for as many download time limits. Here each image is answered only once all three have been asked for."""
    asked: list[str] = []
    everyone = asyncio.Event()

    async def once_all_are_asked(request: Request) -> Response:
        asked.append(request.path_params["name"])
        if len(asked) == 3:
            everyone.set()
        await everyone.wait()
        return Response(png(), media_type="image/png")

    with serve(Starlette(routes=[Route("/{name}", once_all_are_asked)])) as base:
        urls = [f"{base}/{name}" for name in ("a", "b", "c")]
        assert await load(urls, allow_private=True, timeout_s=5) == (data_url(png()),) * 3
    assert sorted(asked) == ["a", "b", "c"]


async def test_a_request_s_other_downloads_stop_when_one_of_its_images_is_refused(server: str) -> None:
    never = asyncio.Event()

    async def slow(request: Request) -> Response:
        await never.wait()
        return Response(png(), media_type="image/png")

    with serve(Starlette(routes=[Route("/{name}", slow)])) as base:
        loader = ReferenceLoader(ReferencesConfig(allow_private=True, timeout_s=30))
        try:
            with pytest.raises(InvalidRequest, match="HTTP 404"):
                await asyncio.wait_for(loader.load([f"{base}/slow", server + "/img/missing"], "key"), 10)
        finally:
            await loader.aclose()


async def test_the_download_goes_to_the_address_that_was_checked(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    asked = []

    async def resolver(host: str, port: int) -> list[IPAddress]:
        asked.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    loader = ReferenceLoader(ReferencesConfig(allow_hosts=["127.0.0.0/8"]), resolver=resolver)
    try:
        # images.example does not exist: the request can only have reached the checked address, with its name
        assert await loader.load([f"http://images.example:{port}/img/hosted"], "key") == (data_url(png()),)
    finally:
        await loader.aclose()
    assert asked == ["images.example"]


async def test_one_private_address_among_public_ones_is_refused() -> None:
    async def resolver(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("169.254.169.254")]

    loader = ReferenceLoader(ReferencesConfig(), resolver=resolver)
    try:
        with pytest.raises(InvalidRequest, match="private or local"):
            await loader.load(["https://rebind.example/x.png"], "key")
    finally:
        await loader.aclose()


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("93.184.215.14", True),
        ("10.0.0.1", False),
        ("2606:4700::1111", True),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 to 169.254.169.254
        ("64:ff9b::808:808", True),
        ("2002:7f00:1::", False),  # 6to4 from 127.0.0.1
        ("fe80::1", False),
        # IPv4 inside IPv6: only NAT64 and 6to4 count, and only with a public IPv4 address
        ("::127.0.0.1", False),  # IPv4-compatible (::/96, deprecated)
        ("::8.8.8.8", False),
        ("::ffff:8.8.8.8", False),  # IPv4-mapped
        ("::ffff:0:808:808", False),  # IPv4-translated
        ("64:ff9b::e000:1", False),  # NAT64 to 224.0.0.1
        ("64:ff9b:1::808:808", False),  # local-use NAT64
        ("2002:808:808::1", True),  # 6to4 from 8.8.8.8
        ("2002:e000:1::", False),  # 6to4 from 224.0.0.1
        ("2001::1", False),  # Teredo
        # multicast, reserved, unspecified, loopback, link-local, site-local, special-purpose
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("ff02::1", False),
        ("ff0e::1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("fec0::1", False),
        ("fc00::1", False),
        ("100::1", False),
        ("2001:db8::1", False),
        ("100.64.0.1", False),
        ("192.0.0.8", False),
        ("198.18.0.1", False),
        ("8.8.8.8", True),
    ],
)
def test_public_addresses_include_what_an_ipv6_address_carries(address: str, ok: bool) -> None:
    assert public(ipaddress.ip_address(address)) is ok


async def test_an_ipv4_compatible_or_multicast_literal_is_refused_before_any_connection() -> None:
    for host in ("[::127.0.0.1]", "[::ffff:127.0.0.1]", "224.0.0.1", "[ff02::1]"):
        assert "private or local" in await refused([f"http://{host}:9/x.png"])


async def test_a_bad_port_is_a_clear_refusal() -> None:
    assert "invalid port" in await refused(["http://example.com:99999/x.png"])


async def test_a_name_that_never_resolves_is_refused_in_time() -> None:
    async def silent(host: str, port: int) -> list[IPAddress]:
        await asyncio.Event().wait()  # name servers that drop every query
        return []

    egress = Egress(False, [], silent, lookup_timeout_s=0.05)
    with pytest.raises(EgressRefused, match="did not resolve in time"):
        await egress.pin("http://hook.slow.example/", owner="key")


def hang_slow_names(monkeypatch: pytest.MonkeyPatch, resolve_as: Callable[[str], str]) -> threading.Event:
    """The system's lookups, with the names under `.slow.example` hanging until the event returned is set (then
    failing, as name servers that never answered), and every other name looked up as `resolve_as` says."""
    hung = threading.Event()
    system = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".slow.example"):
            hung.wait()
            raise socket.gaierror(socket.EAI_AGAIN, "no answer")
        return system(resolve_as(host), *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return hung


async def test_lookups_of_client_given_names_never_hold_up_the_relays_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names whose lookups hang take every thread of their own pool; the next such name waits for one and is
    refused in time, while names the relay itself looks up (its upstreams') resolve at once. Once the hung
    lookups return, their threads take names again."""
    hung = hang_slow_names(monkeypatch, lambda host: "127.0.0.1" if host == "up.example" else host)
    lookups = Lookups(2)
    egress = Egress(False, ["127.0.0.0/8"], lookups.resolve, lookup_timeout_s=0.2)
    stuck = [asyncio.ensure_future(lookups.resolve(f"n{i}.slow.example", 80)) for i in range(2)]
    with pytest.raises(EgressRefused, match="did not resolve in time"):
        await egress.pin("http://n3.slow.example/", owner="key")
    assert await asyncio.get_running_loop().getaddrinfo("up.example", 80)  # the loop's own lookups go on
    literal = await egress.pin("http://127.0.0.1:9/", owner="key")  # a literal needs no thread
    assert literal.target == "http://127.0.0.1:9/"
    hung.set()
    for lookup in stuck:
        with pytest.raises(socket.gaierror):
            await lookup
    assert (await egress.pin("http://up.example:9/x", owner="key")).target == "http://127.0.0.1:9/x"


async def test_one_keys_names_that_never_resolve_leave_the_other_keys_lookups_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key sending names whose servers never answer holds only its own share of the lookup threads: its next
    names wait for that share and are refused in time, while another key's names are looked up at once."""
    hung = hang_slow_names(monkeypatch, lambda host: "127.0.0.1")
    egress = Egress(False, ["127.0.0.0/8"], Lookups(4).resolve, lookup_timeout_s=0.2, lookups_per_owner=2)
    noisy = [asyncio.ensure_future(egress.pin(f"http://n{i}.slow.example/", owner="noisy")) for i in range(4)]
    try:
        assert (await egress.pin("http://images.example:9/a", owner="other")).target == "http://127.0.0.1:9/a"
        for pin in noisy:
            with pytest.raises(EgressRefused, match="did not resolve in time"):
                await pin
        assert (await egress.pin("http://images.example:9/b", owner="other")).target == "http://127.0.0.1:9/b"
    finally:
        hung.set()
    for _ in range(500):  # the hung lookups return on their threads: their places are given back
        if not egress._owners:
            break
        await asyncio.sleep(0.01)
    assert not egress._owners  # and no owner is kept once its lookups are done
    assert (await egress.pin("http://images.example:9/c", owner="noisy")).target == "http://127.0.0.1:9/c"


async def test_a_scoped_ipv6_literal_is_looked_up_as_the_system_reads_it() -> None:
    assert await Lookups(1).resolve("fe80::1%1", 80) == [ipaddress.ip_address("fe80::1")]
    assert await Lookups(1).resolve("2606:4700::1", 80) == [ipaddress.ip_address("2606:4700::1")]


async def test_a_compressed_download_is_decoded_within_the_size_bound() -> None:
    """A body the server compressed (gzip, deflate) is decoded no further than `max_bytes`: 50 KB of gzip that
    decode to 50 MB of zeros, or 250 bytes that do so gzipped twice (`gzip, gzip`), were decoded whole, a network
    read at a time, before the bound was looked at, so a client's URL made the relay hold over a hundred times
    the bound (and a few kilobytes gzipped three times, gigabytes). A compressed image within the bound loads."""
    bomb = gzip.compress(b"\0" * 50_000_000)
    image = png(64)

    async def compressed(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "bomb":
            return Response(bomb, headers={"Content-Encoding": "gzip"}, media_type="image/png")
        if name == "twice":
            return Response(gzip.compress(bomb), headers={"Content-Encoding": "gzip, gzip"}, media_type="image/png")
        if name == "deflate":
            return Response(zlib.compress(image), headers={"Content-Encoding": "deflate"}, media_type="image/png")
        if name == "raw-deflate":
            raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            body = raw.compress(image) + raw.flush()
            return Response(body, headers={"Content-Encoding": "deflate"}, media_type="image/png")
        return Response(gzip.compress(image), headers={"Content-Encoding": "gzip"}, media_type="image/png")

    with serve(Starlette(routes=[Route("/{name}", compressed)])) as base:
        for name in ("bomb", "twice"):
            tracemalloc.start()
            try:
                message = await refused([f"{base}/{name}"], allow_private=True, max_bytes=1_000_000)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert "larger than" in message or "encoding" in message, message
            assert peak < 10_000_000, (name, peak)
        for name in ("gzip", "deflate", "raw-deflate"):
            assert await load([f"{base}/{name}"], allow_private=True) == (data_url(image),), name


async def test_an_internationalised_host_is_reached_at_the_address_of_the_name_sent() -> None:
    """`faß.de` is sent as `xn--fa-hia.de` (IDNA 2008, as the HTTP client names it in `Host`), a domain of its own;
    the system's lookup of the name as written reads it as IDNA 2003, `fass.de`, another domain (another owner).
    The name was looked up as written, so a download (or a client hook's delivery, signed) went to fass.de's
    address, with Host: xn--fa-hia.de."""
    own = bound_socket()  # xn--fa-hia.de, on 127.0.0.1
    port = own.getsockname()[1]
    asked = []

    async def system(host: str, port: int) -> list[IPAddress]:
        name = host.encode("idna").decode("ascii")  # as socket.getaddrinfo reads a name that is not ASCII
        asked.append(name)
        # fass.de's address: nothing listens there, so a download reaching it fails
        return [ipaddress.ip_address({"xn--fa-hia.de": "127.0.0.1", "fass.de": "127.0.0.2"}[name])]

    async def hosted(request: Request) -> Response:
        assert request.headers["host"] == f"xn--fa-hia.de:{port}"
        return Response(png(), media_type="image/png")

    with serve(Starlette(routes=[Route("/img", hosted)]), sock=own):
        loader = ReferenceLoader(ReferencesConfig(allow_hosts=["127.0.0.0/8"]), resolver=system)
        try:
            assert await loader.load([f"http://faß.de:{port}/img"], "key") == (data_url(png()),)
        finally:
            await loader.aclose()
    assert asked == ["xn--fa-hia.de"]
