"""The simulator's hook calls, on a hand-moved clock: when they are made, what they carry, and the faults that can be
injected (drops, duplicates, reordering, delay)."""

from __future__ import annotations

import asyncio
import json

import pytest

from adapters.simulator import SimEngine, SimSettings
from adapters.simulator.hooks import HookSender, HookSettings, summary
from tests.api.native_helpers import png
from tests.helpers import FakeClock

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, str, dict[str, object]]] = []

    async def __call__(self, url: str, body: bytes) -> None:
        self.calls.append((self.clock.now(), url, json.loads(body)))

    def steps(self) -> list[tuple[str, str]]:
        return [(str(view["status"]), str(view["progress"])) for _, _, view in self.calls]


async def run(clock: FakeClock, seconds: float, step: float = 0.05) -> None:
    """Move the clock in small steps, letting woken coroutines run at each."""
    for _ in range(round(seconds / step)):
        clock.advance(step)
        for _ in range(5):
            await asyncio.sleep(0)


def world(settings: HookSettings, **sim: object) -> tuple[FakeClock, SimEngine, Recorder, HookSender]:
    clock = FakeClock()
    engine = SimEngine(SimSettings(**{"fast_s": 1.0, "tile_px": 16, **sim}), now=clock.now)  # type: ignore[arg-type]
    recorder = Recorder(clock)
    sender = HookSender(engine, settings, "http://sim/cdn", post=recorder, sleep=clock.sleep)
    return clock, engine, recorder, sender


async def test_each_change_is_called_once_in_order_with_the_whole_task() -> None:
    clock, engine, recorder, _ = world(HookSettings())
    reply = engine.submit("imagine", {"prompt": "a cat", "state": "job-1", "notifyHook": "http://relay/h"})
    await run(clock, 1.5)
    assert recorder.steps() == [("IN_PROGRESS", f"{step}%") for step in (0, 15, 31, 46, 62, 78, 93)] + [
        ("SUCCESS", "100%")
    ]
    *_, (at, url, last) = recorder.calls
    assert url == "http://relay/h" and last["id"] == reply.body["result"] and last["state"] == "job-1"
    assert str(last["imageUrl"]).startswith("http://sim/cdn/") and at >= engine.now() - 0.5
    stamps = [at for at, _, _ in recorder.calls]
    assert stamps == sorted(stamps)


async def test_without_progress_only_the_start_and_the_end_are_called_and_no_hook_means_no_call() -> None:
    clock, engine, recorder, _ = world(HookSettings(progress=False))
    engine.submit("imagine", {"prompt": "a cat", "notifyHook": "http://relay/h"})
    engine.submit("imagine", {"prompt": "a dog"})
    await run(clock, 1.5)
    assert recorder.steps() == [("IN_PROGRESS", "0%"), ("SUCCESS", "100%")]


@pytest.mark.parametrize("fast_s", [0.0, 0.002])
async def test_a_task_quicker_than_its_steps_is_called_once_per_change(fast_s: float) -> None:
    """Changes closer together than a timer's resolution are one change: each view is called once, as
    midjourney-proxy sends each status and progress once."""
    clock, engine, recorder, _ = world(HookSettings(), fast_s=fast_s)
    engine.submit("imagine", {"prompt": "a cat", "notifyHook": "http://relay/h"})
    await run(clock, 0.5)
    assert recorder.steps()[-1] == ("SUCCESS", "100%")
    assert len(set(recorder.steps())) == len(recorder.steps()), recorder.steps()


async def test_each_call_is_timed_its_wait_for_a_lane_and_its_answer() -> None:
    """A receiver slower to answer than calls come makes them queue for the lanes, as they queue for
    midjourney-proxy's threads: each call's wait for a lane and the receiver's answer are timed, and `summary` gives
    them for the calls due since a moment, the calls that end a task apart."""
    clock = FakeClock()
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16), now=clock.now)

    async def slow(url: str, body: bytes) -> None:
        await clock.sleep(0.1)

    sender = HookSender(engine, HookSettings(lanes=1, progress=False), "http://sim/cdn", post=slow, sleep=clock.sleep)
    for prompt in ("a cat", "a dog"):
        engine.submit("imagine", {"prompt": prompt, "notifyHook": "http://relay/h"})
    await run(clock, 2.0)
    timings = list(sender.timings)
    assert len(timings) == 4  # each task's start and end, the two at each moment made one after the other
    assert sorted(timing.waited for timing in timings) == pytest.approx([0.0, 0.0, 0.1, 0.1])
    assert [timing.took for timing in timings] == pytest.approx([0.1] * 4)
    assert [timing.ending for timing in timings] == [False, False, True, True]
    assert summary(timings, since=0.0) == {
        "calls": 4,
        "wait_ms": pytest.approx([100.0, 100.0]),  # the median of four is the upper middle one
        "answer_ms": pytest.approx([100.0, 100.0]),
        "ending_wait_ms": pytest.approx([0.0, 100.0]),
    }
    ends = summary(timings, since=timings[2].at)  # the calls due from the ends on
    assert ends["calls"] == 2 and ends["wait_ms"] == pytest.approx([0.0, 100.0])
    assert summary(timings, since=clock.now() + 1) == {"calls": 0, "wait_ms": [], "answer_ms": [], "ending_wait_ms": []}


async def test_a_timer_that_fires_early_does_not_make_a_call_before_its_change() -> None:
    """A loop's timer can fire a moment before the wall clock reaches its time: the end call must still say the
    task ended (else nothing follows it and the receiver waits for a poll)."""
    clock = FakeClock()
    engine = SimEngine(SimSettings(fast_s=1.0, tile_px=16), now=clock.now)

    async def early(seconds: float) -> None:  # a long wait ends 2 ms early; a short one ends a little late
        clock.advance(seconds - 0.002 if seconds > 0.01 else seconds + 1e-6)

    recorder = Recorder(clock)
    HookSender(engine, HookSettings(progress=False), "http://sim/cdn", post=recorder, sleep=early)
    engine.submit("imagine", {"prompt": "a cat", "notifyHook": "http://relay/h"})
    for _ in range(50):
        await asyncio.sleep(0)
    assert recorder.steps() == [("IN_PROGRESS", "0%"), ("SUCCESS", "100%")]


async def test_a_failing_task_ends_at_its_failure() -> None:
    clock, engine, recorder, _ = world(HookSettings(progress=False))
    engine.submit("imagine", {"prompt": "a cat sim:fail", "notifyHook": "http://relay/h"})
    await run(clock, 1.5)
    assert recorder.steps() == [("IN_PROGRESS", "0%"), ("FAILURE", "")]


async def test_drops_duplicates_reordering_and_delay_can_be_injected() -> None:
    clock, engine, recorder, sender = world(HookSettings(drop=1.0))
    engine.submit("imagine", {"prompt": "a cat", "notifyHook": "http://relay/h"})
    await run(clock, 1.5)
    assert recorder.calls == [] and sender.sent == 0

    clock, engine, recorder, sender = world(HookSettings(duplicate=1.0, progress=False))
    engine.submit("imagine", {"prompt": "a cat", "notifyHook": "http://relay/h"})
    await run(clock, 1.5)
    assert recorder.steps() == [("IN_PROGRESS", "0%")] * 2 + [("SUCCESS", "100%")] * 2 and sender.sent == 4

    clock, engine, recorder, _ = world(HookSettings(delay_s=0.25, progress=False))
    start = clock.now()
    engine.submit("imagine", {"prompt": "a cat", "notifyHook": "http://relay/h"})
    await run(clock, 1.5)
    arrived = [at - start for at, _, _ in recorder.calls]
    # each change (0.1 s: running; 1.0 s: done) + 0.25 s, to the 0.05 s steps the clock moves in
    assert len(arrived) == 2 and all(abs(at - due) <= 0.1 for at, due in zip(arrived, (0.35, 1.25), strict=True))

    clock, engine, recorder, _ = world(HookSettings(reorder=0.5, reorder_s=0.5, seed=3))
    engine.submit("imagine", {"prompt": "a cat", "notifyHook": "http://relay/h"})
    await run(clock, 2.5)
    progress = [int(str(view["progress"]).rstrip("%")) for _, _, view in recorder.calls]
    assert sorted(progress) == [0, 15, 31, 46, 62, 78, 93, 100]  # every change arrives...
    assert progress != sorted(progress)  # ...and some after later ones


async def test_a_task_waiting_in_modal_is_called_once_confirmed() -> None:
    clock, engine, recorder, _ = world(HookSettings(progress=False))
    parent = str(engine.submit("imagine", {"prompt": "a cat"}).body["result"])
    await run(clock, 1.5)
    grid = engine.task(parent, "http://sim/cdn")
    assert grid is not None
    upscale_button = next(b["customId"] for b in grid["buttons"] if "upsample::1" in b["customId"])  # type: ignore[index]
    upscale = str(engine.submit("action", {"taskId": parent, "customId": upscale_button}).body["result"])
    await run(clock, 1.5)
    done = engine.task(upscale, "http://sim/cdn")
    assert done is not None
    region = next(b["customId"] for b in done["buttons"] if "Inpaint" in b["customId"])  # type: ignore[index]
    waiting = engine.submit("action", {"taskId": upscale, "customId": region, "notifyHook": "http://relay/h"})
    await run(clock, 1.5)
    assert recorder.calls == []  # waiting in MODAL: nothing changes, nothing is called
    engine.submit("modal", {"taskId": waiting.body["result"], "maskBase64": png()})
    await run(clock, 1.5)
    assert recorder.steps() == [("IN_PROGRESS", "0%"), ("SUCCESS", "100%")]


async def test_calls_over_http_reuse_a_kept_connection_and_survive_its_closing() -> None:
    """As the JDK's HttpURLConnection under midjourney-proxy's RestTemplate: calls to one receiver share a kept
    connection, and one the receiver closed while it was kept is replaced (the call made again, once)."""
    received: list[bytes] = []
    connections = 0
    close_after_answer = False

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while line := await reader.readline():
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    length = int(value) if name.lower() == "content-length" else length
                received.append(line + await reader.readexactly(length))
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
                if close_after_answer:
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(receiver, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks/up/token"
    sender = HookSender(SimEngine(SimSettings(tile_px=16)), HookSettings(), "http://sim/cdn")
    for n in range(3):
        await sender._http_post(url, json.dumps({"n": n}).encode())
    assert connections == 1 and len(received) == 3
    close_after_answer = True
    await sender._http_post(url, b"{}")  # answered, then the receiver closes the kept connection
    await asyncio.sleep(0.05)
    await sender._http_post(url, b'{"after": "close"}')  # on the dead connection first, then on a new one
    assert received[-1].endswith(b'{"after": "close"}') and connections == 2
    await sender.aclose()
    server.close()
    await server.wait_closed()
