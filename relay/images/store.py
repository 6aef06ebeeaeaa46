"""`ImageStore`: the relay's images, over any backend (a directory, a bucket), and the links to them.

A finished grid is kept as `grid.png` once it is downloaded; its four tiles `1.png`..`4.png` are cut from it the
first time one is asked for, written back to the backend, and kept too. A job whose result is one image (an
upscale, a face swap) keeps it as `image.png`; an upload keeps its image the same way, under an id of its own.
Upstream links (Discord or a reseller's CDN) are never shown to clients: everything is served at the relay's own
signed, expiring links (`relay.images.links`), which any process sharing the backend and the secrets serves.

Cutting tiles on first use keeps the moment a job finishes cheap (a header check, a walk over its chunks and one
write), so hundreds of jobs that finish together are all answered at once; the decode and the four PNG encodes
happen when a tile is fetched (or at once for `b64_json` answers), each grid once per process however many ask
together (two processes asking at the same moment may both cut it: they write the same tiles).

Decoding and encoding (tiles cut, an image of another format kept as PNG) run on `DECODE_THREADS` threads of the
store's own: a decode holds its whole image in memory (a grid or an upload of the largest size Pillow decodes, 89
million pixels, takes about 270 MB, its tiles as many again), so a burst of them is queued rather than run at
once, and the threads that read and write files for every link are never all taken by them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from relay.images import formats
from relay.images.backend import Backend, ImageMissing, StorageError
from relay.images.formats import ImageError
from relay.images.links import Links
from relay.images.local import LocalBackend
from relay.images.names import GRID, TILE_NAMES, key

__all__ = ["ImageStore"]

log = logging.getLogger("relay.images")

# Grids this process cut lately (ids only): a request that found no tile while one was being cut reads it again.
RECENT_CUTS = 4096
# A kept PNG of more chunks than this has the chunks that do not show it left out on a decoding thread (`shown`).
INLINE_CHUNKS = 2048
# Images decoded or encoded at once (each on a thread; the others wait their turn).
DECODE_THREADS = 2

A = TypeVar("A")
T = TypeVar("T")


class ImageStore:
    """`backend`: where the bytes live (a Path: that directory); `signing_secrets`, newest first, and `ttl_s`: the
    links."""

    def __init__(self, backend: Backend | Path, signing_secrets: list[str], ttl_s: int) -> None:
        self.backend: Backend = LocalBackend(backend) if isinstance(backend, Path) else backend
        self.links = Links(signing_secrets, ttl_s)
        self._cuts: dict[str, asyncio.Future[dict[str, bytes]]] = {}
        self._cut_lately: OrderedDict[str, None] = OrderedDict()
        self._decoders: ThreadPoolExecutor | None = None  # made at the first decode

    async def open(self) -> None:
        await self.backend.open()

    async def close(self) -> None:
        for cut in list(self._cuts.values()):
            cut.cancel()
        if self._decoders is not None:
            decoders, self._decoders = self._decoders, None
            await asyncio.to_thread(decoders.shutdown, wait=True, cancel_futures=True)
        await self.backend.close()

    async def _decoding(self, work: Callable[[A], T], data: A) -> T:
        """`work(data)` on one of the store's decoding threads."""
        if self._decoders is None:
            self._decoders = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="image-decode")
        return await asyncio.get_running_loop().run_in_executor(self._decoders, work, data)

    # -- links ---------------------------------------------------------------------------------------------------

    def url(self, base_url: str, job_id: str, name: str, now: float) -> str:
        return self.links.url(base_url, job_id, name, now)

    def verify(self, job_id: str, name: str, expires: str, signature: str, now: float) -> bool:
        return self.links.verify(job_id, name, expires, signature, now)

    # -- keeping -------------------------------------------------------------------------------------------------

    async def save(self, job_id: str, name: str, data: bytes) -> tuple[int, int]:
        """Keep one finished image; returns its size. Raises ImageError or StorageError; see `save_many`."""
        kept = _kept_at_once(data)
        if kept is None:
            kept = await self._decoding(formats.kept, data)
        failed = await self.backend.put({key(job_id, name): kept[1]})
        if failed:
            raise StorageError(next(iter(failed.values())))
        return kept[0]

    async def save_many(self, images: Sequence[tuple[str, str, bytes]]) -> dict[str, ImageError | StorageError]:
        """Keep finished images, each `(id, name, bytes)` of a different id, in one batch; returns why each one that
        was not kept failed, by id. A PNG is checked by its header and its end marker (a truncated download fails
        here, without decoding) and kept as it came, the chunks that do not show it left out (`formats.shown`);
        another format, or a PNG whose EXIF says to turn it, is decoded (in a thread) and kept as PNG
        (`formats.kept`)."""
        failed: dict[str, ImageError | StorageError] = {}
        keep: dict[str, bytes] = {}
        owner: dict[str, str] = {}
        others: list[tuple[str, str, bytes]] = []
        for image_id, name, data in images:
            where = key(image_id, name)
            owner[where] = image_id
            try:
                if (at_once := _kept_at_once(data)) is not None:
                    keep[where] = at_once[1]
                else:
                    others.append((image_id, where, data))
            except ImageError as exc:
                failed[image_id] = exc
        if others:
            for (image_id, where, _), converted in zip(
                others, await self._decoding(_convert_all, [data for _, _, data in others]), strict=True
            ):
                if isinstance(converted, ImageError):
                    failed[image_id] = converted
                else:
                    keep[where] = converted
        for where, why in (await self.backend.put(keep)).items():
            failed[owner[where]] = StorageError(why)
        return failed

    async def kept_whole(self, job_id: str, name: str) -> bool:
        """Whether an image is kept, whole: a PNG up to its end marker, as `save` keeps it (a file cut short by a
        process killed while writing it is not). Raises StorageError."""
        data = await self.backend.get(key(job_id, name))
        if data is None or not data.endswith(formats.PNG_END):
            return False
        try:
            return formats.png_size(data) is not None
        except ImageError:
            return False

    # -- reading -------------------------------------------------------------------------------------------------

    async def read(self, job_id: str, name: str) -> bytes:
        """An image's bytes, cutting the tiles from the grid when one is asked for the first time. Raises
        ValueError (not a relay id or image name), ImageMissing, ImageError (a stored grid that cannot be cut) or
        StorageError."""
        data = await self.backend.get(key(job_id, name))
        if data is not None:
            return data
        if name not in TILE_NAMES:
            raise ImageMissing(name)
        cut = self._cuts.get(job_id)
        if cut is None and job_id in self._cut_lately:
            # Its tiles were cut and stored while this request looked for one: read it again.
            data = await self.backend.get(key(job_id, name))
            if data is not None:
                return data
            cut = self._cuts.get(job_id)
        if cut is None:
            cut = self._cuts[job_id] = asyncio.ensure_future(self._cut(job_id))
            cut.add_done_callback(lambda done: self._cut_done(job_id, done))
        # Shielded: a client that goes away does not stop the cut that others wait for.
        return (await asyncio.shield(cut))[name]

    async def _cut(self, job_id: str) -> dict[str, bytes]:
        grid = await self.backend.get(key(job_id, GRID))
        if grid is None:
            raise ImageMissing(GRID)
        tiles = await self._decoding(formats.cut, grid)
        # Written beside and renamed: another request may be reading a tile already.
        failed = await self.backend.put({key(job_id, name): tile for name, tile in tiles.items()}, atomic=True)
        if not failed:
            self._cut_lately[job_id] = None
            if len(self._cut_lately) > RECENT_CUTS:
                self._cut_lately.popitem(last=False)
        else:
            # These tiles are answered all the same; the next request cuts them again.
            log.warning(
                "tiles could not be stored", extra={"fields": {"job": job_id, "why": next(iter(failed.values()))}}
            )
        return tiles

    def _cut_done(self, job_id: str, done: asyncio.Future[dict[str, bytes]]) -> None:
        if self._cuts.get(job_id) is done:
            del self._cuts[job_id]
        if not done.cancelled():
            done.exception()  # seen by whoever waits; retrieved here for when everybody went away


def _kept_at_once(data: bytes) -> tuple[tuple[int, int], bytes] | None:
    """What is kept of a PNG of at most `INLINE_CHUNKS` chunks, and its size, as `formats.kept` gives it, without
    decoding (on the event loop); None for an image that is to be decoded (another format, a turn its EXIF asks for)
    or walked on a decoding thread. Raises ImageError for a damaged PNG."""
    size = formats.png_size(data)
    png = formats.shown(data, INLINE_CHUNKS) if size is not None else None
    return (size, png) if size is not None and png is not None else None


def _convert_all(images: list[bytes]) -> list[bytes | ImageError]:
    out: list[bytes | ImageError] = []
    for data in images:
        try:
            out.append(formats.kept(data)[1])
        except ImageError as exc:
            out.append(exc)
    return out
