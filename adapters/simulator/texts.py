"""The text results: describe's four prompts for an image, shorten's five shorter prompts. Deterministic: the same
image or prompt always reads the same, numbered the way Midjourney numbers them ("1️⃣ ...\\n\\n2️⃣ ...")."""

from __future__ import annotations

import hashlib
import re

NUMBERS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣", "5️⃣")
_SUBJECTS = ("a lighthouse", "a red fox", "a quiet harbour", "a city at night", "an old oak", "a paper boat")
_STYLES = ("oil painting", "watercolor", "35mm photograph", "ink sketch", "digital art", "low-poly render")
_MOODS = ("soft morning light", "dramatic shadows", "pastel palette", "muted tones", "vivid colours", "misty air")
_FLAGS = re.compile(r"(?<!\S)--\w+(?:\s+(?!--)\S+)?")
_FILLER = {"a", "an", "the", "of", "with", "and", "very", "in", "at", "on", "about", "is", "that", "which", "some"}


def numbered(prompts: tuple[str, ...]) -> str:
    return "\n\n".join(f"{NUMBERS[i]} {text}" for i, text in enumerate(prompts))


def describe(data: bytes, aspect: tuple[int, int], salt: str = "") -> tuple[str, ...]:
    """Four prompts that describe an image, each with the image's `--ar`; another salt reads it anew."""
    digest = hashlib.sha256(data + salt.encode()).digest()
    out = []
    for index in range(4):
        subject = _SUBJECTS[(digest[index] + index) % len(_SUBJECTS)]
        style = _STYLES[(digest[4 + index] + index) % len(_STYLES)]
        mood = _MOODS[(digest[8 + index] + index) % len(_MOODS)]
        out.append(f"{subject}, {style}, {mood} --ar {aspect[0]}:{aspect[1]}")
    return tuple(out)


def shorten(prompt: str) -> tuple[str, ...]:
    """Five ever shorter versions of a prompt (its parameters kept at the end of each)."""
    flags = " ".join(match.group(0) for match in _FLAGS.finditer(prompt))
    words = [w for w in _FLAGS.sub(" ", prompt).replace(",", " ").split() if not w.lower().startswith("sim:")]
    kept = [w for w in words if w.lower() not in _FILLER] or words or ["image"]
    out = []
    for index in range(5):
        size = max(1, round(len(kept) * (5 - index) / 5))
        text = " ".join(kept[:size])
        out.append(f"{text} {flags}".strip())
    return tuple(out)
