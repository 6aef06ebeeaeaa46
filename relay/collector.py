"""Python's cyclic garbage collector, as `serve` tunes it, and its pauses, as `/metrics` shows them.

    THRESHOLDS  how often each generation is collected (`tune`)
    tune()      freezes what the process made at start, then sets THRESHOLDS
    Pauses      times each collection into a histogram while installed (from the app's start to its close)

Every collection holds the event loop for as long as it runs, so a pause lands on whatever the loop was about to
answer. The relay starts with about a hundred thousand long-lived objects (modules, SQLAlchemy, pydantic and
Starlette structures): frozen after start (`gc.freeze`), no collection scans them again. Full passes over them had
taken 60-90 ms each, three times within one burst of a thousand requests.

What a burst makes is mostly alive until its requests end: each request's scope, task, job and subscription
survive the youngest generation's collections (every 10,000 net allocations instead of 700) and move to the
middle one. Collecting that one every 10 of those, as Python does, scanned a burst's live requests twice per
burst of a thousand, 35-63 ms in all (single pauses of up to 36 ms, while jobs were being ended), and found almost
nothing to free: the requests' objects are freed by their reference counts as they end (after such a burst the
collector follows about 1,400 objects more than before it). So the middle generation is collected every 100 of
the youngest's collections, about once every four such bursts; the cycles the youngest leaves wait that much
longer, and the oldest is collected as Python does, every tenth of those.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

__all__ = ["THRESHOLDS", "Pauses", "tune"]

THRESHOLDS = (10_000, 100, 10)


def tune() -> None:
    """Collect and freeze what exists now (call it once the process has made what it keeps), then set
    `THRESHOLDS`."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


class Pauses:
    """Calls `observe(generation, seconds)` after each collection, from `install` until `remove`."""

    def __init__(self, observe: Callable[[int, float], None], clock: Callable[[], float] = time.perf_counter) -> None:
        self._observe = observe
        self._clock = clock
        self._started: float | None = None

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        self._started = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
        elif self._started is not None:
            started, self._started = self._started, None
            self._observe(int(info["generation"]), self._clock() - started)
