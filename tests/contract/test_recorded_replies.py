"""Odd upstream replies, replayed over loopback HTTP to the real HTTP adapters (`tests.contract.replay`): what each
dialect sends on the wire and how each odd answer maps onto the contract (see shared/reference/upstreams.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from adapters import (
    Accepted,
    ClientError,
    HttpOptions,
    NeedsModal,
    PartialRead,
    ProviderUnusable,
    Retryable,
    SubmitRequest,
    TaskStatus,
    Uploaded,
    Upstream,
    UpstreamUnavailable,
    create_http_upstream,
)
from adapters.http import LIST_RETRY_S, HttpUpstream
from adapters.midjourney_proxy import MidjourneyProxyUpstream
from tests.contract.replay import Replay, replaying

pytestmark = pytest.mark.anyio

BASE = ""  # the replay server's address, set by the `mock` fixture
REQUEST = SubmitRequest(kind="imagine", prompt="a cat --relax", mode="relax", state="job_1")


@pytest.fixture(scope="module")
def server() -> Iterator[Replay]:
    with replaying() as replay:
        yield replay


@pytest.fixture
async def mock(server: Replay, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Replay]:
    """The replay server; every HTTP adapter the test makes is closed after it (its connections are real)."""
    global BASE
    made: list[HttpUpstream] = []
    init = HttpUpstream.__init__

    def recorded(self: HttpUpstream, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(HttpUpstream, "__init__", recorded)
    server.routes.clear()
    BASE = server.base
    try:
        yield server
    finally:
        for adapter in made:
            await adapter.aclose()


def upstream(dialect: str, **options: object) -> Upstream:
    return create_http_upstream(dialect, "p", HttpOptions(base_url=BASE, secret="s3cret"), **options)  # type: ignore[arg-type]


# -- what goes on the wire -------------------------------------------------------------------------------------------


async def test_midjourney_proxy_sends_its_secret_header_and_account_filter(mock: Replay) -> None:
    route = mock.post("/mj/submit/imagine").respond(json={"code": 1, "description": "ok", "result": "17"})
    assert await upstream("midjourney-proxy").submit(REQUEST) == Accepted("17")
    sent = route.calls.last.request
    assert sent.headers["mj-api-secret"] == "s3cret" and "authorization" not in sent.headers
    body = json.loads(sent.content)
    assert body["accountFilter"] == {"modes": ["RELAX"]}
    assert (body["prompt"], body["state"], body["botType"]) == ("a cat --relax", "job_1", "MID_JOURNEY")


async def test_midjourney_proxy_can_put_the_mode_in_the_path(mock: Replay) -> None:
    route = mock.post("/mj-relax/mj/submit/imagine").respond(json={"code": 1, "result": "18"})
    adapter = MidjourneyProxyUpstream("p", HttpOptions(base_url=BASE), mode_prefix=True, account_filter=False)
    assert await adapter.submit(REQUEST) == Accepted("18")
    assert "accountFilter" not in json.loads(route.calls.last.request.content)
    assert "mj-api-secret" not in route.calls.last.request.headers  # no secret configured, none sent


async def test_new_api_uses_bearer_and_the_mode_prefix(mock: Replay) -> None:
    route = mock.post("/mj-relax/mj/submit/imagine").respond(json={"code": 1, "result": "19"})
    assert await upstream("new-api").submit(REQUEST) == Accepted("19")
    assert route.calls.last.request.headers["authorization"] == "Bearer s3cret"


async def test_mj_v1_sends_the_model_and_takes_an_integer_result(mock: Replay) -> None:
    route = mock.post("/v1/mj/submit/imagine").respond(json={"code": 1, "result": 1320098173412546})
    assert await upstream("mj-v1").submit(REQUEST) == Accepted("1320098173412546")
    assert json.loads(route.calls.last.request.content)["model"] == "mj-relax"


async def test_downloads_never_carry_credentials(mock: Replay) -> None:
    route = mock.get("/cdn/img.png").respond(content=b"\x89PNG...")
    assert await upstream("new-api").download(f"{BASE}/cdn/img.png") == b"\x89PNG..."
    assert "authorization" not in route.calls.last.request.headers


async def test_a_relative_image_url_is_read_from_the_provider(mock: Replay) -> None:
    mock.get("/mj/image/42").respond(content=b"png")
    assert await upstream("new-api").download("/mj/image/42") == b"png"


async def test_a_download_over_the_limit_is_refused(mock: Replay) -> None:
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
    # a reverse proxy's HTML page with HTTP 200: unreadable, and a success status may mean the task was taken
    ("midjourney-proxy", httpx.Response(200, text="<html>login</html>"), Retryable),
    # the same page with an error status: this provider cannot serve now
    ("midjourney-proxy", httpx.Response(502, text="<html>bad gateway</html>"), Retryable),
    ("midjourney-proxy", httpx.Response(400, text="<html>login</html>"), ProviderUnusable),
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
    mock: Replay, dialect: str, reply: httpx.Response, expected: type
) -> None:
    mock.post(url__regex=r".*/submit/imagine$").mock(reply)
    outcome = await upstream(dialect).submit(REQUEST)
    assert isinstance(outcome, expected), outcome


async def test_a_timeout_after_sending_is_marked_as_maybe_sent(mock: Replay) -> None:
    mock.post("/mj/submit/imagine").hang()
    adapter = create_http_upstream("midjourney-proxy", "p", HttpOptions(base_url=BASE, timeout_s=0.3))
    outcome = await adapter.submit(REQUEST)
    assert isinstance(outcome, Retryable) and outcome.sent


async def test_a_redirect_is_not_followed_for_api_calls(mock: Replay) -> None:
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
async def test_unknown_ids_read_as_none(mock: Replay, dialect: str, reply: httpx.Response) -> None:
    mock.get(url__regex=r".*/task/77/fetch$").mock(reply)
    assert await upstream(dialect).fetch("77") is None


async def test_a_task_reads_back_normalised(mock: Replay) -> None:
    mock.get("/mj/task/5/fetch").respond(json=TASK)
    view = await upstream("midjourney-proxy").fetch("5")
    assert view is not None
    assert (view.status, view.progress, view.state) == (TaskStatus.IN_PROGRESS, 46, "job_1")


async def test_new_api_empty_status_reads_as_submitted(mock: Replay) -> None:
    mock.get("/mj/task/5/fetch").respond(json={**TASK, "status": "", "progress": ""})
    view = await upstream("new-api").fetch("5")
    assert view is not None and view.status is TaskStatus.SUBMITTED


async def test_without_list_by_condition_reads_fall_back_to_fetch(mock: Replay) -> None:
    listing = mock.post("/v1/mj/task/list-by-condition").respond(404)
    mock.get("/v1/mj/task/5/fetch").respond(json=TASK)
    mock.get("/v1/mj/task/6/fetch").respond(200, text="")
    adapter = upstream("mj-v1")
    assert [v.upstream_id for v in await adapter.fetch_many(["5", "6"])] == ["5"]
    assert [v.upstream_id for v in await adapter.fetch_many(["5"])] == ["5"]
    assert listing.call_count == 1  # remembered: not asked again


async def test_list_by_condition_is_asked_again_a_while_after_a_404(mock: Replay) -> None:
    # A 404 may be a gateway's, passing (a deploy): one fetch per task, for good, would cost a provider that has
    # the list a read per task from then on.
    listing = mock.post("/mj/task/list-by-condition").respond(404)
    mock.get("/mj/task/5/fetch").respond(json=TASK)
    adapter = upstream("midjourney-proxy")
    now = [1000.0]
    adapter._now = lambda: now[0]  # type: ignore[attr-defined]
    assert [v.upstream_id for v in await adapter.fetch_many(["5"])] == ["5"]
    now[0] += LIST_RETRY_S - 1
    assert [v.upstream_id for v in await adapter.fetch_many(["5"])] == ["5"]
    assert listing.call_count == 1
    answering = mock.post("/mj/task/list-by-condition").respond(json=[TASK])
    now[0] += 1
    assert [v.upstream_id for v in await adapter.fetch_many(["5"])] == ["5"]
    assert answering.call_count == 1  # the list, asked again


async def test_one_task_its_fetch_cannot_answer_does_not_cost_the_others_their_read(mock: Replay) -> None:
    mock.post("/v1/mj/task/list-by-condition").respond(404)
    mock.get("/v1/mj/task/5/fetch").respond(json=TASK)
    mock.get("/v1/mj/task/6/fetch").respond(500)
    mock.get("/v1/mj/task/7/fetch").respond(200, text="")
    with pytest.raises(PartialRead) as caught:
        await upstream("mj-v1").fetch_many(["5", "6", "7"])
    assert [v.upstream_id for v in caught.value.views] == ["5"]
    assert caught.value.unread == frozenset({"6"})  # 7 is unknown: left out, as ever


async def test_a_wrapped_task_list_is_accepted(mock: Replay) -> None:
    mock.post("/mj/task/list-by-condition").respond(json={"code": 1, "result": [TASK, {"no": "id"}]})
    views = await upstream("new-api").fetch_many(["5"])
    assert [v.upstream_id for v in views] == ["5"]


@pytest.mark.parametrize(
    "reply",
    [httpx.Response(500), httpx.Response(401), httpx.Response(200, text="<html>"), httpx.Response(200, json={"a": 1})],
)
async def test_broken_list_answers_raise_unavailable(mock: Replay, reply: httpx.Response) -> None:
    mock.post("/mj/task/list-by-condition").mock(reply)
    with pytest.raises(UpstreamUnavailable):
        await upstream("midjourney-proxy").fetch_many(["5"])


@pytest.mark.parametrize(
    "reply", [httpx.Response(403), httpx.Response(200, text="<html>"), httpx.Response(200, json=[1, 2])]
)
async def test_broken_fetch_answers_raise_unavailable(mock: Replay, reply: httpx.Response) -> None:
    mock.get("/mj/task/5/fetch").mock(reply)
    with pytest.raises(UpstreamUnavailable):
        await upstream("midjourney-proxy").fetch("5")


@pytest.mark.parametrize(
    "reply",
    [
        # trueai's own error envelope, HTTP 200 for a logic error (Filters/*.cs)
        httpx.Response(200, json={"success": False, "code": -1, "message": "服务暂不可用"}),
        httpx.Response(200, json={"code": 9, "description": "系统繁忙, 请稍后再试"}),
        # a gateway's page while the provider is away, or a path it does not route
        httpx.Response(404, text="<html><body><h1>404 Not Found</h1>nginx</body></html>"),
        httpx.Response(404, json={"timestamp": 1, "status": 404, "error": "Not Found", "path": "/mj/task/5/fetch"}),
    ],
)
async def test_a_fetch_answer_that_is_an_error_is_not_taken_for_an_unknown_task(
    mock: Replay, reply: httpx.Response
) -> None:
    """Only an answer that says the upstream does not know the id reads as unknown (which ends the job as lost
    after `jobs.lost_after_s`, its credits given back, while the upstream may still run it): an error answer says
    nothing of the task, and the job is read again."""
    mock.post("/v1/mj/task/list-by-condition").respond(404)
    mock.get("/v1/mj/task/5/fetch").mock(reply)
    adapter = upstream("mj-v1")
    with pytest.raises(UpstreamUnavailable):
        await adapter.fetch("5")
    with pytest.raises(UpstreamUnavailable):
        await adapter.fetch_many(["5"])


async def test_probe_falls_back_to_fetch_without_a_list_endpoint(mock: Replay) -> None:
    mock.post("/mj/task/list-by-condition").respond(404)
    mock.get("/mj/task/0/fetch").respond(200, text="")
    assert await upstream("midjourney-proxy").probe() is True


async def test_a_provider_whose_lanes_stay_busy_hands_the_job_on_before_sending() -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.helpers import serve

    received = threading.Event()

    async def slow(request: object) -> JSONResponse:
        received.set()
        await asyncio.sleep(3.0)
        return JSONResponse({"code": 1, "result": "1"})

    with serve(Starlette(routes=[Route("/mj/submit/imagine", slow, methods=["POST"])])) as base:
        options = HttpOptions(base_url=base, max_connections=1, timeout_s=1.5)
        adapter = create_http_upstream("midjourney-proxy", "p", options)
        first = asyncio.ensure_future(adapter.submit(REQUEST))
        assert await asyncio.to_thread(received.wait, 5)
        # The only lane is taken by a submit that runs longer than the next one waits for a lane (with one time
        # limit for both, which of the two ends first would be a race).
        adapter.options = dataclasses.replace(options, timeout_s=0.2)  # type: ignore[attr-defined]
        second = await adapter.submit(REQUEST)
        first_outcome = await first
        await adapter.aclose()
    assert isinstance(first_outcome, Retryable) and first_outcome.sent  # sent, then no answer in time
    assert isinstance(second, Retryable) and not second.sent  # never got a lane: nothing was sent


# -- every kind on the wire -------------------------------------------------------------------------------------------

IMAGE, MASK = "data:image/png;base64,AAAA", "data:image/png;base64,BBBB"
KINDS = [
    (
        SubmitRequest(kind="imagine", prompt="a cat", images=(IMAGE,), state="j", notify_hook="http://h/"),
        "submit/imagine",
        {"prompt": "a cat", "botType": "MID_JOURNEY", "base64Array": [IMAGE], "state": "j", "notifyHook": "http://h/"},
    ),
    (
        SubmitRequest(kind="blend", images=(IMAGE, MASK), dimensions="PORTRAIT", bot="NIJI_JOURNEY"),
        "submit/blend",
        {"botType": "NIJI_JOURNEY", "base64Array": [IMAGE, MASK], "dimensions": "PORTRAIT"},
    ),
    (SubmitRequest(kind="blend", images=(IMAGE, MASK)), "submit/blend", {"dimensions": "SQUARE"}),
    (SubmitRequest(kind="describe", images=(IMAGE,), state="j"), "submit/describe", {"base64": IMAGE, "state": "j"}),
    (SubmitRequest(kind="shorten", prompt="a long cat"), "submit/shorten", {"prompt": "a long cat"}),
    (
        SubmitRequest(kind="action", task_id="17", custom_id="MJ::JOB::upsample::1::h", state="j"),
        "submit/action",
        {"taskId": "17", "customId": "MJ::JOB::upsample::1::h", "state": "j"},
    ),
    (
        SubmitRequest(kind="swap_face", images=(IMAGE, MASK)),
        "insight-face/swap",
        {"sourceBase64": IMAGE, "targetBase64": MASK},
    ),
]
# Where each dialect puts a relax-mode submit, and the mode fields it adds to the body.
MODE_TRAVEL = [
    ("midjourney-proxy", {}, "/mj/", {"accountFilter": {"modes": ["RELAX"]}}),
    ("midjourney-proxy", {"mode_prefix": True, "account_filter": False}, "/mj-relax/mj/", {}),
    ("new-api", {}, "/mj-relax/mj/", {}),
    ("mj-v1", {}, "/v1/mj/", {"model": "mj-relax"}),
]


@pytest.mark.parametrize(("dialect", "options", "prefix", "mode_fields"), MODE_TRAVEL)
@pytest.mark.parametrize(("request_", "endpoint", "expected"), KINDS)
async def test_every_kind_goes_to_its_endpoint_with_its_body_and_the_mode(
    mock: Replay,
    dialect: str,
    options: dict[str, bool],
    prefix: str,
    mode_fields: dict[str, object],
    request_: SubmitRequest,
    endpoint: str,
    expected: dict[str, object],
) -> None:
    route = mock.post(prefix + endpoint).respond(json={"code": 1, "result": "21"})
    relaxed = dataclasses.replace(request_, mode="relax")
    assert await upstream(dialect, **options).submit(relaxed) == Accepted("21")
    body = json.loads(route.calls.last.request.content)
    assert body == {**body, **expected, **mode_fields}
    assert set(body) <= {*expected, *mode_fields, "botType", "base64Array", "prompt", "state", "notifyHook"}
    if not mode_fields:
        assert "accountFilter" not in body and "model" not in body


@pytest.mark.parametrize(("dialect", "options", "prefix", "mode_fields"), MODE_TRAVEL)
async def test_a_modal_carries_the_mask_only_when_given_and_no_mode_fields(
    mock: Replay, dialect: str, options: dict[str, bool], prefix: str, mode_fields: dict[str, object]
) -> None:
    route = mock.post(prefix + "submit/modal").respond(json={"code": 1, "result": "8"})
    adapter = upstream(dialect, **options)
    request = SubmitRequest(kind="modal", task_id="8", prompt="a boat", mask=MASK, mode="relax", state="ignored")
    assert await adapter.submit(request) == Accepted("8")
    assert json.loads(route.calls.last.request.content) == {"taskId": "8", "prompt": "a boat", "maskBase64": MASK}
    assert await adapter.submit(dataclasses.replace(request, mask=None)) == Accepted("8")
    assert json.loads(route.calls.last.request.content) == {"taskId": "8", "prompt": "a boat"}


@pytest.mark.parametrize(
    "request_",
    [
        SubmitRequest(kind="action", task_id="1"),
        SubmitRequest(kind="action", custom_id="MJ::JOB::upsample::1::h"),
        SubmitRequest(kind="modal", prompt="x"),
        SubmitRequest(kind="describe"),
        SubmitRequest(kind="swap_face", images=(IMAGE,)),
    ],
)
async def test_a_request_missing_what_its_kind_needs_is_refused_before_sending(
    mock: Replay, request_: SubmitRequest
) -> None:
    route = mock.post(url__regex=r".*").respond(json={"code": 1, "result": "1"})
    assert isinstance(await upstream("midjourney-proxy").submit(request_), ClientError)
    assert route.call_count == 0


# -- follow-up replies ------------------------------------------------------------------------------------------------

ACTION = SubmitRequest(kind="action", task_id="17", custom_id="MJ::Inpaint::1::h::SOLO")
MODAL_21 = {
    "code": 21,
    "description": "Waiting for window confirm",
    "result": "18",
    "properties": {"finalPrompt": "a cat", "remix": True},
}
NOT_FOUND = {"code": 3, "description": "任务不存在", "result": None}
ACTION_REPLIES = [
    ("midjourney-proxy", httpx.Response(200, json=MODAL_21), NeedsModal("18")),
    ("midjourney-proxy", httpx.Response(200, json={"code": 22, "description": "排队中", "result": "19"}), Accepted),
    ("midjourney-proxy", httpx.Response(404, json=NOT_FOUND), ClientError),  # trueai: unknown task
    ("midjourney-proxy", httpx.Response(200, json=NOT_FOUND), ClientError),  # novicezk plus: "关联任务不存在"
    ("midjourney-proxy", httpx.Response(404, text=""), ClientError),
    ("midjourney-proxy", httpx.Response(200, json={"success": False, "code": -1, "message": "bad"}), ClientError),
    ("midjourney-proxy", httpx.Response(500, json={"success": False, "code": -1, "message": "boom"}), Retryable),
    (
        "new-api",
        httpx.Response(400, json={"description": "task_not_found", "type": "upstream_error", "code": 4}),
        ClientError,
    ),
    # new-api turns trueai's 21 into 1 (relay/relay-mj.go) and passes on the rest: the task still waits in MODAL
    ("new-api", httpx.Response(200, json={**MODAL_21, "code": 1}), NeedsModal("18")),
    ("mj-v1", httpx.Response(200, json={**MODAL_21, "result": 18}), NeedsModal("18")),
]


@pytest.mark.parametrize(("dialect", "reply", "expected"), ACTION_REPLIES)
async def test_follow_up_replies_map_to_outcomes(
    mock: Replay, dialect: str, reply: httpx.Response, expected: object
) -> None:
    mock.post(url__regex=r".*/submit/(action|modal)$").mock(reply)
    for request in (ACTION, SubmitRequest(kind="modal", task_id="17", prompt="p")):
        outcome = await upstream(dialect).submit(request)
        if isinstance(expected, type):
            assert isinstance(outcome, expected), outcome
        else:
            assert outcome == expected


async def test_a_queued_follow_up_is_accepted_as_queued(mock: Replay) -> None:
    mock.post("/mj/submit/action").respond(json={"code": 22, "description": "排队中", "result": "19"})
    assert await upstream("midjourney-proxy").submit(ACTION) == Accepted("19", queued=True)


async def test_code_3_on_a_new_task_still_means_no_account(mock: Replay) -> None:
    mock.post("/mj/submit/blend").respond(json=NOT_FOUND)
    outcome = await upstream("midjourney-proxy").submit(SubmitRequest(kind="blend", images=(IMAGE, MASK)))
    assert isinstance(outcome, Retryable), outcome


# -- uploads ----------------------------------------------------------------------------------------------------------

UPLOAD_PATHS = [
    ("midjourney-proxy", {}, "/mj/submit/upload-discord-images", {"accountFilter": {"modes": ["RELAX"]}}),
    ("midjourney-proxy", {"mode_prefix": True}, "/mj-relax/mj/submit/upload-discord-images", {}),
    ("new-api", {}, "/mj-relax/mj/submit/upload-discord-images", {}),
    ("mj-v1", {}, "/v1/mj/submit/upload-discord-images", {"model": "mj-relax"}),
]


@pytest.mark.parametrize(("dialect", "options", "path", "mode_fields"), UPLOAD_PATHS)
async def test_an_upload_goes_to_the_dialects_path(
    mock: Replay, dialect: str, options: dict[str, bool], path: str, mode_fields: dict[str, object]
) -> None:
    route = mock.post(path).respond(json={"code": 1, "description": "ok", "result": ["https://cdn.example/a.png"]})
    outcome = await upstream(dialect, **options).upload([IMAGE], "relax", "MID_JOURNEY")
    assert outcome == Uploaded(("https://cdn.example/a.png",))
    body = json.loads(route.calls.last.request.content)
    assert body == {"base64Array": [IMAGE], **mode_fields, **body} and body["base64Array"] == [IMAGE]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (httpx.Response(200, json={"code": 1, "result": ["https://a/1.png", "https://a/2.png"]}), Uploaded),
        (httpx.Response(200, json={"code": 1, "result": "https://a/1.png, https://a/2.png"}), Uploaded),
        (httpx.Response(200, json={"code": 1, "result": []}), ProviderUnusable),
        (httpx.Response(200, json={"code": 4, "description": "base64格式错误"}), ClientError),
        (httpx.Response(200, json={"success": False, "code": -1, "message": "bad"}), ClientError),
        (httpx.Response(500, json={"success": False, "code": -1, "message": "boom"}), Retryable),
        (httpx.Response(200, json={"code": 22, "result": "7"}), ProviderUnusable),  # not an upload answer
        (httpx.Response(401), ProviderUnusable),
        (httpx.Response(200, text="<html>"), Retryable),
    ],
)
async def test_upload_replies_map_to_outcomes(mock: Replay, reply: httpx.Response, expected: type) -> None:
    mock.post("/mj/submit/upload-discord-images").mock(reply)
    outcome = await upstream("midjourney-proxy").upload([IMAGE, MASK], "fast", "MID_JOURNEY")
    assert isinstance(outcome, expected), outcome
    if isinstance(outcome, Uploaded):
        assert outcome.links == ("https://a/1.png", "https://a/2.png")


async def test_an_upload_without_images_is_refused_before_sending(mock: Replay) -> None:
    route = mock.post(url__regex=r".*").respond(json={"code": 1, "result": ["x"]})
    assert isinstance(await upstream("new-api").upload([], "fast", "MID_JOURNEY"), ClientError)
    assert route.call_count == 0


# -- seeds ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "path"),
    [
        ("midjourney-proxy", "/mj/task/5/image-seed"),
        ("new-api", "/mj/task/5/image-seed"),
        ("mj-v1", "/v1/mj/task/5/image-seed"),
    ],
)
async def test_a_seed_is_read_from_the_dialects_path(mock: Replay, dialect: str, path: str) -> None:
    route = mock.get(path).respond(json={"code": 1, "description": "成功", "result": 3160581935})
    assert await upstream(dialect).seed("5") == "3160581935"  # an integer seed is read as a string
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (httpx.Response(200, json={"code": 1, "description": "成功", "result": "3160581935"}), "3160581935"),
        (httpx.Response(404, json={"code": 3, "description": "任务不存在"}), None),
        (httpx.Response(404), None),
        (httpx.Response(204), None),
        (httpx.Response(200, text=""), None),
        (httpx.Response(200, json={"code": 3, "description": "not found"}), None),
        (httpx.Response(400, json={"code": 4, "description": "hash不存在"}), None),
        (httpx.Response(400, json={"description": "task_not_found", "type": "upstream_error", "code": 4}), None),
    ],
)
async def test_seed_replies(mock: Replay, reply: httpx.Response, expected: str | None) -> None:
    mock.get("/mj/task/5/image-seed").mock(reply)
    assert await upstream("midjourney-proxy").seed("5") == expected


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(401),
        httpx.Response(403, text="未登录"),
        httpx.Response(500, json={"success": False, "code": -1, "message": "boom"}),
        httpx.Response(502, text="Bad Gateway"),
        httpx.Response(200, text="<html>login</html>"),
        httpx.Response(200, json={"success": False, "code": -1, "message": "bad"}),
        httpx.Response(400, json={"description": "do_request_failed", "type": "upstream_error", "code": 5}),
    ],
)
async def test_seed_replies_that_are_no_answer_raise_unavailable(mock: Replay, reply: httpx.Response) -> None:
    mock.get("/mj/task/5/image-seed").mock(reply)
    with pytest.raises(UpstreamUnavailable):
        await upstream("midjourney-proxy").seed("5")


async def test_a_task_reads_back_its_final_prompt(mock: Replay) -> None:
    described = {**TASK, "status": "SUCCESS", "promptEn": "1️⃣ a cat", "properties": {"finalPrompt": "1️⃣ a dog"}}
    mock.get("/mj/task/5/fetch").respond(json=described)
    view = await upstream("midjourney-proxy").fetch("5")
    assert view is not None and view.final_prompt == "1️⃣ a dog"
    mock.get("/mj/task/6/fetch").respond(json={**described, "id": "6", "properties": {}})
    view = await upstream("midjourney-proxy").fetch("6")
    assert view is not None and view.final_prompt == "1️⃣ a cat"
