from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import RunningRelay, relay_config, running_relay

TOKEN = "admin-token-for-tests-0123456789"


@dataclass
class Admin:
    """A relay with the admin API on, and an HTTP client that sends the admin token."""

    relay: RunningRelay
    http: httpx.Client

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get("/admin/api/" + path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.http.post("/admin/api/" + path, json=body, **kwargs)

    def patch(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.http.patch("/admin/api/" + path, json=body, **kwargs)

    def keys(self) -> list[dict[str, Any]]:
        answer = self.get("keys")
        assert answer.status_code == 200, answer.text
        data: list[dict[str, Any]] = answer.json()["data"]
        return data

    def create(self, name: str = "alice", quota: int = 10, **fields: Any) -> dict[str, Any]:
        answer = self.post("keys", {"name": name, "quota": quota, **fields})
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created


def admin_config(tmp_path: Path, **sections: Any) -> Any:
    server = {"admin_token": TOKEN, **sections.pop("server", {})}
    return relay_config(tmp_path, server=server, **sections)


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    with (
        running_relay(admin_config(tmp_path)) as relay,
        httpx.Client(base_url=relay.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http,
    ):
        yield Admin(relay, http)
