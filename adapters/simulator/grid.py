"""Midjourney-like results as real PNGs: a 2x2 grid of four visibly distinct tiles, or one tile-sized image (an
upscale, a face swap); the aspect ratio follows `--ar` (or a blend's dimensions)."""

from __future__ import annotations

import colorsys
import hashlib
import io
import re

from PIL import Image, ImageDraw

# A side of more digits than any aspect ratio has is no ratio (and past 4,300 digits, not even an int Python reads).
_AR = re.compile(r"(?<!\S)--(?:ar|aspect)\s+(\d{1,6})\s*:\s*(\d{1,6})(?!\S)", re.IGNORECASE)


def aspect_of(prompt: str) -> tuple[int, int]:
    """The last `--ar W:H` of a prompt (each side at most six digits), or 1:1."""
    found = _AR.findall(prompt)
    if not found:
        return (1, 1)
    w, h = (int(x) for x in found[-1])
    return (w, h) if w > 0 and h > 0 else (1, 1)


def tile_size(aspect: tuple[int, int], long_side: int) -> tuple[int, int]:
    w, h = aspect
    if w >= h:
        return long_side, max(8, round(long_side * h / w))
    return max(8, round(long_side * w / h)), long_side


def render_grid(seed: str, aspect: tuple[int, int], long_side: int = 256) -> bytes:
    """PNG bytes of a 2x2 grid; the same seed and aspect always give the same image."""
    tw, th = tile_size(aspect, long_side)
    digest = hashlib.sha256(seed.encode()).digest()
    image = Image.new("RGB", (tw * 2, th * 2))
    draw = ImageDraw.Draw(image)
    for index in range(4):
        _paint_tile(draw, digest, index, (index % 2) * tw, (index // 2) * th, tw, th)
    return _png(image)


def render_image(seed: str, aspect: tuple[int, int], long_side: int = 256) -> bytes:
    """PNG bytes of one tile-sized image (an upscale); the same seed and aspect always give the same image."""
    tw, th = tile_size(aspect, long_side)
    digest = hashlib.sha256(seed.encode()).digest()
    image = Image.new("RGB", (tw, th))
    _paint_tile(ImageDraw.Draw(image), digest, 0, 0, 0, tw, th)
    return _png(image)


def _paint_tile(draw: ImageDraw.ImageDraw, digest: bytes, index: int, x0: int, y0: int, tw: int, th: int) -> None:
    hue = ((digest[0] / 255) + index * 0.25) % 1.0
    base = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.55, 0.85))
    draw.rectangle((x0, y0, x0 + tw - 1, y0 + th - 1), fill=base)
    # A few bands so each tile has structure, seeded by the task and the tile.
    for band in range(4):
        b = digest[1 + index * 4 + band]
        shade = tuple(max(0, min(255, c + (b % 60) - 30)) for c in base)
        top = y0 + (th * band) // 4
        left = x0 + (b * tw) // 512
        draw.rectangle((left, top, x0 + tw - 1, top + th // 8), fill=shade)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
