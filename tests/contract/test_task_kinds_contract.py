"""Every task kind, in every dialect: follow-ups through buttons, modal confirmations, blend, describe, shorten,
swap face, uploads and seeds, through the in-process simulator and the three HTTP adapters over loopback."""

from __future__ import annotations

import base64

import pytest

from adapters import (
    Accepted,
    ClientError,
    NeedsModal,
    SubmitOutcome,
    SubmitRequest,
    TaskStatus,
    TaskView,
    Uploaded,
)
from tests.contract.worlds import Env, image_size, imagine, png, world

pytestmark = pytest.mark.anyio

GRID_3_2 = (64, 42)  # two 32x21 tiles a side
TILE_3_2 = (32, 21)


async def submitted(env: Env, request: SubmitRequest) -> str:
    outcome = await env.upstream.submit(request)
    assert isinstance(outcome, Accepted), outcome
    return outcome.upstream_id


async def finished(env: Env, upstream_id: str, seconds: float = 10) -> TaskView:
    env.clock.advance(seconds)
    view = await env.upstream.fetch(upstream_id)
    assert view is not None and view.status is TaskStatus.SUCCESS, view
    return view


async def grid(env: Env, prompt: str = "a harbour --ar 3:2") -> TaskView:
    return await finished(env, await submitted(env, imagine(prompt)))


def button(view: TaskView, fragment: str) -> str:
    found = [b.custom_id for b in view.buttons if fragment in b.custom_id]
    assert found, [b.custom_id for b in view.buttons]
    return found[0]


def action(view: TaskView, fragment: str, mode: str = "fast") -> SubmitRequest:
    custom_id = button(view, fragment)
    return SubmitRequest(kind="action", task_id=view.upstream_id, custom_id=custom_id, mode=mode)  # type: ignore[arg-type]


async def upscaled(env: Env) -> TaskView:
    parent = await grid(env)
    return await finished(env, await submitted(env, action(parent, "upsample::1")))


async def test_imagine_then_u2_gives_one_image_then_zoom_out_gives_a_grid(env: Env) -> None:
    parent = await grid(env)
    assert parent.action == "IMAGINE" and parent.final_prompt == "a harbour --ar 3:2"
    assert image_size(await env.upstream.download(parent.image_url or "")) == GRID_3_2

    upscale = await finished(env, await submitted(env, action(parent, "upsample::2")))
    assert upscale.action == "UPSCALE" and upscale.upstream_id != parent.upstream_id
    assert image_size(await env.upstream.download(upscale.image_url or "")) == TILE_3_2  # one image, not a grid
    for fragment in ("upsample_v6_2x_subtle", "low_variation", "Inpaint", "Outpaint::75", "CustomZoom", "pan_up"):
        button(upscale, fragment)

    zoom = await finished(env, await submitted(env, action(upscale, "Outpaint::50")))
    assert zoom.action == "ZOOM"
    assert image_size(await env.upstream.download(zoom.image_url or "")) == GRID_3_2
    assert [b.label for b in zoom.buttons[:4]] == ["U1", "U2", "U3", "U4"]


async def test_buttons_carry_a_random_hash_of_their_own_never_the_upstream_id(env: Env) -> None:
    first, second = await grid(env), await grid(env)
    hashes = set()
    for view in (first, second):
        ids = [b.custom_id for b in view.buttons]
        assert not any(view.upstream_id in custom_id for custom_id in ids)
        assert ids[0].startswith("MJ::JOB::upsample::1::") and ids[4].startswith("MJ::JOB::reroll::0::")
        hashes.add(ids[0].split("::")[4])
    assert len(hashes) == 2 and all(len(h) == 36 for h in hashes)


async def test_vary_region_waits_in_modal_until_a_mask_confirms_it_and_keeps_its_id(env: Env) -> None:
    upscale = await upscaled(env)
    outcome = await env.upstream.submit(action(upscale, "Inpaint"))
    assert isinstance(outcome, NeedsModal), outcome  # new-api passes code 21 through for INPAINT
    region = outcome.upstream_id
    env.clock.advance(1000)
    waiting = await env.upstream.fetch(region)
    assert waiting is not None and (waiting.status, waiting.action) == (TaskStatus.MODAL, "INPAINT")

    without_mask = await env.upstream.submit(SubmitRequest(kind="modal", task_id=region, prompt="a red boat"))
    assert isinstance(without_mask, ClientError), without_mask
    modal = SubmitRequest(kind="modal", task_id=region, prompt="a red boat", mask=png())
    assert await env.upstream.submit(modal) == Accepted(region)

    view = await env.upstream.fetch(region)  # the timeline starts at the confirmation
    assert view is not None and view.status is TaskStatus.SUBMITTED
    env.clock.advance(5)
    view = await env.upstream.fetch(region)
    assert view is not None and view.status is TaskStatus.IN_PROGRESS
    done = await finished(env, region, 5)
    assert done.final_prompt == "a red boat" and done.image_url
    again = await env.upstream.submit(modal)  # no longer waiting
    assert isinstance(again, ClientError), again


async def test_custom_zoom_waits_in_modal_and_runs_with_a_prompt(env: Env) -> None:
    upscale = await upscaled(env)
    outcome = await env.upstream.submit(action(upscale, "CustomZoom"))
    assert isinstance(outcome, NeedsModal), outcome
    modal = SubmitRequest(kind="modal", task_id=outcome.upstream_id, prompt="a harbour --ar 2:3 --zoom 1.5")
    assert await env.upstream.submit(modal) == Accepted(outcome.upstream_id)
    done = await finished(env, outcome.upstream_id)
    assert done.action == "ZOOM" and image_size(await env.upstream.download(done.image_url or "")) == (42, 64)


@pytest.mark.parametrize("dialect", ["simulator", "midjourney-proxy", "new-api", "mj-v1"])
async def test_with_remix_a_variation_waits_in_modal(dialect: str) -> None:
    async with world(dialect, remix=True) as env:
        parent = await grid(env)
        outcome = await env.upstream.submit(action(parent, "variation::3"))
        # new-api turns code 21 into 1 but passes on "Waiting for window confirm" and `remix`: still a modal
        assert isinstance(outcome, NeedsModal), outcome
        env.clock.advance(100)
        view = await env.upstream.fetch(outcome.upstream_id)
        assert view is not None and (view.status, view.action) == (TaskStatus.MODAL, "VARIATION")
        modal = SubmitRequest(kind="modal", task_id=outcome.upstream_id, prompt="a harbour at night --ar 3:2")
        assert await env.upstream.submit(modal) == Accepted(outcome.upstream_id)
        done = await finished(env, outcome.upstream_id)
        assert done.final_prompt == "a harbour at night --ar 3:2"
        upscale = await env.upstream.submit(action(parent, "upsample::1"))  # remix leaves upscales alone
        assert isinstance(upscale, Accepted), upscale


async def test_describe_gives_four_prompts_and_picking_one_imagines_it(env: Env) -> None:
    image = png(size=(30, 20))
    described = await finished(env, await submitted(env, SubmitRequest(kind="describe", images=(image,))))
    assert described.action == "DESCRIBE"
    prompts = (described.final_prompt or "").split("\n\n")
    assert [p[:3] for p in prompts] == ["1️⃣", "2️⃣", "3️⃣", "4️⃣"] and all(p.endswith("--ar 3:2") for p in prompts)
    assert await env.upstream.download(described.image_url or "") == base64.b64decode(image.split(",")[1])
    assert {b.custom_id for b in described.buttons} >= {"MJ::Job::PicReader::1", "MJ::Picread::Retry"}

    if env.dialect == "new-api":  # it maps no describe button to an action of its own: refused, as unknown_action
        for fragment in ("PicReader::2", "Picread::Retry"):
            refused = await env.upstream.submit(action(described, fragment))
            assert isinstance(refused, ClientError) and "unknown_action" in refused.description, refused
        return
    picked = await finished(env, await submitted(env, action(described, "PicReader::2")))
    assert picked.action == "IMAGINE" and picked.final_prompt == prompts[1].removeprefix("2️⃣ ")
    assert image_size(await env.upstream.download(picked.image_url or "")) == GRID_3_2


async def test_describe_without_an_image_is_refused(env: Env) -> None:
    for images in ((), ("data:text/plain;base64,aGVsbG8=",)):
        outcome = await env.upstream.submit(SubmitRequest(kind="describe", images=images))
        assert isinstance(outcome, ClientError), outcome


async def test_shorten_gives_five_prompts(env: Env) -> None:
    request = SubmitRequest(kind="shorten", prompt="a very long prompt about a quiet lake at dawn --ar 2:3")
    shortened = await finished(env, await submitted(env, request))
    assert shortened.action == "SHORTEN" and shortened.image_url is None
    prompts = (shortened.final_prompt or "").split("\n\n")
    assert len(prompts) == 5 and prompts[0].startswith("1️⃣") and all(p.endswith("--ar 2:3") for p in prompts)
    assert [b.custom_id for b in shortened.buttons] == [f"MJ::Job::PromptAnalyzer::{i}" for i in range(1, 6)]
    if env.dialect == "new-api":  # nor any shorten button
        refused = await env.upstream.submit(action(shortened, "PromptAnalyzer::5"))
        assert isinstance(refused, ClientError) and "unknown_action" in refused.description, refused
        return
    picked = await finished(env, await submitted(env, action(shortened, "PromptAnalyzer::5")))
    assert picked.action == "IMAGINE" and picked.final_prompt == prompts[4].removeprefix("5️⃣ ")


@pytest.mark.parametrize(("dimensions", "size"), [("PORTRAIT", (42, 64)), ("LANDSCAPE", (64, 42)), (None, (64, 64))])
async def test_blend_makes_a_grid_of_the_dimensions(env: Env, dimensions: str | None, size: tuple[int, int]) -> None:
    images = tuple(png((i * 40, 90, 200)) for i in range(3))
    request = SubmitRequest(kind="blend", images=images, dimensions=dimensions)  # type: ignore[arg-type]
    blend = await finished(env, await submitted(env, request))
    assert blend.action == "BLEND" and image_size(await env.upstream.download(blend.image_url or "")) == size
    button(blend, "upsample::4")


@pytest.mark.parametrize("count", [1, 6])
async def test_blend_takes_two_to_five_images(env: Env, count: int) -> None:
    outcome = await env.upstream.submit(SubmitRequest(kind="blend", images=(png(),) * count))
    assert isinstance(outcome, ClientError), outcome


async def test_swap_face_gives_one_image(env: Env) -> None:
    request = SubmitRequest(kind="swap_face", images=(png(), png((9, 9, 9), size=(30, 20))))
    swapped = await finished(env, await submitted(env, request))
    assert swapped.action == "SWAP_FACE" and swapped.buttons == ()
    assert image_size(await env.upstream.download(swapped.image_url or "")) == TILE_3_2
    for images in ((png(),), (png(), "data:image/png;base64,AAAA")):
        outcome = await env.upstream.submit(SubmitRequest(kind="swap_face", images=images))
        assert isinstance(outcome, ClientError), outcome


async def test_upload_gives_links_that_download_reads(env: Env) -> None:
    images = [png(), png((1, 2, 3), size=(5, 7))]
    outcome = await env.upstream.upload(images, "relax", "MID_JOURNEY")
    assert isinstance(outcome, Uploaded) and len(outcome.links) == 2, outcome
    for link, image in zip(outcome.links, images, strict=True):
        assert await env.upstream.download(link) == base64.b64decode(image.split(",")[1])
    refused = await env.upstream.upload(["not an image"], "fast", "MID_JOURNEY")
    assert isinstance(refused, ClientError), refused


async def test_a_seed_comes_once_the_task_succeeded(env: Env) -> None:
    task_id = await submitted(env, imagine("a seedling"))
    assert await env.upstream.seed(task_id) is None  # no seed yet
    await finished(env, task_id)
    seed = await env.upstream.seed(task_id)
    assert seed is not None and seed.isdigit() and seed == await env.upstream.seed(task_id)
    assert await env.upstream.seed("1234567890") is None  # unknown task


async def test_follow_ups_on_an_unknown_task_are_the_clients_error(env: Env) -> None:
    for request in (
        SubmitRequest(kind="action", task_id="1234567890", custom_id="MJ::JOB::upsample::1::x"),
        SubmitRequest(kind="modal", task_id="1234567890", prompt="x", mask=png()),
    ):
        outcome = await env.upstream.submit(request)
        assert isinstance(outcome, ClientError), outcome  # not "no account": retrying elsewhere cannot help


async def test_a_button_the_task_does_not_have_is_refused(env: Env) -> None:
    parent, other = await grid(env), await grid(env)
    foreign = button(other, "upsample::1")  # a real button, of another task
    cases: list[SubmitOutcome] = [
        await env.upstream.submit(SubmitRequest(kind="action", task_id=parent.upstream_id, custom_id=foreign)),
        await env.upstream.submit(SubmitRequest(kind="action", task_id=parent.upstream_id, custom_id="MJ::x")),
        await env.upstream.submit(SubmitRequest(kind="modal", task_id=parent.upstream_id, prompt="not waiting")),
    ]
    unfinished = await submitted(env, imagine("still running"))
    cases.append(
        await env.upstream.submit(
            SubmitRequest(kind="action", task_id=unfinished, custom_id=button(parent, "upsample::1"))
        )
    )
    assert all(isinstance(outcome, ClientError) for outcome in cases), cases


async def test_steering_words_reach_the_follow_ups(env: Env) -> None:
    failing = await grid(env, "a bridge sim:fail-followups")  # the root itself succeeds
    upscale = await submitted(env, action(failing, "upsample::1"))
    env.clock.advance(6)
    view = await env.upstream.fetch(upscale)
    assert view is not None and view.status is TaskStatus.FAILURE and view.fail_reason

    stuck = await grid(env, "a bridge sim:never-followups")
    variation = await submitted(env, action(stuck, "variation::1"))
    env.clock.advance(1000)
    view = await env.upstream.fetch(variation)
    assert view is not None and view.status is TaskStatus.IN_PROGRESS


async def test_a_follow_up_runs_in_the_mode_it_is_sent_with_or_its_parents(env: Env) -> None:
    parent = await grid(env)
    relax = await submitted(env, action(parent, "upsample::1", mode="relax"))
    env.clock.advance(15)
    view = await env.upstream.fetch(relax)
    assert view is not None
    if env.dialect == "new-api":  # new-api ignores the path prefix: no prompt flag either, so the parent's mode
        assert view.status is TaskStatus.SUCCESS
    else:
        assert view.status is TaskStatus.IN_PROGRESS  # a fast job would be done by now
