"""Which provider takes a job: a pure function over the providers' current state, no I/O.

Providers that cannot run the job's mode and bot (`can_run`), that are already at `max_in_flight`, that their health
sets aside (`available` is False: cooling, down, or half-open with its one trial under way; see `core.health`), or
that this job already tried are left out. The rest are ordered by `priority` (lower first); within one priority, in a
weighted random order (a provider with weight 2 comes first twice as often as one with weight 1).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from relay.core.modes import DEFAULT_MODE

# Task kinds whose submit sends no prompt, so no mode flag: only the dialect's own mechanism (a path, accountFilter, a
# body `model`) names their mode. An upstream that reads none runs them in its default mode, fast (as the relay's own
# mode rule defaults to it), or in the one mode a provider that serves only one has.
WITHOUT_PROMPT = frozenset({"blend", "describe", "swap_face"})


def can_run(
    modes: Collection[str], bots: Collection[str], carries_mode: bool, *, mode: str, bot: str, prompt_less: bool
) -> bool:
    """Whether a provider runs a task of `mode` and `bot` in that mode; `prompt_less`: the task has no prompt (see
    `WITHOUT_PROMPT`), and `carries_mode` says whether the provider's dialect reaches the upstream with the mode."""
    if mode not in modes or bot not in bots:
        return False
    return not prompt_less or carries_mode or mode == DEFAULT_MODE or set(modes) == {mode}


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
    carries_mode: bool = True  # its submits name their mode to the upstream without a prompt's flag

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
    prompt_less: bool = False,
) -> list[str]:
    """Names of the providers to try for one job, best first (`prompt_less`: see `can_run`)."""
    draw = rng or random.Random()
    able = [
        c
        for c in candidates
        if can_run(c.modes, c.bots, c.carries_mode, mode=mode, bot=bot, prompt_less=prompt_less)
        and c.available
        and c.name not in exclude
        and not c.full
    ]
    # Efraimidis-Spirakis: sorting by u ** (1 / w) gives a weighted random order without replacement.
    keyed = [(c.priority, -(draw.random() ** (1.0 / c.weight)), c.name) for c in able]
    return [name for _, _, name in sorted(keyed)]
