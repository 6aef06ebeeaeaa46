from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.prompt import (
    PromptError,
    PromptParts,
    build_prompt,
    parse_size,
    prompt_text,
    quality_flag,
    runs_several_jobs,
    style_flag,
)
from relay.core.uploads import own_links


@pytest.mark.parametrize(
    ("size", "aspect"),
    [
        ("1792x1024", (7, 4)),
        ("1024x1792", (4, 7)),
        ("1024x1024", (1, 1)),
        ("1536x1024", (3, 2)),
        ("1920X1080", (16, 9)),
        (" 640 x 480 ", (4, 3)),
        ("1023x1024", (1023, 1024)),
        ("auto", None),
        ("AUTO", None),
        (None, None),
        ("", None),
    ],
)
def test_size_becomes_an_aspect_ratio_reduced_by_gcd(size: str | None, aspect: tuple[int, int] | None) -> None:
    assert parse_size(size) == aspect


@pytest.mark.parametrize(
    "size",
    ["big", "1024", "0x100", "100x0", "-1x5", "1024x1024x2", "20000x10", "1e3x5", "\u0663x\u0663", "\uff11x\uff11"],
)
def test_an_unparseable_size_names_the_size_param(size: str) -> None:
    with pytest.raises(PromptError) as caught:
        parse_size(size)
    assert caught.value.param == "size"


def test_a_refused_size_is_shown_cut_short() -> None:
    with pytest.raises(PromptError) as caught:
        parse_size("9" * 1_000_000)
    assert len(str(caught.value)) < 200 and "9" * 64 in str(caught.value)


def test_quality_and_style_map_or_refuse() -> None:
    assert quality_flag(None) is None and quality_flag("standard") is None and quality_flag("auto") is None
    assert quality_flag("hd") == quality_flag("high") == "--q 2"
    assert quality_flag("low") == "--q .5"
    assert style_flag("natural") == "--style raw" and style_flag("vivid") == "--stylize 750"
    with pytest.raises(PromptError) as caught:
        quality_flag("ultra")
    assert caught.value.param == "quality"
    with pytest.raises(PromptError) as caught:
        style_flag("noir")
    assert caught.value.param == "style"


def test_the_model_mode_replaces_any_mode_flag() -> None:
    parts = PromptParts(text="a cat --turbo in the rain --FAST", mode="relax")
    assert build_prompt(parts) == "a cat in the rain --relax"


def test_flags_written_with_the_dash_keyboards_make_of_two_hyphens_are_read_and_replaced() -> None:
    parts = PromptParts(text="a cat\u2014in the rain \u2014turbo \u2013FAST \u2014ar 1:2", mode="relax", aspect=(3, 2))
    assert build_prompt(parts) == "a cat\u2014in the rain --ar 3:2 --relax"
    assert prompt_text("a cat \u2014ar 1:2 --v 6") == "a cat"


def test_an_explicit_size_replaces_the_prompt_aspect() -> None:
    parts = PromptParts(text="a cat --ar 1:2 --v 6", mode="fast", aspect=(16, 9))
    assert build_prompt(parts) == "a cat --v 6 --ar 16:9 --fast"


def test_without_a_size_the_prompt_aspect_stays() -> None:
    assert build_prompt(PromptParts(text="a cat --aspect 2:3", mode="fast")) == "a cat --aspect 2:3 --fast"


def test_quality_and_style_flags_replace_the_prompt_ones() -> None:
    parts = PromptParts(text="a cat --q 4 --style raw --s 50", mode="fast", quality="--q 2", style="--stylize 750")
    assert build_prompt(parts) == "a cat --style raw --q 2 --stylize 750 --fast"
    parts = PromptParts(text="a cat --style cute", mode="turbo", style="--style raw")
    assert build_prompt(parts) == "a cat --style raw --turbo"


def test_words_that_only_look_like_flags_stay() -> None:
    assert build_prompt(PromptParts(text="breakfast--fast food", mode="fast")) == "breakfast--fast food --fast"


# What `own_links` finds, as one regular expression (which backtracks: quadratic in a prompt of many `http://`).
LINK = re.compile(
    r"<?https?://[^\s<>]+/files/([a-z0-9_]{8,40})/(grid\.png|image\.png|[1-4]\.png)\?exp=(\d{1,12})&sig=([\w\-]+)>?"
)
PIECES = [
    "http://", "https://", "h", "x", "/", "/files/", "job_abcdefgh", "abcdefgh12", "/1.png", "/grid.png", "/5.png",
    "?exp=", "123", "&sig=", "AbC-_9", " ", "<", ">", "\n", ",", "é", "\u3000", "\x85",
    "/files/job_aaaaaaaa/2.png?exp=9&sig=zz", "files/", "/files/files/abcdefgh/3.png?exp=1&sig=q",
]  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=16).map("".join))
def test_the_relays_own_links_are_found_as_the_expression_finds_them(prompt: str) -> None:
    expected = [(m.start(), m.end(), *m.groups()) for m in LINK.finditer(prompt)]
    assert [(k.start, k.end, k.job_id, k.name, k.expires, k.signature) for k in own_links(prompt)] == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "http://" * 200_000,  # as one expression: hours
        "http:///files/" * 100_000,
        "http://x" + "/files/abcdefgh12/1.png?exp=1&sig=" * 50_000,
    ],
)
def test_a_prompt_made_to_make_the_link_scan_backtrack_is_scanned_in_one_pass(prompt: str) -> None:
    assert own_links(prompt) == []


@pytest.mark.parametrize(
    ("prompt", "several"),
    [
        ("a cat --repeat 3", True),
        ("a cat --r 2", True),
        ("a cat \u2014r 4 --ar 2:3", True),  # a keyboard's em dash is read as --
        ("a cat --R", True),
        ("a {red, blue} bird", True),
        ("a bird --ar {1:1, 16:9}", True),
        ("a {red, {blue, green}} bird", True),
        ("a {single} bird", False),
        ("a {red\\, blue} bird", False),  # an escaped comma is a comma
        ("a bird --relax --raw --ar 1:1", False),
        ("a bird, red --r2d2", False),
        ("a bird }, {", False),
    ],
)
def test_a_prompt_midjourney_runs_as_several_jobs_is_told_apart(prompt: str, several: bool) -> None:
    assert runs_several_jobs(prompt) is several


def test_a_prompt_of_an_open_brace_and_commas_is_read_for_permutations_in_one_pass() -> None:
    """As one expression the check for a permutation was quadratic: a prompt of `{` and 31,999 commas (the longest
    `api.max_prompt_chars` allows, none of them closed) held the event loop for over 4 s, 70 ms at the default."""
    started = time.perf_counter()
    assert runs_several_jobs("{" + "," * 31_999) is False
    assert runs_several_jobs("a {" + ", " * 15_999) is False
    assert time.perf_counter() - started < 0.5


# What `runs_several_jobs` finds of a permutation, as one regular expression (which backtracks: quadratic).
PERMUTATION = re.compile(r"\{[^{}]*(?<!\\),[^{}]*\}")


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(["{", "}", ",", "\\", "a", " "]), max_size=14).map("".join))
def test_a_permutation_is_found_as_the_expression_finds_it(prompt: str) -> None:
    assert runs_several_jobs(prompt) is (PERMUTATION.search(prompt) is not None)
