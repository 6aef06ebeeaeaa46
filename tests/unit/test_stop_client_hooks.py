"""Client hooks when a relay process stops beside another on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.clock import SystemClock
from relay.services import Relay
from tests.helpers import pg_database, relay_config

pytestmark = pytest.mark.anyio


@pytest.mark.postgres
async def test_sigterm_during_a_client_hook_s_retry_still_sends_the_job_s_end(tmp_path: Path) -> None:
    """A job ends on relay A; its client's receiver answers the first delivery of the end with 500, so A tries it
    again after `hooks.backoff_s`. A is stopped (SIGTERM) meanwhile. No other process sends the end of a job that
    ended (none adopts it): A must not drop the retry, or the client never hears that its task succeeded."""
    import json as json_module
    import threading

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from relay.core.modes import ModeHints
    from relay.core.tasks import TaskOrder
    from relay.domain import TaskKind
    from tests.helpers import serve

    seen: list[tuple[str, int]] = []
    lock = threading.Lock()
    first_end = threading.Event()

    async def hook(request: Request) -> Response:
        status = json_module.loads(await request.body())["status"]
        with lock:
            refused = status == "SUCCESS" and not first_end.is_set()
            first_end.set() if refused else None
            seen.append((status, 500 if refused else 204))
        return Response(status_code=500 if refused else 204)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    upstream = SimulatorUpstream("sim", SimEngine(SimSettings(fast_s=0.2, tile_px=16)))
    sections = {"api": {"references": {"allow_private": True}}, "hooks": {"backoff_s": 1.0}}
    async with contextlib.AsyncExitStack() as stack:
        url = stack.enter_context(serve(receiver)) + "/hook"
        database = {"url": await stack.enter_async_context(pg_database())}
        a = Relay(relay_config(tmp_path / "a", database=database, **sections), SystemClock(), {"sim": upstream})
        b = Relay(relay_config(tmp_path / "b", database=database, **sections), SystemClock(), {"sim": upstream})
        from relay.api.mj import render as mj_render

        for relay in (a, b):  # as the app does
            relay.notifier.render = lambda row, base, now, relay=relay: mj_render.task(row, relay.images, base, now)
        await a.open()
        await b.open()
        stack.push_async_callback(b.close)
        key, _ = await a.keys.create("k", 100, 0)
        order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite", notify_hook=url)
        await a.tasks.submit(key, order, "http://127.0.0.1:1")
        await asyncio.get_running_loop().run_in_executor(None, first_end.wait, 10)
        assert first_end.is_set()
        await a.close()  # SIGTERM while the end's delivery waits for its retry

        for _ in range(60):  # up to 3 s: the retry is due after 1 s
            if ("SUCCESS", 204) in seen:
                break
            await asyncio.sleep(0.05)
        assert ("SUCCESS", 204) in seen, f"the receiver heard only {seen}"


async def test_a_job_s_end_gets_its_delivery_s_tries_at_shutdown_however_long_an_earlier_state_s_took(
    tmp_path: Path,
) -> None:
    """A job ends while its receiver has not answered the delivery of an earlier state (it never answers those),
    and the process stops (SIGTERM). The end's delivery is owed all its tries (nobody else sends it); the
    receiver answers its third. The earlier state's tries went on first, using up the time the shutdown gives the
    end, and the end was dropped before its last try."""
    import json as json_module
    import threading

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
    from relay.api.mj import render as mj_render
    from relay.core.events import JobEvent
    from relay.core.modes import ModeHints
    from relay.core.tasks import TaskOrder
    from relay.domain import TaskKind
    from tests.helpers import serve

    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    async def hook(request: Request) -> Response:
        status = json_module.loads(await request.body())["status"]
        with lock:
            ends = sum(1 for s, _ in seen if s == "SUCCESS")
            answer = 204 if status == "SUCCESS" and ends >= 2 else 0
            seen.append((status, answer))
        if not answer:  # no answer: the try runs out of time (1 s)
            await asyncio.sleep(3)
        return Response(status_code=answer or 204)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    upstream = SimulatorUpstream("sim", SimEngine(SimSettings(fast_s=0.5, tile_px=16)))
    hooks = {"timeout_s": 1.0, "backoff_s": 0.1, "attempts": 3}
    sections = {"api": {"references": {"allow_private": True}}, "hooks": hooks}
    with serve(receiver) as base:
        relay = Relay(relay_config(tmp_path, **sections), SystemClock(), {"sim": upstream})
        relay.notifier.render = lambda row, base, now: mj_render.task(row, relay.images, base, now)
        ended = asyncio.Event()

        def heard(change: JobEvent) -> None:
            if change.state.terminal:
                ended.set()

        relay.events.listen(heard)
        await relay.open()
        try:
            key, _ = await relay.keys.create("k", 100, 0)
            order = TaskOrder(TaskKind.IMAGINE, ModeHints(model="mj-fast"), prompt="a kite", notify_hook=base + "/hook")
            await relay.tasks.submit(key, order, "http://127.0.0.1:1")
            await asyncio.wait_for(ended.wait(), 10)
            with lock:
                assert seen and seen[0][0] != "SUCCESS", seen  # an earlier state's delivery is under way
        finally:
            await relay.close()  # SIGTERM: the end's tries are let finish
        with lock:
            assert ("SUCCESS", 204) in seen, f"the receiver heard only {seen}"
