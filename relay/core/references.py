"""Images a client sends: chat `image_url` parts and the native API's inline images, turned into the checked data
URLs the upstream takes (`base64Array`, `base64`, ...).

Data URLs (and bare base64) are decoded with a size limit and must be a PNG, JPEG, WebP or GIF image. http(s) URLs
are fetched with a size and time limit, following at most three redirects, each hop checked and pinned by
`core.egress` (no private or local addresses unless `allow_private` or `allow_hosts` open them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import zlib
from urllib.parse import urljoin

import httpx
from PIL import Image

from relay.config import ReferencesConfig
from relay.core.egress import Egress, EgressRefused, Pinned, Resolver, pinned_client
from relay.errors import InvalidImage

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
MAX_REDIRECTS = 3


def _bad(message: str, param: str = "messages") -> InvalidImage:
    return InvalidImage(message, param=param)


def image_data_url(data: bytes, param: str = "messages") -> str:
    """A data URL for image bytes; raises InvalidImage when they are not a PNG, JPEG, WebP or GIF image. Blocking
    (Pillow reads every chunk of the image: seconds for one of a million tiny chunks): run it in a thread."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            image.verify()
    except Exception:  # client bytes: Pillow's parsers fail on malformed ones in many ways (IndexError, ...)
        raise _bad("An image is not a readable image.", param) from None
    if kind not in _MIME:
        raise _bad(f"An image must be PNG, JPEG, WebP or GIF, not {kind or 'unknown'}.", param)
    return f"data:{_MIME[kind]};base64,{base64.b64encode(data).decode()}"


class ReferenceLoader:
    def __init__(
        self,
        config: ReferencesConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.config = config
        self._egress = egress or Egress(config.allow_private, config.allow_hosts, resolver)
        self._client = pinned_client(config.timeout_s, transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def load(self, urls: list[str], owner: str) -> tuple[str, ...]:
        """Each image as a checked data URL; `owner` (the key that sent them) has its own share of host lookups.
        They are fetched together (a few slow hosts would otherwise hold the request for as many time limits); the
        first refused stops the others."""
        if len(urls) > self.config.max_count:
            raise _bad(f"At most {self.config.max_count} reference images are accepted.")
        loads = [asyncio.ensure_future(self._one(url, owner)) for url in urls]
        try:
            return tuple(await asyncio.gather(*loads))
        finally:
            for unfinished in loads:
                unfinished.cancel()
            await asyncio.gather(*loads, return_exceptions=True)

    async def _one(self, url: str, owner: str) -> str:
        # Decoding and checking an image is CPU work: off the event loop, which serves every other client.
        if url.startswith("data:"):
            return await asyncio.to_thread(self._from_data_url, url)
        if url.lower().startswith(("http://", "https://")):
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    data = await self._download(url, owner)
            except TimeoutError:
                raise _bad("A reference image took too long to download.") from None
            return await asyncio.to_thread(image_data_url, data)
        raise _bad("A reference image must be an http(s) URL or a data URL.")

    def _from_data_url(self, url: str, param: str = "messages") -> str:
        header, _, payload = url.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise _bad("A data URL must be a base64-encoded image (data:image/...;base64,...).", param)
        return self._from_base64(payload, param)

    def _from_base64(self, payload: str, param: str) -> str:
        if len(payload) * 3 // 4 > self.config.max_bytes:
            raise _bad(f"An image is larger than {self.config.max_bytes} bytes.", param)
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise _bad("An image holds invalid base64.", param) from None
        return image_data_url(data, param)

    def decode(self, value: str, param: str) -> str:
        """An image given inline, as Midjourney-proxy clients send them (a data URL, or bare base64), as a checked
        data URL; raises InvalidImage naming `param`."""
        if value.startswith("data:"):
            return self._from_data_url(value, param)
        return self._from_base64(value, param)

    async def _download(self, url: str, owner: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            pinned = await self._pinned(url, owner)
            try:
                async with self._client.stream(
                    "GET", pinned.target, headers=pinned.headers, extensions=pinned.extensions
                ) as response:
                    if response.is_redirect and "location" in response.headers:
                        try:
                            url = urljoin(url, response.headers["location"])
                        except ValueError:
                            raise _bad("A reference image URL redirects to an invalid URL.") from None
                        continue
                    if response.status_code != 200:
                        raise _bad(f"A reference image URL answered HTTP {response.status_code}.")
                    # The body as it came (`aiter_raw`), decoded here within the bound: the HTTP client decodes
                    # gzip and deflate a network read at a time with no bound of its own, so a few kilobytes of
                    # zeros compressed (twice, for `gzip, gzip`) would be held as megabytes, or gigabytes, before
                    # their size was looked at.
                    decoder = _Decoder(response.headers.get("content-encoding", ""), self.config.max_bytes)
                    chunks = [decoder.decode(chunk) async for chunk in response.aiter_raw()]
                    chunks.append(decoder.flush())
                    return b"".join(chunks)
            except httpx.HTTPError:
                raise _bad("A reference image could not be downloaded.") from None
        raise _bad("A reference image URL redirects too often.")

    async def _pinned(self, url: str, owner: str) -> Pinned:
        try:
            return await self._egress.pin(url, owner=owner)
        except EgressRefused as exc:
            raise _bad(f"A reference image URL is refused: {exc}.") from None


class _Decoder:
    """Decodes a body as its `Content-Encoding` says (none, gzip or deflate; one of them, as `adapters.h1` reads
    them), raising InvalidImage once it decodes to more than `limit` bytes, before holding more than that."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding.strip().lower()
        self.left = limit
        self.limit = limit
        self._zlib: zlib._Decompress | None = None
        self._fed = False
        if self.encoding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.encoding == "deflate":
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS)
        elif self.encoding not in ("", "identity"):
            raise _bad("A reference image came in an encoding the relay does not read.")

    def decode(self, data: bytes) -> bytes:
        if self._zlib is None or not data:
            return self._taken(data)
        first, self._fed = not self._fed, True
        try:
            return self._taken(self._zlib.decompress(data, self.left + 1))
        except zlib.error:
            if not (first and self.encoding == "deflate"):
                raise _bad("A reference image could not be decoded.") from None
        self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)  # "deflate" is sent raw (no zlib wrapper) by some servers
        try:
            return self._taken(self._zlib.decompress(data, self.left + 1))
        except zlib.error:
            raise _bad("A reference image could not be decoded.") from None

    def flush(self) -> bytes:
        return b"" if self._zlib is None else self._taken(self._zlib.flush())

    def _taken(self, data: bytes) -> bytes:
        self.left -= len(data)
        if self.left < 0:
            raise _bad(f"A reference image is larger than {self.limit} bytes.")
        return data
