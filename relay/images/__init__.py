"""Where finished images live, and the links that serve them.

    names       the images of a job (`grid.png`, `image.png`, tiles `1.png`..`4.png`) and the key each is kept under
    links       signed, expiring `/files/...` links; the relay's own signing secret
    formats     PNG checks, conversion to PNG, cutting a grid into tiles (Pillow)
    backend     the `Backend` interface (put / get by key) and its errors
    local       `LocalBackend`: a directory (the default)
    s3          `S3Backend`: an S3-compatible bucket (`images.s3`), shared by every relay process
    store       `ImageStore`: keeping, reading and cutting images over a backend, and their links

`image_store(config, secrets)` builds the store a configuration asks for.
"""

from __future__ import annotations

from relay.config import Config
from relay.images.backend import STORE_RETRY_S, Backend, ImageMissing, StorageError
from relay.images.formats import ImageError
from relay.images.links import Links, SigningKeyError, load_or_create_secret
from relay.images.local import LocalBackend
from relay.images.names import GRID, IMAGE, NAMES, TILE_NAMES
from relay.images.store import ImageStore

__all__ = [
    "STORE_RETRY_S",
    "GRID",
    "IMAGE",
    "NAMES",
    "TILE_NAMES",
    "Backend",
    "ImageError",
    "ImageMissing",
    "ImageStore",
    "Links",
    "LocalBackend",
    "SigningKeyError",
    "StorageError",
    "image_store",
    "load_or_create_secret",
]


def image_store(config: Config, signing_secrets: list[str]) -> ImageStore:
    """The image store of a configuration: the bucket of `images.s3` when it is set, else the image directory."""
    backend: Backend
    if config.images.s3 is not None:
        from relay.images.s3 import S3Backend  # botocore is only imported by a relay that uses it

        backend = S3Backend(config.images.s3)
    else:
        backend = LocalBackend(config.images_dir())
    return ImageStore(backend, signing_secrets, config.images.url_ttl_s)
