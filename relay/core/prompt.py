"""From an OpenAI-style request to the Midjourney prompt actually sent: pure functions, no I/O.

size     "WxH" -> `--ar W:H` reduced by their gcd ("1792x1024" -> `--ar 7:4`); "auto" or none adds nothing.
         An explicit size replaces any `--ar`/`--aspect` already in the prompt.
quality  auto, standard, medium: nothing; hd, high: `--q 2`; low: `--q .5` (replaces `--q`/`--quality`).
style    vivid: `--stylize 750`; natural: `--style raw`.
mode     the model's mode flag (`--fast`, `--relax`, `--turbo`) ends the prompt; a conflicting mode flag the
         user wrote is removed, so the model decides the mode (and the price).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from adapters import Mode

MAX_SIDE = 16_384
QUALITY_FLAGS: dict[str, str | None] = {
    "auto": None,
    "standard": None,
    "medium": None,
    "hd": "--q 2",
    "high": "--q 2",
    "low": "--q .5",
}
STYLE_FLAGS: dict[str, str] = {"vivid": "--stylize 750", "natural": "--style raw"}

_SIZE = re.compile(r"^\s*([0-9]{1,6})\s*[xX×]\s*([0-9]{1,6})\s*$")  # ASCII digits: OpenAI's sizes
# How a parameter begins: `--`, or a dash that keyboards make of it (Apple's turn `--` into an em dash), which
# Midjourney reads as `--` too; so a flag written so is read, and replaced, as any other.
FLAG_DASH = "(?:--|\u2014|\u2013)"
MODE_FLAG = re.compile(rf"(?<!\S){FLAG_DASH}(?:fast|relax|turbo)(?!\S)", re.IGNORECASE)
_ASPECT = re.compile(rf"(?<!\S){FLAG_DASH}(?:ar|aspect)\s+\S+", re.IGNORECASE)
_QUALITY = re.compile(rf"(?<!\S){FLAG_DASH}(?:q|quality)\s+\S+", re.IGNORECASE)
_STYLIZE = re.compile(rf"(?<!\S){FLAG_DASH}(?:s|stylize)\s+\S+", re.IGNORECASE)
_STYLE = re.compile(rf"(?<!\S){FLAG_DASH}style\s+\S+", re.IGNORECASE)


class PromptError(ValueError):
    """A request field that cannot be mapped; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_size(size: str | None) -> tuple[int, int] | None:
    """The aspect ratio a size asks for, reduced by gcd; None for "auto" or no size."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None
    match = _SIZE.match(size)
    if not match:
        raise PromptError("size", f"Invalid size {size[:64]!r}: use WIDTHxHEIGHT (for example 1024x1024) or auto.")
    width, height = int(match.group(1)), int(match.group(2))
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise PromptError("size", f"Invalid size {size[:64]!r}: each side must be between 1 and {MAX_SIDE}.")
    divisor = math.gcd(width, height)
    return width // divisor, height // divisor


def quality_flag(quality: str | None) -> str | None:
    if quality is None:
        return None
    if quality not in QUALITY_FLAGS:
        raise PromptError("quality", f"Invalid quality {quality[:64]!r}: use one of {', '.join(QUALITY_FLAGS)}.")
    return QUALITY_FLAGS[quality]


def style_flag(style: str | None) -> str | None:
    if style is None:
        return None
    if style not in STYLE_FLAGS:
        raise PromptError("style", f"Invalid style {style[:64]!r}: use vivid or natural.")
    return STYLE_FLAGS[style]


_PARAMETER = re.compile(rf"(?<!\S){FLAG_DASH}[A-Za-z]")
# What makes Midjourney run one prompt as several jobs: `--repeat N` (`--r N`), and a permutation, options in braces
# separated by a comma that is not escaped (`a {red, blue} bird`, `--ar {1:1, 16:9}`).
_REPEAT = re.compile(rf"(?<!\S){FLAG_DASH}(?:r|repeat)(?!\S)", re.IGNORECASE)
# A permutation is found as braces with no braces inside (`_BRACES`), then an unescaped comma within them: as one
# expression (`\{[^{}]*(?<!\\),[^{}]*\}`) the search backtracked over every comma after an unclosed brace, quadratic
# in the prompt's length.
_BRACES = re.compile(r"\{[^{}]*\}")
_COMMA = re.compile(r"(?<!\\),")


def prompt_text(prompt: str) -> str:
    """What a prompt asks to draw: its text before the first parameter (`--ar`, `--fast`, ...), which is where
    Midjourney's parameters begin."""
    found = _PARAMETER.search(prompt)
    return (prompt[: found.start()] if found else prompt).strip()


def runs_several_jobs(prompt: str) -> bool:
    """Whether Midjourney would run the prompt as several jobs (`--repeat`, or a permutation in braces)."""
    if _REPEAT.search(prompt) is not None:
        return True
    return any(_COMMA.search(braces.group()) is not None for braces in _BRACES.finditer(prompt))


def _squash(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class PromptParts:
    text: str
    mode: Mode
    aspect: tuple[int, int] | None = None
    quality: str | None = None
    style: str | None = None


def build_prompt(parts: PromptParts) -> str:
    """The prompt sent upstream, which is also the `revised_prompt` the client sees."""
    text = MODE_FLAG.sub(" ", parts.text)
    flags: list[str] = []
    if parts.aspect is not None:
        text = _ASPECT.sub(" ", text)
        flags.append(f"--ar {parts.aspect[0]}:{parts.aspect[1]}")
    if parts.quality is not None:
        text = _QUALITY.sub(" ", text)
        flags.append(parts.quality)
    if parts.style is not None:
        text = (_STYLE if parts.style.startswith("--style") else _STYLIZE).sub(" ", text)
        flags.append(parts.style)
    flags.append(f"--{parts.mode}")
    return _squash(" ".join([text, *flags]))
