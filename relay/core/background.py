"""Background tasks a service starts and stops: stopping cancels them all, then waits for each to finish; or first
lets them finish on their own, for a while (`let_finish`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
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
