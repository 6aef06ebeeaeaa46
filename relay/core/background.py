"""Background tasks a service starts and stops: stopping cancels them all, then waits for each to finish; or first
lets them finish on their own, for a while (`let_finish`). A periodic one is `every`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any


async def cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel every task, then wait for each; what a task raised on its way out is not the caller's concern."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def let_finish(tasks: Iterable[asyncio.Future[Any]], timeout_s: float) -> None:
    """Wait for the tasks to finish on their own, for at most `timeout_s`; what they raised is not looked at here."""
    pending = list(tasks)
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


async def every(
    sleep: Callable[[float], Awaitable[None]],
    seconds: float,
    work: Callable[[], Awaitable[object]],
    log: logging.Logger,
    failed: str,
    fields: Mapping[str, object] | None = None,
) -> None:
    """Do `work` every `seconds`, until cancelled; a round that raises is logged (`failed`, with `fields`) and the
    next one comes all the same."""
    while True:
        await sleep(seconds)
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(failed, extra={"fields": dict(fields)} if fields else None)
