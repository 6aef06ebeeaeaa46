"""The relay's image store: a finished grid is downloaded once, kept as `grid.png` and split into four tiles
`1.png`..`4.png` (Pillow), and served at signed, expiring URLs of the relay (`/files/<job>/<name>?exp=&sig=`).
Upstream links (Discord or a reseller's CDN) are never shown to clients.

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

NAMES = ("grid.png", "1.png", "2.png", "3.png", "4.png")
TILE_NAMES = NAMES[1:]
_JOB_ID = re.compile(r"^[a-z0-9_]{8,40}$")


class ImageError(Exception):
    """The upstream's bytes are not an image we can split."""


def load_or_create_secret(path: Path) -> str:
    """The relay's own signing secret, made once and kept next to its data so links survive a restart."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret)
    return secret


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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

    def directory(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise ValueError("not a job id")
        return self.root / job_id[-2:] / job_id

    def path(self, job_id: str, name: str) -> Path:
        if name not in NAMES:
            raise ValueError("not an image name")
        return self.directory(job_id) / name

    def save_grid(self, job_id: str, data: bytes) -> tuple[int, int]:
        """Keep the grid and its four tiles; returns the grid's size. Blocking: run it in a thread."""
        try:
            image: Image.Image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ImageError(f"not a usable image: {type(exc).__name__}") from None
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        width, height = image.size
        if width < 2 or height < 2:
            raise ImageError("the image is too small to split")
        folder = self.directory(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "grid.png", data if image.format == "PNG" else _png(image))
        tw, th = width // 2, height // 2
        for index, name in enumerate(TILE_NAMES):
            x, y = (index % 2) * tw, (index // 2) * th
            _write_atomic(folder / name, _png(image.crop((x, y, x + tw, y + th))))
        return width, height

    def read(self, job_id: str, name: str) -> bytes:
        return self.path(job_id, name).read_bytes()

    # -- signed URLs ---------------------------------------------------------------------------------------------

    def _payload(self, job_id: str, name: str, expires: int) -> bytes:
        return f"{job_id}/{name}:{expires}".encode()

    def url(self, base_url: str, job_id: str, name: str, now: float) -> str:
        expires = int(now) + self.ttl_s
        signature = self._signer.get_signature(self._payload(job_id, name, expires)).decode()
        return f"{base_url.rstrip('/')}/files/{job_id}/{name}?exp={expires}&sig={signature}"

    def verify(self, job_id: str, name: str, expires: str, signature: str, now: float) -> bool:
        if not expires.isdigit() or not signature:
            return False
        if int(expires) < now:
            return False
        try:
            return bool(self._signer.verify_signature(self._payload(job_id, name, int(expires)), signature.encode()))
        except UnicodeEncodeError:
            return False
