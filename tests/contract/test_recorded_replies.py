"""Odd upstream replies, replayed with respx through the real HTTP adapters: what each dialect sends on the wire
and how each odd answer maps onto the contract (see shared/reference/upstreams.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from adapters import (
    Accepted,
    ClientError,
    HttpOptions,
    NeedsModal,
    ProviderUnusable,
    Retryable,
    SubmitRequest,
    TaskStatus,
    Upstream,
    UpstreamUnavailable,
    create_http_upstream,
)
from adapters.midjourney_proxy import MidjourneyProxyUpstream

pytestmark = pytest.mark.anyio

BASE = "http://upstream.test"
REQUEST = SubmitRequest(kind="imagine", prompt="a cat --relax", mode="relax", state="job_1")


@pytest.fixture
async def mock() -> AsyncIterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


def upstream(dialect: str, **options: object) -> Upstream:
    return create_http_upstream(dialect, "p", HttpOptions(base_url=BASE, secret="s3cret"), **options)  # type: ignore[arg-type]


# -- what goes on the wire -------------------------------------------------------------------------------------------


async def test_midjourney_proxy_sends_its_secret_header_and_account_filter(mock: respx.MockRouter) -> None:
    route = mock.post("/mj/submit/imagine").respond(json={"code": 1, "description": "ok", "result": "17"})
    assert await upstream("midjourney-proxy").submit(REQUEST) == Accepted("17")
    sent = route.calls.last.request
    assert sent.headers["mj-api-secret"] == "s3cret" and "authorization" not in sent.headers
    body = json.loads(sent.content)
    assert body["accountFilter"] == {"modes": ["RELAX"]}
    assert (body["prompt"], body["state"], body["botType"]) == ("a cat --relax", "job_1", "MID_JOURNEY")


async def test_midjourney_proxy_can_put_the_mode_in_the_path(mock: respx.MockRouter) -> None:
    route = mock.post("/mj-relax/mj/submit/imagine").respond(json={"code": 1, "result": "18"})
    adapter = MidjourneyProxyUpstream("p", HttpOptions(base_url=BASE), mode_prefix=True, account_filter=False)
    assert await adapter.submit(REQUEST) == Accepted("18")
    assert "accountFilter" not in json.loads(route.calls.last.request.content)
    assert "mj-api-secret" not in route.calls.last.request.headers  # no secret configured, none sent


async def test_new_api_uses_bearer_and_the_mode_prefix(mock: respx.MockRouter) -> None:
    route = mock.post("/mj-relax/mj/submit/imagine").respond(json={"code": 1, "result": "19"})
    assert await upstream("new-api").submit(REQUEST) == Accepted("19")
    assert route.calls.last.request.headers["authorization"] == "Bearer s3cret"


async def test_mj_v1_sends_the_model_and_takes_an_integer_result(mock: respx.MockRouter) -> None:
    route = mock.post("/v1/mj/submit/imagine").respond(json={"code": 1, "result": 1320098173412546})
    assert await upstream("mj-v1").submit(REQUEST) == Accepted("1320098173412546")
    assert json.loads(route.calls.last.request.content)["model"] == "mj-relax"


async def test_downloads_never_carry_credentials(mock: respx.MockRouter) -> None:
    route = mock.get("https://cdn.example/img.png").respond(content=b"\x89PNG...")
    assert await upstream("new-api").download("https://cdn.example/img.png") == b"\x89PNG..."
    assert "authorization" not in route.calls.last.request.headers


async def test_a_relative_image_url_is_read_from_the_provider(mock: respx.MockRouter) -> None:
    mock.get("/mj/image/42").respond(content=b"png")
    assert await upstream("new-api").download("/mj/image/42") == b"png"


async def test_a_download_over_the_limit_is_refused(mock: respx.MockRouter) -> None:
    mock.get("/big.png").respond(content=b"x" * 5000)
    adapter = create_http_upstream("new-api", "p", HttpOptions(base_url=BASE, max_image_bytes=1000))
    with pytest.raises(UpstreamUnavailable):
        await adapter.download("/big.png")


# -- submit replies ---------------------------------------------------------------------------------------------------

SUBMIT_REPLIES = [
    # novicezk: an empty 401 when the secret is wrong
    ("midjourney-proxy", httpx.Response(401), ProviderUnusable),
    # code 22: queued, accepted
    ("midjourney-proxy", httpx.Response(200, json={"code": 22, "description": "排队中", "result": "7"}), Accepted),
    # code 21 with remix: the same id waits for submit/modal
    (
        "midjourney-proxy",
        httpx.Response(
            200,
            json={
                "code": 21,
                "description": "Waiting for window confirm",
                "result": "8",
                "properties": {"remix": True},
            },
        ),
        NeedsModal,
    ),
    # code 21 reporting an existing task: accepted
    (
        "midjourney-proxy",
        httpx.Response(200, json={"code": 21, "result": "9", "properties": {"status": "SUCCESS", "imageUrl": "u"}}),
        Accepted,
    ),
    # code 24: banned prompt
    (
        "midjourney-proxy",
        httpx.Response(200, json={"code": 24, "description": "可能包含敏感词", "properties": {"bannedWord": "x"}}),
        ClientError,
    ),
    # trueai: plain-text 401
    ("midjourney-proxy", httpx.Response(401, text="Authorization header missing."), ProviderUnusable),
    # trueai: an exception as {success: false} with HTTP 500
    ("midjourney-proxy", httpx.Response(500, json={"success": False, "code": -1, "message": "boom"}), Retryable),
    # trueai: a logic error as {success: false} with HTTP 200
    ("midjourney-proxy", httpx.Response(200, json={"success": False, "code": -1, "message": "bad"}), ClientError),
    # trueai: limits reported as code 4, queue full as code 9
    ("midjourney-proxy", httpx.Response(200, json={"code": 4, "description": "并发数已达上限"}), Retryable),
    ("midjourney-proxy", httpx.Response(200, json={"code": 9, "description": "当前队列已满"}), Retryable),
    # a plain validation error
    ("midjourney-proxy", httpx.Response(200, json={"code": 4, "description": "prompt不能为空"}), ClientError),
    # a reverse proxy's HTML page with HTTP 200
    ("midjourney-proxy", httpx.Response(200, text="<html>login</html>"), ProviderUnusable),
    # an empty 200
    ("midjourney-proxy", httpx.Response(200, text=""), Retryable),
    # new-api's own errors
    (
        "new-api",
        httpx.Response(400, json={"description": "quota_not_enough ", "type": "upstream_error", "code": 4}),
        ProviderUnusable,
    ),
    (
        "new-api",
        httpx.Response(400, json={"description": "do_request_failed ", "type": "upstream_error", "code": 5}),
        Retryable,
    ),
    (
        "new-api",
        httpx.Response(429, json={"description": "saturated", "type": "upstream_error", "code": 30}),
        Retryable,
    ),
    ("new-api", httpx.Response(502, text="Bad Gateway"), Retryable),
    ("mj-v1", httpx.Response(200, json={"code": 25, "description": "余额不足"}), ProviderUnusable),
    ("mj-v1", httpx.Response(200, json={"code": 23, "description": "队列已满"}), Retryable),
    ("mj-v1", httpx.Response(200, json={"code": 3, "description": "无可用的账号实例"}), Retryable),
]


@pytest.mark.parametrize(("dialect", "reply", "expected"), SUBMIT_REPLIES)
async def test_submit_replies_map_to_outcomes(
    mock: respx.MockRouter, dialect: str, reply: httpx.Response, expected: type
) -> None:
    mock.post(url__regex=r".*/submit/imagine$").mock(return_value=reply)
    outcome = await upstream(dialect).submit(REQUEST)
    assert isinstance(outcome, expected), outcome


async def test_a_timeout_after_sending_is_marked_as_maybe_sent(mock: respx.MockRouter) -> None:
    mock.post("/mj/submit/imagine").mock(side_effect=httpx.ReadTimeout("slow"))
    outcome = await upstream("midjourney-proxy").submit(REQUEST)
    assert isinstance(outcome, Retryable) and outcome.sent


async def test_a_redirect_is_not_followed_for_api_calls(mock: respx.MockRouter) -> None:
    mock.post("/mj/submit/imagine").respond(302, headers={"Location": "http://elsewhere/"})
    assert isinstance(await upstream("midjourney-proxy").submit(REQUEST), ProviderUnusable)


# -- reads ------------------------------------------------------------------------------------------------------------

TASK = {"id": "5", "status": "IN_PROGRESS", "progress": "46%", "state": "job_1", "action": "IMAGINE"}


@pytest.mark.parametrize(
    ("dialect", "reply"),
    [
        ("midjourney-proxy", httpx.Response(200, text="")),  # novicezk: null as an empty 200
        ("midjourney-proxy", httpx.Response(204)),  # trueai
        ("new-api", httpx.Response(400, json={"description": "task_no_found ", "type": "upstream_error", "code": 4})),
        ("mj-v1", httpx.Response(404, json={"code": 3, "description": "not found"})),
        ("mj-v1", httpx.Response(200, json={"code": 3, "description": "not found", "result": None})),
    ],
)
async def test_unknown_ids_read_as_none(mock: respx.MockRouter, dialect: str, reply: httpx.Response) -> None:
    mock.get(url__regex=r".*/task/77/fetch$").mock(return_value=reply)
    assert await upstream(dialect).fetch("77") is None


async def test_a_task_reads_back_normalised(mock: respx.MockRouter) -> None:
    mock.get("/mj/task/5/fetch").respond(json=TASK)
    view = await upstream("midjourney-proxy").fetch("5")
    assert view is not None
    assert (view.status, view.progress, view.state) == (TaskStatus.IN_PROGRESS, 46, "job_1")


async def test_new_api_empty_status_reads_as_submitted(mock: respx.MockRouter) -> None:
    mock.get("/mj/task/5/fetch").respond(json={**TASK, "status": "", "progress": ""})
    view = await upstream("new-api").fetch("5")
    assert view is not None and view.status is TaskStatus.SUBMITTED


async def test_without_list_by_condition_reads_fall_back_to_fetch(mock: respx.MockRouter) -> None:
    listing = mock.post("/v1/mj/task/list-by-condition").respond(404)
    mock.get("/v1/mj/task/5/fetch").respond(json=TASK)
    mock.get("/v1/mj/task/6/fetch").respond(200, text="")
    adapter = upstream("mj-v1")
    assert [v.upstream_id for v in await adapter.fetch_many(["5", "6"])] == ["5"]
    assert [v.upstream_id for v in await adapter.fetch_many(["5"])] == ["5"]
    assert listing.call_count == 1  # remembered: not asked again


async def test_a_wrapped_task_list_is_accepted(mock: respx.MockRouter) -> None:
    mock.post("/mj/task/list-by-condition").respond(json={"code": 1, "result": [TASK, {"no": "id"}]})
    views = await upstream("new-api").fetch_many(["5"])
    assert [v.upstream_id for v in views] == ["5"]


@pytest.mark.parametrize(
    "reply",
    [httpx.Response(500), httpx.Response(401), httpx.Response(200, text="<html>"), httpx.Response(200, json={"a": 1})],
)
async def test_broken_list_answers_raise_unavailable(mock: respx.MockRouter, reply: httpx.Response) -> None:
    mock.post("/mj/task/list-by-condition").mock(return_value=reply)
    with pytest.raises(UpstreamUnavailable):
        await upstream("midjourney-proxy").fetch_many(["5"])


@pytest.mark.parametrize(
    "reply", [httpx.Response(403), httpx.Response(200, text="<html>"), httpx.Response(200, json=[1, 2])]
)
async def test_broken_fetch_answers_raise_unavailable(mock: respx.MockRouter, reply: httpx.Response) -> None:
    mock.get("/mj/task/5/fetch").mock(return_value=reply)
    with pytest.raises(UpstreamUnavailable):
        await upstream("midjourney-proxy").fetch("5")


async def test_probe_falls_back_to_fetch_without_a_list_endpoint(mock: respx.MockRouter) -> None:
    mock.post("/mj/task/list-by-condition").respond(404)
    mock.get("/mj/task/0/fetch").respond(200, text="")
    assert await upstream("midjourney-proxy").probe() is True


async def test_a_provider_whose_lanes_stay_busy_hands_the_job_on_before_sending() -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.helpers import serve

    async def slow(request: object) -> JSONResponse:
        await asyncio.sleep(1.0)
        return JSONResponse({"code": 1, "result": "1"})

    with serve(Starlette(routes=[Route("/mj/submit/imagine", slow, methods=["POST"])])) as base:
        adapter = create_http_upstream(
            "midjourney-proxy", "p", HttpOptions(base_url=base, max_connections=1, timeout_s=0.3)
        )
        first, second = await asyncio.gather(adapter.submit(REQUEST), adapter.submit(REQUEST))
        await adapter.aclose()
    assert isinstance(first, Retryable) and first.sent  # sent, then no answer in time
    assert isinstance(second, Retryable) and not second.sent  # never got a lane: nothing was sent
