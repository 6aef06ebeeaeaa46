"""JSON nested deeper than its reader allows never reaches the parser (`adapters.nesting`): the parser would refuse
it only at the interpreter's recursion limit, where whatever the garbage collector runs then (a finalizer closing
a socket) fails for want of stack and is lost. Seen as a test of generated input failing with an unraisable
`RecursionError` from such a finalizer, in the process serving the relay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from adapters import replies
from adapters.nesting import nests_deeper
from relay.api.common import MAX_JSON_DEPTH, json_body
from relay.errors import InvalidRequest

ENCODINGS = ["utf-8", "utf-16", "utf-16-le", "utf-32-be"]
# Text that reads like brackets and escapes, so that strings full of them are drawn.
_tricky = st.text(alphabet=st.sampled_from('[]{}"\\,:a\u00e9\u5b00'), max_size=12)
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | _tricky,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_tricky, inner, max_size=3),
    max_leaves=30,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=400, deadline=None)
@given(_values, st.integers(0, 6), st.sampled_from(ENCODINGS), st.booleans())
def test_the_depth_read_from_the_bytes_is_the_depth_of_the_parsed_value(
    value: Any, limit: int, encoding: str, ascii_only: bool
) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode(encoding)
    assert nests_deeper(raw, limit) == (_depth(value) > limit)


@pytest.mark.parametrize(
    ("raw", "deeper"),
    [
        (b"[" * 33, True),  # never closed: the parser descends all the same
        (b"[" * 32 + b"]" * 32, False),
        (b"[" * 33 + b"]" * 33, True),
        (b'["' + b"[" * 100 + b'"]', False),  # brackets in a string
        (b'"' + b"[" * 100, False),  # in a string never closed: the parser refuses it at its first character
        (b'["\\"' + b"[" * 100 + b'"]', False),  # after an escaped quote, still in the string
        (b"]" * 100 + b"[" * 32, False),  # closing brackets first open nothing
        (("[" * 33 + "]" * 33).encode("utf-16"), True),
        (('["' + "\u5b5b" * 100 + '"]').encode("utf-16-le"), False),  # a character whose bytes are both "["
        (b"[\x00" * 40 + b"\x00", False),  # not text in the encoding its bytes suggest: the parser reads none of it
    ],
)
def test_examples(raw: bytes, deeper: bool) -> None:
    assert nests_deeper(raw, 32) is deeper


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How deeply each text the json module's decoder was given nests (the bodies here have no string brackets)."""
    seen: list[int] = []
    decode = json.JSONDecoder.raw_decode

    def spy(self: json.JSONDecoder, text: str, idx: int = 0) -> tuple[Any, int]:
        depth = deepest = 0
        for char in text:
            depth += (char in "[{") - (char in "]}")
            deepest = max(deepest, depth)
        seen.append(deepest)
        return decode(self, text, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", spy)
    yield seen


def _request(body: bytes) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


@pytest.mark.anyio
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 5000])
async def test_a_client_body_nested_too_deep_is_refused_unparsed(parsed: list[int], depth: int) -> None:
    body = b'{"prompt": "x", "n": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(InvalidRequest, match=f"nests more than {MAX_JSON_DEPTH} levels"):
        await json_body(_request(body))
    assert parsed == []
    shallow = b'{"prompt": "x", "n": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert (await json_body(_request(shallow)))["prompt"] == "x"
    assert parsed == [MAX_JSON_DEPTH]


@pytest.mark.parametrize("depth", [replies.MAX_NESTING + 1, 5000])
def test_an_upstream_answer_nested_too_deep_is_not_json_and_unparsed(parsed: list[int], depth: int) -> None:
    task = b'{"id": "t1", "status": "SUCCESS", "properties": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    assert replies.parse_hook(task) is None
    assert parsed == []
    with pytest.raises(ValueError, match="non-JSON"):
        replies.parse_fetch(200, task)
    assert parsed == []
    assert replies.parse_hook(task.replace(b"[" * depth + b"]" * depth, b"[[]]")) is not None
    assert parsed == [4]
