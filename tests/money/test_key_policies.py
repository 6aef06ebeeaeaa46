"""Key policies through real HTTP: expired and revoked keys (401), a model the key may not use (403), over the
requests-per-minute (429 with Retry-After); each refusal holds nothing, on both surfaces."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from relay.clock import SystemClock
from relay.config import Config
from relay.store.db import Database
from relay.store.keys import KeyStore
from tests.helpers import RunningRelay, create_key, relay_config, running_relay, sql, wait_for


def _store(config: Config, work: Any) -> Any:
    async def run() -> Any:
        db = Database(config.database_url())
        try:
            return await work(KeyStore(db.engine))
        finally:
            await db.dispose()

    return asyncio.run(run())


def _money(config: Config, name: str) -> tuple[int, int, int]:
    """The key's balance and held, and how many jobs it has."""
    ((balance, held),) = sql(config, "SELECT balance, held FROM keys WHERE name = ?", name)
    (jobs,) = sql(config, "SELECT COUNT(*) FROM jobs j JOIN keys k ON k.id = j.key_id WHERE k.name = ?", name)
    return int(balance), int(held), int(jobs[0])


def _native(relay: RunningRelay, key: str, path: str = "/mj/submit/imagine", **body: Any) -> httpx.Response:
    return httpx.post(relay.base + path, json={"prompt": "a gate", **body}, headers={"mj-api-secret": key}, timeout=30)


@pytest.fixture
def relay(tmp_path: Path) -> Any:
    with running_relay(relay_config(tmp_path)) as running:
        yield running


def test_an_expired_key_is_401_and_holds_nothing(relay: RunningRelay) -> None:
    key = create_key(relay.config, 100, name="old", expires_at=time.time() - 1)
    with pytest.raises(openai.AuthenticationError) as caught:
        relay.openai(key).images.generate(model="mj-fast", prompt="a gate")
    assert caught.value.code == "key_expired"
    assert caught.value.response.headers["x-should-retry"] == "false"
    native = _native(relay, key)
    assert native.status_code == 401 and native.json()["code"] == 4
    assert _money(relay.config, "old") == (100, 0, 0)


def test_a_key_that_expires_while_cached_is_refused_at_its_hold(relay: RunningRelay) -> None:
    key = create_key(relay.config, 100, name="soon", expires_at=time.time() + 3600)
    relay.openai(key).images.generate(model="mj-fast", prompt="in time")
    _store(relay.config, lambda store: store.update("soon", time.time(), expires_at=time.time() - 1))
    with pytest.raises(openai.AuthenticationError) as caught:  # the record is cached; the hold checks the database
        relay.openai(key).images.generate(model="mj-fast", prompt="too late")
    assert caught.value.code == "key_expired"
    assert _money(relay.config, "soon") == (98, 0, 1)


def test_a_revoked_key_is_401_and_holds_nothing(relay: RunningRelay) -> None:
    key = create_key(relay.config, 100, name="gone")
    assert _store(relay.config, lambda store: store.revoke("gone", time.time())) == 1
    with pytest.raises(openai.AuthenticationError) as caught:
        relay.openai(key).chat.completions.create(model="mj-fast", messages=[{"role": "user", "content": "a gate"}])
    assert caught.value.code == "key_revoked"
    assert _native(relay, key).status_code == 401
    assert _money(relay.config, "gone") == (100, 0, 0)


def test_a_model_the_key_may_not_use_is_403_and_holds_nothing(relay: RunningRelay) -> None:
    key = create_key(relay.config, 100, name="relaxed", models=["mj-relax"])
    client = relay.openai(key)
    for call in (
        lambda: client.images.generate(model="mj-fast", prompt="a gate"),
        lambda: client.chat.completions.create(model="mj-turbo", messages=[{"role": "user", "content": "a gate"}]),
    ):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            call()
        assert caught.value.code == "model_not_allowed"
        assert caught.value.response.headers["x-should-retry"] == "false"
    for path in ("/mj/submit/imagine", "/mj-fast/mj/submit/imagine"):  # natively: the mode decides the model
        native = _native(relay, key, path)
        assert native.status_code == 403 and native.json()["code"] == 4, native.text
    assert _money(relay.config, "relaxed") == (100, 0, 0)
    client.images.generate(model="mj-relax", prompt="a gate")  # the allowed model runs
    assert _native(relay, key, "/mj-relax/mj/submit/imagine").json()["code"] == 1
    wait_for(lambda: _money(relay.config, "relaxed")[1] == 0)
    assert _money(relay.config, "relaxed") == (98, 0, 2)  # mj-relax costs 1


def _in_one_window(work: Any) -> Any:
    """Run `work` within one rate window (whole minutes); again if it straddled a minute's turn (whether it failed
    then or not: a request in the next window is not over the limit)."""
    for _ in range(3):
        started = math.floor(time.time() / 60)
        try:
            result = work()
        except BaseException:
            if math.floor(time.time() / 60) != started:
                continue
            raise
        if math.floor(time.time() / 60) == started:
            return result
    raise AssertionError("could not run within one minute window")


def test_over_the_rpm_is_429_with_retry_after_and_holds_nothing(tmp_path: Path) -> None:
    config = relay_config(tmp_path)
    with running_relay(config) as relay:
        key = create_key(config, 100, name="slow", rpm=2)
        client = relay.openai(key)

        def burst() -> tuple[Any, Any, tuple[int, int, int]]:
            # A try that straddled a minute's turn left native jobs running: they settle before this one counts.
            wait_for(lambda: _money(config, "slow")[1] == 0)
            sql(config, "UPDATE keys SET rate_count = 0, rate_window = 0 WHERE name = 'slow'")
            before = _money(config, "slow")
            client.images.generate(model="mj-fast", prompt="one")
            _native(relay, key, prompt="two").raise_for_status()
            with pytest.raises(openai.RateLimitError) as caught:
                client.images.generate(model="mj-fast", prompt="three")
            native = _native(relay, key, prompt="four")
            return caught.value, native, before

        error, native, before = _in_one_window(burst)
        assert error.code == "rate_limit_exceeded"
        retry_after = int(error.response.headers["retry-after"])
        assert 1 <= retry_after <= 60
        assert "x-should-retry" not in error.response.headers  # a retry after Retry-After succeeds
        assert native.status_code == 429 and native.json()["code"] == 23 and native.headers["retry-after"]
        wait_for(lambda: _money(config, "slow")[1] == 0)
        assert _money(config, "slow") == (before[0] - 4, 0, before[2] + 2)  # the refused ones made and held nothing


def test_reads_do_not_count_against_the_rpm(tmp_path: Path) -> None:
    config = relay_config(tmp_path)
    with running_relay(config) as relay:
        key = create_key(config, 100, name="reader", rpm=1)
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(5):
            assert httpx.get(relay.base + "/v1/models", headers=headers).status_code == 200
        relay.openai(key).images.generate(model="mj-fast", prompt="one")


class _Later(SystemClock):
    """The relay's clock, two hours ahead of the wall clock."""

    def now(self) -> float:
        return super().now() + 7200


def test_expiry_is_read_on_the_relay_s_clock_on_every_route(tmp_path: Path) -> None:
    """The key expires an hour from now by the wall clock, but the relay's clock is two hours ahead: every route
    refuses it, not only the ones that hold credits."""
    config = relay_config(tmp_path)
    with running_relay(config, clock=_Later()) as relay:
        key = create_key(config, 100, name="later", expires_at=time.time() + 3600)
        headers = {"Authorization": f"Bearer {key}"}
        for path in ("/v1/models", "/v1/models/mj-fast", "/dashboard/billing/subscription"):
            answer = httpx.get(relay.base + path, headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "key_expired", (path, answer.text)
        native = httpx.get(relay.base + "/mj/task/1/fetch", headers={"mj-api-secret": key})
        assert native.status_code == 401
        assert _money(config, "later") == (100, 0, 0)
