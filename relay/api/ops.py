"""Operations: liveness, readiness and Prometheus metrics (no key needed; nothing secret is exposed)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.api.common import relay_of


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    relay = relay_of(request)
    checks = {
        "started": relay.ready,
        "database": await relay.db.ping(),
        "tracker": relay.tracker.running,
        "coordination": relay.coordinator.running,
    }
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


async def metrics(request: Request) -> Response:
    return Response(relay_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
