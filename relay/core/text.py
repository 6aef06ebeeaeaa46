"""Whether client text can be stored: every database the relay runs on takes it as UTF-8, and PostgreSQL refuses
NUL. A lone surrogate (`"\\ud800"`, which JSON can carry) or a NUL would fail the write it is part of, and writes are
shared between requests, so such text is refused where it comes in, naming its field."""

from __future__ import annotations


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored, or None when it can."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (not valid Unicode)"
    return None


def check_storable(text: str) -> str:
    """`text` itself; raises ValueError (the reason) when it cannot be stored."""
    reason = unstorable(text)
    if reason is not None:
        raise ValueError(reason)
    return text
