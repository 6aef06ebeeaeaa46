"""Which mode a native request runs in, and which configured model prices it. Pure, no I/O.

The mode rule, first match wins:
  1. the path prefix: `/mj-fast/mj/...`, `/mj-relax/mj/...`, `/mj-turbo/mj/...`
  2. the body's `model`: a configured model's mode, or `mj-fast` / `mj-relax` / `mj-turbo`
  3. `accountFilter.modes`: the first of FAST, RELAX, TURBO it lists
  4. a mode flag in the prompt (`--fast`, `--relax`, `--turbo`; the last one written)
  5. for a follow-up (a button, a modal), the mode its parent ran in
  6. fast
The mode decided is the one sent upstream (the prompt's flag is replaced by it) and the one priced and routed.

The price comes from a configured model of that mode: the one the body named, if its mode is the mode decided;
else the first model (in configuration order) of that mode and bot; else the first of that mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from adapters import MODES, Bot, Mode
from relay.config import ModelConfig
from relay.core.prompt import FLAG_DASH

# The mode of a request that names none (rule 6), which an upstream that is told no mode runs a task in too.
DEFAULT_MODE: Mode = "fast"
_FLAG = re.compile(rf"(?<!\S){FLAG_DASH}(fast|relax|turbo)(?!\S)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ModeHints:
    """What a native request says about its mode, from the most to the least binding."""

    path: Mode | None = None
    model: str | None = None
    filter_modes: Sequence[str] = ()
    prompt: str = ""


class UnknownModel(ValueError):
    """The body named a model that is neither configured nor `mj-{mode}`."""


def model_mode(name: str, models: Mapping[str, ModelConfig]) -> Mode:
    if name in models:
        return models[name].mode
    short = name.lower().removeprefix("mj-").removeprefix("mj_")
    for mode in MODES:
        if short == mode:
            return mode
    raise UnknownModel(name)


def choose_mode(hints: ModeHints, models: Mapping[str, ModelConfig], inherited: Mode | None = None) -> Mode:
    """The mode a request runs in (see the module's rule); raises UnknownModel for a model that means nothing."""
    if hints.path is not None:
        if hints.model:
            model_mode(hints.model, models)  # still a mistake worth telling the client about
        return hints.path
    if hints.model:
        return model_mode(hints.model, models)
    for entry in hints.filter_modes:
        for mode in MODES:
            if entry.strip().lower() == mode:
                return mode
    flags = _FLAG.findall(hints.prompt)
    if flags:
        return flags[-1].lower()  # type: ignore[no-any-return]
    return inherited or DEFAULT_MODE


def price_model(models: Mapping[str, ModelConfig], mode: Mode, bot: Bot, named: str | None = None) -> str | None:
    """The configured model that prices a task of `mode` and `bot`; None when no model has that mode."""
    if named is not None and named in models and models[named].mode == mode:
        return named
    same_mode = [name for name, model in models.items() if model.mode == mode]
    for name in same_mode:
        if models[name].bot == bot:
            return name
    return same_mode[0] if same_mode else None
