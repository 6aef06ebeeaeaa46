"""The relay's image store: a finished grid is downloaded once and kept as `grid.png`; its four tiles
`1.png`..`4.png` are cut from it (Pillow) the first time one is needed, and kept too. A job whose result is one
image (an upscale, a face swap) keeps it as `image.png`. Everything is served at
signed, expiring URLs of the relay (`/files/<job>/<name>?exp=&sig=`); upstream links (Discord or a reseller's CDN)
are never shown to clients.

Cutting tiles on first use keeps the moment a job finishes cheap (a header check and one write), so hundreds of
jobs that finish together are all answered at once; the decode and the four PNG encodes happen when a tile is
fetched (or at once for `b64_json` answers), each grid once.

Signatures are HMAC-SHA256 (itsdangerous) over the job, the file name and the expiry. Several secrets may be
configured, newest first: the newest signs, all of them verify, so a secret can be rotated without breaking links.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
from pathlib import Path

from itsdangerous import Signer
from PIL import Image, UnidentifiedImageError

GRID = "grid.png"
IMAGE = "image.png"
TILE_NAMES = ("1.png", "2.png", "3.png", "4.png")
NAMES = (GRID, IMAGE, *TILE_NAMES)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC: the last chunk of every PNG
_JOB_ID = re.compile(r"^[a-z0-9_]{8,40}$")


class ImageError(Exception):
    """The upstream's bytes are not an image we can split."""


def load_or_create_secret(path: Path) -> str:
    """The relay's own signing secret, made once and kept next to its data so links survive a restart. A file
    left empty (a crash while it was written) is never used as a key: a new secret replaces it."""
    try:
        kept = path.read_text(encoding="utf-8").strip()
        if len(kept) >= 32:
            return kept
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret)
    os.replace(tmp, path)
    return secret


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _write(tmp, data)
    os.replace(tmp, path)


def _write(path: Path, data: bytes) -> None:
    """Write a whole file with the fewest system calls (open, write, close): grids are written by threads, and
    each call gives up the interpreter lock, which a busy event loop is slow to hand back."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's header (its first chunk, IHDR); None when the bytes are not a PNG."""
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _plain(image: Image.Image) -> Image.Image:
    """The image in a mode PNG keeps as it is."""
    if image.mode in ("RGB", "RGBA", "L", "LA", "P"):
        return image
    return image.convert("RGBA" if "A" in image.getbands() else "RGB")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)
    return out.getvalue()


class ImageStore:
    def __init__(self, root: Path, signing_secrets: list[str], ttl_s: int) -> None:
        if not signing_secrets:
            raise ValueError("at least one signing secret is needed")
        self.root = root
        self.ttl_s = ttl_s
        # itsdangerous signs with the last key and verifies with any of them.
        self._signer = Signer(list(reversed(signing_secrets)), salt="mj-relay.files", digest_method=hashlib.sha256)

    # -- files ---------------------------------------------------------------------------------------------------

    def path(self, job_id: str, name: str) -> Path:
        """`<root>/<last two characters of the job id>/<job id>-<name>`: 256 folders, made once each."""
        if not _JOB_ID.match(job_id):
            raise ValueError("not a job id")
        if name not in NAMES:
            raise ValueError("not an image name")
        return self.root / job_id[-2:] / f"{job_id}-{name}"

    def save_grid(self, job_id: str, data: bytes) -> tuple[int, int]:
        """Keep a finished grid; see `save`."""
        return self.save(job_id, GRID, data)

    def save(self, job_id: str, name: str, data: bytes) -> tuple[int, int]:
        """Keep a finished image (`grid.png` or `image.png`); returns its size. A PNG is checked by its header and
        its end marker (a truncated download fails here, without decoding: the first tile request decodes it) and
        kept as it came; another format is decoded and kept as PNG.
        Blocking: run it in a thread."""
        size = _png_size(data)
        if size is not None:
            if _PNG_END not in data[-64:]:
                raise ImageError("the PNG is truncated")
            kept = data
        else:
            try:
                image: Image.Image = Image.open(io.BytesIO(data))
                image.load()
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise ImageError(f"not a usable image: {type(exc).__name__}") from None
            size, kept = image.size, _png(_plain(image))
        width, height = size
        if width < 2 or height < 2:
            raise ImageError("the image is too small to split")
        path = self.path(job_id, name)
        # Written in place: the job only counts as succeeded once this returns, and a job that did not is
        # delivered again (and its grid written again) after a restart. Its folder is made the first time.
        try:
            _write(path, kept)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, kept)
        return width, height

    def ensure(self, job_id: str, name: str) -> Path:
        """The file for a name, cutting the tiles from the grid when one is asked for the first time.
        Blocking: run it in a thread. Raises FileNotFoundError when the job has no such image."""
        path = self.path(job_id, name)
        if path.exists():
            return path
        if name not in TILE_NAMES:
            raise FileNotFoundError(name)
        grid = self.path(job_id, GRID)
        try:
            with Image.open(grid) as opened:
                image = _plain(opened)
                image.load()
        except (UnidentifiedImageError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ImageError(f"the stored grid is unreadable: {type(exc).__name__}") from None
        tw, th = image.width // 2, image.height // 2
        for index, tile in enumerate(TILE_NAMES):
            x, y = (index % 2) * tw, (index // 2) * th
            _write_atomic(self.path(job_id, tile), _png(image.crop((x, y, x + tw, y + th))))
        return path

    def read(self, job_id: str, name: str) -> bytes:
        return self.ensure(job_id, name).read_bytes()

    # -- signed URLs ---------------------------------------------------------------------------------------------

    def _payload(self, job_id: str, name: str, expires: int) -> bytes:
        return f"{job_id}/{name}:{expires}".encode()

    def url(self, base_url: str, job_id: str, name: str, now: float) -> str:
        expires = int(now) + self.ttl_s
        signature = self._signer.get_signature(self._payload(job_id, name, expires)).decode()
        return f"{base_url.rstrip('/')}/files/{job_id}/{name}?exp={expires}&sig={signature}"

    def verify(self, job_id: str, name: str, expires: str, signature: str, now: float) -> bool:
        # ASCII digits only ("²" is a digit to str.isdigit but not to int()), and no more than a timestamp needs.
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12) or not signature:
            return False
        if int(expires) < now:
            return False
        try:
            return bool(self._signer.verify_signature(self._payload(job_id, name, int(expires)), signature.encode()))
        except UnicodeEncodeError:
            return False
