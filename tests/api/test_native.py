"""The native Midjourney-proxy API behind relay keys, against the simulator in every dialect (over HTTP, and in
process): every endpoint, follow-ups on their parent's provider, modal confirmations, and each step's price."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.api.native_helpers import DIALECTS, Native, native, png
from tests.helpers import pg_database_sync

PRICES = {
    "mj-fast": {
        "imagine": 5,
        "upscale": 2,
        "zoom": 3,
        "vary_region": 4,
        "blend": 6,
        "describe": 1,
        "shorten": 1,
        "swap_face": 7,
        "variation": 5,
        "default": 5,
    },
    "mj-relax": {"default": 1},
    "mj-turbo": {"default": 9},
}


@pytest.fixture(params=DIALECTS)
def world(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    with native(tmp_path, request.param, providers=2, prices=PRICES) as running:
        yield running


def spent(world: Native) -> int:
    balance, held = world.relay.balance()
    assert held == 0
    return 1000 - balance


def test_imagine_then_u2_then_zoom_out_each_billed_at_its_price_on_the_parents_provider(world: Native) -> None:
    grid_id = world.submit("/submit/imagine", {"prompt": "a lighthouse", "state": "mine"})
    grid = world.finished(grid_id)
    assert grid["action"] == "IMAGINE" and grid["state"] == "mine" and grid["progress"] == "100%"
    assert "/files/" + grid_id + "/grid.png" in grid["imageUrl"]
    assert httpx.get(grid["imageUrl"]).headers["content-type"] == "image/png"
    assert spent(world) == 5

    upscale_id = world.submit("/submit/action", {"taskId": grid_id, "customId": world.button(grid, "upsample::2")})
    upscale = world.finished(upscale_id)
    assert upscale["action"] == "UPSCALE" and upscale["parentId"] == grid_id
    assert "/files/" + upscale_id + "/image.png" in upscale["imageUrl"]  # one image, not a grid
    assert spent(world) == 5 + 2

    zoom_id = world.submit("/submit/action", {"taskId": upscale_id, "customId": world.button(upscale, "Outpaint::50")})
    zoom = world.finished(zoom_id)
    assert zoom["action"] == "ZOOM" and zoom["imageUrl"].split("?")[0].endswith("/grid.png")
    assert spent(world) == 5 + 2 + 3

    jobs = [world.job(task) for task in (grid_id, upscale_id, zoom_id)]
    assert len({job["provider"] for job in jobs}) == 1  # every follow-up on its parent's provider
    assert [job["hold_state"] for job in jobs] == ["captured"] * 3
    if world.engines:  # the other provider never saw the follow-ups
        others = [e for e, name in zip(world.engines, world.providers, strict=True) if name != jobs[0]["provider"]]
        assert all(engine.submits == 0 for engine in others)


def test_vary_region_waits_in_modal_then_runs_with_a_mask(world: Native) -> None:
    grid = world.finished(world.submit("/submit/imagine", {"prompt": "a harbour"}))
    upscale = world.finished(
        world.submit("/submit/action", {"taskId": grid["id"], "customId": world.button(grid, "upsample::1")})
    )
    reply = world.post("/submit/action", {"taskId": upscale["id"], "customId": world.button(upscale, "Inpaint")})
    assert reply.status_code == 200 and reply.json()["code"] == 21, reply.text
    region_id = str(reply.json()["result"])
    waiting = world.reached(region_id, "MODAL")
    assert waiting["action"] == "INPAINT"
    held = world.relay.balance()[1]
    assert held == 4  # held at vary region's price while it waits

    confirmed = world.post("/submit/modal", {"taskId": region_id, "prompt": "a red boat", "maskBase64": png()})
    assert confirmed.json() == {"code": 1, "description": "Submit success", "properties": {}, "result": region_id}
    done = world.finished(region_id)
    assert done["imageUrl"].split("?")[0].endswith("/grid.png") and done["prompt"] == "a red boat --fast"
    assert spent(world) == 5 + 2 + 4
    assert world.job(region_id)["provider"] == world.job(grid["id"])["provider"]


def test_blend_describe_shorten_and_swap_face(world: Native, request: pytest.FixtureRequest) -> None:
    behind_new_api = request.node.callspec.params["world"] == "new-api"
    blend = world.finished(
        world.submit("/submit/blend", {"base64Array": [png(), png((0, 90, 200))], "dimensions": "LANDSCAPE"})
    )
    assert blend["action"] == "BLEND" and blend["imageUrl"]

    described = world.finished(world.submit("/submit/describe", {"base64": png()}))
    assert described["action"] == "DESCRIBE" and described["imageUrl"] is None
    assert described["properties"]["finalPrompt"].count("\n\n") >= 3  # four prompts
    pick = {"taskId": described["id"], "customId": world.button(described, "PicReader::2")}
    if behind_new_api:  # new-api maps no describe button to an action of its own: refused, and nothing is charged
        refused = world.post("/submit/action", pick).json()
        assert refused["code"] == 4 and "unknown_action" in refused["description"], refused
    else:
        picked = world.finished(world.submit("/submit/action", pick))
        assert picked["action"] == "IMAGINE" and picked["parentId"] == described["id"]

    shortened = world.finished(
        world.submit("/submit/shorten", {"prompt": "a very long prompt about a quiet lake at dawn"})
    )
    assert shortened["action"] == "SHORTEN" and shortened["properties"]["finalPrompt"]

    swapped = world.finished(
        world.submit("/insight-face/swap", {"sourceBase64": png(), "targetBase64": png((9, 9, 9))})
    )
    assert swapped["action"] == "SWAP_FACE" and swapped["imageUrl"].split("?")[0].endswith("/image.png")
    assert spent(world) == 6 + 1 + (0 if behind_new_api else 5) + 1 + 7


def test_upload_returns_links_and_image_seed_answers_for_a_finished_task(world: Native) -> None:
    uploaded = world.post("/submit/upload-discord-images", {"base64Array": [png(), png((1, 2, 3))]})
    assert uploaded.status_code == 200 and uploaded.json()["code"] == 1
    assert len(uploaded.json()["result"]) == 2
    task = world.finished(world.submit("/submit/imagine", {"prompt": "a seedling"}))
    seed = world.client.get(f"/mj/task/{task['id']}/image-seed").json()
    assert seed["code"] == 1 and str(seed["result"]).isdigit()
    assert spent(world) == 5  # an upload is no job and costs nothing


def test_list_by_condition_and_fetch_on_every_prefix(world: Native) -> None:
    first = world.submit("/submit/imagine", {"prompt": "one"})
    typed = world.post("/submit/imagine", {"prompt": "two"}, prefix="/v1/mj").json()
    assert isinstance(typed["result"], int)  # /v1/mj resellers type the id as an integer
    assert typed["result"] < 2**53  # which a JavaScript client's JSON.parse reads exactly, as midjourney-proxy's
    second = str(typed["result"])
    for prefix in ("/mj", "/mj-fast/mj", "/mj-relax/mj", "/mj-turbo/mj", "/v1/mj"):
        listed = world.client.post(prefix + "/task/list-by-condition", json={"ids": [first, second, "12345"]}).json()
        assert {task["id"] for task in listed} == {first, second}
        assert world.client.get(f"{prefix}/task/{first}/fetch").json()["id"] == first
    recent = world.client.post("/mj/task/list-by-condition", json={}).json()
    assert {task["id"] for task in recent} == {first, second}


def test_keys_are_accepted_as_bearer_and_as_mj_api_secret(tmp_path: Path) -> None:
    with native(tmp_path) as world:
        key = world.relay.key
        for headers in ({"Authorization": f"Bearer {key}"}, {"mj-api-secret": key}, {"Authorization": key}):
            reply = httpx.post(world.relay.base + "/mj/submit/imagine", json={"prompt": "a key"}, headers=headers)
            assert reply.status_code == 200 and reply.json()["code"] == 1, reply.text
        for headers in ({}, {"mj-api-secret": "sk-mjr-wrong"}, {"Authorization": "Bearer nope"}):
            reply = httpx.post(world.relay.base + "/mj/submit/imagine", json={"prompt": "a key"}, headers=headers)
            assert reply.status_code == 401 and reply.json()["code"] == 4 and reply.json()["result"] is None


@pytest.mark.postgres
def test_the_native_flow_holds_on_postgresql(tmp_path: Path) -> None:
    with pg_database_sync() as url, native(tmp_path, database={"url": url}, prices=PRICES) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a quay", "state": "pg"}))
        upscale = world.finished(
            world.submit("/submit/action", {"taskId": grid["id"], "customId": world.button(grid, "upsample::4")})
        )
        region = world.submit("/submit/action", {"taskId": upscale["id"], "customId": world.button(upscale, "Inpaint")})
        assert world.reached(region, "MODAL")["startTime"] is None
        world.post("/submit/modal", {"taskId": region, "maskBase64": png()})
        done = world.finished(region)
        assert done["startTime"] is not None and done["finishTime"] >= done["startTime"]
        assert spent(world) == 5 + 2 + 4
        listed = world.client.post("/mj/task/list-by-condition", json={"ids": [grid["id"], region, 42]}).json()
        assert [task["id"] for task in listed] == [region, grid["id"]]  # newest first


def test_a_shorten_sends_its_own_mode_flag_so_its_prompts_run_at_the_price_held(
    world: Native, request: pytest.FixtureRequest
) -> None:
    """A shorten's prompts keep its parameters, and an imagine of one of them (`PromptAnalyzer::N`) runs in its
    parent's mode, at that mode's price: a mode flag the client wrote that the mode rule overrode (here the path's)
    must not reach the upstream, or the picked prompt runs turbo at relax's price."""
    shortened = world.finished(
        world.submit("/submit/shorten", {"prompt": "a very long prompt about a quiet lake --turbo"}, "/mj-relax/mj")
    )
    assert world.job(shortened["id"])["mode"] == "relax"
    final = shortened["properties"]["finalPrompt"]
    assert "--turbo" not in final and "--relax" in final, final
    if request.node.callspec.params["world"] == "new-api":  # it maps no PromptAnalyzer button to an action
        return
    picked = world.finished(
        world.submit(
            "/submit/action", {"taskId": shortened["id"], "customId": world.button(shortened, "PromptAnalyzer::1")}
        )
    )
    assert world.job(picked["id"])["mode"] == "relax" and world.job(picked["id"])["price"] == 1
    assert spent(world) == 1 + 1


@pytest.mark.parametrize(
    ("dialect", "settings"),
    [("new-api", None), ("midjourney-proxy", {"account_filter": False})],
)
def test_a_button_runs_at_the_price_of_the_mode_the_upstream_runs_it_in(
    tmp_path: Path, dialect: str, settings: dict[str, object] | None
) -> None:
    """A provider whose submits carry no mode of their own (new-api drops the path's, a midjourney-proxy without
    accountFilter has none) runs a button's task in its parent's mode: a button asked for in another mode would be
    held at that mode's price while the upstream runs it in the parent's (a turbo task's V1 at relax's price). It
    is refused, holding nothing; asked for in the parent's mode, or in none, it runs."""
    with native(tmp_path, dialect, prices=PRICES, provider_settings=settings) as world:
        grid = world.finished(world.submit("/submit/imagine", {"prompt": "a lighthouse"}, "/mj-turbo/mj"))
        assert spent(world) == 9
        v1 = {"taskId": grid["id"], "customId": world.button(grid, "variation::1")}
        refused = world.post("/submit/action", v1, "/mj-relax/mj")
        assert refused.status_code == 400 and refused.json()["code"] == 4, refused.text
        assert "turbo" in refused.json()["description"]
        assert spent(world) == 9
        variation = world.finished(world.submit("/submit/action", v1))
        (engine,) = world.engines
        made = engine.task(world.job(variation["id"])["upstream_id"], "")
        assert made is not None and made["mode"] == "TURBO"
        assert world.job(variation["id"])["mode"] == "turbo" and spent(world) == 9 + 9


@pytest.mark.parametrize(
    ("dialect", "settings"),
    [("new-api", None), ("midjourney-proxy", {"account_filter": False})],
)
def test_a_task_without_a_prompt_is_not_routed_where_its_mode_cannot_reach(
    tmp_path: Path, dialect: str, settings: dict[str, object] | None
) -> None:
    """A blend, a describe and a face swap send no prompt, so on a provider whose submits carry no mode of their own
    nothing names their mode: the upstream runs them in its default (fast), while the relay held them at the price
    of the mode asked for (a relax blend ran fast for relax's price). They are refused there, holding nothing,
    unless asked for in fast mode (or none)."""
    with native(tmp_path, dialect, prices=PRICES, provider_settings=settings) as world:
        blend = {"base64Array": [png(), png((0, 90, 200))]}
        refused = world.post("/submit/blend", blend, "/mj-relax/mj")
        assert refused.status_code == 400 and refused.json()["code"] == 4, refused.text
        refused = world.post("/submit/describe", {"base64": png()}, "/mj-turbo/mj")
        assert refused.status_code == 400 and refused.json()["code"] == 4, refused.text
        assert spent(world) == 0
        (engine,) = world.engines
        assert engine.submits == 0
        made = world.finished(world.submit("/submit/blend", blend))
        assert engine.task(world.job(made["id"])["upstream_id"], "")["mode"] == "FAST"  # type: ignore[index]
        assert world.job(made["id"])["mode"] == "fast" and spent(world) == 6
