from __future__ import annotations

import base64
import io
import uuid
from typing import Any

import pytest
from PIL import Image

from adapters.simulator import SimEngine, SimSettings
from adapters.simulator.grid import aspect_of, render_grid, render_image, tile_size
from adapters.simulator.pictures import media_type, picture, pictures
from tests.helpers import FakeClock


def engine(clock: FakeClock, **settings: object) -> SimEngine:
    return SimEngine(SimSettings(**settings), now=clock.now)  # type: ignore[arg-type]


def submit(sim: SimEngine, prompt: str, mode: str = "fast") -> dict[str, object]:
    reply = sim.submit_imagine({"prompt": prompt, "state": "s"}, mode)  # type: ignore[arg-type]
    return {"status": reply.http_status, **reply.body}


def test_a_task_follows_the_real_life_cycle() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    task_id = str(submit(sim, "a cat")["result"])
    view = sim.task(task_id, "http://x")
    assert view is not None and (view["status"], view["progress"], view["state"]) == ("SUBMITTED", "0%", "s")
    clock.advance(5)
    view = sim.task(task_id, "http://x")
    assert view is not None and view["status"] == "IN_PROGRESS" and view["progress"] == "31%"
    assert sim.image(task_id) is None
    clock.advance(5)
    view = sim.task(task_id, "http://x")
    assert view is not None and view["status"] == "SUCCESS" and view["progress"] == "100%"
    assert view["imageUrl"] == f"http://x/{task_id}.png" and len(view["buttons"]) == 9  # type: ignore[arg-type]
    assert sim.image(task_id) == sim.image(task_id)  # cached, deterministic


def test_failures_and_refusals() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, banned_words=("gore",))
    assert submit(sim, "")["code"] == 4
    assert submit(sim, "so much GORE")["code"] == 24
    assert submit(sim, "x sim:queue-full")["code"] == 23
    assert submit(sim, "x sim:no-account")["code"] == 3
    assert submit(sim, "x sim:error")["status"] == 500
    failing = str(submit(sim, "x sim:fail")["result"])
    never = str(submit(sim, "x sim:never")["result"])
    clock.advance(100)
    failed = sim.task(failing, "")
    assert failed is not None and failed["status"] == "FAILURE" and failed["progress"] == "" and failed["failReason"]
    stuck = sim.task(never, "")
    assert stuck is not None and stuck["status"] == "IN_PROGRESS"


def test_a_queued_submit_answers_code_22_and_waits_in_not_start() -> None:
    """midjourney-proxy takes a task beyond an account's running slots with code 22 (IN_QUEUE), and it shows
    NOT_START until a slot frees: the relay's handling of both must be reachable on the simulator."""
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    reply = submit(sim, "x sim:queued")
    assert (reply["status"], reply["code"]) == (200, 22) and reply["properties"]["numberOfQueues"] == 1
    view = sim.task(str(reply["result"]), "")
    assert view is not None and (view["status"], view["progress"]) == ("NOT_START", "0%")
    clock.advance(5)
    assert sim.task(str(reply["result"]), "")["status"] == "IN_PROGRESS"  # type: ignore[index]
    assert done(sim, clock, reply["result"])["progress"] == "100%"


def test_fail_rate_and_capacity() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, fail_rate=1.0, capacity=2, seed=3)
    first, second = (str(submit(sim, f"job {i}")["result"]) for i in range(2))
    assert submit(sim, "third")["code"] == 23  # two unfinished tasks fill it
    clock.advance(6)
    assert all(sim.task(t, "")["status"] == "FAILURE" for t in (first, second))  # type: ignore[index]
    assert submit(sim, "fourth")["code"] == 1  # failed tasks free their places


def test_a_full_queue_is_told_from_the_unfinished_tasks_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a capacity, each submit looked at every task kept (up to 100,000), finished or not: submits grew slower
    with every task made."""
    from adapters.simulator.tasks import SimTask

    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, capacity=3)
    for i in range(300):
        assert submit(sim, f"job {i}")["code"] == 1
        clock.advance(20)
    looked = 0
    status = SimTask.status

    def counted(task: SimTask, now: float) -> tuple[str, int]:
        nonlocal looked
        looked += 1
        return status(task, now)

    monkeypatch.setattr(SimTask, "status", counted)
    assert [submit(sim, f"more {i}")["code"] for i in range(4)] == [1, 1, 1, 23]
    assert looked <= 20, looked


def test_old_tasks_are_forgotten_past_the_limit() -> None:
    sim = engine(FakeClock(), keep_tasks=3)
    ids = [str(submit(sim, f"job {i}")["result"]) for i in range(5)]
    assert len(set(ids)) == 5
    assert [sim.task(i, "") is not None for i in ids] == [False, False, True, True, True]
    assert sim.tasks(ids, "") and len(sim.tasks(ids, "")) == 3


def test_the_mode_sets_the_duration() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, relax_s=30.0)
    relax = str(submit(sim, "a lake", "relax")["result"])
    slow = str(submit(sim, "a lake sim:slow")["result"])
    clock.advance(20)
    assert sim.task(relax, "")["status"] == "IN_PROGRESS"  # type: ignore[index]
    assert sim.task(slow, "")["status"] == "IN_PROGRESS"  # type: ignore[index]


def test_the_grid_follows_the_aspect_ratio() -> None:
    assert aspect_of("a cat --ar 16:9 --fast") == (16, 9)
    assert aspect_of("a cat --aspect 2:3 --ar 3:4") == (3, 4)
    assert aspect_of("a cat") == (1, 1) and aspect_of("a cat --ar 0:3") == (1, 1)
    assert tile_size((16, 9), 256) == (256, 144) and tile_size((2, 3), 300) == (200, 300)
    image = Image.open(io.BytesIO(render_grid("t", (7, 4), 70)))
    assert image.format == "PNG" and image.size == (140, 80)
    quadrants = {image.crop((x, y, x + 70, y + 40)).tobytes() for x in (0, 70) for y in (0, 40)}
    assert len(quadrants) == 4


def test_an_aspect_ratio_too_long_to_read_is_one_to_one() -> None:
    """A number past Python's 4,300-digit limit for reading an int made every submit naming it an HTTP 500."""
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    prompt = "a cat --ar 1:" + "9" * 5000
    assert aspect_of(prompt) == (1, 1)
    reply = submit(sim, prompt)
    assert reply["code"] == 1 and done(sim, clock, reply["result"])["imageUrl"]


# -- every kind -------------------------------------------------------------------------------------------------------


def png(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> str:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(out.getvalue()).decode()


def call(sim: SimEngine, kind: str, body: dict[str, Any], mode: str | None = None) -> dict[str, Any]:
    reply = sim.submit(kind, body, mode)  # type: ignore[arg-type]
    return {"status": reply.http_status, "unknown": reply.unknown_task, "action": reply.action, **reply.body}


def done(sim: SimEngine, clock: FakeClock, task_id: object, seconds: float = 10.0) -> dict[str, Any]:
    clock.advance(seconds)
    view = sim.task(str(task_id), "http://x")
    assert view is not None and view["status"] == "SUCCESS", view
    return view


def custom_id(view: dict[str, Any], fragment: str) -> str:
    return next(str(b["customId"]) for b in view["buttons"] if fragment in b["customId"])


def press(sim: SimEngine, view: dict[str, Any], fragment: str, mode: str | None = None) -> dict[str, Any]:
    return call(sim, "action", {"taskId": view["id"], "customId": custom_id(view, fragment), "state": "f"}, mode)


def test_a_grid_has_u_reroll_v_buttons_on_a_random_hash_not_the_id() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, seed=5)
    views = [done(sim, clock, submit(sim, f"cat {i}")["result"]) for i in range(2)]
    for view in views:
        ids = [b["customId"] for b in view["buttons"]]
        hash_ = view["properties"]["messageHash"]
        assert ids == [
            *(f"MJ::JOB::upsample::{i}::{hash_}" for i in range(1, 5)),
            f"MJ::JOB::reroll::0::{hash_}::SOLO",
            *(f"MJ::JOB::variation::{i}::{hash_}" for i in range(1, 5)),
        ]
        assert str(uuid.UUID(hash_)) == hash_ and view["id"][-8:] not in hash_
    assert views[0]["properties"]["messageHash"] != views[1]["properties"]["messageHash"]


def test_an_upscale_is_one_image_with_the_upscale_buttons() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, tile_px=30)
    parent = done(sim, clock, submit(sim, "a cat --ar 3:2")["result"])
    reply = press(sim, parent, "upsample::3")
    assert (reply["code"], reply["action"]) == (1, "UPSCALE")
    upscale = done(sim, clock, reply["result"])
    assert (upscale["action"], upscale["parentId"], upscale["state"]) == ("UPSCALE", parent["id"], "f")
    hash_ = upscale["properties"]["messageHash"]
    assert [b["customId"] for b in upscale["buttons"]] == [
        f"MJ::JOB::upsample_v6_2x_subtle::1::{hash_}::SOLO",
        f"MJ::JOB::upsample_v6_2x_creative::1::{hash_}::SOLO",
        f"MJ::JOB::low_variation::1::{hash_}::SOLO",
        f"MJ::JOB::high_variation::1::{hash_}::SOLO",
        f"MJ::Inpaint::1::{hash_}::SOLO",
        f"MJ::Outpaint::50::1::{hash_}::SOLO",
        f"MJ::Outpaint::75::1::{hash_}::SOLO",
        f"MJ::CustomZoom::{hash_}",
        *(f"MJ::JOB::pan_{side}::1::{hash_}::SOLO" for side in ("left", "right", "up", "down")),
    ]
    data = sim.image(upscale["id"])
    assert data is not None and Image.open(io.BytesIO(data)).size == (30, 20)
    grid = sim.image(parent["id"])
    assert grid is not None and Image.open(io.BytesIO(grid)).size == (60, 40)


@pytest.mark.parametrize(
    ("fragment", "action"),
    [
        ("upsample_v6_2x_creative", "UPSCALE"),
        ("low_variation", "VARIATION"),
        ("high_variation", "VARIATION"),
        ("Outpaint::75", "ZOOM"),
        ("pan_left", "PAN"),
        ("pan_down", "PAN"),
    ],
)
def test_each_upscale_button_makes_its_kind_of_task(fragment: str, action: str) -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    parent = done(sim, clock, submit(sim, "a cat")["result"])
    upscale = done(sim, clock, press(sim, parent, "upsample::1")["result"])
    follow = done(sim, clock, press(sim, upscale, fragment)["result"])
    assert follow["action"] == action and follow["parentId"] == upscale["id"]
    assert len(follow["buttons"]) == (12 if action == "UPSCALE" else 9)


@pytest.mark.parametrize(("fragment", "action"), [("variation::2", "VARIATION"), ("reroll", "REROLL")])
def test_grid_buttons_make_variations_and_rerolls(fragment: str, action: str) -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    parent = done(sim, clock, submit(sim, "a cat --ar 2:3")["result"])
    follow = done(sim, clock, press(sim, parent, fragment)["result"])
    assert follow["action"] == action and follow["prompt"] == "a cat --ar 2:3"


def test_actions_are_refused_on_unknown_unfinished_or_foreign_buttons() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    parent = done(sim, clock, submit(sim, "a cat")["result"])
    other = done(sim, clock, submit(sim, "a dog")["result"])
    running = submit(sim, "still going")["result"]
    unknown = call(sim, "action", {"taskId": "42", "customId": custom_id(parent, "upsample::1")})
    assert (unknown["status"], unknown["code"], unknown["unknown"]) == (404, 3, True)
    for body in (
        {"taskId": parent["id"], "customId": custom_id(other, "upsample::1")},
        {"taskId": parent["id"], "customId": "MJ::JOB::animate_high::1::x::SOLO"},
        {"taskId": running, "customId": custom_id(parent, "upsample::1")},
        {"taskId": parent["id"]},
        {"taskId": 7, "customId": "x"},
    ):
        assert call(sim, "action", body)["code"] == 4, body


@pytest.mark.parametrize("fragment", ["Inpaint", "CustomZoom"])
def test_vary_region_and_custom_zoom_wait_in_modal(fragment: str) -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    parent = done(sim, clock, submit(sim, "a cat")["result"])
    upscale = done(sim, clock, press(sim, parent, "upsample::1")["result"])
    reply = press(sim, upscale, fragment)
    assert reply["code"] == 21 and reply["description"] == "Waiting for window confirm"
    assert reply["properties"] == {"finalPrompt": "a cat", "remix": True}
    assert reply["action"] == ("INPAINT" if fragment == "Inpaint" else "CUSTOM_ZOOM")
    clock.advance(10_000)
    waiting = sim.task(reply["result"], "")
    assert waiting is not None and (waiting["status"], waiting["progress"], waiting["startTime"]) == (
        "MODAL",
        "0%",
        None,
    )
    assert waiting["action"] == ("INPAINT" if fragment == "Inpaint" else "ZOOM")


def test_a_modal_confirms_with_a_mask_and_the_same_id_runs_from_then() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    parent = done(sim, clock, submit(sim, "a cat")["result"])
    upscale = done(sim, clock, press(sim, parent, "upsample::1")["result"])
    region = press(sim, upscale, "Inpaint")["result"]
    clock.advance(500)
    assert call(sim, "modal", {"taskId": region, "prompt": "a boat"})["code"] == 4  # no mask
    assert call(sim, "modal", {"taskId": region, "prompt": "a boat", "maskBase64": "aGVsbG8="})["code"] == 4
    assert call(sim, "modal", {"taskId": "42", "maskBase64": png()})["unknown"] is True
    assert call(sim, "modal", {"taskId": parent["id"], "maskBase64": png()})["code"] == 4  # not waiting
    confirmed = call(sim, "modal", {"taskId": region, "prompt": "a boat --ar 3:2", "maskBase64": png()})
    assert (confirmed["code"], confirmed["result"]) == (1, region)
    view = sim.task(region, "")
    assert view is not None and view["status"] == "SUBMITTED" and view["prompt"] == "a boat --ar 3:2"
    clock.advance(5)
    assert sim.task(region, "")["status"] == "IN_PROGRESS"  # type: ignore[index]
    finished = done(sim, clock, region, 5)
    assert finished["startTime"] >= int(clock.now() * 1000) - 9000  # the timeline started at the confirmation
    grid = sim.image(region)
    assert grid is not None and Image.open(io.BytesIO(grid)).size == (512, 342)
    assert call(sim, "modal", {"taskId": region, "maskBase64": png()})["code"] == 4  # confirmed once only


def test_a_custom_zoom_outside_one_to_two_is_refused() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    parent = done(sim, clock, submit(sim, "a cat")["result"])
    upscale = done(sim, clock, press(sim, parent, "upsample::1")["result"])
    zoom = press(sim, upscale, "CustomZoom")["result"]
    assert call(sim, "modal", {"taskId": zoom, "prompt": "a cat --zoom 3"})["code"] == 4
    assert call(sim, "modal", {"taskId": zoom, "prompt": "a cat --zoom x"})["code"] == 4
    assert call(sim, "modal", {"taskId": zoom, "prompt": "a cat --zoom 1.5"})["code"] == 1


@pytest.mark.parametrize("fragment", ["variation::1", "reroll", "pan_left"])
def test_with_remix_variation_reroll_and_pan_wait_in_modal(fragment: str) -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, remix=True)
    parent = done(sim, clock, submit(sim, "a cat")["result"])
    if fragment == "pan_left":
        parent = done(sim, clock, press(sim, parent, "upsample::1")["result"])
    reply = press(sim, parent, fragment)
    assert reply["code"] == 21 and sim.task(reply["result"], "")["status"] == "MODAL"  # type: ignore[index]
    assert call(sim, "modal", {"taskId": reply["result"], "prompt": "a cat, remixed"})["code"] == 1
    assert done(sim, clock, reply["result"])["prompt"] == "a cat, remixed"
    without = engine(clock, fast_s=10.0)
    plain = done(without, clock, submit(without, "a cat")["result"])
    assert press(without, plain, "variation::1")["code"] == 1


def test_modal_tasks_take_no_place_in_the_queue() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, capacity=1, remix=True)
    parent = done(sim, clock, submit(sim, "a cat")["result"])
    assert press(sim, parent, "variation::1")["code"] == 21
    assert press(sim, parent, "variation::2")["code"] == 21
    assert submit(sim, "one")["code"] == 1
    assert submit(sim, "two")["code"] == 23
    assert press(sim, parent, "upsample::1")["code"] == 23  # a follow-up needs a place too


def test_follow_ups_inherit_fail_and_never_from_the_root_prompt() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    failing = done(sim, clock, submit(sim, "a bridge sim:fail-followups")["result"])
    upscale = press(sim, failing, "upsample::1")["result"]
    clock.advance(6)
    assert sim.task(upscale, "")["status"] == "FAILURE"  # type: ignore[index]

    stuck = done(sim, clock, submit(sim, "a bridge sim:never-followups")["result"])
    variation = press(sim, stuck, "variation::1")["result"]
    clock.advance(1000)
    assert sim.task(variation, "")["status"] == "IN_PROGRESS"  # type: ignore[index]


def test_failing_follow_ups_pass_it_on_to_their_own_follow_ups() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, remix=True)
    root = done(sim, clock, submit(sim, "a bridge sim:fail-followups")["result"])
    child = press(sim, root, "variation::1")["result"]
    assert sim.task(child, "")["status"] == "MODAL"  # type: ignore[index]
    call(sim, "modal", {"taskId": child, "prompt": "a bridge at dusk"})
    clock.advance(6)
    assert sim.task(child, "")["status"] == "FAILURE"  # type: ignore[index]
    never = done(sim, clock, submit(sim, "a bridge")["result"])
    stuck = press(sim, never, "reroll")["result"]
    call(sim, "modal", {"taskId": stuck, "prompt": "a bridge sim:never"})  # the modal's prompt steers it too
    clock.advance(1000)
    assert sim.task(stuck, "")["status"] == "IN_PROGRESS"  # type: ignore[index]


def test_the_mode_of_a_follow_up_is_its_own_or_its_parents() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, relax_s=30.0)
    parent = done(sim, clock, submit(sim, "a lake", "relax")["result"], 30)
    inherited = press(sim, parent, "upsample::1")["result"]
    fast = press(sim, parent, "upsample::2", mode="fast")["result"]
    clock.advance(15)
    assert sim.task(inherited, "")["mode"] == "RELAX" and sim.task(inherited, "")["status"] == "IN_PROGRESS"  # type: ignore[index]
    assert sim.task(fast, "")["mode"] == "FAST" and sim.task(fast, "")["status"] == "SUCCESS"  # type: ignore[index]


def test_describe_reads_four_prompts_and_serves_the_image() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    image = png(size=(40, 30), fmt="JPEG")
    assert call(sim, "describe", {"base64": "aGVsbG8="})["code"] == 4
    assert call(sim, "describe", {"base64": "data:image/png;base64,aGVsbG8="})["code"] == 4
    reply = call(sim, "describe", {"base64": image, "state": "d"})
    running = sim.task(reply["result"], "http://x")
    assert running is not None and running["promptEn"] == "" and "finalPrompt" not in running["properties"]
    view = done(sim, clock, reply["result"])
    prompts = view["promptEn"].split("\n\n")
    assert view["prompt"] == view["promptEn"] == view["properties"]["finalPrompt"]
    assert [p.split(" ")[0] for p in prompts] == ["1️⃣", "2️⃣", "3️⃣", "4️⃣"]
    assert all(p.endswith("--ar 4:3") for p in prompts)
    assert view["imageUrl"] == f"http://x/{view['id']}.jpg"
    assert sim.image(view["id"]) == base64.b64decode(image.split(",")[1])
    assert [b["customId"] for b in view["buttons"]] == [
        *(f"MJ::Job::PicReader::{i}" for i in range(1, 5)),
        "MJ::Picread::Retry",
        "MJ::Job::PicReader::all",
    ]
    picked = done(sim, clock, press(sim, view, "PicReader::3")["result"])
    assert (picked["action"], picked["prompt"]) == ("IMAGINE", prompts[2].removeprefix("3️⃣ "))
    every = press(sim, view, "PicReader::all")  # as trueai answers "Imagine all": four imagines' ids, joined
    grids = [done(sim, clock, made) for made in every["result"].split(",")]
    assert [(g["action"], g["prompt"]) for g in grids] == [("IMAGINE", p.split(" ", 1)[1]) for p in prompts]
    again = done(sim, clock, press(sim, view, "Picread::Retry")["result"])
    assert again["action"] == "DESCRIBE" and again["promptEn"] != view["promptEn"]
    assert sim.image(again["id"]) == sim.image(view["id"])


@pytest.mark.parametrize(
    ("settings", "code", "status"),
    [({"capacity": 3}, 23, 200), ({"error_rate": 1.0}, -1, 500)],
)
def test_imagine_all_refused_on_the_way_is_refused_whole(settings: dict[str, Any], code: int, status: int) -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    view = done(sim, clock, call(sim, "describe", {"base64": png(size=(40, 30))})["result"])
    sim.settings = SimSettings(fast_s=10.0, **settings)
    before = len(sim.all_tasks())
    every = press(sim, view, "PicReader::all")  # room for three of the four imagines, or for none
    assert (every["status"], every["code"]) == (status, code) and not every.get("result")
    assert len(sim.all_tasks()) == before  # nothing taken that its caller never hears of


def test_described_images_are_kept_up_to_a_limit_as_uploads_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each describe kept the image it was given (up to 10 MB) for as long as its task was kept (100,000 tasks)."""
    monkeypatch.setattr("adapters.simulator.media.MAX_UPLOADS", 3)
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    ids = [call(sim, "describe", {"base64": png(color=(i, 0, 0))})["result"] for i in range(5)]
    clock.advance(10)
    assert [sim.image(i) is not None for i in ids] == [False, False, True, True, True]
    first, last = (sim.task(i, "http://x") for i in (ids[0], ids[-1]))
    assert first is not None and last is not None
    assert press(sim, first, "Picread::Retry")["code"] == 4  # its image is gone: nothing to read anew
    assert press(sim, last, "Picread::Retry")["code"] == 1


def test_shorten_gives_five_prompts_and_prompt_analyzer_imagines_one() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    assert call(sim, "shorten", {"prompt": " "})["code"] == 4
    assert call(sim, "shorten", {"prompt": "a forbidden lake"})["code"] == 24
    reply = call(sim, "shorten", {"prompt": "a very long prompt about the quiet lake at dawn --ar 2:3 sim:slow"})
    view = done(sim, clock, reply["result"], 50)
    prompts = view["promptEn"].split("\n\n")
    assert view["prompt"].startswith("a very long") and view["properties"]["finalPrompt"] == view["promptEn"]
    assert len(prompts) == 5 and prompts[0] == "1️⃣ long prompt quiet lake dawn --ar 2:3"
    assert view["imageUrl"] is None and sim.image(view["id"]) is None
    assert [b["customId"] for b in view["buttons"]] == [f"MJ::Job::PromptAnalyzer::{i}" for i in range(1, 6)]
    picked = done(sim, clock, press(sim, view, "PromptAnalyzer::5")["result"])
    assert picked["prompt"] == "long --ar 2:3"
    assert call(sim, "action", {"taskId": view["id"], "customId": "MJ::Job::PromptAnalyzer::6"})["code"] == 4


@pytest.mark.parametrize(
    ("dimensions", "size"), [("PORTRAIT", (20, 30)), ("square", (30, 30)), (None, (30, 30)), ("LANDSCAPE", (30, 20))]
)
def test_blend_takes_two_to_five_images_and_the_dimensions(dimensions: str | None, size: tuple[int, int]) -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, tile_px=15)
    for images in ([png()], [png()] * 6, [png(), "data:image/png;base64,AAAA"], "x"):
        assert call(sim, "blend", {"base64Array": images})["code"] == 4
    assert call(sim, "blend", {"base64Array": [png(), png()], "dimensions": "WIDE"})["code"] == 4
    view = done(sim, clock, call(sim, "blend", {"base64Array": [png()] * 5, "dimensions": dimensions})["result"])
    assert view["action"] == "BLEND" and len(view["buttons"]) == 9
    grid = sim.image(view["id"])
    assert grid is not None and Image.open(io.BytesIO(grid)).size == size


def test_swap_face_gives_one_image_of_the_targets_shape() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, tile_px=30)
    assert call(sim, "swap_face", {"sourceBase64": png()})["code"] == 4
    assert call(sim, "swap_face", {"sourceBase64": "x", "targetBase64": png()})["code"] == 4
    view = done(
        sim, clock, call(sim, "swap_face", {"sourceBase64": png(), "targetBase64": png(size=(20, 30))})["result"]
    )
    assert view["action"] == "SWAP_FACE" and view["buttons"] == []
    data = sim.image(view["id"])
    assert data is not None and Image.open(io.BytesIO(data)).size == (20, 30)


def test_imagine_checks_its_reference_images() -> None:
    sim = engine(FakeClock())
    assert submit(sim, "a cat")["code"] == 1
    assert call(sim, "imagine", {"prompt": "a cat", "base64Array": [png(fmt="WEBP")]})["code"] == 1
    assert call(sim, "imagine", {"prompt": "a cat", "base64Array": ["https://example.com/a.png"]})["code"] == 4


def test_uploads_are_kept_and_linked() -> None:
    sim = engine(FakeClock())
    gif = png(fmt="GIF")
    reply = sim.upload({"base64Array": [png(), gif]}, "http://cdn/")
    assert (reply.http_status, reply.body["code"]) == (200, 1)
    links = reply.body["result"]
    assert [link.rsplit(".", 1)[1] for link in links] == ["png", "gif"] and links[0].startswith("http://cdn/upload-")
    key = links[1].rsplit("/", 1)[1].rsplit(".", 1)[0]
    assert sim.image(key) == sim.cached_image(key) == base64.b64decode(gif.split(",")[1])
    assert media_type(sim.image(key) or b"") == "image/gif"
    for body in ({"base64Array": []}, {"base64Array": ["x"]}, {}):
        assert sim.upload(body, "http://cdn").body["code"] == 4


def test_seeds_are_for_finished_images_only() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    task_id = str(submit(sim, "a seedling")["result"])
    unfinished = sim.seed(task_id)
    assert (unfinished.http_status, unfinished.body["code"]) == (400, 4)
    clock.advance(10)
    seed = sim.seed(task_id)
    assert (seed.http_status, seed.body["code"]) == (200, 1) and str(seed.body["result"]).isdigit()
    assert sim.seed(task_id).body == seed.body
    unknown = sim.seed("42")
    assert (unknown.http_status, unknown.body["code"], unknown.unknown_task) == (404, 3, True)
    shortened = done(sim, clock, call(sim, "shorten", {"prompt": "a long prompt"})["result"])
    assert sim.seed(shortened["id"]).body["code"] == 4  # text has no image, so no seed


def test_steering_words_are_whole_words() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0)
    root = done(sim, clock, submit(sim, "a bridge sim:fail-followups sim:never-followups")["result"])
    assert root["status"] == "SUCCESS"  # not sim:fail, not sim:never


def test_pictures_and_media_types() -> None:
    assert picture(png(size=(6, 4))).aspect == (3, 2)  # type: ignore[union-attr]
    for bad in (
        None,
        3,
        "data:image/png;base64",
        "data:image/png,abc",
        "data:image/png;base64,@@@",
        "data:text/x;base64,",
    ):
        assert picture(bad) is None, bad
    assert pictures("x") is None and pictures([png(), "x"]) is None and pictures([]) == []
    assert media_type(b"\xff\xd8\xff\xe0") == "image/jpeg" and media_type(b"RIFF0000WEBPVP8 ") == "image/webp"
    assert media_type(b"??") == "application/octet-stream"
    image = Image.open(io.BytesIO(render_image("t", (3, 2), 60)))
    assert image.size == (60, 40)
