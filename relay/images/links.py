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
