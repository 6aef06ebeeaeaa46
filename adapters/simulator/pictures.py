"""Images the simulator is given (data URLs in `base64Array`, `base64`, `maskBase64`, ...) and the media type of the
bytes it serves. An image is a base64 data URL of a PNG, JPEG, WebP or GIF that Pillow recognises; only its header is
read."""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass

from PIL import Image

MAX_IMAGE_BYTES = 10_000_000
_FORMATS = {"PNG": ("png", "image/png"), "JPEG": ("jpg", "image/jpeg"), "WEBP": ("webp", "image/webp")}
_FORMATS["GIF"] = ("gif", "image/gif")
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


@dataclass(frozen=True, slots=True)
class Picture:
    data: bytes
    ext: str
    size: tuple[int, int]

    @property
    def aspect(self) -> tuple[int, int]:
        """The image's aspect ratio, reduced (`--ar` style)."""
        w, h = self.size
        d = math.gcd(w, h) or 1
        return w // d, h // d


def picture(value: object) -> Picture | None:
    """The image a data URL carries, or None when the value is not an image data URL."""
    if not isinstance(value, str) or not value.startswith("data:image/"):
        return None
    header, sep, payload = value.partition(",")
    if not sep or not header.endswith(";base64") or len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, size = image.format, image.size
    except Exception:  # hostile bytes: Pillow raises many kinds of error on them
        return None
    if kind not in _FORMATS or size[0] <= 0 or size[1] <= 0:
        return None
    return Picture(data, _FORMATS[kind][0], size)


def pictures(value: object) -> list[Picture] | None:
    """Every image of a `base64Array`, or None when it is not a list of image data URLs."""
    if not isinstance(value, list):
        return None
    found = [picture(item) for item in value]
    if any(item is None for item in found):
        return None
    return [item for item in found if item is not None]


def media_type(data: bytes) -> str:
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
