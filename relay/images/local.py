"""The images in a directory: `<root>/<key>` (`<root>/ab/job_...ab-grid.png`).

A small batch of files is written where it is asked for, on the event loop's thread, while the directory takes
them fast: a small file that goes to the page cache costs tens of microseconds, and a hand-off to a thread costs
far more under a burst (two turns of the loop, and the interpreter lock for each system call, which a busy loop
gives up only every switch interval: 25-35 ms a batch). Larger batches (more than `INLINE_FILES` files or
`INLINE_BYTES` bytes: a real Midjourney grid is megabytes) go to a few threads of the backend's own, where the
copy runs beside the loop. A batch that took longer than `SLOW_BATCH_S` (a busy disk, a network mount, a file
system slow to create files) sends every write to the threads for the next `THREADS_FOR_S`, so a slow directory
holds the loop once in that long at most, for as long as that one write took; a directory that stops answering
altogether holds it as the database in the same data folder would. Reads run on asyncio's default threads, so a
page of tiles never queues behind a burst of writes.

The directory is made by `open`, and only there: one that goes away later (a mount) is the store failing, as a
bucket gone is (its images are not missing: a read is a StorageError), and it is not made again where it was,
with images in it that its mount would hide when it came back.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relay.images.backend import StorageError

__all__ = ["LocalBackend"]

WRITE_THREADS = 4
# Written on the loop's thread: batches of at most this many files and bytes, while no batch has taken longer than
# `SLOW_BATCH_S` for `THREADS_FOR_S`.
INLINE_FILES = 32
INLINE_BYTES = 256 * 1024
SLOW_BATCH_S = 0.005
THREADS_FOR_S = 60.0


class LocalBackend:
    def __init__(
        self, root: Path, *, threads: int = WRITE_THREADS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.root = root
        self._threads = threads
        self._writers: ThreadPoolExecutor | None = None
        self._clock = clock
        self._threads_until = float("-inf")  # writes go to the threads until then (a batch was slow)

    def path(self, key: str) -> Path:
        return self.root / key

    async def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        if self._writers is not None:
            writers, self._writers = self._writers, None
            await asyncio.to_thread(writers.shutdown, wait=True, cancel_futures=True)

    async def put(self, objects: Mapping[str, bytes], *, atomic: bool = False) -> dict[str, str]:
        if not objects:
            return {}
        started = self._clock()
        if (
            len(objects) <= INLINE_FILES
            and sum(len(data) for data in objects.values()) <= INLINE_BYTES
            and started >= self._threads_until
        ):
            failed = self._write_all(objects, atomic)
            ended = self._clock()
            if ended - started > SLOW_BATCH_S:
                self._threads_until = ended + THREADS_FOR_S
            return failed
        if self._writers is None:
            self._writers = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="image-writer")
        return await asyncio.get_running_loop().run_in_executor(self._writers, self._write_all, objects, atomic)

    async def get(self, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._read, key)
        except OSError as exc:  # a directory that refuses reads (permissions, a mount gone): as the S3 store's
            raise StorageError(f"the image directory refused a read: {exc.strerror or type(exc).__name__}") from None

    def _read(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            if not self.root.is_dir():  # the directory itself is gone (a mount went away): not this image
                raise
            return None

    def _write_all(self, objects: Mapping[str, bytes], atomic: bool) -> dict[str, str]:
        failed = {}
        write = _write_atomic if atomic else _write_new
        for key, data in objects.items():
            path = self.path(key)
            try:
                # A new object is written in place: it is only named to anyone (its job succeeds, its link is
                # made) once this returns; one written again replaces the first whole. Its folder is made the
                # first time; the directory itself only by `open`: one that went away (a mount) is not made again
                # where it was, to be hidden when it comes back.
                try:
                    write(path, data)
                except FileNotFoundError:
                    path.parent.mkdir(exist_ok=True)
                    write(path, data)
            except OSError as exc:
                failed[key] = f"the image directory refused it: {exc.strerror or type(exc).__name__}"
        return failed


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_new(path: Path, data: bytes) -> None:
    """A new file, written in place; one that is there already (the same result delivered again, by a process that
    stalled past its lease) is replaced whole, so that a client already reading it reads all of what it found."""
    try:
        _write(path, data, os.O_EXCL)
    except FileExistsError:
        _write_atomic(path, data)


def _write(path: Path, data: bytes, flags: int = os.O_TRUNC) -> None:
    """Write a whole file with the fewest system calls (open, write, close): on a thread, each call gives up the
    interpreter lock, which a busy event loop is slow to hand back."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    made = os.fstat(fd) if flags & os.O_EXCL else None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            # (a network file system may report that the data did not fit only here, as the file is closed)
            os.close(fd)
    except BaseException:
        if made is not None:
            _remove_made(path, made)
        raise


def _remove_made(path: Path, made: os.stat_result) -> None:
    """Remove the file this write made and could not finish (a full disk): images are never removed, so half of one
    would take its room for good. Only while the path still names that file: another process's whole copy may have
    replaced it meanwhile."""
    try:
        there = os.stat(path)
        if (made.st_dev, made.st_ino) == (there.st_dev, there.st_ino):
            os.unlink(path)
    except OSError:
        pass
