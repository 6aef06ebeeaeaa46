from __future__ import annotations

import random
from collections import Counter

from relay.core.router import Candidate, rank

ALL = frozenset({"fast", "relax", "turbo"})
MJ = frozenset({"MID_JOURNEY"})
BOTH = frozenset({"MID_JOURNEY", "NIJI_JOURNEY"})


def test_capability_filters_mode_and_bot() -> None:
    providers = [
        Candidate("fast-only", frozenset({"fast"}), BOTH),
        Candidate("mj-only", ALL, MJ),
        Candidate("all", ALL, BOTH),
    ]
    assert sorted(rank(providers, mode="relax", bot="NIJI_JOURNEY")) == ["all"]
    assert sorted(rank(providers, mode="fast", bot="MID_JOURNEY")) == ["all", "fast-only", "mj-only"]


def test_lower_priority_numbers_come_first() -> None:
    providers = [Candidate("backup", ALL, MJ, priority=1, weight=100), Candidate("main", ALL, MJ, priority=0)]
    for seed in range(20):
        assert rank(providers, mode="fast", bot="MID_JOURNEY", rng=random.Random(seed)) == ["main", "backup"]


def test_weights_share_the_first_place_within_a_tier() -> None:
    providers = [Candidate("heavy", ALL, MJ, weight=3), Candidate("light", ALL, MJ, weight=1)]
    rng = random.Random(7)
    firsts = Counter(rank(providers, mode="fast", bot="MID_JOURNEY", rng=rng)[0] for _ in range(4000))
    assert 0.70 < firsts["heavy"] / 4000 < 0.80


def test_full_and_already_tried_providers_are_left_out() -> None:
    providers = [
        Candidate("full", ALL, MJ, in_flight=3, max_in_flight=3),
        Candidate("tried", ALL, MJ),
        Candidate("free", ALL, MJ, in_flight=2, max_in_flight=3),
    ]
    assert rank(providers, mode="fast", bot="MID_JOURNEY", exclude={"tried"}) == ["free"]
    assert rank(providers[:1], mode="fast", bot="MID_JOURNEY") == []


def test_providers_their_health_sets_aside_are_left_out() -> None:
    providers = [
        Candidate("cooling", ALL, MJ, priority=0, available=False),
        Candidate("healthy", ALL, MJ, priority=1),
    ]
    for seed in range(20):
        assert rank(providers, mode="fast", bot="MID_JOURNEY", rng=random.Random(seed)) == ["healthy"]
    assert rank(providers[:1], mode="fast", bot="MID_JOURNEY") == []


def test_a_task_without_a_prompt_goes_only_where_its_mode_reaches_the_upstream() -> None:
    """A blend, describe or face swap has no prompt to carry a mode flag: a provider whose dialect names no mode
    (new-api, a midjourney-proxy without accountFilter or prefix) runs it in its default mode, fast, or in its one
    mode when it serves only one. In another mode it goes to a provider that names the mode, and to no other."""
    providers = [
        Candidate("silent", ALL, MJ, priority=0, carries_mode=False),
        Candidate("relax-only", frozenset({"relax"}), MJ, priority=0, carries_mode=False),
        Candidate("naming", ALL, MJ, priority=1),
    ]
    assert rank(providers, mode="relax", bot="MID_JOURNEY", prompt_less=True)[-1] == "naming"
    assert sorted(rank(providers, mode="relax", bot="MID_JOURNEY", prompt_less=True)) == ["naming", "relax-only"]
    assert rank(providers, mode="turbo", bot="MID_JOURNEY", prompt_less=True) == ["naming"]
    assert rank(providers, mode="fast", bot="MID_JOURNEY", prompt_less=True) == ["silent", "naming"]
    assert rank(providers, mode="turbo", bot="MID_JOURNEY") == ["silent", "naming"]  # a prompt carries its flag
