"""Chat front ends' own housekeeping requests, recognised by their prompts so that they never start a job.

Chat front ends ask the conversation's model for titles, tags, follow-up questions, search queries and summaries of
the conversation. Sent to an image model, each would run (and charge) a Midjourney job. The prompts they use are
fixed texts of each front end, so they are recognised here, as data, and answered with a short text instead.

Where each front end puts its prompt:

- **Open WebUI** sends every task as one user message that starts with `### Task:` (title, tags, follow-ups, search
  queries, autocomplete, image prompt), or with its emoji and tool-choice templates
  (`backend/open_webui/config.py`, `DEFAULT_*_PROMPT_TEMPLATE`).
- **NextChat** appends its topic prompt as the last user message, and its memory summary prompt as a trailing
  *system* message after the real user turn (`app/locales/*.ts`, `Store.Prompt.Topic` / `Summarize`).
- **LobeChat** puts the instruction in the system message and the transcript in the user message
  (`packages/prompts/src/chains/summaryTitle.ts`, `summaryHistory.ts`, `topicAutoSummary.ts`; older
  `src/chains/summaryTitle.ts` in Chinese).
- **LibreChat** and **Cherry Studio** send their title prompts as a user or system message.

So the matcher reads the last message, the last user message and the system (or developer) messages, each only
up to `HEAD_CHARS` characters. This module does no I/O and imports nothing of the relay.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "BUILTIN",
    "HEAD_CHARS",
    "MAX_PATTERN_CHARS",
    "MAX_PATTERNS",
    "MAX_SYSTEM_MESSAGES",
    "Matcher",
    "Pattern",
    "compile_pattern",
    "matcher",
    "texts_of",
]

# How much of each message is looked at: every known prompt says what it is within its first few hundred
# characters, and a bound keeps a configured expression's cost bounded by the pattern, not by the request.
HEAD_CHARS = 2000
# Limits on configured patterns (`api.housekeeping.patterns`).
MAX_PATTERN_CHARS = 500
MAX_PATTERNS = 50
# System messages read: front ends send one or two; a request with thousands is not made slower by the guard.
MAX_SYSTEM_MESSAGES = 8

_ROLES_READ = ("system", "developer")
# The regular expression parser, to read a configured pattern's structure (a private module: no stub).
_PARSER: Any = importlib.import_module("re._parser")
_CONSTANTS: Any = importlib.import_module("re._constants")
_REPEATS = frozenset(
    getattr(_CONSTANTS, name) for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_CONSTANTS, name)
)


@dataclass(frozen=True, slots=True)
class Pattern:
    """One known housekeeping prompt: `name` says whose and what (for logs), `regex` recognises it."""

    name: str
    regex: re.Pattern[str]


def _p(name: str, expression: str) -> Pattern:
    return Pattern(name, re.compile(expression, re.IGNORECASE))


# The prompts of the front ends this relay knows, as they ship them (whitespace between words may vary).
BUILTIN: tuple[Pattern, ...] = (
    # Open WebUI: `### Task:` templates, several wordings across versions.
    _p("open-webui/title", r"\A\s*### Task:\s*(You are a title generator\.\s*)?Generate a concise,? (3-5 word )?title"),
    _p("open-webui/tags", r"\A\s*### Task:\s*Generate 1-3 broad tags categorizing the main themes"),
    _p("open-webui/follow-ups", r"\A\s*### Task:\s*Suggest 3-5 relevant follow-up questions"),
    _p("open-webui/queries", r"\A\s*### Task:\s*Analyze the chat history to determine the necessity of generating"),
    _p("open-webui/autocomplete", r"\A\s*### Task:\s*You are an autocompletion system\."),
    _p("open-webui/image-prompt", r"\A\s*### Task:\s*Generate a detailed prompt for a[mn]? image generation task"),
    _p(
        "open-webui/emoji",
        r"\A\s*Your task is to reflect the speaker's likely facial expression through a fitting emoji",
    ),
    _p("open-webui/tools", r"\A\s*Available Tools:\s*[\[{]"),  # the tool specs (JSON) may run past the head
    # NextChat (ChatGPT-Next-Web): topic and memory summary, English and Chinese, old and new wordings.
    _p("nextchat/topic", r"\A\s*Please generate a four to five word title summarizing our conversation"),
    _p("nextchat/topic", r"\A\s*请?使用四到五个字直接返回这句话的简要主题"),
    _p("nextchat/summary", r"\A\s*Summarize the discussion briefly in 200 words or less to use as a prompt"),
    _p("nextchat/summary", r"\A\s*简要总结一下对话内容，用作后续的上下文提示 ?prompt"),
    # LobeChat: title, history summary, topic summary, generation title (system messages).
    _p("lobechat/title", r"\A\s*You are a professional conversation summarizer\. Generate a concise title"),
    _p("lobechat/title", r"\A\s*你是一名擅长会话的助理，你需要将用户的会话总结为 ?10 ?个字以内的标题"),
    _p("lobechat/summary", r"\A\s*You're an assistant who's good at extracting key takeaways from conversations"),
    _p("lobechat/topic", r"\A\s*Summarize the conversation for future reference\.\s*Requirements:"),
    _p("lobechat/generation-title", r"\A\s*你是一位资深的 ?AI ?艺术创作者和语言大师"),
    # LibreChat and Cherry Studio titles.
    _p("librechat/title", r"\A\s*(Please generate|Provide) a concise,? 5-word-or-less title for the conversation"),
    _p("cherry-studio/title", r"\A\s*Summarize the conversation into a title in .{0,40}? within 10 (words|characters)"),
)


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns of one parsed item (a group's body, each branch, a repeat's body, ...)."""
    if op in _REPEATS:
        return [av[2]]
    found: list[Any] = []
    for part in av if isinstance(av, tuple | list) else (av,):
        if isinstance(part, _PARSER.SubPattern):
            found.append(part)
        elif isinstance(part, list):  # a branch's alternatives
            found += [p for p in part if isinstance(p, _PARSER.SubPattern)]
    return found


def _can_repeat_or_branch(pattern: Any) -> bool:
    """Whether a sub-pattern holds anything that can match in more than one way: a repeat of more than one, an
    alternation, a back reference."""
    for op, av in pattern:
        if op in _REPEATS and av[1] > 1:
            return True
        if op in (_CONSTANTS.BRANCH, _CONSTANTS.GROUPREF, _CONSTANTS.GROUPREF_EXISTS):
            return True
        if any(_can_repeat_or_branch(child) for child in _children(op, av)):
            return True
    return False


def _backtracks_for_ever(pattern: Any) -> bool:
    """Whether a repeat (of more than one) repeats something that can itself match in several ways, `(a+)+`,
    `(\\w+\\s?)+`, `(a|aa)+`, `(.*a){12}`: the shapes whose backtracking grows exponentially with the text."""
    for op, av in pattern:
        if op in _REPEATS and av[1] > 1 and _can_repeat_or_branch(av[2]):
            return True
        if any(_backtracks_for_ever(child) for child in _children(op, av)):
            return True
    return False


def compile_pattern(expression: str) -> re.Pattern[str]:
    """A configured pattern, compiled case-insensitively; ValueError when it is too long, does not compile, or
    repeats something that can itself match in several ways (`(a+)+`, `(a|aa)+`), which can backtrack for ever."""
    if len(expression) > MAX_PATTERN_CHARS:
        raise ValueError(f"a pattern is at most {MAX_PATTERN_CHARS} characters")
    if not expression.strip():
        raise ValueError("a pattern must not be empty")
    try:
        compiled = re.compile(expression, re.IGNORECASE)
        parsed = _PARSER.parse(expression, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"not a regular expression ({exc})") from None
    if _backtracks_for_ever(parsed):
        raise ValueError(
            "a repeated group that can itself match in several ways, like (a+)+ or (a|aa)+, can take for ever to match"
        )
    return compiled


def _text(content: Any) -> str:
    """A message's text: the string itself, or its text parts joined; nothing for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


def texts_of(messages: Sequence[Any]) -> list[str]:
    """What a housekeeping prompt can be: the last message, the last user message and the system or developer
    messages (the first `MAX_SYSTEM_MESSAGES`), each cut to its first `HEAD_CHARS` characters."""
    chosen: list[Any] = []
    if messages:
        chosen.append(messages[-1])
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is not None:
        chosen.append(user)
    chosen += [m for m in messages if isinstance(m, dict) and m.get("role") in _ROLES_READ][:MAX_SYSTEM_MESSAGES]
    texts: list[str] = []
    seen: set[int] = set()
    for message in chosen:
        if id(message) in seen or not isinstance(message, dict):
            continue
        seen.add(id(message))
        text = _text(message.get("content"))[:HEAD_CHARS]
        if text.strip():
            texts.append(text)
    return texts


class Matcher:
    """The built-in patterns and the configured ones."""

    def __init__(self, extra: Iterable[re.Pattern[str]] = ()) -> None:
        self.patterns = BUILTIN + tuple(Pattern("configured", regex) for regex in extra)

    def match(self, messages: Sequence[Any]) -> str | None:
        """The name of the housekeeping prompt these messages carry, or None for an ordinary request."""
        for text in texts_of(messages):
            for pattern in self.patterns:
                if pattern.regex.search(text):
                    return pattern.name
        return None


@lru_cache(maxsize=8)
def matcher(extra: tuple[str, ...] = ()) -> Matcher:
    """The matcher for a configuration's extra patterns (already validated when the configuration was loaded)."""
    return Matcher(compile_pattern(expression) for expression in extra)
