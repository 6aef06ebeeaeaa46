"""The bound on a JSON body's values holds for every encoding `json.loads` reads (UTF-8, UTF-16, UTF-32)."""

from __future__ import annotations

import json

import pytest

from relay.api.common import MAX_JSON_VALUES, _too_many_values


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_body_of_a_million_values_is_refused_in_any_encoding_json_reads(encoding: str) -> None:
    # An escaped quote in UTF-16 is 5C 00 22 00: the string pattern's `\\.` takes the backslash and its zero byte,
    # and the quote that follows closes the string early; the real closing quote then opens a "string" that
    # swallows every comma after it. 1,000,000 values (a 20 MB body in UTF-16 holds 5,000,000) counted as a few.
    doc = '{"model": "mj-fast", "messages": ["\\"", ' + "0," * 1_000_000 + ' "x"]}'
    raw = doc.encode(encoding)
    assert len(json.loads(raw)["messages"]) == 1_000_002  # what the relay would parse
    assert _too_many_values(raw)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_a_pasted_csv_is_one_value_in_any_encoding(encoding: str) -> None:
    csv = "\n".join(f'2024-01-{i % 28 + 1:02d},{i},{i * 3 % 997},ok \\ "q"' for i in range(40_000))
    raw = json.dumps({"model": "mj-fast", "messages": [{"role": "user", "content": csv}]}).encode(encoding)
    assert raw.count(",".encode(encoding)[-1:]) > MAX_JSON_VALUES
    assert not _too_many_values(raw)
