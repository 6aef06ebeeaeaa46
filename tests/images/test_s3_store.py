"""The image store over an S3-compatible bucket (moto's server, over HTTP): the same behaviour as the directory."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from adapters.simulator.grid import render_grid
from relay.config import ConfigError, S3Config, parse_config
from relay.core.uploads import Uploads
from relay.images import ImageError, ImageMissing, ImageStore, StorageError, formats, image_store
from relay.images.s3 import S3Backend
from tests.helpers import CuttableProxy, FakeClock
from tests.images.conftest import Bucket

pytestmark = pytest.mark.anyio

JOB = "job_0123456789abcdef01234567"
OTHER = "job_76543210fedcba9876543210"
TILES = ("1.png", "2.png", "3.png", "4.png")


def over(target: Bucket, **overrides: Any) -> ImageStore:
    return ImageStore(S3Backend(target.s3_config(**overrides)), ["s1"], 600)


@pytest.fixture
async def images(bucket: Bucket) -> AsyncIterator[ImageStore]:
    opened = over(bucket, prefix="relay/")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def cuts(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every grid cut into tiles, in this process."""
    seen: list[bytes] = []
    cut: Callable[[bytes], dict[str, bytes]] = formats.cut
    monkeypatch.setattr(formats, "cut", lambda grid: seen.append(grid) or cut(grid))
    return seen


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


async def test_a_grid_is_kept_in_the_bucket_and_its_tiles_cut_once_and_written_back(
    images: ImageStore, bucket: Bucket, cuts: list[bytes]
) -> None:
    grid = render_grid("x", (3, 2), 60)
    assert await images.save_many([(JOB, "grid.png", grid)]) == {}
    assert bucket.keys() == [f"relay/67/{JOB}-grid.png"]
    assert await images.read(JOB, "grid.png") == grid
    tiles = await asyncio.gather(*(images.read(JOB, name) for name in TILES * 2))
    assert len(cuts) == 1 and tiles[:4] == tiles[4:]
    assert bucket.keys() == sorted(f"relay/67/{JOB}-{name}" for name in (*TILES, "grid.png"))
    assert [bucket.get(f"relay/67/{JOB}-{name}") for name in TILES] == tiles[:4]
    assert all(Image.open(io.BytesIO(tile)).size == (60, 40) for tile in tiles)
    # Another process (its own store over the same bucket) reads the tiles that were written back.
    other = over(bucket, prefix="relay/")
    try:
        assert [await other.read(JOB, name) for name in TILES] == tiles[:4]
    finally:
        await other.close()
    assert len(cuts) == 1


async def test_other_formats_are_kept_as_png_and_broken_images_refused(images: ImageStore, bucket: Bucket) -> None:
    grid = render_grid("x", (1, 1), 16)
    third = "job_aaaaaaaaaaaaaaaaaaaaaaaa"
    failed = await images.save_many(
        [(JOB, "grid.png", jpeg()), (OTHER, "grid.png", grid[:-12]), (third, "image.png", b"")]
    )
    assert set(failed) == {OTHER, third} and all(isinstance(why, ImageError) for why in failed.values())
    assert bucket.keys() == [f"relay/67/{JOB}-grid.png"]
    kept = Image.open(io.BytesIO(bucket.get(f"relay/67/{JOB}-grid.png")))
    assert kept.format == "PNG" and kept.size == (40, 30)
    assert await images.save(third, "image.png", grid) == (32, 32)


async def test_what_the_bucket_does_not_hold_is_missing(images: ImageStore, bucket: Bucket) -> None:
    with pytest.raises(ImageMissing):
        await images.read(JOB, "grid.png")
    with pytest.raises(ImageMissing):  # no grid to cut tiles from
        await images.read(JOB, "1.png")
    await images.save(JOB, "grid.png", render_grid("x", (1, 1), 16))
    bucket.delete(f"relay/67/{JOB}-grid.png")
    with pytest.raises(ImageMissing):
        await images.read(JOB, "2.png")


async def test_uploads_are_kept_in_the_bucket_and_come_back_from_it_as_reference_images(
    images: ImageStore, bucket: Bucket
) -> None:
    uploads = Uploads(images, FakeClock())
    picture = jpeg()
    (link,) = await uploads.keep(
        "k1", ("data:image/jpeg;base64," + base64.b64encode(picture).decode(),), "http://relay"
    )
    (stored,) = bucket.keys()
    upload_id = link.split("/files/")[1].split("/")[0]
    assert upload_id.startswith("up") and stored == f"relay/{upload_id[-2:]}/{upload_id}-image.png"
    prompt, references = await uploads.inline(f"{link} a heron", (), 5)
    assert prompt == "a heron"
    assert references == ("data:image/png;base64," + base64.b64encode(bucket.get(stored)).decode(),)
    bucket.delete(stored)
    with pytest.raises(Exception, match="gone"):
        await uploads.inline(f"{link} a heron", (), 5)


async def test_a_bucket_that_cannot_be_used_is_a_storage_error(bucket: Bucket) -> None:
    missing = over(bucket, bucket="no-such-bucket-here", max_attempts=1)
    try:
        with pytest.raises(StorageError, match=r"images\.s3: the bucket 'no-such-bucket-here' cannot be used"):
            await missing.open()
        failed = await missing.save_many([(JOB, "grid.png", render_grid("x", (1, 1), 16))])
        assert isinstance(failed[JOB], StorageError) and "NoSuchBucket" in str(failed[JOB])
        with pytest.raises(StorageError):
            await missing.read(JOB, "grid.png")
    finally:
        await missing.close()


async def test_an_unreachable_endpoint_is_a_storage_error_that_names_no_address(bucket: Bucket) -> None:
    with socket.socket() as closed:  # bound, never listening: every connection is refused at once
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        unreachable = over(bucket, endpoint_url=endpoint, max_attempts=1, connect_timeout_s=2)
        try:
            with pytest.raises(StorageError):
                await unreachable.open()
            with pytest.raises(StorageError) as raised:
                await unreachable.read(JOB, "grid.png")
            assert endpoint not in str(raised.value) and bucket.name not in str(raised.value)
        finally:
            await unreachable.close()


async def test_a_bucket_on_a_silent_network_fails_each_request_in_a_bounded_time_and_is_used_again_once_back(
    bucket: Bucket, store_proxy: CuttableProxy
) -> None:
    # Two tries, each with its connect and read timeouts (2 s here), and at most a second of botocore's backoff
    # between them: at most 5 s in all, whatever the network does.
    store = over(bucket, endpoint_url=store_proxy.endpoint, timeout_s=1, connect_timeout_s=1, max_attempts=2)
    grid = render_grid("x", (1, 1), 16)
    await store.open()
    try:
        await store.save(JOB, "grid.png", grid)
        store_proxy.silent()  # connections are taken, and then nothing is read or answered

        async def big_put() -> None:  # more than the socket buffers take: the body itself stalls
            failed = await store.backend.put({"big": os.urandom(32_000_000)})
            if failed:
                raise StorageError(failed["big"])

        requests: tuple[Callable[[], Awaitable[object]], ...] = (
            lambda: store.save(OTHER, "grid.png", grid),
            lambda: store.read(JOB, "grid.png"),
            big_put,
        )
        for request, tries in zip(requests, (2, 2, 1), strict=True):
            started, swallowed = time.monotonic(), store_proxy.swallowed
            with pytest.raises(StorageError):
                await asyncio.wait_for(request(), 30)  # a TimeoutError here: the request hung
            assert time.monotonic() - started < 8
            # A small request's try ends at its read timeout and the next is made; a stalled body takes the budget.
            assert store_proxy.swallowed - swallowed == tries
        store_proxy.restore()
        await store.save(OTHER, "grid.png", grid)
        assert await store.read(OTHER, "grid.png") == grid
    finally:
        await store.close()


async def test_requests_queued_behind_a_silent_bucket_fail_within_the_same_bound(
    bucket: Bucket, store_proxy: CuttableProxy
) -> None:
    """A request that waits for one of the `max_connections` counts that wait against its bound too: behind a bucket
    that stopped answering, a page of tiles is a page of 503s in one bound, not one bound per connection's worth of
    requests ahead of it (a finished job's image queued behind them no different)."""
    # One connection, one try of a second's connect and read timeouts each: at most 2 s a request.
    store = over(
        bucket, endpoint_url=store_proxy.endpoint, timeout_s=1, connect_timeout_s=1, max_attempts=1, max_connections=1
    )
    await store.open()
    try:
        await store.save(JOB, "grid.png", render_grid("x", (1, 1), 16))
        store_proxy.silent()

        async def read() -> float:
            with pytest.raises(StorageError):
                await store.read(JOB, "grid.png")
            return time.monotonic()

        started = time.monotonic()
        ended = await asyncio.wait_for(asyncio.gather(*(read() for _ in range(6))), 30)
        assert max(ended) - started < 4  # six tries one after the other: 6 s
    finally:
        await store.close()


def test_the_s3_section_is_checked_and_each_problem_names_its_path() -> None:
    text = """
images:
  s3:
    endpoint_url: ftp://minio
    bucket: Not_A_Bucket
    region: EU
    prefix: ../up
    addressing_style: sideways
    colour: blue
"""
    with pytest.raises(ConfigError) as raised:
        parse_config(text, env={})
    paths = sorted(problem.split(":")[0] for problem in raised.value.problems)
    assert paths == [
        f"images.s3.{key}"
        for key in sorted(("endpoint_url", "bucket", "region", "prefix", "addressing_style", "colour"))
    ]
    with pytest.raises(ConfigError, match=r"images\.s3\.secret_access_key: give access_key_id and"):
        parse_config("images: {s3: {bucket: pics, access_key_id: AKIA}}", env={})
    with pytest.raises(ConfigError, match=r"images\.s3\.secret_access_key: the environment variable S3_KEY"):
        parse_config("images: {s3: {bucket: pics, access_key_id: a, secret_access_key: '${S3_KEY}'}}", env={})
    with pytest.raises(ConfigError, match=r"images\.s3\.bucket: required"):
        parse_config("images: {s3: {}}", env={})


def test_a_configured_bucket_is_where_the_relay_keeps_its_images() -> None:
    config = parse_config(
        "images: {s3: {bucket: pics, prefix: /relay/a, access_key_id: '', secret_access_key: '${S3_KEY:-}'}}",
        env={},
    )
    assert config.images.s3 is not None and config.images.s3.prefix == "relay/a/"
    assert config.images.s3.access_key_id is None and config.images.s3.secret_access_key is None
    keyed = parse_config("images: {s3: {bucket: pics, access_key_id: AKIA42, secret_access_key: hush-0123}}", env={})
    assert "hush-0123" not in repr(keyed) and "AKIA42" not in repr(keyed)
    backend = image_store(config, ["s"]).backend
    assert isinstance(backend, S3Backend) and backend.config.bucket == "pics"


def test_the_example_configuration_documents_every_s3_field() -> None:
    lines = (Path(__file__).resolve().parents[2] / "config.example.yaml").read_text().splitlines()
    start = lines.index("  # s3:")
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("  #   "):
            break
        block.append(line)
    text = "images:\n" + "\n".join("  " + line[4:] for line in block)
    env = {"MJ_RELAY_S3_ACCESS_KEY_ID": "AKIA0123", "MJ_RELAY_S3_SECRET_ACCESS_KEY": "s3cr3t-0123"}
    s3 = parse_config(text, env=env).images.s3
    assert s3 is not None and s3.secret_access_key == "s3cr3t-0123" and s3.prefix == "mj-relay/"
    assert {line.split(":")[0].strip(" #") for line in block[1:]} == set(S3Config.model_fields)
