"""What chat front ends read about the calling key: `models.retrieve` with the official SDK, and the legacy billing
endpoints NextChat calls (with and without `/v1`), in the shapes it reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import RunningRelay, create_key, pg_database_sync, relay_config, running_relay, sql

RATE = 0.05  # dollars per credit


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RunningRelay]:
    with running_relay(relay_config(tmp_path, billing={"usd_per_credit": RATE}), quota=1000) as running:
        yield running


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db_relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningRelay]:
    """The same relay on SQLite and on PostgreSQL (the usage query groups by day in SQL)."""
    with ExitStack() as stack:
        sections: dict[str, Any] = {"billing": {"usd_per_credit": RATE}}
        if request.param == "postgresql":
            sections["database"] = {"url": stack.enter_context(pg_database_sync())}
        yield stack.enter_context(running_relay(relay_config(tmp_path, **sections), quota=1000))


def day(offset: int = 0) -> str:
    return (datetime.now(UTC) + timedelta(days=offset)).strftime("%Y-%m-%d")


def get(relay: RunningRelay, path: str, key: str | None = None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or relay.key}"}
    return httpx.get(relay.base + path, params=params, headers=headers, timeout=30)


# -- models.retrieve ---------------------------------------------------------------------------------------------


def test_models_retrieve_answers_one_model(relay: RunningRelay) -> None:
    client = relay.openai()
    model = client.models.retrieve("mj-relax")
    assert (model.id, model.object, model.owned_by) == ("mj-relax", "model", "mj-relay")
    assert model.model_dump() == next(m for m in client.models.list().data if m.id == "mj-relax").model_dump()


def test_models_retrieve_of_an_unknown_model_is_a_404(relay: RunningRelay) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        relay.openai().models.retrieve("gpt-4o")
    assert raised.value.code == "model_not_found"
    assert raised.value.response.headers["x-should-retry"] == "false"


def test_a_key_is_shown_only_the_models_it_may_use(relay: RunningRelay) -> None:
    # A chat client fills its model picker from the list: a model the key may not use would only ever answer 403.
    client = relay.openai(create_key(relay.config, name="relax only", models=["mj-relax"]))
    assert [m.id for m in client.models.list().data] == ["mj-relax"]
    assert client.models.retrieve("mj-relax").id == "mj-relax"
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.models.retrieve("mj-fast")
    assert raised.value.code == "model_not_allowed"
    assert {m.id for m in relay.openai().models.list().data} == {"mj-fast", "mj-relax", "mj-turbo"}


def test_models_retrieve_needs_a_key(relay: RunningRelay) -> None:
    with pytest.raises(openai.AuthenticationError):
        relay.openai(key="sk-mjr-not-a-key").models.retrieve("mj-fast")


# -- billing --------------------------------------------------------------------------------------------------------


def spend(relay: RunningRelay) -> None:
    """Two mj-fast jobs that succeed (2 credits each) and one that fails (released, never charged)."""
    client = relay.openai()
    client.images.generate(model="mj-fast", prompt="a lighthouse")
    client.images.generate(model="mj-fast", prompt="a harbour")
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="mj-fast", prompt="something forbidden")
    assert relay.balance() == (996, 0)


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_nextchat_reads_what_the_key_spent_and_its_quota(any_db_relay: RunningRelay, prefix: str) -> None:
    relay = any_db_relay
    spend(relay)
    # NextChat's own query: from the first of the month to tomorrow.
    first = datetime.now(UTC).replace(day=1).strftime("%Y-%m-%d")
    used = get(relay, f"{prefix}/dashboard/billing/usage", start_date=first, end_date=day(1))
    assert used.status_code == 200, used.text
    body = used.json()
    assert body["object"] == "list"
    assert body["total_usage"] == pytest.approx(4 * RATE * 100)  # cents
    today = int(datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    assert body["daily_costs"] == [{"timestamp": today, "line_items": [{"name": "mj-fast", "cost": 20.0}]}]

    subscription = get(relay, f"{prefix}/dashboard/billing/subscription")
    assert subscription.status_code == 200, subscription.text
    sub = subscription.json()
    assert sub["object"] == "billing_subscription"
    assert sub["has_payment_method"] is True
    # The quota: what is left (996) and what was spent (4), so that quota - usage is the balance.
    assert sub["hard_limit_usd"] == sub["soft_limit_usd"] == sub["system_hard_limit_usd"] == pytest.approx(50.0)
    assert sub["access_until"] == 0


def test_each_key_sees_only_its_own_usage(relay: RunningRelay) -> None:
    spend(relay)
    other = create_key(relay.config, quota=30, name="other")
    used = get(relay, "/dashboard/billing/usage", key=other, start_date=day(-1), end_date=day(1)).json()
    assert used["total_usage"] == 0 and used["daily_costs"] == []
    sub = get(relay, "/v1/dashboard/billing/subscription", key=other).json()
    assert sub["hard_limit_usd"] == pytest.approx(30 * RATE)


def test_usage_is_counted_by_the_day_each_job_finished(any_db_relay: RunningRelay) -> None:
    relay = any_db_relay
    spend(relay)
    three_days_ago = time.time() - 3 * 86_400
    (job_id,) = sql(relay.config, "SELECT id FROM jobs WHERE hold_state = 'captured' ORDER BY id LIMIT 1")[0]
    moved = f"created_at = {three_days_ago - 20}, finished_at = {three_days_ago}"
    sql(relay.config, f"UPDATE jobs SET {moved} WHERE id = ?", job_id)
    both = get(relay, "/dashboard/billing/usage", start_date=day(-5), end_date=day(1)).json()
    assert [len(d["line_items"]) for d in both["daily_costs"]] == [1, 1]
    assert both["daily_costs"][1]["timestamp"] - both["daily_costs"][0]["timestamp"] == 3 * 86_400
    assert both["total_usage"] == pytest.approx(20.0)
    # end_date is excluded; start_date included.
    recent = get(relay, "/dashboard/billing/usage", start_date=day(-2), end_date=day(1)).json()
    assert recent["total_usage"] == pytest.approx(10.0)
    old = get(relay, "/dashboard/billing/usage", start_date=day(-3), end_date=day(-2)).json()
    assert old["total_usage"] == pytest.approx(10.0)
    # The quota counts every capture, whenever it was.
    sub = get(relay, "/dashboard/billing/subscription").json()
    assert sub["hard_limit_usd"] == pytest.approx(50.0)


def test_the_quota_stays_exact_while_jobs_are_charged(any_db_relay: RunningRelay) -> None:
    """Charges move credits from the balance to what was spent: the quota, read while they land, never moves."""
    relay = any_db_relay
    charged = threading.Event()
    seen: list[float] = []

    def read() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {relay.key}"}, timeout=30) as client:
            while not charged.is_set():
                seen.append(client.get(relay.base + "/dashboard/billing/subscription").json()["hard_limit_usd"])

    def charge(i: int) -> None:
        relay.openai().images.generate(model="mj-fast", prompt=f"a lighthouse {i}")

    with ThreadPoolExecutor(8) as pool:
        readers = [pool.submit(read) for _ in range(4)]
        try:
            list(pool.map(charge, range(12)))
        finally:
            charged.set()
        for reader in readers:
            reader.result()
    assert relay.balance() == (976, 0)
    assert seen and set(seen) == {50.0}  # 1000 credits, as many as the key was given


def test_the_key_expiry_is_access_until(relay: RunningRelay) -> None:
    expires = int(time.time()) + 86_400
    sql(relay.config, f"UPDATE keys SET expires_at = {expires} WHERE name = ?", "test")
    assert get(relay, "/dashboard/billing/subscription").json()["access_until"] == expires


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "start_date"),
        ({"start_date": day(-1)}, "end_date"),
        ({"start_date": "2024-13-01", "end_date": "2024-12-31"}, "start_date"),
        ({"start_date": "2024-02-30", "end_date": "2024-03-01"}, "start_date"),
        ({"start_date": "20240101", "end_date": "2024-02-01"}, "start_date"),
        ({"start_date": "٢٠٢٤-٠١-٠١", "end_date": "2024-02-01"}, "start_date"),  # digits, but not ASCII ones
        ({"start_date": "2024-01-01T00:00", "end_date": "2024-02-01"}, "start_date"),
        ({"start_date": "2024-01-01", "end_date": "2024-01-01"}, "end_date"),
        ({"start_date": "2024-02-01", "end_date": "2024-01-01"}, "end_date"),
        ({"start_date": "2024-01-01", "end_date": "2024-04-11"}, "end_date"),  # 101 days
        ({"start_date": "9" * 5000, "end_date": "2024-01-01"}, "start_date"),
    ],
)
def test_a_bad_range_is_a_400_that_names_its_parameter(relay: RunningRelay, params: dict[str, str], param: str) -> None:
    reply = get(relay, "/v1/dashboard/billing/usage", **params)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_a_hundred_days_is_the_longest_range(relay: RunningRelay) -> None:
    reply = get(relay, "/dashboard/billing/usage", start_date="2024-01-01", end_date="2024-04-10")
    assert reply.status_code == 200 and reply.json()["total_usage"] == 0


@pytest.mark.parametrize(
    "path", ["/dashboard/billing/subscription", "/v1/dashboard/billing/usage?start_date=2024-01-01&end_date=2024-01-02"]
)
def test_billing_needs_a_valid_key(relay: RunningRelay, path: str) -> None:
    assert httpx.get(relay.base + path).status_code == 401
    reply = httpx.get(relay.base + path, headers={"Authorization": "Bearer sk-mjr-wrong"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
