"""Which provider takes a job: a pure function over the providers' current state, no I/O.

Providers that cannot serve the job's mode or bot, that are already at `max_in_flight`, that their health sets
aside (`available` is False: cooling, down, or half-open with its one trial under way; see `core.health`), or that
this job already tried are left out. The rest are ordered by `priority` (lower first); within one priority, in a
weighted random order (a provider with weight 2 comes first twice as often as one with weight 1).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    modes: frozenset[str]
    bots: frozenset[str]
    priority: int = 0
    weight: int = 1
    in_flight: int = 0
    max_in_flight: int | None = None
    available: bool = True  # its health lets a new job through

    @property
    def full(self) -> bool:
        return self.max_in_flight is not None and self.in_flight >= self.max_in_flight


def rank(
    candidates: Sequence[Candidate],
    *,
    mode: str,
    bot: str,
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
) -> list[str]:
    """Names of the providers to try for one job, best first."""
    draw = rng or random.Random()
    able = [
        c
        for c in candidates
        if mode in c.modes and bot in c.bots and c.available and c.name not in exclude and not c.full
    ]
    # Efraimidis-Spirakis: sorting by u ** (1 / w) gives a weighted random order without replacement.
    keyed = [(c.priority, -(draw.random() ** (1.0 / c.weight)), c.name) for c in able]
    return [name for _, _, name in sorted(keyed)]
