"""Recorded odd upstream replies, replayed over loopback by a canned midjourney-proxy, through the whole relay:
what a native client sees when the upstream queues (22), asks for a modal (21), answers trueai's
`{"success": false}`, or forgets a task (an empty fetch body)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.app import build_app
from relay.store.db import Unreachable
from tests.api.native_helpers import png
from tests.helpers import (
    RunningRelay,
    assert_ledger_balances,
    create_key,
    relay_config,
    running_relay,
    serve,
    sql,
    wait_for,
)


class Canned:
    """Answers each route with the next reply queued for it (the last one repeats). `before[route]`, when set, is
    awaited before that route answers (an upstream that is slow to answer)."""

    def __init__(self) -> None:
        self.replies: dict[str, list[tuple[int, Any]]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.before: dict[str, Callable[[], Awaitable[None]]] = {}
        self.lock = threading.Lock()

    def on(self, route: str, *replies: tuple[int, Any]) -> None:
        self.replies[route] = list(replies)

    def _next(self, route: str) -> tuple[int, Any]:
        with self.lock:
            queue = self.replies.get(route) or [(404, None)]
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            route = request.url.path.removeprefix("/mj/")
            if request.method == "POST":
                with self.lock:
                    self.calls.append((route, await request.json()))
            if route.startswith("task/") and route.endswith("/fetch"):
                route = "fetch"
            if route in self.before:
                await self.before[route]()
            status, body = self._next(route)
            if body is None:
                return Response(status_code=status)
            if isinstance(body, RawJson):
                return Response(str(body).encode(), status_code=status, media_type="application/json")
            if isinstance(body, bytes):  # bytes that need not be UTF-8
                return Response(body, status_code=status, media_type="application/json")
            if body == "":
                return Response(b"", status_code=status, media_type="application/json")
            return JSONResponse(body, status_code=status)

        return Starlette(routes=[Route("/mj/{rest:path}", handle, methods=["GET", "POST"])])


class RawJson(str):
    """A reply body sent exactly as written (JSON escapes a Python string could not carry)."""


def task(upstream_id: str, status: str, progress: str = "0%", **extra: Any) -> dict[str, Any]:
    return {"id": upstream_id, "status": status, "progress": progress, "action": "IMAGINE", **extra}


@contextmanager
def relay_before(
    canned: Canned, tmp_path: Path, *more: Canned, sections: dict[str, Any] | None = None, **jobs: Any
) -> Iterator[tuple[httpx.Client, RunningRelay]]:
    """A relay whose providers are canned upstreams (`odd`, then `odd1`, `odd2`, ... in priority order), and a
    native client of it."""
    with ExitStack() as stack:
        providers = []
        for index, upstream in enumerate((canned, *more)):
            base = stack.enter_context(serve(upstream.app()))
            name = "odd" if index == 0 else f"odd{index}"
            providers.append(
                {"name": name, "dialect": "midjourney-proxy", "base_url": base, "secret": "s", "priority": index}
            )
        config = relay_config(tmp_path, providers=providers, jobs={"poll_interval_s": 0.05, **jobs}, **(sections or {}))
        relay = stack.enter_context(running_relay(config))
        client = stack.enter_context(
            httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30)
        )
        yield client, relay


def test_a_queued_submit_is_answered_22_and_followed(tmp_path: Path) -> None:
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 22, "description": "排队中", "result": "u-1", "properties": {}}))
    canned.on("task/list-by-condition", (200, [task("u-1", "NOT_START")]), (200, [task("u-1", "IN_PROGRESS", "46%")]))
    with relay_before(canned, tmp_path) as (client, _):
        reply = client.post("/mj/submit/imagine", json={"prompt": "a queue"})
        assert reply.json()["code"] == 22 and reply.json()["description"] == "In queue"
        task_id = reply.json()["result"]
        assert task_id != "u-1"  # the relay's id, never the upstream's
        wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["progress"] == "46%")


@pytest.mark.parametrize(
    "odd",
    [
        b'"progress": 1e999',
        b'"submitTime": ' + b"9" * 5000,
        b'"progress": NaN',
        b'"failReason": "cut short \xe7\x8c"',  # a character cut in the middle of its bytes
    ],
)
def test_a_task_with_an_unreadable_number_does_not_stop_its_neighbours_reads(tmp_path: Path, odd: bytes) -> None:
    """A status read lists two tasks, one with a number no one can read (an infinite progress, more digits than
    Python reads, NaN) or text that is not UTF-8: the other job's progress is taken all the same, round after
    round."""
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-a"}), (200, {"code": 1, "result": "u-b"}))
    neighbour = json.dumps(task("u-a", "IN_PROGRESS", "46%")).encode()
    listing = b"[" + neighbour + b', {"id": "u-b", "status": "IN_PROGRESS", ' + odd + b"}]"
    canned.on("task/list-by-condition", (200, listing))
    with relay_before(canned, tmp_path) as (client, _):
        a = client.post("/mj/submit/imagine", json={"prompt": "a"}).json()["result"]
        client.post("/mj/submit/imagine", json={"prompt": "b"})
        wait_for(lambda: client.get(f"/mj/task/{a}/fetch").json()["progress"] == "46%")


def test_a_modal_answer_to_an_action_parks_the_task_and_the_modal_runs_it(tmp_path: Path) -> None:
    canned = Canned()
    buttons = [{"customId": "MJ::Inpaint::1::h::SOLO", "label": "Vary (Region)"}]
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-parent"}))
    canned.on(
        "task/list-by-condition",
        (200, [task("u-parent", "SUCCESS", "100%", imageUrl="/cdn/p.png", buttons=buttons)]),
    )
    canned.on(
        "submit/action",
        (
            200,
            {
                "code": 21,
                "description": "Waiting for window confirm",
                "result": "u-modal",
                "properties": {"remix": True, "finalPrompt": "x"},
            },
        ),
    )
    canned.on("submit/modal", (200, {"code": 1, "description": "ok", "result": "u-modal"}))
    with serve(_png_cdn()) as cdn:
        canned.on(
            "task/list-by-condition",
            (200, [task("u-parent", "SUCCESS", "100%", imageUrl=cdn + "/p.png", buttons=buttons)]),
        )
        with relay_before(canned, tmp_path) as (client, _):
            parent = client.post("/mj/submit/imagine", json={"prompt": "a parent"}).json()["result"]
            wait_for(lambda: client.get(f"/mj/task/{parent}/fetch").json()["status"] == "SUCCESS")
            canned.on("task/list-by-condition", (200, [task("u-modal", "MODAL")]))
            reply = client.post("/mj/submit/action", json={"taskId": parent, "customId": "MJ::Inpaint::1::h::SOLO"})
            assert reply.json()["code"] == 21
            child = reply.json()["result"]
            assert client.get(f"/mj/task/{child}/fetch").json()["status"] == "MODAL"
            confirmed = client.post("/mj/submit/modal", json={"taskId": child, "maskBase64": png(), "prompt": "a boat"})
            assert confirmed.json()["code"] == 1
            sent = [body for route, body in canned.calls if route == "submit/modal"][-1]
            assert sent["taskId"] == "u-modal" and sent["maskBase64"].startswith("data:image/png;base64,")
            assert sent["prompt"] == "a boat --fast"  # the mode it was held at
            action = [body for route, body in canned.calls if route == "submit/action"][-1]
            assert action == {**action, "taskId": "u-parent", "customId": "MJ::Inpaint::1::h::SOLO"}


def test_trueai_refusals_are_client_errors_and_faults_are_retryable(tmp_path: Path) -> None:
    canned = Canned()
    canned.on(
        "submit/imagine",
        (200, {"success": False, "code": -1, "message": "prompt contains a parameter that is not allowed"}),
        (500, {"success": False, "code": -1, "message": "internal"}),
    )
    with relay_before(canned, tmp_path) as (client, _):
        refused = client.post("/mj/submit/imagine", json={"prompt": "a cat --badparam"})
        assert refused.status_code == 400 and refused.json()["code"] == 4
        assert "not allowed" in refused.json()["description"]
        faulted = client.post("/mj/submit/imagine", json={"prompt": "a cat"})
        # A 500 in the server's own envelope: it refused the task, so another provider may take it (none here).
        assert faulted.status_code == 503 and faulted.json()["code"] == 23


def test_a_task_the_upstream_forgets_ends_lost(tmp_path: Path) -> None:
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-ghost"}))
    canned.on("task/list-by-condition", (404, None))
    canned.on("fetch", (200, ""))  # novicezk answers an unknown id with an empty 200
    with relay_before(canned, tmp_path, lost_after_s=0.3) as (client, _):
        task_id = client.post("/mj/submit/imagine", json={"prompt": "a ghost"}).json()["result"]
        wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["status"] == "FAILURE")
        assert "lost" in client.get(f"/mj/task/{task_id}/fetch").json()["failReason"]


def test_a_task_whose_fetch_answers_another_task_is_not_lost(tmp_path: Path) -> None:
    """Read one fetch per task, the provider answers the fetch of a task with another task: that says nothing of the
    task asked for (it is no answer that the upstream does not know it), so the job is read again, never lost, and
    the other task's view is taken for nobody's."""
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-asked"}))
    canned.on("task/list-by-condition", (404, None))
    canned.on("fetch", (200, task("u-other", "IN_PROGRESS", "40%")))
    with relay_before(canned, tmp_path, lost_after_s=0.3) as (client, _):
        task_id = client.post("/mj/submit/imagine", json={"prompt": "a heron"}).json()["result"]
        wait_for(lambda: sum(1 for route, _ in canned.calls if route == "task/list-by-condition") >= 1)
        time.sleep(1.0)  # twenty poll intervals, three times lost_after_s
        seen = client.get(f"/mj/task/{task_id}/fetch").json()
        assert seen["status"] not in ("FAILURE", "SUCCESS"), seen
        assert seen["progress"] == "0%"  # the other task's progress is not this job's


def _png_cdn() -> Starlette:
    import base64

    data = base64.b64decode(png(size=16).split(",", 1)[1])

    async def image(request: Request) -> Response:
        return Response(data, media_type="image/png")

    return Starlette(routes=[Route("/{name}", image)])


def parked_in_modal(client: httpx.Client, canned: Canned, cdn: str, buttons: list[dict[str, str]]) -> str:
    """A parent imagine run to its end (`u-parent`, with `buttons`), then its first button, which the upstream parks
    in MODAL (`u-modal`): the child's task id, checked MODAL."""
    canned.on(
        "task/list-by-condition",
        (200, [task("u-parent", "SUCCESS", "100%", imageUrl=cdn + "/p.png", buttons=buttons)]),
    )
    parent = client.post("/mj/submit/imagine", json={"prompt": "a parent"}).json()["result"]
    wait_for(lambda: client.get(f"/mj/task/{parent}/fetch").json()["status"] == "SUCCESS")
    canned.on("task/list-by-condition", (200, [task("u-modal", "MODAL")]))
    reply = client.post("/mj/submit/action", json={"taskId": parent, "customId": buttons[0]["customId"]})
    child = str(reply.json()["result"])
    assert client.get(f"/mj/task/{child}/fetch").json()["status"] == "MODAL"
    return child


def test_a_confirmation_the_upstream_took_is_answered_success_when_writing_it_fails(tmp_path: Path) -> None:
    """The upstream takes `submit/modal`, then the database cannot write the confirmation: the client is answered
    success all the same (a 503 would invite a second confirmation, run and charged again), and the job is followed
    to its end and captured once."""
    canned = Canned()
    buttons = [{"customId": "MJ::Inpaint::1::h::SOLO", "label": "Vary (Region)"}]
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-parent"}))
    canned.on("submit/action", (200, {"code": 21, "result": "u-modal", "properties": {"remix": True}}))
    canned.on("submit/modal", (200, {"code": 1, "result": "u-run"}))
    with ExitStack() as stack:
        cdn = stack.enter_context(serve(_png_cdn()))
        upstream = stack.enter_context(serve(canned.app()))
        provider = {"name": "odd", "dialect": "midjourney-proxy", "base_url": upstream, "secret": "s"}
        config = relay_config(tmp_path, providers=[provider], jobs={"poll_interval_s": 0.05})
        key = create_key(config)
        app = build_app(config)
        client = stack.enter_context(
            httpx.Client(base_url=stack.enter_context(serve(app)), headers={"mj-api-secret": key}, timeout=30)
        )
        child = parked_in_modal(client, canned, cdn, buttons)

        store = app.state.relay.tasks.store

        async def unreachable(*args: Any, **kwargs: Any) -> None:
            raise Unreachable("connection refused by 10.0.0.7:5432") from OSError(111, "Connection refused")

        store.confirm_modal = unreachable
        canned.on("task/list-by-condition", (200, [task("u-run", "IN_PROGRESS", "46%")]))
        confirmed = client.post("/mj/submit/modal", json={"taskId": child, "maskBase64": png(), "prompt": "a boat"})
        assert confirmed.status_code == 200, confirmed.text
        assert confirmed.json()["code"] == 1 and confirmed.json()["result"] == child
        del store.confirm_modal
        canned.on("task/list-by-condition", (200, [task("u-run", "SUCCESS", "100%", imageUrl=cdn + "/m.png")]))
        wait_for(lambda: client.get(f"/mj/task/{child}/fetch").json()["status"] == "SUCCESS")
        assert [route for route, _ in canned.calls].count("submit/modal") == 1
        assert sql(config, "SELECT hold_state FROM jobs WHERE id = ?", child) == [("captured",)]
    assert_ledger_balances(config.database_url())
