"""The native API's rules: the mode rule and its price, tenant isolation, refusals that hold nothing, MODAL
expiry, and client hooks (signed, in order, never holding a job up)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.api.native_helpers import Native, native, png
from tests.helpers import Receiver, create_key, png_chunk, png_start, serve, sql, wait_for

PRICES = {"mj-fast": {"default": 2}, "mj-relax": {"default": 1}, "mj-turbo": {"default": 4}}


def test_the_mode_rule_decides_mode_and_price(tmp_path: Path) -> None:
    cases = [
        ("/mj-relax/mj", {"prompt": "a fox --turbo", "model": "mj-fast"}, "relax"),  # the path wins
        ("/mj", {"prompt": "a fox --turbo", "model": "mj-relax", "accountFilter": {"modes": ["FAST"]}}, "relax"),
        ("/mj", {"prompt": "a fox --relax", "accountFilter": {"modes": ["TURBO"]}}, "turbo"),
        ("/v1/mj", {"prompt": "a fox --relax"}, "relax"),
        ("/mj", {"prompt": "a fox"}, "fast"),
        # Midjourney reads an em dash (as Apple keyboards turn `--` into) as `--`: such a flag is read and replaced
        ("/mj", {"prompt": "a fox \u2014turbo", "model": "mj-relax"}, "relax"),
        ("/mj", {"prompt": "a fox \u2014relax"}, "relax"),
        ("/mj", {"prompt": "a fox \u2013turbo"}, "turbo"),
    ]
    with native(tmp_path, prices=PRICES) as world:
        for prefix, body, mode in cases:
            task_id = world.submit("/submit/imagine", body, prefix=prefix)
            job = world.job(task_id)
            assert (job["mode"], job["price"]) == (mode, PRICES[f"mj-{mode}"]["default"]), (prefix, body)
            task = world.fetch(task_id)
            assert task["mode"] == mode.upper() and task["prompt"].endswith(f"--{mode}"), task["prompt"]
            assert task["prompt"].count("--") == 1  # the flags the client wrote were replaced by the mode sent
            assert "\u2014" not in task["prompt"] and "\u2013" not in task["prompt"], task["prompt"]
        relaxed = world.finished(world.submit("/submit/imagine", {"prompt": "a fox"}, prefix="/mj-relax/mj"))
        follow = world.submit(
            "/submit/action", {"taskId": relaxed["id"], "customId": world.button(relaxed, "upsample::1")}
        )
        assert world.job(follow)["mode"] == "relax"  # a follow-up runs in its parent's mode unless told otherwise
        turbo = world.submit(
            "/submit/action",
            {"taskId": relaxed["id"], "customId": world.button(relaxed, "upsample::2")},
            prefix="/mj-turbo/mj",
        )
        assert world.job(turbo)["mode"] == "turbo"
        bad = world.post("/submit/imagine", {"prompt": "a fox", "model": "dall-e-3"})
        assert bad.status_code == 400 and bad.json()["code"] == 4, bad.text
        # each name once: the configured models are the mj-{mode} names here, as in the example configuration
        assert bad.json()["description"].endswith("use one of mj-fast, mj-relax, mj-turbo."), bad.text


def test_another_keys_tasks_and_made_up_ids_are_not_found_and_hold_nothing(tmp_path: Path) -> None:
    with native(tmp_path, sim={"fast_s": 0.05}) as world:
        other = create_key(world.relay.config, 1000, name="other")
        theirs = httpx.Client(base_url=world.relay.base, headers={"Authorization": f"Bearer {other}"}, timeout=30)
        with theirs:
            their_ids = []
            for index in range(100):
                reply = theirs.post("/mj/submit/imagine", json={"prompt": f"their picture {index}"})
                assert reply.status_code == 200, reply.text
                their_ids.append(str(reply.json()["result"]))
            wait_for(
                lambda: all(
                    t["status"] == "SUCCESS"
                    for t in theirs.post("/mj/task/list-by-condition", json={"ids": their_ids}).json()
                ),
                30,
            )
        made_up = [str(10**17 + secrets.randbelow(9 * 10**17)) for _ in range(100)]
        button = "MJ::JOB::upsample::1::00000000-0000-0000-0000-000000000000"
        for task_id in their_ids + made_up:
            for reply in (
                world.client.get(f"/mj/task/{task_id}/fetch"),
                world.client.get(f"/mj/task/{task_id}/image-seed"),
                world.post("/submit/action", {"taskId": task_id, "customId": button}),
                world.post("/submit/modal", {"taskId": task_id, "prompt": "x"}),
            ):
                assert reply.status_code == 404 and reply.json()["code"] == 3, (task_id, reply.text)
        assert world.client.post("/mj/task/list-by-condition", json={"ids": their_ids + made_up}).json() == []
        assert world.client.post("/mj/task/list-by-condition", json={}).json() == []
        assert world.relay.balance() == (1000, 0)
        assert sql(
            world.relay.config, "SELECT count(*) FROM jobs WHERE key_id = (SELECT id FROM keys WHERE name = 'test')"
        ) == [(0,)]


def test_refused_requests_hold_nothing(tmp_path: Path) -> None:
    with native(tmp_path) as world:
        task = world.finished(world.submit("/submit/imagine", {"prompt": "a parent"}))
        before = world.relay.balance()
        refusals = [
            ("/submit/imagine", {"prompt": "--fast --ar 2:3"}, 400, 4),
            ("/submit/imagine", {"prompt": "a cat", "base64Array": ["not an image"]}, 400, 4),
            ("/submit/imagine", {"prompt": "a cat", "notifyHook": "http://127.0.0.1:9/hook"}, 400, 4),
            ("/submit/imagine", {"prompt": "a cat", "notifyHook": "ftp://example.com/x"}, 400, 4),
            ("/submit/imagine", {"prompt": "a forbidden cat"}, 400, 24),
            ("/submit/blend", {"base64Array": [png()]}, 400, 4),
            ("/submit/describe", {"base64": "aGVsbG8="}, 400, 4),
            ("/submit/action", {"taskId": task["id"], "customId": "MJ::JOB::animate_high::1::x::SOLO"}, 400, 4),
            ("/submit/action", {"taskId": task["id"], "customId": "MJ::JOB::upsample::9::nothere"}, 400, 4),
            ("/submit/modal", {"taskId": task["id"], "prompt": "x"}, 400, 4),
            ("/submit/action", {"taskId": True, "customId": "x"}, 400, 4),
        ]
        for path, body, status, code in refusals:
            reply = world.post(path, body)
            assert (reply.status_code, reply.json()["code"]) == (status, code), (path, body, reply.text)
        assert world.relay.balance() == before
        assert world.relay.jobs()[-1][1] == "banned"  # the banned prompt was tried upstream and released


def test_a_modal_nobody_confirms_ends_at_its_timeout_and_releases(tmp_path: Path) -> None:
    with native(tmp_path, jobs={"poll_interval_s": 0.05, "modal_timeout_s": 0.5}) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a parent"}))
        upscale = world.finished(
            world.submit("/submit/action", {"taskId": grid["id"], "customId": world.button(grid, "upsample::3")})
        )
        region = world.submit("/submit/action", {"taskId": upscale["id"], "customId": world.button(upscale, "Inpaint")})
        ended = world.finished(region, "FAILURE")
        assert "confirm" in ended["failReason"]
        assert world.job(region)["hold_state"] == "released"
        assert world.relay.balance()[1] == 0


def test_client_hooks_arrive_signed_in_order_and_a_failing_receiver_stalls_nothing(tmp_path: Path) -> None:
    receiver = Receiver()
    sections = {"api": {"references": {"allow_private": True}}, "hooks": {"attempts": 3, "backoff_s": 0.05}}
    with serve(receiver.app()) as hooks, native(tmp_path, sim={"fast_s": 1.0}, **sections) as world:
        good = world.submit("/submit/imagine", {"prompt": "a hooked fox", "notifyHook": hooks + "/ok", "state": "s1"})
        bad = world.submit("/submit/imagine", {"prompt": "a hooked owl", "notifyHook": hooks + "/fail"})
        world.finished(good)
        world.finished(bad)  # not held up by its failing receiver
        wait_for(lambda: any(t["status"] == "SUCCESS" for t in receiver.tasks(good)))
        wait_for(lambda: any(json.loads(b)["status"] == "SUCCESS" for b in receiver.failed[-3:]))
        (secret,) = sql(world.relay.config, "SELECT hook_secret FROM keys WHERE name = 'test'")[0]
        with receiver.lock:
            deliveries = list(receiver.deliveries)
        for headers, body in deliveries:
            expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-mj-relay-signature"], expected)
        seen = receiver.tasks(good)
        order = {"NOT_START": 0, "SUBMITTED": 1, "IN_PROGRESS": 2, "SUCCESS": 3}
        steps = [(order[t["status"]], int(t["progress"].rstrip("%") or 0)) for t in seen]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)  # in order, each change once
        assert seen[-1]["status"] == "SUCCESS" and seen[-1]["state"] == "s1" and "/files/" in seen[-1]["imageUrl"]
        assert len(seen) >= 3  # submitted, progress, success
        wait_for(lambda: len(receiver.failed) % 3 == 0)
        with receiver.lock:
            tries: dict[bytes, int] = {}
            for body in receiver.failed:
                tries[body] = tries.get(body, 0) + 1
        assert set(tries.values()) == {3}  # each update tried three times, then given up, and the next one sent


def test_a_receiver_that_never_answers_holds_up_no_other_keys_hooks(tmp_path: Path) -> None:
    arrivals: list[float] = []

    async def hang(request: Request) -> Response:
        await asyncio.sleep(30)  # a receiver that takes the connection and never answers
        return Response(status_code=204)

    async def ok(request: Request) -> Response:
        arrivals.append(time.monotonic())
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hang", hang, methods=["POST"]), Route("/ok", ok, methods=["POST"])])
    hooks = {"timeout_s": 3, "attempts": 1, "max_concurrent": 2, "max_concurrent_per_key": 1}
    sections = {"api": {"references": {"allow_private": True}}, "hooks": hooks}
    with serve(app) as receiver, native(tmp_path, sim={"fast_s": 0.5}, **sections) as world:
        for index in range(3):
            world.submit("/submit/imagine", {"prompt": f"slow hook {index}", "notifyHook": receiver + "/hang"})
        other = create_key(world.relay.config, 100, name="other")
        sent_at = time.monotonic()
        reply = httpx.post(
            world.relay.base + "/mj/submit/imagine",
            json={"prompt": "a quick hook", "notifyHook": receiver + "/ok"},
            headers={"mj-api-secret": other},
        )
        assert reply.json()["code"] == 1
        wait_for(lambda: bool(arrivals), timeout=10)
        # Its first update came long before the hanging receiver's first try could time out (3 s).
        assert arrivals[0] - sent_at < 1.5


def test_a_key_has_a_bounded_number_of_hooked_tasks_under_way(tmp_path: Path) -> None:
    sections = {"api": {"references": {"allow_private": True}}, "hooks": {"max_watched_per_key": 2}}
    with native(tmp_path, sim={"fast_s": 5}, **sections) as world:
        for index in range(2):
            world.submit("/submit/imagine", {"prompt": f"hooked {index}", "notifyHook": "http://127.0.0.1:9/h"})
        third = world.post("/submit/imagine", {"prompt": "one too many", "notifyHook": "http://127.0.0.1:9/h"})
        assert third.status_code == 400 and "notifyHook" in third.json()["description"]
        assert world.post("/submit/imagine", {"prompt": "no hook"}).json()["code"] == 1


def test_a_burst_of_hooked_submissions_cannot_pass_the_bound(tmp_path: Path) -> None:
    """Twelve at once: each was checked against the count of tasks already watched, which rose only once each was
    admitted, so all twelve passed a bound of two."""
    sections = {"api": {"references": {"allow_private": True}}, "hooks": {"max_watched_per_key": 2}}
    with native(tmp_path, sim={"fast_s": 5}, **sections) as world:

        def submit(index: int) -> httpx.Response:
            return world.post("/submit/imagine", {"prompt": f"hooked {index}", "notifyHook": "http://127.0.0.1:9/h"})

        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(submit, range(12)))
        taken = [r for r in replies if r.status_code == 200 and r.json()["code"] == 1]
        refused = [r for r in replies if r.status_code == 400 and "notifyHook" in r.json()["description"]]
        assert (len(taken), len(refused)) == (2, 10), [r.text for r in replies]


def test_hooked_submissions_refused_at_admission_give_their_places_back(tmp_path: Path) -> None:
    sections = {"api": {"references": {"allow_private": True}}, "hooks": {"max_watched_per_key": 2}}
    with native(tmp_path, quota=3, sim={"fast_s": 5}, prices=PRICES, **sections) as world:
        hooked = {"notifyHook": "http://127.0.0.1:9/h"}
        assert world.post("/submit/imagine", {"prompt": "fast, 2 of 3 credits", **hooked}).json()["code"] == 1
        for index in range(3):  # 1 credit left: refused for want of credits, after their places were taken
            reply = world.post("/submit/imagine", {"prompt": f"fast {index}", **hooked})
            assert reply.status_code == 429, reply.text
        reply = world.post("/submit/imagine", {"prompt": "relax, the last credit", **hooked}, prefix="/mj-relax/mj")
        assert reply.json()["code"] == 1, reply.text  # the second place of two is free


def test_a_malformed_url_is_a_400_not_a_500(tmp_path: Path) -> None:
    with native(tmp_path) as world:
        for url in ("http://[::1", "http://[::1]:99999/x", "http://exa mple.com/x", "https://"):
            reply = world.post("/submit/imagine", {"prompt": "a cat", "notifyHook": url})
            assert reply.status_code == 400 and reply.json()["code"] == 4, (url, reply.text)
            chat = httpx.post(
                world.relay.base + "/v1/chat/completions",
                json={
                    "model": "mj-fast",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "a cat"},
                                {"type": "image_url", "image_url": {"url": url}},
                            ],
                        }
                    ],
                },
                headers={"Authorization": f"Bearer {world.relay.key}"},
            )
            assert chat.status_code == 400 and chat.json()["error"]["code"] == "invalid_image", (url, chat.text)
        assert world.relay.balance() == (1000, 0)


def _png_without_pixels() -> str:
    """A PNG with its header and end marker but no image data: Pillow's check of it raised IndexError."""
    data = png_start(8, 8) + png_chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_an_image_without_pixels_is_a_400_on_every_image_field_not_a_500(tmp_path: Path) -> None:
    bad = _png_without_pixels()
    content = [{"type": "text", "text": "a cat"}, {"type": "image_url", "image_url": {"url": bad}}]
    bodies = [
        ("/submit/imagine", {"prompt": "a cat", "base64Array": [bad]}),
        ("/submit/blend", {"base64Array": [png(), bad]}),
        ("/submit/describe", {"base64": bad}),
        ("/insight-face/swap", {"sourceBase64": png(), "targetBase64": bad}),
        ("/submit/upload-discord-images", {"base64Array": [bad]}),
    ]
    with native(tmp_path) as world:
        for path, body in bodies:
            reply = world.post(path, body)
            assert reply.status_code == 400 and reply.json()["code"] == 4, (path, reply.text)
            assert "not a readable image" in reply.json()["description"], (path, reply.text)
        chat = httpx.post(
            world.relay.base + "/v1/chat/completions",
            json={"model": "mj-fast", "messages": [{"role": "user", "content": content}]},
            headers={"Authorization": f"Bearer {world.relay.key}"},
        )
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "invalid_image", chat.text
        assert world.relay.balance() == (1000, 0) and world.relay.jobs() == []


def test_imagine_all_is_refused_and_holds_nothing(tmp_path: Path) -> None:
    """A describe's "Imagine all" makes four grids upstream under one id joined from four: priced as one imagine
    and followed as one task, the key would get four grids for one and the job would end lost."""
    imagine_all = "MJ::Job::PicReader::all"
    with native(tmp_path, "midjourney-proxy") as world:
        described = world.finished(world.submit("/submit/describe", {"base64": png()}))
        assert imagine_all in {b["customId"] for b in described["buttons"]}
        before, made = world.relay.balance(), len(world.engines[0]._tasks)
        reply = world.post("/submit/action", {"taskId": described["id"], "customId": imagine_all})
        assert (reply.status_code, reply.json()["code"]) == (400, 4), reply.text
        assert world.relay.balance() == before and len(world.engines[0]._tasks) == made
        one = world.submit("/submit/action", {"taskId": described["id"], "customId": "MJ::Job::PicReader::2"})
        assert world.job(one)["action"] == "imagine"  # a numbered prompt is one imagine, as before


def relax_variation_in_modal(world: Native) -> str:
    """A grid made at relax, and its first variation pressed: the upstream (remix on) waits in MODAL for its
    prompt. The variation's task id."""
    grid = world.finished(world.submit("/submit/imagine", {"prompt": "a cat"}, prefix="/mj-relax/mj"))
    pressed = world.post(
        "/submit/action",
        {"taskId": grid["id"], "customId": world.button(grid, "variation::1")},
        prefix="/mj-relax/mj",
    )
    assert pressed.json()["code"] == 21, pressed.text
    variation = str(pressed.json()["result"])
    world.reached(variation, "MODAL")
    return variation


def test_a_modal_prompt_runs_in_the_mode_its_task_was_held_at(tmp_path: Path) -> None:
    """A remix confirmation's prompt cannot switch a variation held at relax's price to turbo: its mode flag is
    replaced by the job's own, as for every prompt sent upstream."""
    with native(tmp_path, "midjourney-proxy", sim={"remix": True}, prices=PRICES) as world:
        variation = relax_variation_in_modal(world)
        assert world.relay.balance() == (1000 - 1, 1)  # the grid charged, the variation held: relax, 1 each
        confirmed = world.post("/submit/modal", {"taskId": variation, "prompt": "a cat in the rain --turbo"})
        assert confirmed.json()["code"] == 1, confirmed.text
        world.finished(variation)
        assert world.relay.balance() == (1000 - 2, 0)
        ((mode, prompt),) = sql(world.relay.config, "SELECT mode, prompt FROM jobs WHERE id = ?", variation)
        sent = [t.prompt for t in world.engines[0]._tasks.values() if t.prompt.startswith("a cat in the rain")]
        assert mode == "relax" and sent and all(p.endswith("--relax") and "--turbo" not in p for p in [prompt, *sent])


def test_a_follow_up_in_a_mode_its_provider_does_not_serve_is_refused(tmp_path: Path) -> None:
    """Follow-ups run on their parent's provider: a relax one there, held at relax's price, would run in the only
    mode that provider's account serves."""
    modes = [{"modes": ["fast"]}, {"modes": ["relax", "turbo"]}]
    with native(tmp_path, "midjourney-proxy", providers=2, provider_settings=modes, prices=PRICES) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a cat"}))
        assert world.job(grid["id"])["provider"] == "p0"
        before, made = world.relay.balance(), sum(len(engine._tasks) for engine in world.engines)
        custom = world.button(grid, "variation::1")
        reply = world.post("/submit/action", {"taskId": grid["id"], "customId": custom}, prefix="/mj-relax/mj")
        assert (reply.status_code, reply.json()["code"]) == (400, 4) and "relax" in reply.json()["description"]
        assert world.relay.balance() == before and sum(len(engine._tasks) for engine in world.engines) == made
        assert world.job(world.submit("/submit/action", {"taskId": grid["id"], "customId": custom}))["mode"] == "fast"


def test_a_follow_up_of_a_task_whose_provider_is_gone_is_refused_and_starts_no_task(tmp_path: Path) -> None:
    """A provider taken out of the configuration (removed, renamed) is not brought back by a retry of its task's
    button: the press was held, failed as "no provider could take it; try again shortly" (a 503 with Retry-After,
    retried for ever) and left a FAILURE task, unknown to the client, in its list and at its hook."""
    receiver = Receiver()
    sections = {"api": {"references": {"allow_private": True}}}
    with serve(receiver.app()) as hooks, native(tmp_path, prices=PRICES, **sections) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a cat"}))
        sql(world.relay.config, "UPDATE jobs SET provider = 'retired' WHERE id = ?", grid["id"])
        before = world.relay.balance()
        body = {"taskId": grid["id"], "customId": world.button(grid, "upsample::1"), "notifyHook": hooks + "/ok"}
        reply = world.post("/submit/action", body)
        assert (reply.status_code, reply.json()["code"]) == (400, 4), reply.text
        assert "no longer configured" in reply.json()["description"]
        assert reply.headers.get("x-should-retry") == "false" and "retry-after" not in reply.headers
        assert world.relay.balance() == before
        assert [t["id"] for t in world.client.post("/mj/task/list-by-condition", json={}).json()] == [grid["id"]]
        time.sleep(0.5)
        assert receiver.deliveries == []


def test_a_confirmation_of_a_task_whose_provider_is_gone_is_refused_not_an_internal_error(tmp_path: Path) -> None:
    """The provider that parked the task is the only one that can run its confirmation: looking it up in the
    configuration failed (a KeyError, a 500 "internal error") once it was taken out of it."""
    with native(tmp_path, prices=PRICES) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a cat"}))
        upscale = world.finished(
            world.submit("/submit/action", {"taskId": grid["id"], "customId": world.button(grid, "upsample::1")})
        )
        region = world.submit("/submit/action", {"taskId": upscale["id"], "customId": world.button(upscale, "Inpaint")})
        world.reached(region, "MODAL")
        sql(world.relay.config, "UPDATE jobs SET provider = 'retired' WHERE id = ?", region)
        confirmation = {"taskId": region, "prompt": "a red boat", "maskBase64": png()}
        reply = world.post("/submit/modal", confirmation)
        assert (reply.status_code, reply.json()["code"]) == (400, 4), reply.text
        assert "no longer configured" in reply.json()["description"]
        sql(world.relay.config, "UPDATE jobs SET provider = 'p0' WHERE id = ?", region)  # confirmable again
        assert world.post("/submit/modal", confirmation).json()["code"] == 1
        world.finished(region)


def test_an_imagine_with_more_reference_images_than_the_relay_takes_is_refused_links_or_not(tmp_path: Path) -> None:
    """`api.references.max_count` bounds an imagine's reference images, as it bounds a chat message's: those in
    `base64Array` count whether or not the prompt carries one of the relay's own image links, which count too."""
    with native(tmp_path, api={"references": {"max_count": 2}}) as world:
        before = world.relay.balance()
        (link,) = world.post("/submit/upload-discord-images", {"base64Array": [png()]}).json()["result"]
        for prompt, images in ((f"{link} a cat", 2), ("a cat", 3), ("a cat", 5)):
            body = {"prompt": prompt, "base64Array": [png((i, 0, 0)) for i in range(images)]}
            reply = world.post("/submit/imagine", body)
            assert (reply.status_code, reply.json()["code"]) == (400, 4), (prompt, images, reply.text)
            assert "At most 2 reference images" in reply.json()["description"]
        assert world.relay.balance() == before and world.relay.jobs() == []
        world.finished(world.submit("/submit/imagine", {"prompt": "a cat", "base64Array": [png(), png((1, 2, 3))]}))


def test_a_confirmation_with_an_empty_mask_as_the_seed_documents_send_it_is_no_mask(tmp_path: Path) -> None:
    """Midjourney-proxy clients send every field of `submit/modal`, `"maskBase64": ""` when there is no mask (the
    seed documents' own example): a Custom Zoom confirmed so runs, as midjourney-proxy runs it, rather than being
    refused as a bad image."""
    with native(tmp_path, "midjourney-proxy", prices=PRICES) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a cat"}))
        upscale = world.finished(
            world.submit("/submit/action", {"taskId": grid["id"], "customId": world.button(grid, "upsample::1")})
        )
        pressed = world.post(
            "/submit/action", {"taskId": upscale["id"], "customId": world.button(upscale, "CustomZoom")}
        )
        assert pressed.json()["code"] == 21, pressed.text
        zoom = str(pressed.json()["result"])
        world.reached(zoom, "MODAL")
        confirmed = world.post("/submit/modal", {"maskBase64": "", "prompt": "a cat --zoom 1.5", "taskId": zoom})
        assert confirmed.status_code == 200 and confirmed.json()["code"] == 1, confirmed.text
        world.finished(zoom)
        assert world.relay.balance() == (1000 - 3 * 2, 0)


def test_an_id_that_cannot_be_a_task_is_left_out_of_a_list_not_failing_its_neighbours(tmp_path: Path) -> None:
    """`list-by-condition` leaves out ids it has no task of, as midjourney-proxy does and as `fetch` answers such
    an id (404): a blank one (a client's task whose submit failed), one longer than any task id, one with a NUL.
    The tasks beside them are still read, rather than the whole poll being a 400."""
    with native(tmp_path, sim={"fast_s": 0.05}) as world:
        task_id = world.submit("/submit/imagine", {"prompt": "a neighbour"})
        for odd in ("", "   ", "9" * 65, "12\u0000"):
            fetched = world.client.get(f"/mj/task/{quote(odd) if odd.strip() else '%20'}/fetch")
            assert fetched.status_code == 404 and fetched.json()["code"] == 3, (odd, fetched.text)
            listed = world.client.post("/mj/task/list-by-condition", json={"ids": [odd, task_id, int(task_id)]})
            assert listed.status_code == 200, (odd, listed.text)
            assert [task["id"] for task in listed.json()] == [task_id]
        for wrong in ([True], [{"id": task_id}], "not a list"):  # not ids at all: still a bad request
            refused = world.client.post("/mj/task/list-by-condition", json={"ids": wrong})
            assert (refused.status_code, refused.json()["code"]) == (400, 4), (wrong, refused.text)


def test_a_modal_prompt_without_a_mode_flag_still_runs_in_the_mode_its_task_was_held_at(tmp_path: Path) -> None:
    """A remix prompt replaces the whole prompt upstream, and a confirmation carries no `accountFilter`: without a
    mode flag, a variation held at relax's price would run in whatever mode the account is set to (fast, say). The
    job's own mode is written into it, as into every prompt the relay sends."""
    with native(tmp_path, "midjourney-proxy", sim={"remix": True}, prices=PRICES) as world:
        variation = relax_variation_in_modal(world)
        confirmed = world.post("/submit/modal", {"taskId": variation, "prompt": "a cat in the rain"})
        assert confirmed.json()["code"] == 1, confirmed.text
        world.finished(variation)
        assert world.relay.balance() == (1000 - 2, 0)
        ((prompt,),) = sql(world.relay.config, "SELECT prompt FROM jobs WHERE id = ?", variation)
        sent = [t.prompt for t in world.engines[0]._tasks.values() if t.prompt.startswith("a cat in the rain")]
        assert sent and all(p == "a cat in the rain --relax" for p in [prompt, *sent]), (prompt, sent)


def test_an_optional_list_or_choice_sent_as_null_is_taken_as_not_given(tmp_path: Path) -> None:
    """Clients send every field of their request type, and one with nothing in it as null: a Go client's nil slice
    is `null` (`"base64Array": null` for a prompt without images), a Java client's unset list or enum is too, and a
    Go client's unset string is `""` (`"botType": ""`). midjourney-proxy reads such a field as not given; they were
    refused as not being a list or a choice."""
    with native(tmp_path, prices=PRICES) as world:
        bodies = [
            ("/submit/imagine", {"prompt": "a fox", "base64Array": None, "accountFilter": {"modes": None}}),
            ("/submit/imagine", {"prompt": "a fox", "botType": "", "base64Array": [], "state": ""}),
            ("/submit/blend", {"base64Array": [png(), png((0, 90, 200))], "dimensions": None}),
            ("/submit/blend", {"base64Array": [png(), png((0, 90, 200))], "dimensions": "", "botType": None}),
        ]
        for path, body in bodies:
            reply = world.post(path, body)
            assert reply.status_code == 200 and reply.json()["code"] == 1, (path, reply.text)
            task = world.finished(str(reply.json()["result"]))
            assert (task["mode"], task["botType"]) == ("FAST", "MID_JOURNEY"), task
        for path, body in (  # not a list or a choice at all: still refused, holding nothing
            ("/submit/imagine", {"prompt": "a fox", "base64Array": "abc"}),
            ("/submit/imagine", {"prompt": "a fox", "accountFilter": {"modes": "RELAX"}}),
            ("/submit/blend", {"base64Array": [png(), png()], "dimensions": "WIDE"}),
            ("/submit/imagine", {"prompt": "a fox", "botType": "DALL_E"}),
        ):
            reply = world.post(path, body)
            assert (reply.status_code, reply.json()["code"]) == (400, 4), (path, reply.text)
        assert world.relay.balance() == (1000 - 4 * 2, 0)


def test_a_text_field_out_of_its_bounds_is_told_in_characters(tmp_path: Path) -> None:
    """The seed documents' examples carry `"base64": ""` and `"sourceBase64": ""` for the client to fill in; sent as
    they are, or with a `state` over its bound, the answer spoke of "items after validation", as if of a list."""
    with native(tmp_path) as world:
        cases = [
            ("/submit/describe", {"base64": ""}, "'base64': String should have at least 1 character"),
            ("/insight-face/swap", {"sourceBase64": "", "targetBase64": png()}, "at least 1 character"),
            ("/submit/imagine", {"prompt": "a fox", "base64Array": [""]}, "at least 1 character"),
            ("/submit/imagine", {"prompt": "a fox", "state": "s" * 4097}, "at most 4096 characters"),
            ("/submit/imagine", {"prompt": "a fox", "model": "m" * 65}, "at most 64 characters"),
            ("/submit/imagine", {"prompt": "a fox", "accountFilter": {"modes": ["F" * 17]}}, "at most 16 characters"),
            ("/submit/action", {"taskId": "1", "customId": ""}, "'customId': String should have at least 1 character"),
            ("/submit/action", {"taskId": "1", "customId": "c" * 201}, "at most 200 characters"),
        ]
        for path, body, says in cases:
            reply = world.post(path, body)
            assert (reply.status_code, reply.json()["code"]) == (400, 4), (path, reply.text)
            assert says in reply.json()["description"] and "item" not in reply.json()["description"], reply.text
        assert world.relay.balance() == (1000, 0) and world.relay.jobs() == []


def test_a_list_of_more_ids_than_one_read_takes_is_answered_whole(tmp_path: Path) -> None:
    """New API polls every unfinished task of a channel in one `list-by-condition`, with no bound on the ids, and
    leaves all of them unchanged when the answer is not a 200 (a task it is not answered about never times out
    either). Past 500 ids the whole poll was a 400: once a busy reseller had that many tasks under way, none of its
    tasks ever changed again. Every id is read, as many reads as it takes."""
    with native(tmp_path, sim={"fast_s": 0.05}) as world:
        mine = [world.submit("/submit/imagine", {"prompt": f"a fox {index}"}) for index in range(3)]
        made_up = [str(10**15 + index) for index in range(1200)]
        ids = made_up[:400] + [mine[0]] + made_up[400:900] + [int(mine[1])] + made_up[900:] + [mine[2], mine[0]]
        reply = world.client.post("/mj/task/list-by-condition", json={"ids": ids})
        assert reply.status_code == 200, reply.text[:300]
        assert [task["id"] for task in reply.json()] == mine[::-1]  # newest first, each once


def test_a_native_route_the_relay_does_not_serve_is_no_code_3_that_new_api_reads_as_a_dead_channel(
    tmp_path: Path,
) -> None:
    # New API forwards every `/mj/submit/...` it routes (`edits`, `video`, ...) to its upstream, and disables the
    # channel on a submit answered with code 3 (midjourney-proxy's "no account instance").
    with native(tmp_path) as world:
        for path in ("/submit/edits", "/submit/video", "/submit/nope"):
            reply = world.post(path, {"prompt": "a fox", "taskId": "1234567890"})
            assert reply.status_code == 404, reply.text
            assert reply.json()["code"] == 4 and reply.json()["result"] is None, reply.text
        unknown = world.post("/submit/action", {"taskId": "1234567890", "customId": "MJ::JOB::upsample::1::x"})
        assert unknown.status_code == 404 and unknown.json()["code"] == 3, unknown.text  # an unknown task stays 3


def test_the_open_source_change_and_simple_change_press_the_grids_buttons(tmp_path: Path) -> None:
    # novicezk/midjourney-proxy's open-source API has no `submit/action`: its clients (and New API, which routes
    # both) upscale, vary and reroll through `submit/change` and `submit/simple-change`.
    with native(tmp_path, prices=PRICES) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a fox"}))
        upscale_id = world.submit(
            "/submit/change", {"taskId": grid["id"], "action": "UPSCALE", "index": 2, "state": "u2"}
        )
        upscale = world.finished(upscale_id)
        assert (upscale["action"], upscale["parentId"], upscale["state"]) == ("UPSCALE", grid["id"], "u2")
        assert world.job(upscale_id)["price"] == PRICES["mj-fast"]["default"]
        variation = world.finished(world.submit("/submit/simple-change", {"content": f"{grid['id']} V3"}))
        assert (variation["action"], variation["parentId"]) == ("VARIATION", grid["id"])
        reroll = world.finished(world.submit("/submit/change", {"taskId": grid["id"], "action": "REROLL"}))
        assert (reroll["action"], reroll["parentId"]) == ("REROLL", grid["id"])
        before = world.relay.balance()
        refused = [
            ("/submit/change", {"taskId": grid["id"], "action": "UPSCALE", "index": 5}),
            ("/submit/change", {"taskId": upscale_id, "action": "UPSCALE", "index": 1}),  # an upscale has no U1
            ("/submit/change", {"taskId": grid["id"], "action": "ZOOM", "index": 1}),
            ("/submit/simple-change", {"content": f"{grid['id']} X1"}),
            ("/submit/simple-change", {"content": grid["id"]}),
        ]
        for path, body in refused:
            reply = world.post(path, body)
            assert reply.status_code == 400 and reply.json()["code"] == 4, (body, reply.text)
        unknown = world.post("/submit/simple-change", {"content": "1234567890 U1"})
        assert unknown.status_code == 404 and unknown.json()["code"] == 3, unknown.text
        assert world.relay.balance() == before  # nothing held for a refused change


def test_a_placeholder_bearer_midjourney_proxy_beside_mj_api_secret_is_no_key(tmp_path: Path) -> None:
    # New API's midjourney forks call their upstream with `Authorization: Bearer midjourney-proxy` and the channel
    # key in `mj-api-secret` (submits and the list-by-condition poll alike); New API itself reads such an
    # Authorization as none and takes `mj-api-secret`.
    with native(tmp_path) as world:
        for authorization in ("Bearer midjourney-proxy", "midjourney-proxy"):
            headers = {"Authorization": authorization, "mj-api-secret": world.relay.key}
            with httpx.Client(base_url=world.relay.base, headers=headers, timeout=30) as client:
                reply = client.post("/mj/submit/imagine", json={"prompt": "a fox"})
                assert reply.status_code == 200 and reply.json()["code"] == 1, reply.text
                polled = client.post("/mj/task/list-by-condition", json={"ids": [reply.json()["result"]]})
                assert polled.status_code == 200 and len(polled.json()) == 1, polled.text
        alone = httpx.get(f"{world.relay.base}/mj/task/1/fetch", headers={"Authorization": "Bearer midjourney-proxy"})
        assert alone.status_code == 401 and alone.json()["code"] == 4, alone.text
        wrong = world.client.get("/mj/task/1/fetch", headers={"Authorization": "Bearer sk-mjr-nope"})
        assert wrong.status_code == 401, wrong.text  # any other bearer is still the key presented


def test_an_imagine_s_single_base64_is_a_reference_image_as_midjourney_proxy_reads_it(tmp_path: Path) -> None:
    """midjourney-proxy's imagine still takes the first API's one reference image, `base64`, and adds it to
    `base64Array`: a client that sends it gets its image used (or refused), never an imagine run and charged
    without it."""
    with native(tmp_path, api={"references": {"max_count": 2}}) as world:
        before = world.relay.balance()
        refused = [
            {"prompt": "a cat", "base64": "not an image"},
            {"prompt": "a cat", "base64Array": [png(), png((1, 2, 3))], "base64": png((4, 5, 6))},
        ]
        for body in refused:
            reply = world.post("/submit/imagine", body)
            assert (reply.status_code, reply.json()["code"]) == (400, 4), reply.text
        assert world.relay.balance() == before and world.relay.jobs() == []
        world.finished(world.submit("/submit/imagine", {"prompt": "a cat", "base64": png(), "base64Array": None}))
        world.finished(world.submit("/submit/imagine", {"prompt": "a dog", "base64": ""}))  # blank: none given
