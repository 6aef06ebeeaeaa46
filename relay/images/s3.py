"""The images in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, Ceph, ...), under `<prefix><key>`, through
aiobotocore: botocore's own signing, retries and error parsing, on asyncio.

Every relay process that uses the bucket serves every image. The relay reads an object and answers it itself: the
bucket is never named to a client (no redirect, no presigned URL), so it stays private. At most `max_connections`
requests are under way at once; the others wait their turn here rather than in the connection pool, where waiting
would count against the connect timeout.

A request is bounded as a whole, its wait for one of the `max_connections`, its tries and the backoff between them
included (`_budget`): behind a bucket that stopped answering, the requests queued for a connection fail within the
bound too, not one bound for each connection's worth of requests ahead of them. aiohttp's socket
timeouts cover connecting and reading an answer, not the wait for a body to be taken (a server that accepts the
connection and then reads nothing stalls the write with no timeout at all). Nor is `Expect: 100-continue` sent
with a PUT: aiohttp waits for the server's go-ahead with no timeout either, so a silent server would take the whole
budget in one try; the images are small, and a refusal after the body costs little.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import add_expect_header

from relay.config import S3Config
from relay.images.backend import StorageError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ["S3Backend"]

log = logging.getLogger("relay.images")

# What a request to the bucket may fail with: botocore's errors (an answer, a timeout, no connection) and what the
# HTTP layer under it may let through.
_FAILURES = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)
_MISSING = ("NoSuchKey", "404", "NotFound")


class S3Backend:
    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._client: S3Client | None = None
        self._stack: AsyncExitStack | None = None
        self._connecting = asyncio.Lock()
        self._slots = asyncio.Semaphore(config.max_connections)
        self._budget = _budget(config)

    def _object(self, key: str) -> str:
        return self.config.prefix + key

    async def _connect(self) -> S3Client:
        if self._client is not None:
            return self._client
        async with self._connecting:
            if self._client is None:
                c = self.config
                options = AioConfig(
                    signature_version="s3v4",
                    connect_timeout=c.connect_timeout_s,
                    read_timeout=c.timeout_s,
                    max_pool_connections=c.max_connections,
                    # Tries in all, the first one included (botocore's `max_attempts` counts only the retries).
                    retries={"total_max_attempts": c.max_attempts, "mode": "standard"},
                    s3={"addressing_style": c.addressing_style},
                    # Checksums only where S3 requires them: several S3-compatible servers refuse the newer ones.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                stack = AsyncExitStack()
                client = get_session().create_client(
                    "s3",
                    region_name=c.region,
                    endpoint_url=c.endpoint_url,
                    aws_access_key_id=c.access_key_id,
                    aws_secret_access_key=c.secret_access_key,
                    config=options,
                )
                self._client = await stack.enter_async_context(client)
                self._client.meta.events.unregister("before-call.s3", add_expect_header)
                self._stack = stack
            return self._client

    async def open(self) -> None:
        client = await self._connect()
        try:
            async with asyncio.timeout(self._budget), self._slots:
                await client.head_bucket(Bucket=self.config.bucket)
        except _FAILURES as exc:
            await self.close()
            raise StorageError(f"images.s3: the bucket {self.config.bucket!r} cannot be used ({_why(exc)})") from None

    async def close(self) -> None:
        async with self._connecting:
            stack, self._stack, self._client = self._stack, None, None
            if stack is not None:
                await stack.aclose()

    async def put(self, objects: Mapping[str, bytes], *, atomic: bool = False) -> dict[str, str]:
        """Each object in one PUT, all at once (an S3 PUT is atomic: `atomic` changes nothing)."""
        if not objects:
            return {}
        client = await self._connect()

        async def one(key: str, data: bytes) -> str | None:
            try:
                async with asyncio.timeout(self._budget), self._slots:
                    await client.put_object(
                        Bucket=self.config.bucket, Key=self._object(key), Body=data, ContentType="image/png"
                    )
            except _FAILURES as exc:
                log.warning("an image could not be stored", extra={"fields": {"object": key, "why": _why(exc)}})
                return f"the image store refused it ({_why(exc)})"
            return None

        results = await asyncio.gather(*(one(key, data) for key, data in objects.items()))
        return {key: why for key, why in zip(objects, results, strict=True) if why is not None}

    async def get(self, key: str) -> bytes | None:
        client = await self._connect()
        try:
            async with asyncio.timeout(self._budget), self._slots:
                answer = await client.get_object(Bucket=self.config.bucket, Key=self._object(key))
                async with answer["Body"] as body:
                    return await body.read()
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            log.warning("an image could not be read", extra={"fields": {"object": key, "why": _why(exc)}})
            raise StorageError(f"the image store failed ({_why(exc)})") from None
        except _FAILURES as exc:
            log.warning("an image could not be read", extra={"fields": {"object": key, "why": _why(exc)}})
            raise StorageError(f"the image store failed ({_why(exc)})") from None


def _budget(config: S3Config) -> float:
    """The longest a request to the bucket may take: each try its connect and read timeouts, and between tries the
    most botocore's standard backoff waits (up to 2**n s, at most 20 s)."""
    backoff = sum(min(2.0**n, 20.0) for n in range(config.max_attempts - 1))
    return config.max_attempts * (config.connect_timeout_s + config.timeout_s) + backoff


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _why(exc: BaseException) -> str:
    """A short reason that names no endpoint, bucket or key: the S3 error code, else the kind of failure."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = _code(exc)
        if status and code in ("", str(status)):  # an answer with no body (HEAD): botocore's code is its status
            return f"HTTP {status}"
        return f"{code or 'error'}, HTTP {status}" if status else code or "error"
    return type(exc).__name__
