"""Whether text can be stored: every database the relay runs on takes it as UTF-8, and PostgreSQL refuses NUL. A
lone surrogate (`"\\ud800"`, which JSON can carry) or a NUL would fail the write it is part of, and writes are shared
between requests and jobs. Client text with them is refused where it comes in, naming its field; upstream text is
made storable (`storable`) before the relay keeps it."""

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


def storable(text: str | None) -> str | None:
    """`text` without what a database cannot store: NUL is dropped, an unpaired surrogate becomes U+FFFD."""
    if text is None or unstorable(text) is None:
        return text
    return "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text if char != "\x00")
