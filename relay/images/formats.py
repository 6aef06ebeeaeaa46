"""What the relay keeps of an image: a PNG, checked without decoding when it already is one; and the four tiles
cut from a grid. Pillow's work (`to_png`, `cut`) is blocking: run it in a thread."""

from __future__ import annotations

import io
import struct

from PIL import ExifTags, Image, UnidentifiedImageError

from relay.images.names import TILE_NAMES

__all__ = ["ImageError", "cut", "kept", "png_size", "shown", "to_png"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC: the last chunk of every PNG


class ImageError(Exception):
    """The bytes are not an image the relay can keep or split."""


# How Pillow reports bytes it cannot decode: besides OSError ("image file is truncated", ...), a chunk or marker it
# cannot follow is a SyntaxError ("broken PNG file"), and some parsers fail with the error of the step that went
# wrong (EOFError, IndexError, struct.error, ValueError).
_UNDECODABLE = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    ValueError,
    Image.DecompressionBombError,
)


def _usable(size: tuple[int, int]) -> tuple[int, int]:
    """The size of an image the relay keeps: large enough to split, and no larger than Pillow decodes without
    calling it a decompression bomb (`Image.MAX_IMAGE_PIXELS`; above it Pillow only warns, up to twice as many)."""
    if size[0] < 2 or size[1] < 2:
        raise ImageError("the image is too small to split")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise ImageError(f"the image has more than {limit} pixels")
    return size


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a whole PNG, from its header (its first chunk, IHDR) and its end marker, without decoding
    it (the first tile request does); None when the bytes are not a PNG. Raises ImageError for a truncated PNG, or
    one too small to split or too large to decode. Cheap enough for the event loop. The end marker is looked for
    at the end, then anywhere (a scan of a few ms per 10 MB, only for bytes that do not end with it): decoders stop
    at it, and a PNG with bytes after it (padding, an appended archive) is whole."""
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    if PNG_END not in data[-64:] and PNG_END not in data:
        raise ImageError("the PNG is truncated")
    return _usable((int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")))


# The chunks of a PNG the relay keeps as they came: what a decoder needs to show the image as it was made (its pixels,
# palette, transparency, colour space, pixel density, animation). The others (text, XMP, EXIF, times, an editor's own
# chunks) are left out: Midjourney writes the name of the account that made an image, and its own job id, in text
# chunks, and neither is ever told to a client.
_SHOWING = frozenset(
    (b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"cICP", b"mDCV", b"cLLI")
    + (b"sBIT", b"pHYs", b"bKGD", b"acTL", b"fcTL", b"fdAT")
)


def shown(data: bytes, max_chunks: int | None = None) -> bytes | None:
    """A whole PNG (`png_size` said so) with only the chunks that show it (`_SHOWING`), up to its end marker: the
    bytes themselves when that is all they hold. None when its EXIF says it is to be shown turned (`kept` turns
    it), or it has more than `max_chunks` chunks (a real image has a few hundred; one of a million tiny chunks
    takes a second to walk: on a thread, then). Raises ImageError for a chunk that runs past the end (no decoder
    could read it)."""
    parts: list[memoryview] = []
    view = memoryview(data)
    at, chunks, dropped = len(_PNG_SIGNATURE), 0, False
    while True:
        chunks += 1
        if max_chunks is not None and chunks > max_chunks:
            return None
        end = at + 12 + int.from_bytes(data[at : at + 4], "big")
        if end > len(data):
            raise ImageError("the PNG is damaged: a chunk runs past its end")
        kind = data[at + 4 : at + 8]
        if kind == b"eXIf" and _turned(data[at + 8 : end - 4]):
            return None
        if kind in _SHOWING:
            parts.append(view[at:end])
        else:
            dropped = True
        at = end
        if kind == b"IEND":
            if not dropped and at == len(data):
                return data
            return view[: len(_PNG_SIGNATURE)].tobytes() + b"".join(parts)


def _turned(exif: bytes) -> bool:
    """Whether a PNG's EXIF (its `eXIf` chunk) says it is to be shown turned; one that cannot be read is taken to
    (the decoder reads what it can of it as the image is kept)."""
    try:
        orientation = Image.Exif()
        orientation.load(exif)
        return bool(orientation.get(ExifTags.Base.Orientation, 1) != 1)
    except Exception:  # upstream bytes: the TIFF reader fails on malformed ones in many ways
        return True


def kept(data: bytes) -> tuple[tuple[int, int], bytes]:
    """What the relay keeps of an image, and its size: a PNG with only the chunks that show it (`shown`); another
    format, or a PNG whose EXIF says to turn it, decoded and encoded as PNG (`to_png`). Blocking."""
    size = png_size(data)
    if size is not None and (png := shown(data)) is not None:
        return size, png
    return to_png(data)


def to_png(data: bytes) -> tuple[tuple[int, int], bytes]:
    """An image of another format (JPEG, WebP, ...) decoded and encoded as PNG, with its size; its size is checked
    from its header, before it is decoded. An image whose EXIF says it is to be shown turned (a phone's photo is
    stored as its sensor saw it) is turned: the PNG keeps no EXIF, and every viewer shows the photo turned. Blocking."""
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        _usable(image.size)
        image.load()
        turn = _TURNS.get(image.getexif().get(ExifTags.Base.Orientation))
    except (*_UNDECODABLE, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a usable image: {type(exc).__name__}") from None
    if turn is not None:
        image = image.transpose(turn)
    return image.size, _png(_plain(image))


# How to turn an image whose EXIF orientation (1..8) says it is to be shown turned, as `ImageOps.exif_transpose`
# does. Not that function itself: it writes the EXIF back without the orientation, and Pillow fails to write much
# of what cameras and editors write (a tag of another type than the standard's: a TypeError,
# a struct.error), which failed or refused whole photos for EXIF the kept PNG does not even carry.
_TURNS: dict[object, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def cut(grid: bytes) -> dict[str, bytes]:
    """The four tiles of a grid, as PNGs, by name. Blocking."""
    try:
        with Image.open(io.BytesIO(grid)) as opened:
            # Checked as it was kept; a grid found smaller in the store (replaced since) would make empty tiles,
            # which Pillow does not write (a ValueError).
            _usable(opened.size)
            image = _plain(opened)
            image.load()
    except ImageError as exc:
        raise ImageError(f"the stored grid is unreadable: {exc}") from None
    except _UNDECODABLE as exc:
        raise ImageError(f"the stored grid is unreadable: {type(exc).__name__}") from None
    tw, th = image.width // 2, image.height // 2
    tiles = {}
    for index, name in enumerate(TILE_NAMES):
        x, y = (index % 2) * tw, (index // 2) * th
        tiles[name] = _png(image.crop((x, y, x + tw, y + th)))
    return tiles


def _plain(image: Image.Image) -> Image.Image:
    """The image in a mode PNG keeps as it is. 16-bit grey (0..65535) is scaled to 8 bits: Pillow's conversion
    clips it, every grey above 255 white. An image turned to RGB keeps its colour profile only when that is an RGB
    one: Pillow keeps the profile of the colours it converted from (CMYK, grey, Lab), which a PNG of RGB colours
    may not carry (decoders drop it, or refuse the image)."""
    if image.mode in ("RGB", "RGBA", "L", "LA", "P"):
        return image
    if image.mode.startswith("I;16"):
        return image.convert("I").point(lambda value: value / 257).convert("L")
    plain = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    profile = plain.info.get("icc_profile")
    if profile is not None and bytes(profile[16:20]) != b"RGB ":  # the profile's colour space, from its header
        del plain.info["icc_profile"]
    return plain


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)
    return out.getvalue()
