"""Read routes: usage, job search (each job with signed links to its images), providers and their health, and the
ledger as CSV."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.api.admin import inputs
from relay.api.admin.auth import admin
from relay.api.common import base_url, relay_of
from relay.domain import ResultShape
from relay.errors import InvalidRequest
from relay.images import GRID, IMAGE, TILE_NAMES, ImageStore
from relay.store import ledger, reports
from relay.store.jobs import JobRow

USAGE_DEFAULT_DAYS = 30
USAGE_MAX_DAYS = 366
JOBS_MAX_DAYS = 3660


def _query(request: Request) -> dict[str, str]:
    """The query string, each parameter once: a repeated one is refused rather than half-read."""
    pairs = request.query_params.multi_items()
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name in seen:
            raise InvalidRequest(f"The query parameter {name[:40]!r} is given twice.", param=name[:40])
        if len(value) > 200:
            raise InvalidRequest(f"The query parameter {name[:40]!r} is too long.", param=name[:40])
        seen[name] = value
    return seen


GROUPS = ("key", "model", "action", "day")


@admin
async def usage(request: Request) -> JSONResponse:
    """Credits captured (and released) from the ledger, summed by the groups asked for (by default key, model,
    action and UTC day) over [since, until): by default the last 30 days."""
    relay = relay_of(request)
    query = _query(request)
    since, until = inputs.window(query, relay.clock.now(), USAGE_DEFAULT_DAYS, USAGE_MAX_DAYS)
    raw = query.get("group_by", "")
    group_by = [part.strip() for part in raw.split(",")] if raw else list(GROUPS)
    if any(name not in GROUPS for name in group_by) or len(set(group_by)) != len(group_by):
        raise InvalidRequest(
            f"'group_by' is a comma-separated list of {', '.join(GROUPS)}, each at most once.", param="group_by"
        )
    key_id = inputs.optional_key(query)
    rows = await ledger.usage(relay.db.engine, key_id=key_id, since=since, until=until)
    names = {record.id: record.name for record in await relay.keys.list()} if "key" in group_by else {}
    sums: dict[tuple[str, ...], list[int]] = {}
    for row in rows:
        group = tuple(
            {"key": row.key_id, "model": row.model, "action": row.action, "day": row.day}[g] for g in group_by
        )
        totals = sums.setdefault(group, [0, 0, 0, 0])
        totals[0] += row.jobs
        totals[1] += row.credits
        totals[2] += row.released_jobs
        totals[3] += row.released_credits
    data = []
    for group, (jobs, credits, released_jobs, released_credits) in sorted(sums.items()):
        item: dict[str, Any] = dict(zip(group_by, group, strict=True))
        if "key" in item:
            item["key_name"] = names.get(item["key"], "")
        item |= {"jobs": jobs, "credits": credits, "released_jobs": released_jobs, "released_credits": released_credits}
        data.append(item)
    return JSONResponse(
        {
            "object": "usage",
            "since": since,
            "until": until,
            "key": key_id,
            "group_by": group_by,
            "data": data,
            "total": {"jobs": sum(r.jobs for r in rows), "credits": sum(r.credits for r in rows)},
        }
    )


def images_of(row: JobRow, images: ImageStore, root: str, now: float) -> list[dict[str, str]]:
    """Signed links to a succeeded job's images: the grid and its four tiles, or the one image."""
    if row.state.value != "SUCCEEDED":
        return []
    shape = row.spec.shape
    if shape is ResultShape.GRID:
        names = [GRID, *TILE_NAMES]
    elif shape is ResultShape.IMAGE:
        names = [IMAGE]
    else:
        return []
    return [{"name": name, "url": images.url(root, row.id, name, now)} for name in names]


def job_json(row: JobRow, images: ImageStore, root: str, now: float) -> dict[str, Any]:
    """A job as an operator sees it (no upstream id, no upstream link)."""
    text = row.result_text if row.spec.shape is ResultShape.TEXT else None
    return {
        "id": row.id,
        "object": "job",
        "key_id": row.key_id,
        "model": row.model,
        "mode": row.mode,
        "action": row.action,
        "prompt": row.prompt,
        "state": row.state.value,
        "progress": row.progress,
        "provider": row.provider,
        "price": row.price,
        "hold_state": row.hold_state,
        "error_code": row.error_code,
        "fail_reason": row.fail_reason,
        "parent_id": row.parent_id,
        "created_at": row.created_at,
        "submitted_at": row.submitted_at,
        "finished_at": row.finished_at,
        "result_text": text,
        "images": images_of(row, images, root, now),
    }


@admin
async def list_jobs(request: Request) -> JSONResponse:
    relay = relay_of(request)
    query = _query(request)
    since = inputs.optional_time(query, "since")
    until = inputs.optional_time(query, "until")
    if since is not None and until is not None and since >= until:
        raise InvalidRequest("'since' must be before 'until'.", param="since")
    rows, more = await reports.search_jobs(
        relay.db.engine,
        key_id=inputs.optional_key(query),
        states=inputs.states(query),
        since=since,
        until=until,
        after=inputs.cursor(query),
        limit=inputs.limit(query),
    )
    root, now = base_url(request), relay.clock.now()
    next_cursor = inputs.encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return JSONResponse(
        {
            "object": "list",
            "data": [job_json(row, relay.images, root, now) for row in rows],
            "has_more": more,
            "next_cursor": next_cursor,
        }
    )


@admin
async def providers(request: Request) -> JSONResponse:
    relay = relay_of(request)
    pool, now = relay.pool, relay.clock.now()
    recorded = await relay.prober.store.all()
    data = []
    for provider in relay.config.providers:
        pool.advance(provider.name, now)
        health = pool.health[provider.name]
        record = recorded.get(provider.name)
        data.append(
            {
                "name": provider.name,
                "dialect": provider.dialect,
                "modes": list(provider.modes),
                "bots": list(provider.bots),
                "priority": provider.priority,
                "weight": provider.weight,
                "max_in_flight": provider.max_in_flight,
                "in_flight": pool.in_flight[provider.name],
                "in_flight_elsewhere": pool.elsewhere[provider.name],
                # This process's view, which routes its jobs.
                "state": health.state.value,
                "since": health.since,
                "until": health.until,
                "reason": health.reason,
                # The last change any relay process on this database recorded (None: never set aside).
                "recorded": None
                if record is None
                else {
                    "state": record.state,
                    "since": record.since,
                    "until": record.cooling_until,
                    "reason": record.reason,
                    "updated_at": record.updated_at,
                },
            }
        )
    return JSONResponse({"object": "list", "data": data})


@admin
async def ledger_csv(request: Request) -> Response:
    relay = relay_of(request)
    query = _query(request)
    rendered = await ledger.export_csv(
        relay.db.engine, key_id=inputs.optional_key(query), since=inputs.optional_time(query, "since")
    )
    return Response(
        rendered,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="mj-relay-ledger.csv"'},
    )
