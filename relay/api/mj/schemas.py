"""The native request bodies, as Midjourney-proxy clients send them (seed documents). Fields the relay has no use
for (`accountFilter.channelId`, `chooseSameChannel`, `filter`, ...) are accepted and ignored; every string the relay
keeps is a storable `Text` of bounded length, and task ids may come as numbers (some resellers type them so)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

from relay.api.common import Text
from relay.core.buttons import MAX_CUSTOM_ID, Change
from relay.core.text import check_storable

MAX_IMAGES = 5
MAX_STATE = 4096
MAX_ID = 64


def _bot(value: object) -> object:
    """midjourney-proxy takes `mj`/`niji` as well as the enum names, and a blank one as none given (a Go client's
    unset string is `""`)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if not lowered:
            return None
        if lowered in ("mj", "mid_journey", "midjourney"):
            return "MID_JOURNEY"
        if lowered in ("niji", "niji_journey"):
            return "NIJI_JOURNEY"
    return value


def task_id(value: str | int) -> str:
    """A task id as the relay keeps it; raises ValueError for one that cannot be a task id."""
    text = check_storable(str(value).strip())
    if not text or len(text) > MAX_ID:
        raise ValueError(f"a task id is 1 to {MAX_ID} characters")
    return text


def _id_text(value: object) -> object:
    """Task ids come as strings, or as integers from resellers that type them so (never as booleans)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError("a task id is a string or an integer")
    return value


def _blank_is_none(value: object) -> object:
    """midjourney-proxy clients send every field, an empty string for one they have nothing for (the seed
    documents' `submit/modal` example: `"maskBase64": ""`); midjourney-proxy reads that as no value."""
    return None if isinstance(value, str) and not value.strip() else value


def _null_is_empty(value: object) -> object:
    """Clients send every field of their request type, null for one with nothing in it (a Go client's nil slice, a
    Java client's unset list); midjourney-proxy reads that as not given: an empty list."""
    return [] if value is None else value


def _null_is_square(value: object) -> object:
    """`dimensions` sent as null or blank is not given (as `_null_is_empty`): the default, SQUARE."""
    return "SQUARE" if _blank_is_none(value) is None else value


def _id_texts(value: object) -> object:
    """A list's task ids as `_id_text` reads each, in one pass that stops at the first of a wrong type: a validator
    for each value would make an error of each of tens of thousands, holding the event loop for over a second."""
    if not isinstance(value, list):
        return value  # refused as not a list
    return [_id_text(item) for item in value]


def _task_ids(values: list[str]) -> list[str]:
    """The ids of a list that can be task ids: one that cannot (blank, too long, unstorable) names no task, and
    is left out as an unknown one is, not failing the read of the others beside it."""
    ids = []
    for value in values:
        try:
            ids.append(task_id(value))
        except ValueError:
            continue
    return ids


def _any_case(*words: str) -> str:
    """A JSON Schema (ECMA-262) pattern for `words` in any case, with blanks around: ECMA patterns have no flag for
    case."""
    cased = ("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word) for word in words)
    return rf"^\s*(?:{'|'.join(cased)})?\s*$"


# What `/openapi.json` tells each widened field takes (its `json_schema_input_type`): what the field accepts before
# its validator reads it, not only what it leaves, so that a body the relay takes is valid under the document.
_BOT_NAMES = _any_case("mj", "mid_journey", "midjourney", "niji", "niji_journey")
_BotInput = Literal["MID_JOURNEY", "NIJI_JOURNEY"] | Annotated[str, Field(pattern=_BOT_NAMES)] | None
_Blank = Annotated[str, Field(pattern=r"^\s*$")]

BotType = Annotated[
    Literal["MID_JOURNEY", "NIJI_JOURNEY"] | None, BeforeValidator(_bot, json_schema_input_type=_BotInput)
]
TaskId = Annotated[str, BeforeValidator(_id_text, json_schema_input_type=str | int), AfterValidator(task_id)]
# Bounded `Text`: the bounds come before the storability check, so that they are checked, and told, as a string's
# (a bound put on `Text` itself is checked after its validator, and told as "items after validation").
Image = Annotated[StrictStr, Field(min_length=1), AfterValidator(check_storable)]
ModeName = Annotated[StrictStr, Field(max_length=16), AfterValidator(check_storable)]
State = Annotated[StrictStr, Field(max_length=MAX_STATE), AfterValidator(check_storable)]
ModelName = Annotated[StrictStr, Field(max_length=64), AfterValidator(check_storable)]
CustomId = Annotated[StrictStr, Field(min_length=1, max_length=MAX_CUSTOM_ID), AfterValidator(check_storable)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AccountFilter(_Body):
    modes: Annotated[
        Annotated[list[ModeName], Field(max_length=8)],
        BeforeValidator(_null_is_empty, json_schema_input_type=Annotated[list[ModeName], Field(max_length=8)] | None),
    ] = Field(default_factory=list)


class _Submit(_Body):
    botType: BotType = None
    state: State | None = None
    notifyHook: Text | None = None
    accountFilter: AccountFilter | None = None
    model: ModelName | None = None


class ImagineBody(_Submit):
    prompt: Text
    base64Array: Annotated[
        Annotated[list[Image], Field(max_length=MAX_IMAGES)],
        BeforeValidator(
            _null_is_empty, json_schema_input_type=Annotated[list[Image], Field(max_length=MAX_IMAGES)] | None
        ),
    ] = Field(default_factory=list)
    # The first API's one reference image, which midjourney-proxy still reads and adds after `base64Array`.
    base64: Annotated[Image | None, BeforeValidator(_blank_is_none, json_schema_input_type=Image | _Blank | None)] = (
        None
    )


class BlendBody(_Submit):
    base64Array: list[Image] = Field(min_length=2, max_length=5)
    dimensions: Annotated[
        Literal["PORTRAIT", "SQUARE", "LANDSCAPE"],
        BeforeValidator(
            _null_is_square, json_schema_input_type=Literal["PORTRAIT", "SQUARE", "LANDSCAPE"] | _Blank | None
        ),
    ] = "SQUARE"


class DescribeBody(_Submit):
    base64: Image


class ShortenBody(_Submit):
    prompt: Text


class SwapFaceBody(_Submit):
    sourceBase64: Image
    targetBase64: Image


class ActionBody(_Submit):
    taskId: TaskId
    customId: CustomId


class ChangeBody(_Submit):
    """The open-source midjourney-proxy's button press: `index` 1-4 for an upscale or a variation (a re-roll takes
    none; Go clients send 0)."""

    taskId: TaskId
    action: Change
    index: StrictInt | None = None


class SimpleChangeBody(_Submit):
    """`content` is "<task id> U2", "<task id> V1" or "<task id> R"."""

    content: Text


def simple_change(content: str) -> tuple[str, Change, int | None] | None:
    """The task id, action and index of a `submit/simple-change` content, as midjourney-proxy reads it (`U1`-`U4`,
    `V1`-`V4`, `R`, any case); None when it is not one."""
    words = content.split()
    if len(words) != 2:
        return None
    try:
        task = task_id(words[0])
    except ValueError:
        return None
    word = words[1].lower()
    if word == "r":
        return task, "REROLL", None
    if len(word) == 2 and word[0] in "uv" and word[1] in "1234":
        return task, "UPSCALE" if word[0] == "u" else "VARIATION", int(word[1])
    return None


class ModalBody(_Body):
    taskId: TaskId
    prompt: Text | None = None
    maskBase64: Annotated[
        Image | None, BeforeValidator(_blank_is_none, json_schema_input_type=Image | _Blank | None)
    ] = None


class UploadBody(_Submit):
    base64Array: list[Image] = Field(min_length=1, max_length=MAX_IMAGES)


class ListBody(_Body):
    # As many ids as a body may hold values (`api.common.MAX_JSON_VALUES`): a poll names every task a client waits
    # for (New API sends all of a channel's unfinished ones in one), and a bound would fail the whole poll.
    ids: (
        Annotated[
            list[str], BeforeValidator(_id_texts, json_schema_input_type=list[str | int]), AfterValidator(_task_ids)
        ]
        | None
    ) = None
