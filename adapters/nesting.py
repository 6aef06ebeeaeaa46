"""How deeply JSON text nests, read from its bytes before it is parsed. Pure, no I/O.

Python's JSON parser descends one level of the interpreter's stack per level of nesting, and counts it against the
same recursion limit as Python calls. A body nested thousands deep is refused with a `RecursionError`, but only once
the parser is at the limit, and whatever the garbage collector runs there (a finalizer that closes a socket, a
callback of a weak reference) fails for want of stack and is lost, in a process serving everyone else. Text that
nests deeper than its reader allows is therefore refused before it reaches the parser.
"""

from __future__ import annotations

import json
import re

__all__ = ["JSON_STRING", "nests_deeper"]

# A JSON string, escapes included; one never closed runs to the end of the text, as the parser reads it.
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_OPENING = frozenset(b"[{")


def nests_deeper(raw: bytes, limit: int) -> bool:
    """Whether JSON text (bytes in any encoding the json module reads) opens more than `limit` levels at once,
    brackets within strings apart. Counted as the parser would meet them: an opening bracket never closed counts.
    Text with no more opening brackets than `limit` is answered at once; other text costs one pass over its
    brackets."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # every level opens with one (in UTF-16 and UTF-32 too, one byte of each)
    encoding = json.detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):
        try:  # in those, a bracket byte may belong to another character
            raw = raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
        except UnicodeError:
            return False  # not JSON in that encoding either: the parser refuses it at once
    depth = 0
    for byte in JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        if byte in _OPENING:
            depth += 1
            if depth > limit:
                return True
        elif depth:
            depth -= 1
    return False
