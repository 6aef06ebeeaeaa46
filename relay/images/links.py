"""Signed, expiring links to the relay's images (`/files/<job>/<name>?exp=&sig=`), and the relay's own secret.

Signatures are HMAC-SHA256 (itsdangerous) over the job, the file name and the expiry. Several secrets may be
configured, newest first: the newest signs, all of them verify, so a secret can be rotated without breaking links.
Links say nothing about where the bytes live: every relay process that shares the secrets (and the image store)
serves every link.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from itsdangerous import Signer

from relay.config import MIN_SECRET_CHARS

__all__ = ["Links", "load_or_create_secret"]


class Links:
    def __init__(self, signing_secrets: list[str], ttl_s: int) -> None:
        if not signing_secrets:
            raise ValueError("at least one signing secret is needed")
        self.ttl_s = ttl_s
        # itsdangerous signs with the last key and verifies with any of them.
        self._signer = Signer(list(reversed(signing_secrets)), salt="mj-relay.files", digest_method=hashlib.sha256)

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


class SigningKeyError(Exception):
    """The relay's kept signing secret cannot be used; the message says why, and what to do."""


def load_or_create_secret(path: Path) -> str:
    """The relay's own signing secret, made once and kept next to its data so links survive a restart. A file
    left empty (a crash while it was written) is never used as a key: a new secret replaces it. A secret someone
    put there that is too short is refused (`SigningKeyError`), never replaced: processes that share the folder,
    and the links and hook URLs they made with it, would each be left with a secret of their own. Of processes
    starting together on a folder without one, the first to write its secret makes it every process's."""
    kept = _read_secret(path)
    if kept:
        if len(kept) < MIN_SECRET_CHARS:
            raise SigningKeyError(
                f"{path} holds a signing secret of {len(kept)} characters, fewer than {MIN_SECRET_CHARS}: put a "
                "longer one there (or set images.signing_secret), or empty the file to have the relay make one"
            )
        return kept
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secret)
        if kept is None:  # none yet: made only where none is (another process's, written meanwhile, is kept)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                os.replace(tmp, path)
        else:  # left empty: replaced whole
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    written = _read_secret(path)  # this process's, or the one another process wrote first
    return written if written and len(written) >= MIN_SECRET_CHARS else secret


def _read_secret(path: Path) -> str | None:
    """The secret kept at `path`, stripped; None when there is no such file."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
