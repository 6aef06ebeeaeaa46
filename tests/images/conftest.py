"""A real S3-protocol server for the image tests: moto's server mode, in a process of its own on a free loopback
port (no mock of the client: the relay talks HTTP to it as to any bucket), and a fresh bucket per test; and a TCP
proxy in front of it that can refuse connections or swallow them without a word, as a bucket that is down or a
network that drops its packets."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import botocore.session
import pytest

from relay.config import S3Config
from tests.helpers import CuttableProxy

REGION = "us-east-1"
ACCESS = {"access_key_id": "test-access-key", "secret_access_key": "test-secret-key-0123456789"}


@dataclass
class Bucket:
    """A bucket on the test server, and a plain (blocking) client to look into it as an operator would."""

    endpoint: str
    name: str
    client: Any

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The `images.s3` section for this bucket."""
        return {"endpoint_url": self.endpoint, "bucket": self.name, "region": REGION, **ACCESS, **overrides}

    def s3_config(self, **overrides: Any) -> S3Config:
        return S3Config.model_validate(self.config(**overrides))

    def keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)


def _drain(stream: IO[str]) -> None:
    for _ in stream:  # the server logs every request: keep its pipe from filling up
        pass


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a port it picks itself; its URL, read from the line it prints once it listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE")}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stderr is not None
    drain = threading.Thread(target=_drain, args=(server.stderr,), daemon=True)
    try:
        endpoint = None
        for line in server.stderr:
            found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                endpoint = found.group(1)
                break
        if endpoint is None:
            raise RuntimeError("moto's S3 server did not start")
        drain.start()
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)
        if drain.is_alive():
            drain.join(10)  # the server is gone: its pipe is at its end
        server.stderr.close()


@pytest.fixture
def bucket(s3_endpoint: str) -> Iterator[Bucket]:
    client = botocore.session.get_session().create_client(
        "s3",
        region_name=REGION,
        endpoint_url=s3_endpoint,
        aws_access_key_id=ACCESS["access_key_id"],
        aws_secret_access_key=ACCESS["secret_access_key"],
    )
    name = "mj-relay-" + secrets.token_hex(6)
    client.create_bucket(Bucket=name)
    try:
        yield Bucket(s3_endpoint, name, client)
    finally:
        client.close()


@pytest.fixture
def store_proxy(s3_endpoint: str) -> Iterator[CuttableProxy]:
    """A proxy to the S3 server (`Bucket.config(endpoint_url=proxy.endpoint)` goes through it)."""
    proxy = CuttableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
