from __future__ import annotations

import io

from PIL import Image

from adapters.simulator import SimEngine, SimSettings
from adapters.simulator.grid import aspect_of, render_grid, tile_size
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


def test_fail_rate_and_capacity() -> None:
    clock = FakeClock()
    sim = engine(clock, fast_s=10.0, fail_rate=1.0, capacity=2, seed=3)
    first, second = (str(submit(sim, f"job {i}")["result"]) for i in range(2))
    assert submit(sim, "third")["code"] == 23  # two unfinished tasks fill it
    clock.advance(6)
    assert all(sim.task(t, "")["status"] == "FAILURE" for t in (first, second))  # type: ignore[index]
    assert submit(sim, "fourth")["code"] == 1  # failed tasks free their places


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
