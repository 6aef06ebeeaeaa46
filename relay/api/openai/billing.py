"""OpenAI's legacy billing endpoints, which chat front ends (NextChat, chatgpt-web and their forks) call to show a
balance; each answers for the calling key, with and without the `/v1` prefix.

`GET /dashboard/billing/subscription`: the key's quota in dollars (`hard_limit_usd`, also as the soft and system
limits): what it has left plus what its jobs ever captured, so that the quota less all usage is its balance.
`access_until` is the key's expiry (unix seconds), 0 when it never expires.

`GET /dashboard/billing/usage?start_date=YYYY-MM-DD&end_date=YYYY-MM-DD`: what the key's jobs captured in the range
(UTC days, `end_date` excluded, at most 100 days) in cents (`total_usage`), and by day and model (`daily_costs`).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from relay.api.common import relay_of
from relay.core import billing
from relay.store import reports

PREFIXES = ("", "/v1")


def routes() -> list[Route]:
    return [
        route
        for prefix in PREFIXES
        for route in (
            Route(f"{prefix}/dashboard/billing/subscription", subscription, methods=["GET"]),
            Route(f"{prefix}/dashboard/billing/usage", usage, methods=["GET"]),
        )
    ]


async def subscription(request: Request) -> JSONResponse:
    relay = relay_of(request)
    key = await relay.auth(request)
    # Read afresh (the authenticator's copy may be a few seconds old), balance and charges as one
    fresh = await reports.quota(relay.db.engine, key.id) or reports.Quota(key.name, key.expires_at, key.balance)
    quota = billing.dollars(fresh.credits, relay.config.billing.usd_per_credit)
    return JSONResponse(
        {
            "object": "billing_subscription",
            "has_payment_method": True,
            "canceled": False,
            "canceled_at": None,
            "delinquent": None,
            "access_until": int(fresh.expires_at or 0),
            "soft_limit_usd": quota,
            "hard_limit_usd": quota,
            "system_hard_limit_usd": quota,
            "plan": {"title": "Pay-as-you-go", "id": "payg"},
            "account_name": fresh.name,
            "po_number": None,
            "billing_email": None,
            "tax_ids": None,
            "billing_address": None,
            "business_address": None,
        }
    )


async def usage(request: Request) -> JSONResponse:
    relay = relay_of(request)
    key = await relay.auth(request)
    params = request.query_params
    start, end = billing.parse_range(params.get("start_date"), params.get("end_date"))
    rate = relay.config.billing.usd_per_credit
    days: dict[int, list[dict[str, object]]] = {}
    total = 0
    for row in await reports.usage_by_day(relay.db.engine, key.id, start, end):
        days.setdefault(row.day, []).append({"name": row.model, "cost": billing.cents(row.credits, rate)})
        total += row.credits
    return JSONResponse(
        {
            "object": "list",
            "daily_costs": [{"timestamp": day, "line_items": items} for day, items in days.items()],
            "total_usage": billing.cents(total, rate),
        }
    )
