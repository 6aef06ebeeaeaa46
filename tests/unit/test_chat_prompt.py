"""The prompt a chat request sends upstream: the last user message's text, without the Discord command a user may
have typed or pasted before it (`/imagine`, and its `prompt:` label)."""

from __future__ import annotations

import json

import pytest

from relay.api.openai.chat import _chunk, last_user_turn
from relay.errors import InvalidRequest


def prompt_of(text: str) -> str:
    return last_user_turn([{"role": "user", "content": text}])[0]


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("a cat", "a cat"),
        ("/imagine a cat", "a cat"),
        ("/IMAGINE a cat", "a cat"),
        ("/imagine\na cat", "a cat"),
        ("/imagine: a cat", "a cat"),
        ("/imagine prompt: a cat", "a cat"),  # as Discord shows the command, and users paste it
        ("/imagine prompt:a cat --ar 3:2", "a cat --ar 3:2"),
        ("/imagine Prompt:  a cat", "a cat"),
    ],
)
def test_the_imagine_command_and_its_prompt_label_are_dropped(typed: str, sent: str) -> None:
    assert prompt_of(typed) == sent


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("/imagined cities", "/imagined cities"),  # not the command: a word that begins like it
        ("/imagineering a theme park", "/imagineering a theme park"),
        ("/imagine promptly a cat", "promptly a cat"),  # the label is `prompt:`, not a word that begins like it
        ("prompt: a cat", "prompt: a cat"),  # a label without the command is the user's text
        ("a cat, /imagine prompt: a dog", "a cat, /imagine prompt: a dog"),
    ],
)
def test_text_that_only_looks_like_the_command_is_kept(typed: str, sent: str) -> None:
    assert prompt_of(typed) == sent


@pytest.mark.parametrize("typed", ["/imagine", "/imagine   ", "/imagine prompt:", "/imagine prompt:  "])
def test_the_command_alone_is_no_prompt(typed: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        prompt_of(typed)
    assert raised.value.param == "messages"


def test_a_streamed_chunk_stays_one_line_for_readers_that_split_as_splitlines_does() -> None:
    # httpx's iter_lines (and so httpx-sse) splits at U+2028, U+2029 and U+0085 too: an upstream's failure reason
    # holding one would cut a chunk in two.
    text = "a crane\u2028in flight\u2029over\x85water"
    chunk = _chunk("chatcmpl-1", 0, "mj-fast", {"content": text})
    lines = [line for line in chunk.decode().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == text
