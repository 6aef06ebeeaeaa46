"""The simulator's HTTP server speaks each dialect the way the real servers do, on every endpoint: raw requests over
loopback, no adapter in between, so each quirk the adapters must handle is pinned here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from tests.contract.worlds import HTTP_DIALECTS, SECRET, png
from tests.helpers import FakeClock, serve

UNKNOWN = "1234567890"
ENDPOINTS = [
    "submit/imagine",
    "submit/blend",
    "submit/describe",
    "submit/shorten",
    "submit/action",
    "submit/modal",
    "submit/upload-discord-images",
    "insight-face/swap",
    "task/list-by-condition",
]


@contextmanager
def client(dialect: str, **settings: Any) -> Iterator[tuple[httpx.Client, FakeClock]]:
    clock = FakeClock()
    engine = SimEngine(SimSettings(fast_s=10, tile_px=16, **settings), now=clock.now)
    headers = {"mj-api-secret": SECRET} if dialect == "midjourney-proxy" else {"Authorization": f"Bearer {SECRET}"}
    with serve(build_sim_app(engine, dialect, SECRET)) as base:  # type: ignore[arg-type]
        with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
            yield http, clock


def prefix(dialect: str) -> str:
    return "/v1/mj" if dialect == "mj-v1" else "/mj"


def finished_grid(http: httpx.Client, clock: FakeClock, dialect: str, prompt: str = "a cat") -> dict[str, Any]:
    task_id = http.post(f"{prefix(dialect)}/submit/imagine", json={"prompt": prompt}).json()["result"]
    clock.advance(10)
    task: dict[str, Any] = http.get(f"{prefix(dialect)}/task/{task_id}/fetch").json()
    assert task["status"] == "SUCCESS"
    return task


@pytest.mark.parametrize("dialect", HTTP_DIALECTS)
def test_every_endpoint_asks_for_credentials_but_images_do_not(dialect: str) -> None:
    with client(dialect) as (http, clock):
        task = finished_grid(http, clock, dialect)
        paths = [f"{prefix(dialect)}/{endpoint}" for endpoint in ENDPOINTS]
        for path in paths:
            assert httpx.post(str(http.base_url) + path, json={}).status_code == 401, path
        for path in (f"task/{task['id']}/fetch", f"task/{task['id']}/image-seed"):
            assert httpx.get(f"{http.base_url}{prefix(dialect)}/{path}").status_code == 401, path
        image = httpx.get(task["imageUrl"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    ("dialect", "status", "body"),
    [
        ("midjourney-proxy", 404, {"code": 3}),
        ("new-api", 400, {"description": "task_not_found", "type": "upstream_error", "code": 4}),
        ("mj-v1", 200, {"code": 3}),
    ],
)
def test_a_follow_up_on_an_unknown_task_is_answered_the_dialects_way(
    dialect: str, status: int, body: dict[str, Any]
) -> None:
    with client(dialect) as (http, _):
        for path, payload in (
            ("submit/action", {"taskId": UNKNOWN, "customId": "MJ::JOB::upsample::1::x"}),
            ("submit/modal", {"taskId": UNKNOWN, "prompt": "x"}),
        ):
            reply = http.post(f"{prefix(dialect)}/{path}", json=payload)
            assert reply.status_code == status and reply.json() == {**reply.json(), **body}, reply.text


@pytest.mark.parametrize(
    "custom_id", ["MJ::Job::PicReader::1", "MJ::Job::PromptAnalyzer::2", "MJ::Picread::Retry", "MJ::BOOKMARK::x"]
)
def test_new_api_refuses_the_buttons_it_cannot_map_before_any_upstream_sees_them(custom_id: str) -> None:
    """new-api maps a customId to its own actions (upsample, variation, pan, reroll, Outpaint, CustomZoom, Inpaint)
    in its middleware and refuses any other, describe's and shorten's buttons among them, with its OpenAI-style
    envelope: the simulator ran them."""
    with client("new-api") as (http, clock):
        described = http.post("/mj/submit/describe", json={"base64": png()}).json()["result"]
        clock.advance(10)
        submits = http.get("/sim/stats").json()["submits"]
        reply = http.post("/mj/submit/action", json={"taskId": described, "customId": custom_id})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "new_api_error" and f"unknown_action:{custom_id}" in error["message"]
        assert http.get("/sim/stats").json()["submits"] == submits  # refused before any channel was chosen


@pytest.mark.parametrize(
    ("dialect", "fetch_status", "fetch_body", "seed_status", "seed_body"),
    [
        ("midjourney-proxy", 200, b"", 404, {"code": 3}),
        ("new-api", 400, {"description": "task_no_found ", "code": 4}, 400, {"description": "task_not_found"}),
        ("mj-v1", 404, {"code": 3}, 404, {"code": 3}),
    ],
)
def test_unknown_reads_are_answered_the_dialects_way(
    dialect: str, fetch_status: int, fetch_body: object, seed_status: int, seed_body: dict[str, Any]
) -> None:
    with client(dialect) as (http, _):
        fetched = http.get(f"{prefix(dialect)}/task/{UNKNOWN}/fetch")
        assert fetched.status_code == fetch_status
        if isinstance(fetch_body, bytes):
            assert fetched.content == fetch_body
        else:
            assert fetched.json() == {**fetched.json(), **fetch_body}  # type: ignore[dict-item]
        seed = http.get(f"{prefix(dialect)}/task/{UNKNOWN}/image-seed")
        assert seed.status_code == seed_status and seed.json() == {**seed.json(), **seed_body}


@pytest.mark.parametrize(
    ("dialect", "status", "body"),
    [
        ("midjourney-proxy", 500, {"success": False, "code": -1}),
        ("new-api", 400, {"type": "upstream_error", "code": 5}),
        ("mj-v1", 500, {"success": False, "code": -1}),
    ],
)
def test_a_fault_is_answered_the_dialects_way(dialect: str, status: int, body: dict[str, Any]) -> None:
    with client(dialect) as (http, _):
        reply = http.post(f"{prefix(dialect)}/submit/shorten", json={"prompt": "a cat sim:error"})
        assert reply.status_code == status and reply.json() == {**reply.json(), **body}


def test_a_late_answer_comes_after_its_task_was_taken() -> None:
    """`sim:late-answer`, in a submit's prompt or in the prompt a modal confirms with: the task is taken at once and
    its answer held back, as an upstream slow to answer does (a caller that gives up first cannot tell whether it
    ran)."""
    clock = FakeClock()
    engine = SimEngine(SimSettings(fast_s=10, tile_px=16, remix=True), now=clock.now)
    with serve(build_sim_app(engine, "midjourney-proxy", SECRET, late_answer_s=0.5)) as base:
        http = httpx.Client(base_url=base, headers={"mj-api-secret": SECRET}, timeout=10)
        with pytest.raises(httpx.ReadTimeout):
            http.post("/mj/submit/imagine", json={"prompt": "a cat sim:late-answer"}, timeout=0.2)
        assert [task.prompt for task in engine.all_tasks()] == ["a cat sim:late-answer"]  # taken, not answered
        task = finished_grid(http, clock, "midjourney-proxy")
        variation = next(b["customId"] for b in task["buttons"] if "variation::1" in b["customId"])
        parked = http.post("/mj/submit/action", json={"taskId": task["id"], "customId": variation}).json()
        with pytest.raises(httpx.ReadTimeout):
            http.post("/mj/submit/modal", json={"taskId": parked["result"], "prompt": "sim:late-answer"}, timeout=0.2)
        assert http.get(f"/mj/task/{parked['result']}/fetch").json()["status"] != "MODAL"  # confirmed meanwhile
        started = time.monotonic()
        answered = http.post("/mj/submit/imagine", json={"prompt": "a dog sim:late-answer"})
        assert answered.json()["code"] == 1 and time.monotonic() - started >= 0.5  # answered, in the end
        http.close()


@pytest.mark.parametrize(("dialect", "code"), [("midjourney-proxy", 21), ("new-api", 1), ("mj-v1", 21)])
def test_a_remix_variation_answers_21_except_through_new_api(dialect: str, code: int) -> None:
    with client(dialect, remix=True) as (http, clock):
        task = finished_grid(http, clock, dialect)
        variation = next(b["customId"] for b in task["buttons"] if "variation::1" in b["customId"])
        reply = http.post(f"{prefix(dialect)}/submit/action", json={"taskId": task["id"], "customId": variation})
        assert reply.json()["code"] == code
        if dialect == "mj-v1":
            assert isinstance(reply.json()["result"], int)  # numeric ids as integers
        upscale = next(b["customId"] for b in task["buttons"] if "upsample::1" in b["customId"])
        region_parent = http.post(f"{prefix(dialect)}/submit/action", json={"taskId": task["id"], "customId": upscale})
        clock.advance(10)
        upscaled = http.get(f"{prefix(dialect)}/task/{region_parent.json()['result']}/fetch").json()
        inpaint = next(b["customId"] for b in upscaled["buttons"] if "Inpaint" in b["customId"])
        region = http.post(f"{prefix(dialect)}/submit/action", json={"taskId": upscaled["id"], "customId": inpaint})
        assert region.json()["code"] == 21  # INPAINT keeps its 21 everywhere


@pytest.mark.parametrize("mode", ["relax", "turbo"])
def test_midjourney_proxy_and_new_api_serve_every_endpoint_under_a_mode_prefix(mode: str) -> None:
    for dialect in ("midjourney-proxy", "new-api"):
        with client(dialect) as (http, clock):
            image = png()
            replies = [
                http.post(f"/mj-{mode}/mj/submit/imagine", json={"prompt": "a cat"}),
                http.post(f"/mj-{mode}/mj/submit/blend", json={"base64Array": [image, image]}),
                http.post(f"/mj-{mode}/mj/submit/describe", json={"base64": image}),
                http.post(f"/mj-{mode}/mj/submit/shorten", json={"prompt": "a long cat"}),
                http.post(f"/mj-{mode}/mj/insight-face/swap", json={"sourceBase64": image, "targetBase64": image}),
                http.post(f"/mj-{mode}/mj/submit/upload-discord-images", json={"base64Array": [image]}),
            ]
            assert [reply.json()["code"] for reply in replies] == [1] * 6
            listed = http.post(f"/mj-{mode}/mj/task/list-by-condition", json={"ids": [replies[0].json()["result"]]})
            # midjourney-proxy reads the mode from the path; new-api ignores the prefix (no flag: fast)
            assert listed.json()[0]["mode"] == (mode.upper() if dialect == "midjourney-proxy" else "FAST")
            assert http.get(f"/mj-{mode}/mj/task/{replies[0].json()['result']}/image-seed").status_code == 400


def test_mj_v1_serves_only_v1_paths_and_reads_the_mode_from_the_model() -> None:
    with client("mj-v1") as (http, _):
        assert http.post("/mj/submit/imagine", json={"prompt": "a cat"}).status_code == 404
        task_id = http.post("/v1/mj/submit/imagine", json={"prompt": "a cat", "model": "mj-turbo"}).json()["result"]
        assert isinstance(task_id, int)
        assert http.get(f"/v1/mj/task/{task_id}/fetch").json()["mode"] == "TURBO"


def test_midjourney_proxy_takes_the_mode_from_the_account_filter_then_the_prompt() -> None:
    with client("midjourney-proxy") as (http, _):
        filtered = http.post(
            "/mj/submit/imagine", json={"prompt": "a cat --turbo", "accountFilter": {"modes": ["RELAX"]}}
        )
        flagged = http.post("/mj/submit/imagine", json={"prompt": "a cat --turbo", "accountFilter": {"modes": "x"}})
        modes = [http.get(f"/mj/task/{r.json()['result']}/fetch").json()["mode"] for r in (filtered, flagged)]
        assert modes == ["RELAX", "TURBO"]
        assert http.post("/mj/submit/imagine", content=b"{not json").json()["code"] == 4
        assert http.post("/mj/submit/upload-discord-images", content=b"[]").json()["code"] == 4


@pytest.mark.parametrize("dialect", HTTP_DIALECTS)
def test_a_body_nested_thousands_deep_is_answered_as_one_that_is_not_json(dialect: str) -> None:
    """The simulator reads bodies as the relay does: never by a parser at the interpreter's recursion limit
    (`adapters.nesting`), where a finalizer run then fails for want of stack."""
    with client(dialect) as (http, _):
        path = f"{prefix(dialect)}/submit/imagine"
        plain = http.post(path, content=b"not json", headers={"Content-Type": "application/json"})
        deep = b'{"prompt": "a cat", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        reply = http.post(path, content=deep, headers={"Content-Type": "application/json"})
        assert plain.status_code < 500
        assert (reply.status_code, reply.json()) == (plain.status_code, plain.json())
