"""Reference images a client sends with a prompt (chat `image_url` parts), turned into the data URLs the upstream
takes in `base64Array`.

Data URLs are decoded with a size limit and must be an image. http(s) URLs are fetched with a size and time limit,
following at most three redirects, and by default never from private, loopback, link-local or otherwise
non-public addresses: every address the host resolves to is checked, on every hop, and the connection is made to
the address that was checked. `allow_private` or `allow_hosts` (host names or CIDR blocks) open that up for tests
and private networks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from PIL import Image, UnidentifiedImageError

from relay.config import ReferencesConfig
from relay.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
MAX_REDIRECTS = 3


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="messages", code="invalid_image")


def image_data_url(data: bytes) -> str:
    """A data URL for image bytes; raises InvalidRequest when they are not a PNG, JPEG, WebP or GIF image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _bad("A reference image is not a readable image.") from None
    if kind not in _MIME:
        raise _bad(f"A reference image must be PNG, JPEG, WebP or GIF, not {kind or 'unknown'}.")
    return f"data:{_MIME[kind]};base64,{base64.b64encode(data).decode()}"


class ReferenceLoader:
    def __init__(
        self,
        config: ReferencesConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Callable[[str, int], Awaitable[list[IPAddress]]] | None = None,
    ) -> None:
        self.config = config
        self._resolve = resolver or resolve
        # A fresh connection for every download: a pooled one, made for another host name on the same address,
        # would skip that host's TLS name check. No proxies from the environment: they would connect by name.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_keepalive_connections=0),
            follow_redirects=False,
            trust_env=False,
            transport=transport,
        )
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._hosts: set[str] = set()
        for entry in config.allow_hosts:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry.lower())

    async def aclose(self) -> None:
        await self._client.aclose()

    async def load(self, urls: list[str]) -> tuple[str, ...]:
        if len(urls) > self.config.max_count:
            raise _bad(f"At most {self.config.max_count} reference images are accepted.")
        return tuple([await self._one(url) for url in urls])

    async def _one(self, url: str) -> str:
        if url.startswith("data:"):
            return self._from_data_url(url)
        if urlsplit(url).scheme in ("http", "https"):
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    data = await self._download(url)
            except TimeoutError:
                raise _bad("A reference image took too long to download.") from None
            return image_data_url(data)
        raise _bad("A reference image must be an http(s) URL or a data URL.")

    def _from_data_url(self, url: str) -> str:
        header, _, payload = url.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise _bad("A data URL must be a base64-encoded image (data:image/...;base64,...).")
        if len(payload) * 3 // 4 > self.config.max_bytes:
            raise _bad(f"A reference image is larger than {self.config.max_bytes} bytes.")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("A data URL holds invalid base64.") from None
        return image_data_url(data)

    async def _download(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            target, headers, extensions = await self._pinned(url)
            try:
                async with self._client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise _bad(f"A reference image URL answered HTTP {response.status_code}.")
                    chunks, total = [], 0
                    async for chunk in response.aiter_bytes():
                        total += len(chunk)
                        if total > self.config.max_bytes:
                            raise _bad(f"A reference image is larger than {self.config.max_bytes} bytes.")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.HTTPError:
                raise _bad("A reference image could not be downloaded.") from None
        raise _bad("A reference image URL redirects too often.")

    async def _pinned(self, url: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        """Where to connect for a URL, checked: every address its host resolves to must be public (or allowed),
        and the connection goes to the address that was checked, so a name cannot resolve to one address for
        the check and another for the download. The Host header and the TLS server name stay the URL's."""
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise _bad("A reference image URL has an invalid port.") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _bad("A reference image must be an http(s) URL or a data URL.")
        host = parts.hostname.lower()
        if self.config.allow_private or host in self._hosts:
            return url, {}, {}
        try:
            addresses = await self._resolve(host, port)
        except OSError:
            raise _bad("The host of a reference image URL does not resolve.") from None
        if not addresses:
            raise _bad("The host of a reference image URL does not resolve.")
        for address in addresses:
            if not any(address in network for network in self._networks) and not public(address):
                raise _bad("Reference image URLs may not point at private or local addresses.")
        literal = f"[{addresses[0]}]" if addresses[0].version == 6 else str(addresses[0])
        target = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
        extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
        return target, {"Host": parts.netloc.rsplit("@", 1)[-1]}, extensions


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public(address: IPAddress) -> bool:
    """Whether an address is on the public internet, including the IPv4 address an IPv6 one carries (mapped,
    6to4, Teredo, NAT64), since a host reached that way is the IPv4 one."""
    if not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        carried = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
        if address in _NAT64:
            carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(inner is None or inner.is_global for inner in carried)
    return True


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address a host name resolves to (an IP literal resolves to itself)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
