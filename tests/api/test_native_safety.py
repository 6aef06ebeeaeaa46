"""What must hold when upstreams are slow, odd or hostile: a confirmation the upstream starts at once is never lost,
an answer that may mean "taken" is never sent elsewhere, upstream text a database cannot store never leaves a job
unending, and no upstream link reaches a client."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from tests.api.native_helpers import SECRET, native, png, sim_settings
from tests.api.test_native_odd_upstreams import Canned, RawJson, _png_cdn, parked_in_modal, relay_before, task
from tests.helpers import create_key, pg_database_sync, relay_config, running_relay, serve, sql, wait_for

BUTTONS = [{"customId": "MJ::Inpaint::1::h::SOLO", "label": "Vary (Region)"}]


def test_a_confirmation_the_upstream_starts_before_it_answers_runs_to_its_end_and_is_charged(tmp_path: Path) -> None:
    """The upstream takes `submit/modal`, starts the task, and answers only after the relay has read it running and
    after the modal's own deadline: the job still runs on to its end, with the prompt it was confirmed with."""
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-parent"}))
    canned.on("submit/action", (200, {"code": 21, "result": "u-modal", "properties": {"remix": True}}))
    canned.on("submit/modal", (200, {"code": 1, "result": "u-modal"}))
    polls_during_modal: list[float] = []

    async def slow_modal() -> None:
        started = time.monotonic()
        canned.on("task/list-by-condition", (200, [task("u-modal", "IN_PROGRESS", "46%")]))
        while len(polls_during_modal) < 3 or time.monotonic() - started < 0.8:  # past the modal's deadline
            await asyncio.sleep(0.02)

    async def count_polls() -> None:
        polls_during_modal.append(time.monotonic())

    with serve(_png_cdn()) as cdn, relay_before(canned, tmp_path, modal_timeout_s=0.5) as (client, relay):
        child = parked_in_modal(client, canned, cdn, BUTTONS)
        canned.before["submit/modal"] = slow_modal
        canned.before["task/list-by-condition"] = count_polls
        confirmed = client.post("/mj/submit/modal", json={"taskId": child, "prompt": "a boat", "maskBase64": png()})
        assert confirmed.json()["code"] == 1
        assert len(polls_during_modal) >= 3  # the relay read the task while the confirmation was under way
        during = client.get(f"/mj/task/{child}/fetch").json()
        assert during["status"] == "IN_PROGRESS" and during["prompt"] == "a boat --fast"
        canned.on("task/list-by-condition", (200, [task("u-modal", "SUCCESS", "100%", imageUrl=cdn + "/m.png")]))
        wait_for(lambda: client.get(f"/mj/task/{child}/fetch").json()["status"] in ("SUCCESS", "FAILURE"))
        assert client.get(f"/mj/task/{child}/fetch").json()["status"] == "SUCCESS"
        assert sql(relay.config, "SELECT hold_state FROM jobs WHERE id = ?", child) == [("captured",)]


def test_a_job_waiting_in_modal_holds_no_provider_slot(tmp_path: Path) -> None:
    with native(tmp_path, provider_settings={"max_in_flight": 1}) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a parent"}))
        button = world.button(grid, "upsample::1")
        upscale = world.finished(world.submit("/submit/action", {"taskId": grid["id"], "customId": button}))
        region = world.button(upscale, "Inpaint")
        parked = [world.submit("/submit/action", {"taskId": upscale["id"], "customId": region}) for _ in range(3)]
        assert {world.fetch(task_id)["status"] for task_id in parked} == {"MODAL"}
        # three parked tasks, on a provider that runs one job at a time: a new job still gets through
        other = world.post("/submit/imagine", {"prompt": "someone else's picture"})
        assert other.status_code == 200 and other.json()["code"] == 1, other.text
        world.finished(str(other.json()["result"]))
        world.post("/submit/modal", {"taskId": parked[0], "maskBase64": png()})
        world.finished(parked[0])  # a confirmed one runs, taking the slot again


def test_a_confirmation_the_upstream_refuses_leaves_the_job_waiting_to_its_own_deadline(tmp_path: Path) -> None:
    """While a confirmation is under way the job may run to a running job's deadline (no timeout of its modal
    window is written meanwhile); when the upstream refuses it (Vary Region without a mask), the job waits in
    MODAL again, to the end of its modal window, and can still be confirmed."""
    with native(tmp_path) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a parent"}))
        button = world.button(grid, "upsample::1")
        upscale = world.finished(world.submit("/submit/action", {"taskId": grid["id"], "customId": button}))
        region = world.submit("/submit/action", {"taskId": upscale["id"], "customId": world.button(upscale, "Inpaint")})
        query = "SELECT state, deadline_at FROM jobs WHERE id = ?"
        ((state, window),) = sql(world.relay.config, query, region)
        refused = world.post("/submit/modal", {"taskId": region, "prompt": "no mask"})
        assert refused.status_code == 400 and "mask" in refused.json()["description"], refused.text
        assert sql(world.relay.config, query, region) == [(state, window)] == [("MODAL", window)]
        world.post("/submit/modal", {"taskId": region, "maskBase64": png()})
        world.finished(region)


def test_an_answer_that_may_mean_taken_is_never_sent_to_another_provider(tmp_path: Path) -> None:
    first, second = Canned(), Canned()
    first.on("submit/imagine", (200, {"code": 1, "description": "ok", "result": None}))  # taken, but no id
    second.on("submit/imagine", (200, {"code": 1, "result": "u-2"}))
    with relay_before(first, tmp_path, second) as (client, relay):
        reply = client.post("/mj/submit/imagine", json={"prompt": "once only"})
        assert reply.status_code == 502 and reply.json()["code"] == 9, reply.text
        assert [route for route, _ in second.calls] == []
        assert relay.balance() == (1000, 0)


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_upstream_text_a_database_cannot_store_still_ends_the_job(store: str, tmp_path: Path) -> None:
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-bad"}))
    raw = '[{"id": "u-bad", "status": "FAILURE", "progress": "", "failReason": "bad \\u0000 words \\ud800 here"}]'
    canned.on("task/list-by-condition", (200, RawJson(raw)))
    sections: dict[str, Any] = {}
    with pg_database_sync() if store == "postgres" else _nothing() as url:
        if url:
            sections["database"] = {"url": url}
        with relay_before(canned, tmp_path, sections=sections) as (client, relay):
            task_id = client.post("/mj/submit/imagine", json={"prompt": "a cat"}).json()["result"]
            wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["status"] == "FAILURE")
            reason = client.get(f"/mj/task/{task_id}/fetch").json()["failReason"]
            assert reason == "bad  words \ufffd here"
            assert relay.balance() == (1000, 0)


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_task_id_longer_than_the_relay_keeps_ends_its_own_job_and_no_other(store: str, tmp_path: Path) -> None:
    """An upstream that takes a task under an id longer than any the relay keeps: that job ends at once (the task
    may run upstream: it is not sent elsewhere) and is not charged; the next job is taken and followed as usual."""
    canned = Canned()
    long_id = "u" * 200
    canned.on("submit/imagine", (200, {"code": 1, "result": long_id}), (200, {"code": 1, "result": "u-ok"}))
    canned.on(
        "task/list-by-condition", (200, [task(long_id, "IN_PROGRESS", "50%"), task("u-ok", "IN_PROGRESS", "46%")])
    )
    sections: dict[str, Any] = {}
    with pg_database_sync() if store == "postgres" else _nothing() as url:
        if url:
            sections["database"] = {"url": url}
        with relay_before(canned, tmp_path, sections=sections) as (client, relay):
            reply = client.post("/mj/submit/imagine", json={"prompt": "a long one"})
            assert reply.status_code == 502 and reply.json()["code"] == 9, reply.text
            ok = client.post("/mj/submit/imagine", json={"prompt": "a short one"}).json()["result"]
            wait_for(lambda: client.get(f"/mj/task/{ok}/fetch").json()["progress"] == "46%")
            assert [route for route, _ in canned.calls if route.startswith("submit/")] == ["submit/imagine"] * 2
            # Its row names the provider it was sent to (the mark written as its submit left).
            assert relay.jobs() == [("FAILED", "unconfirmed", "released", "odd"), ("IN_PROGRESS", None, "held", "odd")]
            assert relay.balance() == (
                1000,
                sql(relay.config, "SELECT price FROM jobs WHERE state = 'IN_PROGRESS'")[0][0],
            )


def test_uploads_are_the_relays_links_and_come_back_as_reference_images(tmp_path: Path) -> None:
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-ref"}))
    with relay_before(canned, tmp_path) as (client, relay):
        uploaded = client.post("/mj/submit/upload-discord-images", json={"base64Array": [png(), png((1, 2, 3))]})
        links = uploaded.json()["result"]
        assert uploaded.json()["code"] == 1 and all(link.startswith(relay.base + "/files/up") for link in links)
        assert client.get(links[0]).headers["content-type"] == "image/png"
        assert [route for route, _ in canned.calls] == []  # no upstream saw the upload
        prompt = f"{links[0]} a cat with <{links[1]}> --ar 2:3 https://example.com/theirs.png"
        client.post("/mj/submit/imagine", json={"prompt": prompt})
        (sent,) = [body for route, body in canned.calls if route == "submit/imagine"]
        assert sent["prompt"] == "a cat with --ar 2:3 https://example.com/theirs.png --fast"
        assert len(sent["base64Array"]) == 2
        assert base64.b64decode(sent["base64Array"][0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        tampered = links[0].replace("sig=", "sig=x")
        client.post("/mj/submit/imagine", json={"prompt": f"{tampered} a dog"})
        assert [body for route, body in canned.calls if route == "submit/imagine"][-1]["base64Array"] == []


def test_a_final_prompt_never_shows_links_the_client_did_not_write(tmp_path: Path) -> None:
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-fp"}))
    with serve(_png_cdn()) as cdn:
        final = "<https://s.mj.run/AbC> <https://cdn.discordapp.com/attachments/1/2/x.png> a cat --v 6 --fast"
        done = task("u-fp", "SUCCESS", "100%", imageUrl=cdn + "/f.png", properties={"finalPrompt": final})
        canned.on("task/list-by-condition", (200, [done]))
        with relay_before(canned, tmp_path) as (client, _):
            task_id = client.post("/mj/submit/imagine", json={"prompt": "a cat --v 6"}).json()["result"]
            wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["status"] == "SUCCESS")
            shown = client.get(f"/mj/task/{task_id}/fetch").json()
            assert shown["promptEn"] == shown["properties"]["finalPrompt"] == "a cat --v 6 --fast"
            assert "discord" not in str(shown) and "mj.run" not in str(shown)


def test_one_keys_seed_reads_on_a_slow_upstream_hold_up_no_other_keys_jobs(tmp_path: Path) -> None:
    """midjourney-proxy answers `image-seed` only once Discord has (seconds): seed reads that waited there took
    every connection the provider's status reads go on, so another key's task stayed SUBMITTED behind them."""
    engine = SimEngine(SimSettings(**sim_settings()))
    upstream = build_sim_app(engine, "midjourney-proxy", SECRET)
    release, arrived = threading.Event(), []

    async def slow_seeds(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/image-seed"):
            arrived.append(scope["path"])
            await asyncio.to_thread(release.wait, 30)
        await upstream(scope, receive, send)

    with serve(slow_seeds) as base:
        provider = {"name": "p0", "dialect": "midjourney-proxy", "base_url": base, "secret": SECRET}
        config = relay_config(tmp_path, providers=[provider])
        with (
            running_relay(config) as relay,
            httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=60) as mine,
            httpx.Client(base_url=relay.base, headers={"mj-api-secret": create_key(config, 10, "b")}) as other,
            ThreadPoolExecutor(8) as pool,
        ):
            task_id = mine.post("/mj/submit/imagine", json={"prompt": "a cat"}).json()["result"]
            wait_for(lambda: mine.get(f"/mj/task/{task_id}/fetch").json()["status"] == "SUCCESS")
            seeds = [pool.submit(mine.get, f"/mj/task/{task_id}/image-seed") for _ in range(8)]
            try:
                wait_for(lambda: len(arrived) + sum(seed.done() for seed in seeds) >= 4)
                theirs = other.post("/mj/submit/imagine", json={"prompt": "a dog"}).json()["result"]
                wait_for(lambda: other.get(f"/mj/task/{theirs}/fetch").json()["status"] == "SUCCESS", 10)
            finally:
                release.set()
            replies = [seed.result() for seed in seeds]
            refused = [r for r in replies if r.status_code != 200]
            assert refused and all(r.status_code == 503 and r.json()["code"] == 23 for r in refused), refused
            assert all("retry-after" in r.headers for r in refused)
            assert all(r.json()["result"] for r in replies if r.status_code == 200)


class _nothing:
    def __enter__(self) -> str:
        return ""

    def __exit__(self, *args: object) -> None:
        return None


def test_a_keys_uploads_are_bounded_per_window_even_when_sent_at_once(tmp_path: Path) -> None:
    """Uploads are free and kept: a key may keep `api.uploads.max_images` a window, and a burst of uploads sent at
    once keeps no more; an upload then an imagine with its link still works, and another key is not held up."""
    uploads = {"max_images": 5, "window_s": 3600}
    with native(tmp_path, api={"uploads": uploads}) as world:
        (link,) = world.post("/submit/upload-discord-images", {"base64Array": [png()]}).json()["result"]
        task_id = world.submit("/submit/imagine", {"prompt": f"{link} a heron"})
        world.finished(task_id)
        with ThreadPoolExecutor(10) as pool:
            replies = list(
                pool.map(
                    lambda i: world.post("/submit/upload-discord-images", {"base64Array": [png((i, 0, 0))]}),
                    range(10),
                )
            )
        kept = [r for r in replies if r.status_code == 200]
        refused = [r for r in replies if r.status_code != 200]
        assert len(kept) == 4 and all(r.json()["code"] == 1 for r in kept)
        assert {(r.status_code, r.json()["code"], r.json()["result"]) for r in refused} == {(429, 23, None)}
        assert all(0 < int(r.headers["retry-after"]) <= 3600 for r in refused)
        stored = list(world.relay.config.images_dir().rglob("up*"))
        assert len(stored) == 5
        other = create_key(world.relay.config, name="other")
        reply = world.post("/submit/upload-discord-images", {"base64Array": [png()]}, headers={"mj-api-secret": other})
        assert reply.status_code == 200 and reply.json()["code"] == 1


def test_an_upload_refused_as_unkeepable_counts_nothing_against_the_keys_bound(tmp_path: Path) -> None:
    """An image that passes the check of its bytes but cannot be kept (a PNG of one pixel: too small to be a
    grid's tile or to be split) is refused with the upload, 400; the key kept nothing, so its bound is untouched
    and its next uploads may keep `api.uploads.max_images` images, as a key that sent nothing could. Images of the
    same request that were kept still count."""
    uploads = {"max_images": 5, "window_s": 3600}
    with native(tmp_path, api={"uploads": uploads}) as world:
        for _ in range(3):
            refused = world.post("/submit/upload-discord-images", {"base64Array": [png(size=1)]})
            assert (refused.status_code, refused.json()["code"]) == (400, 4), refused.text
        mixed = world.post("/submit/upload-discord-images", {"base64Array": [png(), png(size=1)]})
        assert (mixed.status_code, mixed.json()["code"]) == (400, 4), mixed.text  # its good image was kept
        kept = world.post("/submit/upload-discord-images", {"base64Array": [png((i, 0, 0)) for i in range(4)]})
        assert kept.status_code == 200 and len(kept.json()["result"]) == 4, kept.text
        over = world.post("/submit/upload-discord-images", {"base64Array": [png()]})
        assert (over.status_code, over.json()["code"]) == (429, 23), over.text
        assert len(list(world.relay.config.images_dir().rglob("up*"))) == 5
