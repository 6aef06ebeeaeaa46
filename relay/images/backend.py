"""Where image bytes live: the one interface every backend implements, and its errors.

    Backend             put / get objects by key (`relay.images.names.key`), nothing else
      LocalBackend      a directory on this machine (relay/images/local.py): the default
      S3Backend         an S3-compatible bucket (relay/images/s3.py): shared by every relay process

    StorageError        the backend failed (a disk, the bucket): nothing about the image itself
    ImageMissing        no image is kept under that name

A backend knows nothing of PNGs, tiles or links: `ImageStore` (relay/images/store.py) does, over any backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["Backend", "ImageMissing", "StorageError"]


class StorageError(Exception):
    """The backend could not keep or give back an object. The message names no path, bucket or endpoint."""


# The Retry-After of a request answered 503 because the store could not keep or give back an image, on every surface.
STORE_RETRY_S = 5


class ImageMissing(LookupError):
    """No image is kept under that name."""


class Backend(Protocol):
    async def open(self) -> None:
        """Get ready (make the directory, check the bucket). Raises StorageError when the store is unusable."""

    async def close(self) -> None:
        """Let go of threads and connections; waits for writes under way."""

    async def put(self, objects: Mapping[str, bytes], *, atomic: bool = False) -> dict[str, str]:
        """Keep each object under its key, replacing what was there. Returns the keys that could not be kept, and
        why (the others were). `atomic`: readers may already be asking for these keys, so none may ever see part
        of an object (a bucket always works so; a directory writes beside and renames)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The object's bytes; None when nothing is kept under the key. Raises StorageError."""
        ...
