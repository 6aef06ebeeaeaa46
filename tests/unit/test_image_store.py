"""The image store over the local directory: keeping, checking and cutting images, and signed links."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image, ImageCms, PngImagePlugin

from adapters.simulator.grid import render_grid
from relay.config import default_config, parse_config
from relay.core.references import image_data_url
from relay.core.uploads import Uploads
from relay.images import (
    ImageError,
    ImageMissing,
    ImageStore,
    LocalBackend,
    SigningKeyError,
    StorageError,
    formats,
    image_store,
    load_or_create_secret,
)
from relay.images import links as images_links
from relay.images import local as images_local
from relay.images import store as images_store
from relay.images.names import key
from tests.helpers import FakeClock, bomb_png

pytestmark = pytest.mark.anyio

JOB = "job_0123456789abcdef01234567"
OTHER = "job_76543210fedcba9876543210"
NOW = 1_800_000_000.0
TILES = ("1.png", "2.png", "3.png", "4.png")


def store(tmp_path: Path, secrets: list[str] | None = None) -> ImageStore:
    return ImageStore(tmp_path / "images", secrets or ["s1"], ttl_s=600)


@pytest.fixture
async def images(tmp_path: Path) -> AsyncIterator[ImageStore]:
    opened = store(tmp_path)
    await opened.open()
    yield opened
    await opened.close()


def local(images: ImageStore) -> LocalBackend:
    assert isinstance(images.backend, LocalBackend)
    return images.backend


def jpeg(size: tuple[int, int] = (40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", size, (0, 50, 100, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def signed(url: str) -> tuple[str, str, str, str]:
    parts = urlsplit(url)
    _, _, job_id, name = parts.path.split("/")
    query = parse_qs(parts.query)
    return job_id, name, query["exp"][0], query["sig"][0]


async def test_a_grid_is_kept_and_split_into_four_tiles(images: ImageStore) -> None:
    grid = render_grid("x", (3, 2), 60)
    assert await images.save(JOB, "grid.png", grid) == (120, 80)
    assert await images.read(JOB, "grid.png") == grid
    folder = local(images).path(key(JOB, "grid.png")).parent
    assert [p.name for p in folder.iterdir()] == [f"{JOB}-grid.png"]  # tiles are cut when first asked for
    tiles = [Image.open(io.BytesIO(await images.read(JOB, name))) for name in TILES]
    assert all(t.size == (60, 40) and t.format == "PNG" for t in tiles)
    assert len({t.tobytes() for t in tiles}) == 4
    assert sorted(p.name for p in folder.iterdir()) == [f"{JOB}-{name}" for name in (*TILES, "grid.png")]


async def test_tiles_asked_for_together_are_cut_once(images: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    await images.save(JOB, "grid.png", render_grid("x", (1, 1), 32))
    cuts: list[bytes] = []
    cut = formats.cut
    monkeypatch.setattr(formats, "cut", lambda grid: cuts.append(grid) or cut(grid))
    first = await asyncio.gather(*(images.read(JOB, name) for name in TILES * 3))
    again = await asyncio.gather(*(images.read(JOB, name) for name in TILES))
    assert len(cuts) == 1 and first[:4] == first[4:8] == again


class SlowFirstLook(LocalBackend):
    """A directory whose first look for a tile finds nothing, and answers only when the test says: the look of a
    request that raced a cut which ended meanwhile."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.looking = asyncio.Event()
        self.answer = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        if key.endswith("-1.png") and not self.looking.is_set():
            self.looking.set()
            await self.answer.wait()
            return None
        return await super().get(key)


async def test_a_request_that_raced_a_finished_cut_reads_its_tiles_and_cuts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SlowFirstLook(tmp_path / "images")
    images = ImageStore(backend, ["s"], 600)
    await images.open()
    await images.save(JOB, "grid.png", render_grid("x", (1, 1), 32))
    cuts: list[bytes] = []
    cut = formats.cut
    monkeypatch.setattr(formats, "cut", lambda grid: cuts.append(grid) or cut(grid))
    late = asyncio.ensure_future(images.read(JOB, "1.png"))
    await backend.looking.wait()
    second = await images.read(JOB, "2.png")  # cuts the grid and stores the tiles, all before `late` hears back
    backend.answer.set()
    first = await late
    assert len(cuts) == 1 and first == backend.path(key(JOB, "1.png")).read_bytes() != second
    await images.close()


class RefusingTiles(LocalBackend):
    async def put(self, objects: Mapping[str, bytes], *, atomic: bool = False) -> dict[str, str]:
        if any(k.endswith("-1.png") for k in objects):
            return {k: "refused" for k in objects}
        return await super().put(objects, atomic=atomic)


async def test_tiles_the_store_refuses_are_answered_all_the_same_and_cut_again_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = ImageStore(RefusingTiles(tmp_path / "images"), ["s"], 600)
    await images.open()
    await images.save(JOB, "grid.png", render_grid("x", (1, 1), 32))
    cuts: list[bytes] = []
    cut = formats.cut
    monkeypatch.setattr(formats, "cut", lambda grid: cuts.append(grid) or cut(grid))
    first = await images.read(JOB, "1.png")
    assert await images.read(JOB, "1.png") == first and len(cuts) == 2
    await images.close()


async def test_a_16_bit_grey_grid_keeps_its_greys_in_its_tiles(images: ImageStore) -> None:
    """Pillow opens a 16-bit grey PNG as 0..65535 and its conversion to 8 bits clips instead of scaling: every grey
    above 255 (all but the darkest 0.4 %) came out white."""
    grey = Image.new("I;16", (8, 8))
    for x in range(8):
        for y in range(8):
            grey.putpixel((x, y), 32768)  # mid-grey
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG")
    await images.save(JOB, "grid.png", buffer.getvalue())
    for tile in TILES:
        with Image.open(io.BytesIO(await images.read(JOB, tile))) as kept:
            assert kept.size == (4, 4)
            assert kept.convert("L").getpixel((1, 1)) in range(120, 136)


async def test_other_formats_are_kept_as_png(images: ImageStore) -> None:
    assert await images.save(JOB, "grid.png", jpeg()) == (40, 40)
    with Image.open(local(images).path(key(JOB, "grid.png"))) as kept:
        assert kept.format == "PNG"


async def test_a_cmyk_photo_is_kept_as_rgb_without_its_cmyk_colour_profile(images: ImageStore) -> None:
    """A print shop's JPEG is CMYK with a CMYK profile: the PNG kept of it is RGB, and a PNG may only carry a profile
    of its own colour space (decoders drop or refuse another). An RGB profile stays."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk = srgb[:16] + b"CMYK" + srgb[20:]  # (only its colour space is read here)
    for mode, profile, kept in (("CMYK", cmyk, None), ("RGB", srgb, srgb)):
        out = io.BytesIO()
        Image.new(mode, (40, 40)).save(out, format="JPEG", icc_profile=profile)
        await images.save(JOB, "image.png", out.getvalue())
        png = Image.open(io.BytesIO(await images.read(JOB, "image.png")))
        assert png.mode == "RGB" and png.info.get("icc_profile") == kept


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
async def test_a_photo_is_kept_the_way_up_its_camera_says(images: ImageStore, kind: str) -> None:
    """A phone's JPEG (or PNG) is stored sideways with an EXIF orientation that says how to turn it, which every
    viewer follows; the PNG kept in its place carries no EXIF, so it is turned as it is kept."""
    sideways = Image.new("RGB", (40, 20), (255, 0, 0))
    sideways.paste((0, 0, 255), (0, 0, 20, 20))  # the left half blue: at the top once turned
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    buffer = io.BytesIO()
    sideways.save(buffer, format=kind, exif=exif.tobytes(), quality=95)
    assert await images.save(JOB, "image.png", buffer.getvalue()) == (20, 40)
    with Image.open(io.BytesIO(await images.read(JOB, "image.png"))) as kept:
        assert kept.size == (20, 40) and not kept.getexif()
        top, bottom = kept.convert("RGB").getpixel((10, 5)), kept.convert("RGB").getpixel((10, 35))
        assert isinstance(top, tuple) and isinstance(bottom, tuple)
        assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]


@pytest.mark.parametrize("tag", [b"\x01\x1f", b"\x01\x28"])  # YPosition (a fraction), ResolutionUnit (a number)
async def test_a_photo_whose_exif_pillow_cannot_write_back_is_turned_and_kept(images: ImageStore, tag: bytes) -> None:
    """Cameras and editors write EXIF that Pillow reads but cannot write back (a tag kept with another type than
    the one it has by the standard: here a number written as text; Pillow fails with a TypeError for one tag, a
    struct.error for the other). The photo itself is whole, and the PNG keeps no EXIF: it is turned and kept all
    the same, not failed (a 500 for its upload) or refused as not a usable image."""
    sideways = Image.new("RGB", (40, 20), (255, 0, 0))
    sideways.paste((0, 0, 255), (0, 0, 20, 20))  # the left half blue: at the top once turned
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    exif[0x010F] = "cam"  # Make, text: renamed below to `tag`, whose values are numbers
    raw = exif.tobytes()
    assert raw.count(b"\x01\x0f\x00\x02") == 1
    buffer = io.BytesIO()
    sideways.save(buffer, format="JPEG", exif=raw.replace(b"\x01\x0f\x00\x02", tag + b"\x00\x02"), quality=95)
    photo = buffer.getvalue()
    assert await images.save(JOB, "image.png", photo) == (20, 40)
    assert await images.save_many([(OTHER, "image.png", photo)]) == {}
    for job_id in (JOB, OTHER):
        with Image.open(io.BytesIO(await images.read(job_id, "image.png"))) as kept:
            assert kept.size == (20, 40)
            top, bottom = kept.convert("RGB").getpixel((10, 5)), kept.convert("RGB").getpixel((10, 35))
            assert isinstance(top, tuple) and isinstance(bottom, tuple)
            assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]


@pytest.mark.parametrize(
    "data", [b"not an image", b"", render_grid("x", (1, 1), 16)[:40], render_grid("x", (1, 1), 16)[:-12]]
)
async def test_broken_images_are_refused(images: ImageStore, data: bytes) -> None:
    with pytest.raises(ImageError):
        await images.save(JOB, "grid.png", data)
    assert not local(images).path(key(JOB, "grid.png")).exists()


async def test_a_whole_png_with_bytes_after_its_end_is_kept_and_one_cut_short_refused(images: ImageStore) -> None:
    """Decoders read a PNG to its IEND chunk and ignore what follows (padding, an appended archive): such a PNG is
    whole. An upload of one passes the reference check, and is then kept (to its end), not refused as truncated."""
    grid = render_grid("x", (1, 1), 16)
    padded = grid + bytes(100)
    uploads = Uploads(images, FakeClock())
    (link,) = await uploads.keep("k1", (image_data_url(padded),), "http://relay")
    upload_id, name, _, _ = signed(link)
    assert await images.read(upload_id, name) == grid
    assert await images.save(JOB, "grid.png", padded) == (32, 32)
    assert len({await images.read(JOB, tile) for tile in TILES}) == 4
    for cut_short in (grid[: len(grid) // 2], grid[:-12] + bytes(100)):
        with pytest.raises(ImageError, match="truncated"):
            await images.save(OTHER, "grid.png", cut_short)


async def test_a_png_of_many_chunks_is_kept_without_its_text_off_the_event_loop(
    images: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunks of a PNG that do not show it are left out as it is kept: on a decoding thread when it has more
    chunks than are walked at once. A chunk that runs past the end is a damaged PNG, refused."""
    image = Image.open(io.BytesIO(render_grid("x", (1, 1), 16)))
    info = PngImagePlugin.PngInfo()
    for n in range(images_store.INLINE_CHUNKS + 10):
        info.add_text("Comment", f"upstream job {n}")
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    threads: list[str] = []
    shown = formats.shown
    monkeypatch.setattr(
        formats,
        "shown",
        lambda *a: threads.append(threading.current_thread().name) or shown(*a),  # type: ignore[func-returns-value]
    )
    assert await images.save(JOB, "grid.png", out.getvalue()) == (32, 32)
    kept = await images.read(JOB, "grid.png")
    assert b"upstream job" not in kept and b"tEXt" not in kept
    assert Image.open(io.BytesIO(kept)).tobytes() == image.tobytes()
    assert threads[0] == threading.current_thread().name and threads[1].startswith("image-decode")
    damaged = bytearray(out.getvalue())
    damaged[33:37] = (10**6).to_bytes(4, "big")  # the length of its first text chunk
    with pytest.raises(ImageError, match="damaged"):
        await images.save(OTHER, "grid.png", bytes(damaged))
    assert (await images.save_many([(OTHER, "grid.png", out.getvalue())])) == {}
    assert b"tEXt" not in await images.read(OTHER, "grid.png")


@pytest.mark.parametrize(("orientation", "decoded"), [(None, False), (1, False), (6, True), (3, True)])
def test_a_png_is_decoded_to_be_kept_only_when_its_exif_says_to_turn_it(orientation: int | None, decoded: bool) -> None:
    """A PNG with EXIF that says it is shown as it is stored (or says nothing of it) is kept as any other, its EXIF
    left out with its text: decoded and made anew, every grid of an upstream that writes EXIF would take a decoding
    thread for a quarter of a second as its job ends."""
    exif = Image.Exif()
    exif[0x0131] = "an upstream's software"
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(out, format="PNG", exif=exif.tobytes())
    assert b"eXIf" in out.getvalue()
    kept = formats.shown(out.getvalue())
    assert (kept is None) is decoded
    if kept is not None:
        assert b"eXIf" not in kept and Image.open(io.BytesIO(kept)).size == (40, 20)


async def test_images_too_small_to_split_are_refused(images: ImageStore) -> None:
    one_pixel = io.BytesIO()
    Image.new("RGB", (1, 1)).save(one_pixel, format="PNG")
    for data in (one_pixel.getvalue(), jpeg((1, 8))):
        with pytest.raises(ImageError, match="too small"):
            await images.save(JOB, "grid.png", data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # as in service: Pillow only warns
async def test_images_with_more_pixels_than_pillow_decodes_safely_are_refused(
    images: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ImageError, match="pixels"):
        await images.save(JOB, "grid.png", bomb_png(20_000, 20_000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 40x40 JPEG: more, but less than twice as many
    with pytest.raises(ImageError, match="pixels"):
        await images.save(JOB, "grid.png", jpeg())
    assert not local(images).path(key(JOB, "grid.png")).exists()
    failed = await images.save_many([(JOB, "image.png", jpeg()), (OTHER, "image.png", bomb_png(40, 40))])
    assert sorted(failed) == [JOB, OTHER] and all(isinstance(why, ImageError) for why in failed.values())


async def test_a_batch_keeps_the_good_images_and_says_why_each_other_one_was_refused(images: ImageStore) -> None:
    grid = render_grid("x", (1, 1), 16)
    third = "job_aaaaaaaaaaaaaaaaaaaaaaaa"
    failed = await images.save_many(
        [(JOB, "grid.png", grid), (OTHER, "image.png", grid[:-12]), (third, "grid.png", jpeg())]
    )
    assert set(failed) == {OTHER} and isinstance(failed[OTHER], ImageError)
    assert await images.read(JOB, "grid.png") == grid
    assert (await images.read(third, "grid.png"))[:8] == b"\x89PNG\r\n\x1a\n"


async def test_a_directory_that_refuses_a_write_fails_that_image_only(tmp_path: Path) -> None:
    images = store(tmp_path)
    await images.open()
    try:
        grid = render_grid("x", (1, 1), 16)
        (tmp_path / "images" / JOB[-2:]).write_text("a file where the folder should be")
        failed = await images.save_many([(JOB, "grid.png", grid), (OTHER, "grid.png", grid)])
        assert set(failed) == {JOB} and isinstance(failed[JOB], StorageError)
        assert await images.read(OTHER, "grid.png") == grid
        with pytest.raises(StorageError):
            await images.save(JOB, "image.png", grid)
    finally:
        await images.close()


async def test_a_full_disk_leaves_no_part_of_an_image_behind(
    images: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images are never removed: half a file left by a write the disk refused would take its room for good, on the
    disk that ran out of it."""
    grid = render_grid("x", (1, 1), 16)
    write = os.write
    written: list[int] = []

    def full(fd: int, data: bytes | memoryview) -> int:
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(write(fd, bytes(data[: len(data) // 2])))
        return written[0]

    monkeypatch.setattr(images_local.os, "write", full)
    with pytest.raises(StorageError, match="No space left"):
        await images.save(JOB, "grid.png", grid)
    monkeypatch.undo()
    assert written and list(local(images).path(key(JOB, "grid.png")).parent.iterdir()) == []
    with pytest.raises(ImageMissing):
        await images.read(JOB, "grid.png")
    await images.save(JOB, "grid.png", grid)  # once there is room again
    assert await images.read(JOB, "grid.png") == grid


async def test_a_disk_that_reports_it_is_full_only_as_the_file_is_closed_leaves_no_part_of_an_image_behind(
    images: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network file system may take every write and say only at close that the data did not fit (or could not be
    written): the file made is removed then too."""
    grid = render_grid("x", (1, 1), 16)
    close = os.close
    closed: list[int] = []

    def refused(fd: int) -> None:
        closed.append(fd)
        close(fd)
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(images_local.os, "close", refused)
    with pytest.raises(StorageError, match="quota"):
        await images.save(JOB, "grid.png", grid)
    monkeypatch.undo()
    assert closed and list(local(images).path(key(JOB, "grid.png")).parent.iterdir()) == []
    await images.save(JOB, "grid.png", grid)  # once it takes it again
    assert await images.read(JOB, "grid.png") == grid


async def test_decodes_run_a_few_at_a_time_and_never_hold_up_the_reads_of_links(
    images: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each decode holds its whole image in memory (up to about 270 MB for the largest one Pillow takes, from an
    upload of a few hundred kilobytes): a burst of uploads of other formats, or of first tile requests, is decoded
    `DECODE_THREADS` at a time, on threads of the store's own, so it neither takes all the memory at once nor every
    thread that reads an image for a link."""
    await images.save(OTHER, "grid.png", render_grid("x", (1, 1), 16))
    to_png = formats.to_png
    held, running, most = threading.Event(), [0], [0]
    lock, loop, busy = threading.Lock(), asyncio.get_running_loop(), asyncio.Event()

    def slow(data: bytes) -> tuple[tuple[int, int], bytes]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] == images_store.DECODE_THREADS:
                loop.call_soon_threadsafe(busy.set)
        held.wait(30)  # a decode of a large image, still under way
        with lock:
            running[0] -= 1
        return to_png(data)

    monkeypatch.setattr(images_store.formats, "to_png", slow)
    ids = [f"job_{i:024x}" for i in range(40)]  # more than any machine's default thread pool
    saves = [asyncio.ensure_future(images.save(job_id, "grid.png", jpeg())) for job_id in ids]
    try:
        await asyncio.wait_for(busy.wait(), 10)  # the decoding threads have taken what they can
        assert await asyncio.wait_for(images.read(OTHER, "grid.png"), 10)  # a link is served meanwhile
    finally:
        held.set()
    assert [await save for save in saves] == [(40, 40)] * len(ids)
    assert most[0] == images_store.DECODE_THREADS


async def test_an_image_directory_that_went_away_is_a_storage_error_and_not_made_again_elsewhere(
    images: ImageStore,
) -> None:
    """A directory gone (a mount that went away under the relay) is the store failing, as a bucket gone is: its
    images are not missing for good (a 404, a prompt link 'gone'), and a new one is not written where the mount
    was, to be hidden when it comes back."""
    grid = render_grid("x", (1, 1), 16)
    await images.save(JOB, "grid.png", grid)
    root = local(images).root
    root.rename(root.with_name("unmounted"))
    with pytest.raises(StorageError):
        await images.read(JOB, "grid.png")
    with pytest.raises(StorageError):
        await images.save(OTHER, "grid.png", grid)
    assert not root.exists()
    root.with_name("unmounted").rename(root)  # back
    assert await images.read(JOB, "grid.png") == grid
    await images.save(OTHER, "grid.png", grid)
    with pytest.raises(ImageMissing):
        await images.read(OTHER, "image.png")


class Clock:
    """The backend's clock: each look at it moves it on by `step` (a write that takes that long)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.step = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def written_in_place(backend: LocalBackend, objects: dict[str, bytes]) -> bool:
    """Put `objects`; whether that took no turn of the event loop (written on its thread, not handed to one)."""
    turns: list[str] = []
    asyncio.get_running_loop().call_soon(turns.append, "turned")
    assert await backend.put(objects) == {}
    in_place = not turns
    await asyncio.sleep(0)
    for name, data in objects.items():
        assert backend.path(name).read_bytes() == data
    return in_place


async def test_a_directory_that_writes_fast_is_written_in_place_and_a_slow_one_from_threads_for_a_while(
    tmp_path: Path,
) -> None:
    clock = Clock()
    backend = LocalBackend(tmp_path, clock=clock)
    await backend.open()
    try:
        assert await written_in_place(backend, {"ab/1.png": b"one", "ab/2.png": b"two"})
        many = {f"cd/{i}.png": b"x" for i in range(images_local.INLINE_FILES + 1)}
        assert not await written_in_place(backend, many)  # a batch too large to hold the loop for
        big = {"gh/1.png": b"x" * (images_local.INLINE_BYTES + 1)}  # a real grid is megabytes
        assert not await written_in_place(backend, big)
        clock.step = images_local.SLOW_BATCH_S * 2  # each look at the clock is that much later: the batch was slow
        assert await written_in_place(backend, {"ef/1.png": b"slow"})
        clock.step = 0.0
        assert not await written_in_place(backend, {"ef/2.png": b"after"})
        clock.now += images_local.THREADS_FOR_S - 1
        assert not await written_in_place(backend, {"ef/3.png": b"still"})
        clock.now += 1
        assert await written_in_place(backend, {"ef/4.png": b"again"})
    finally:
        await backend.close()


async def test_an_object_written_again_is_replaced_whole_under_a_reader(tmp_path: Path) -> None:
    """A new object is written in place; one written again (a second delivery of the same result, by a process
    that stalled past its lease) replaces the first whole: a client already reading it reads all of the first."""
    backend = LocalBackend(tmp_path)
    await backend.open()
    try:
        assert await backend.put({"ab/grid.png": b"first" * 1000}) == {}
        with backend.path("ab/grid.png").open("rb") as reading:
            assert await backend.put({"ab/grid.png": b"second"}) == {}
            assert reading.read() == b"first" * 1000
        assert backend.path("ab/grid.png").read_bytes() == b"second"
        assert sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["grid.png"]  # nothing left beside it
    finally:
        await backend.close()


async def test_what_was_never_kept_is_missing(images: ImageStore) -> None:
    for name in ("grid.png", "image.png", "1.png"):
        with pytest.raises(ImageMissing):
            await images.read(JOB, name)
    await images.save(OTHER, "image.png", render_grid("x", (1, 1), 16))
    with pytest.raises(ImageMissing):  # one image, no grid: it has no tiles
        await images.read(OTHER, "1.png")


async def test_a_directory_that_refuses_a_read_is_a_storage_error(images: ImageStore) -> None:
    """Not a missing image, nor a bug: the store failed, as an S3 store's error is (a 503 that says to retry)."""
    local(images).path(key(JOB, "grid.png")).mkdir(parents=True)  # reading it fails, as a mount that went away
    with pytest.raises(StorageError, match="refused a read"):
        await images.read(JOB, "grid.png")


async def test_a_grid_that_cannot_be_decoded_is_an_image_error_when_cut(images: ImageStore) -> None:
    grid = bytearray(render_grid("x", (1, 1), 16))
    grid[40:60] = b"\x00" * 20  # damaged inside; the header and the end marker are intact
    await images.save(JOB, "grid.png", bytes(grid))
    with pytest.raises(ImageError, match="unreadable"):
        await images.read(JOB, "1.png")


async def test_a_grid_whose_chunks_are_damaged_is_an_image_error_when_cut(images: ImageStore) -> None:
    """Pillow reports a chunk it cannot follow as a SyntaxError ("broken PNG file"): a damaged grid all the same,
    which every route answers as one, and not a failure of the relay's own."""
    grid = bytearray(render_grid("x", (1, 1), 16))
    assert grid[37:41] == b"IDAT"
    grid[33:37] = (int.from_bytes(grid[33:37], "big") - 100).to_bytes(4, "big")  # its length: the next chunk is not
    await images.backend.put({key(JOB, "grid.png"): bytes(grid)})  # as found there: `save` refuses it
    for tile in TILES:
        with pytest.raises(ImageError, match="unreadable"):
            await images.read(JOB, tile)


@pytest.mark.parametrize("size", [(1, 1), (1, 64), (64, 1)])
async def test_a_kept_grid_found_too_small_to_split_is_an_image_error_when_cut(
    images: ImageStore, size: tuple[int, int]
) -> None:
    """A grid is checked to be large enough to split as it is kept; one found smaller in the store (replaced since,
    or copied in from elsewhere) is a damaged grid, answered as one: not a ValueError of Pillow's (a PNG with no
    pixels cannot be written), which a link answered as a 404 for an image that is there, and b64_json as a 500
    of the relay's own."""
    await images.save(JOB, "grid.png", render_grid("x", (1, 1), 16))
    buffer = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buffer, format="PNG")
    local(images).path(key(JOB, "grid.png")).write_bytes(buffer.getvalue())
    for tile in TILES:
        with pytest.raises(ImageError, match="unreadable"):
            await images.read(JOB, tile)


def test_names_and_ids_cannot_escape_the_store() -> None:
    for job_id, name in ((JOB, "../x.png"), ("../../etc", "grid.png"), (JOB, "5.png"), (JOB + "\n", "grid.png")):
        with pytest.raises(ValueError):
            key(job_id, name)
    assert key(JOB, "1.png") == f"67/{JOB}-1.png"


def test_the_configuration_picks_the_directory_unless_a_bucket_is_set(tmp_path: Path) -> None:
    config = parse_config(f"data_dir: {tmp_path}", env={})
    backend = image_store(config, ["s"]).backend
    assert isinstance(backend, LocalBackend) and backend.root == tmp_path / "images"
    assert isinstance(image_store(default_config(), ["s"]).backend, LocalBackend)


def test_signed_urls_verify_until_they_expire(tmp_path: Path) -> None:
    images = store(tmp_path)
    url = images.url("http://relay:1/", JOB, "1.png", NOW)
    assert url.startswith(f"http://relay:1/files/{JOB}/1.png?exp=")
    job_id, name, exp, sig = signed(url)
    assert images.verify(job_id, name, exp, sig, NOW + 599)
    assert not images.verify(job_id, name, exp, sig, NOW + 601)
    assert not images.verify(job_id, "2.png", exp, sig, NOW)
    assert not images.verify(job_id, name, str(int(exp) + 1000), sig, NOW)
    assert not images.verify(job_id, name, exp, "A" * len(sig), NOW)
    assert not images.verify(job_id, name, "soon", sig, NOW)
    assert not images.verify(job_id, name, exp, "", NOW)
    assert not images.verify(job_id, name, exp, "é", NOW)


def test_secrets_rotate_without_breaking_links(tmp_path: Path) -> None:
    old_url = store(tmp_path, ["old"]).url("http://r", JOB, "1.png", NOW)
    rotated = store(tmp_path, ["new", "old"])
    assert rotated.verify(*signed(old_url), NOW)
    new_url = rotated.url("http://r", JOB, "1.png", NOW)
    assert not store(tmp_path, ["old"]).verify(*signed(new_url), NOW)
    with pytest.raises(ValueError):
        ImageStore(tmp_path, [], 60)


def test_the_relay_keeps_its_own_secret(tmp_path: Path) -> None:
    path = tmp_path / "d" / "signing.key"
    first = load_or_create_secret(path)
    assert len(first) >= 32 and load_or_create_secret(path) == first
    assert os.stat(path).st_mode & 0o777 == 0o600
    path.write_text("")  # left empty by a crash: never used as a key
    replaced = load_or_create_secret(path)
    assert len(replaced) >= 32 and replaced != first and path.read_text() == replaced


def test_a_kept_secret_too_short_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """A short secret someone put in the file is refused, not replaced: each process sharing the folder would make
    a secret of its own, and no link or hook URL made by one would hold at another, or after a restart."""
    path = tmp_path / "signing.key"
    path.write_text("  short-but-not-empty \n")
    with pytest.raises(SigningKeyError, match=r"signing.key holds a signing secret of 19 characters, fewer than 32"):
        load_or_create_secret(path)
    assert path.read_text() == "  short-but-not-empty \n"


def test_of_processes_making_the_secret_together_the_first_one_written_is_every_one_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes start on a folder without a secret: the one that writes second finds the first one's there and
    takes it, instead of putting its own over it (the first would sign with a secret no longer kept anywhere)."""
    path = tmp_path / "signing.key"
    theirs = "t" * 43
    make = images_links.secrets.token_urlsafe

    def meanwhile(size: int) -> str:  # another process writes its secret while this one makes its own
        path.write_text(theirs)
        return make(size)

    monkeypatch.setattr(images_links.secrets, "token_urlsafe", meanwhile)
    assert load_or_create_secret(path) == theirs
    assert path.read_text() == theirs
    assert [p.name for p in tmp_path.iterdir()] == ["signing.key"]  # no temporary file left
