"""The garbage collector as `serve` tunes it, and each collection's pause timed for `/metrics`."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from relay import collector
from relay.collector import Pauses


class Ticks:
    """A clock that moves `step` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture(autouse=True)
def only_collections_asked_for() -> Iterator[None]:
    """No collection the allocations of the test itself would start."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_each_collection_is_reported_with_its_generation_and_how_long_it_held_the_process() -> None:
    seen: list[tuple[int, float]] = []
    pauses = Pauses(lambda generation, seconds: seen.append((generation, seconds)), clock=Ticks(0.25))
    pauses.install()
    try:
        gc.collect(1)
        gc.collect(0)
    finally:
        pauses.remove()
    assert seen == [(1, 0.25), (0, 0.25)]


def test_nothing_is_reported_once_removed_and_installing_twice_reports_once() -> None:
    seen: list[int] = []
    pauses = Pauses(lambda generation, seconds: seen.append(generation))
    pauses.install()
    pauses.install()
    gc.collect(2)
    pauses.remove()
    gc.collect(2)
    assert seen == [2]
    assert all(getattr(callback, "__self__", None) is not pauses for callback in gc.callbacks)


@pytest.fixture
def gc_restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("gc_restored")
def test_tune_freezes_what_exists_and_collects_the_middle_generation_a_tenth_as_often_as_python() -> None:
    kept = [[] for _ in range(100)]  # objects that exist when the process is tuned
    collector.tune()
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold() == (10_000, 100, 10)
