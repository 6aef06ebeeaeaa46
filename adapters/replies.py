"""How upstream replies map onto the adapter contract: pure functions, no I/O.

Covers the result codes and odd bodies of every dialect we speak (see `shared/reference/upstreams.md`):
midjourney-proxy (novicezk and trueai), new-api's own error envelope, and the `/v1/mj` resellers.

    classify_submit(status, body, follow_up)   a submit reply -> SubmitOutcome
    classify_upload(status, body)              an upload-discord-images reply -> UploadOutcome
    parse_seed(status, body)                   an image-seed reply -> the seed, or None (no such task, no seed yet)
    parse_task / parse_fetch / parse_task_list task JSON -> TaskView
    parse_all_tasks(status, body)              a `task/list` reply (every task kept, or the newest 100) -> Listed
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from adapters.base import (
    Accepted,
    Button,
    ClientError,
    Listed,
    NeedsModal,
    ProviderUnusable,
    Retryable,
    SubmitOutcome,
    TaskStatus,
    TaskView,
    Uploaded,
    UploadOutcome,
)
from adapters.nesting import nests_deeper

# Descriptions that mean "busy, try elsewhere" even when the code says validation error (trueai code 4 / 9).
_BUSY_WORDS = ("并发数已达上限", "队列数已达上限", "服务暂不可用", "队列已满", "queue is full", "concurrency limit")
# Descriptions of a submit refused because the upstream could not upload the request's images before taking the task
# (trueai's TaskService answers every such failure as code 9, FAILURE, in the upload's own words): novicezk's and
# trueai's upload to Discord (up to 11.9.1), trueai's upload to its own storage (from 11.9.2), the message that posts
# the upload in the channel, and describe's and blend's check of the links.
_UPLOAD_WORDS = (
    "上传图片到discord失败",
    "上传图片到云存储异常",
    "上传图片到加速站点",
    "发送图片消息到discord失败",
    "上传失败，未返回有效链接",
)
# trueai refusing the relay's own account until a limit resets (SubmitController.NewTask): the provider cannot
# serve now.
_ACCOUNT_LIMIT_WORDS = ("绘图次数已达上限", "账号已被临时封锁")
# new-api's own error descriptions.
_NEWAPI_UNUSABLE = ("quota_not_enough", "channel_not_found", "invalid_token")
# new-api's own errors after its upstream answered the submit (relay/relay-mj.go): the task may be running there.
_NEWAPI_AFTER_UPSTREAM = ("insert_midjourney_task_failed",)
_NEWAPI_CLIENT = ("task_not_found", "task_no_found", "task_status_not_success", "unknown_action", "invalid_request")
# How deeply an upstream's JSON may nest: a task is a few levels deep, a list of tasks one more.
MAX_NESTING = 64
# Result codes by which a server refuses a submit (no account, invalid, failure, queue full, banned, no balance,
# saturated): with a 5xx they say the server handled the request and did not take the task. Any other code there
# (1 or 22: taken; a gateway echoing its own status, such as 504) leaves open that the task was taken.
_REFUSALS = frozenset({3, 4, 5, 9, 23, 24, 25, 30})
# Failure reasons that mean the prompt was refused by Midjourney's moderation.
_BANNED_WORDS = ("banned", "敏感词", "sensitive", "moderation", "content policy", "prohibited")


def _decode(body: bytes) -> Any:
    """An upstream's JSON, with every string made safe to keep: JSON escapes can carry NUL and unpaired surrogates,
    which no database of the relay's takes (NUL is dropped, a surrogate becomes U+FFFD). `NaN` and `Infinity`,
    which JSON has not, are None. JSON nested deeper than `MAX_NESTING` is not read (`adapters.nesting`)."""
    if nests_deeper(body, MAX_NESTING):
        raise ValueError("not JSON")
    encoding = json.detect_encoding(body)
    try:
        text = body.decode(encoding, "surrogatepass")  # as `json.loads` decodes bytes
    except UnicodeDecodeError:
        # Bytes that are not text in their encoding (a character cut short where text was cut by its bytes, another
        # encoding's): U+FFFD where they could not be read, as for an unpaired surrogate, rather than the whole
        # body refused (one task's text would make a whole list of tasks unreadable).
        text = body.decode(encoding, "replace")
    try:
        # The common case, at the C parser's speed. The checks read UTF-8 bytes: JSON in UTF-16 or UTF-32 (which
        # the json module decodes too) is always cleaned.
        if encoding == "utf-8" and not _unstorable(body):
            # with one decoder made once (the keywords of `json.loads` make one per call); the C parser reads
            # integers itself unless a run of digits is longer than any integer the relay reads
            decoder = _DIGITS_DECODER if _LONG_DIGITS in body.translate(_DIGITS_ONLY) else _DECODER
            return decoder.decode(text)
        return _clean(json.loads(text, object_pairs_hook=_clean_pairs, parse_constant=_no_constant, parse_int=_integer))
    except ValueError:
        raise ValueError("not JSON") from None


_SURROGATE = re.compile("[\ud800-\udfff]")
# How JSON bytes can carry NUL or a surrogate: as an escape, or as a surrogate's UTF-8-like bytes (which the json
# module decodes with "surrogatepass").
_CANDIDATE = re.compile(rb"\\u0000|\\u[dD][89a-fA-F]")
_RAW_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
# An escaped surrogate pair (an emoji, as encoders that escape everything not ASCII write it) is fine.
_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_BACKSLASH = 0x5C


def _unstorable(body: bytes) -> bool:
    """Whether JSON bytes may decode to a string with NUL or a lone surrogate. Each candidate escape is looked at
    where the scan finds it (they are few: mostly the halves of escaped emoji): one that an odd number of
    backslashes come before is text, an escaped surrogate pair is fine, anything else is not."""
    if b"\xed" in body and _RAW_SURROGATE.search(body):
        return True
    if b"\\u" not in body:
        return False
    found = _CANDIDATE.search(body)
    while found is not None:
        at = found.start()
        first = at
        while first and body[first - 1] == _BACKSLASH:
            first -= 1
        after = at + 2
        if (at - first) % 2 == 0:  # the backslash is not itself escaped: an escape starts here
            if not _PAIR.match(body, at):
                return True
            after = at + 12
        found = _CANDIDATE.search(body, after)
    return False


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = _SURROGATE.sub("\ufffd", value)
        return value
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _clean_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {_clean(key): _clean(value) for key, value in pairs}


def _no_constant(name: str) -> Any:
    """`NaN`, `Infinity` and `-Infinity`, which JSON has not but many encoders write for a float (Python's, by
    default): no number the relay can read, so None, as an integer too long to read is. Refused, one task's value
    made a whole list of tasks unreadable, and every other job of its provider went unread until its deadline."""
    return None


# The most digits an integer from an upstream is read with (ids and times have twenty at most). Python refuses to
# read more than 4300 (a JSON number that long made a whole list of tasks unreadable); more than this are None.
MAX_DIGITS = 100


def _integer(text: str) -> int | None:
    return int(text) if len(text) <= MAX_DIGITS else None


# A decoder that reads each integer in Python (`_integer`), for bodies with a run of digits longer than `MAX_DIGITS`
# (in a number or a string), and one that leaves integers to the C parser, for all the others: an upstream's
# integers are a handful of ids and times, and a task's buttons, each with two.
_DIGITS_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_int=_integer)
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
# (a run of digits found with two C scans: every digit made "0", then the run of zeros looked for)
_DIGITS_ONLY = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * (MAX_DIGITS + 1)


# The longest task id the relay keeps (`jobs.upstream_id`). An upstream's ids are a few dozen characters; a longer
# one could not be written down (PostgreSQL refuses it), so the relay could not follow the task.
MAX_ID_CHARS = 128


def _task_id(value: Any) -> str | None:
    """A task id the relay can keep; None for none, or for one longer than `MAX_ID_CHARS`."""
    upstream_id = _as_id(value)
    return upstream_id if upstream_id is not None and len(upstream_id) <= MAX_ID_CHARS else None


def _as_id(result: Any) -> str | None:
    """`result` as a string id: reseller ints become strings, trueai's lists are comma-joined."""
    if result is None or isinstance(result, bool):
        return None
    if isinstance(result, list):
        parts = [str(x) for x in result if x is not None]
        return ",".join(parts) or None
    text = str(result).strip()
    return text or None


def _code(value: Any) -> int | None:
    """An integer as an upstream writes one (a number, or digits in a string); None for anything else, including
    digits no integer of any upstream has (more than `MAX_DIGITS`, which `int` may refuse to read)."""
    if type(value) is int:  # (the common case first; a bool is an int to `isinstance`)
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        digits = value.strip().removeprefix("-")
        if digits.isascii() and digits.isdigit() and len(digits) <= MAX_DIGITS:
            return int(value)
    return None


def _busy(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _BUSY_WORDS)


def _maybe_ran(status: int) -> bool:
    """Whether a failed answer leaves open that the upstream took the task: 429 and 503 say it did not."""
    return status >= 500 and status != 503


def looks_banned(reason: str | None) -> bool:
    if not reason:
        return False
    lowered = reason.lower()
    return any(word in lowered for word in _BANNED_WORDS)


def classify_submit(status: int, body: bytes, *, follow_up: bool = False) -> SubmitOutcome:
    """Map one submit reply (HTTP status and raw body) to an outcome.

    `follow_up` marks a call that acts on an existing task (action, modal): there a missing task is the client's
    mistake, while on a new task "not found" (code 3) means the provider has no account to run it.
    """
    if status in (401, 403):
        return ProviderUnusable(f"upstream refused the credentials (HTTP {status})")
    if status == 413:  # (a gateway's limit, as nginx's 1 MB default): this request's size, not the provider's health
        return ClientError("the request is larger than the upstream takes (HTTP 413)")
    if not body.strip():
        if status == 404 and follow_up:
            return ClientError("the task was not found upstream")
        if status == 404:
            return ProviderUnusable("the submit endpoint was not found (HTTP 404)")
        return Retryable(f"empty answer (HTTP {status})", sent=True)
    try:
        data = _decode(body)
    except ValueError:
        if status == 429 or status >= 500:
            return Retryable(f"HTTP {status}", sent=_maybe_ran(status))
        if status == 404:
            return ClientError("the task was not found upstream") if follow_up else ProviderUnusable("HTTP 404")
        return _unreadable(status, "a non-JSON answer")
    if not isinstance(data, Mapping):
        return _unreadable(status, "an unexpected JSON answer")
    return _classify_envelope(status, data, follow_up=follow_up)


def _unreadable(status: int, what: str) -> SubmitOutcome:
    """An answer the relay cannot read. A success status may mean the upstream took the task: it is not sent
    elsewhere (it could run twice); any other status says the provider cannot serve now."""
    if 200 <= status < 300:
        return Retryable(f"{what} (HTTP {status}); the task may have been taken", sent=True)
    return ProviderUnusable(f"{what} (HTTP {status})")


def _classify_envelope(status: int, data: Mapping[str, Any], *, follow_up: bool) -> SubmitOutcome:
    description = str(data.get("description") or data.get("message") or "").strip()
    code = _code(data.get("code"))

    # trueai's own envelope: {"success": false, "code": -1, "message": ...}, HTTP 200 for logic errors, 500 for faults.
    # A 5xx that carries the server's own error envelope was handled and refused by the server (trueai answers its
    # exceptions so): the task was not taken, and another provider may run it. A 5xx that is not such a refusal (a
    # gateway's page, an answer cut short, a code that is no refusal) leaves open that the task was taken.
    if data.get("success") is False:
        if any(word in description for word in _ACCOUNT_LIMIT_WORDS):
            return ProviderUnusable(description)
        if status >= 500 or status == 429 or _busy(description):
            return Retryable(description or f"HTTP {status}", sent=False)
        return ClientError(description or "refused by the upstream")

    # new-api's own envelope: {"description", "type": "upstream_error", "code"}, HTTP 400 (429 for code 30).
    if data.get("type") == "upstream_error":
        lowered = description.lower()
        if any(word in lowered for word in _NEWAPI_UNUSABLE):
            return ProviderUnusable(description)
        if any(word in lowered for word in _NEWAPI_AFTER_UPSTREAM):
            return Retryable(description, sent=True)
        if any(word in lowered for word in _NEWAPI_CLIENT):
            return ClientError(description)
        if code in (5, 30) or status == 429 or status >= 500:
            return Retryable(description or f"code {code}", sent=code == 5)
        if code == 24:
            return ClientError(description or "banned prompt", banned=True)
        return ClientError(description or f"code {code}")

    # new-api's middleware answers in its OpenAI-style envelope, {"error": {"message", "type": "new_api_error"}},
    # before any channel is chosen: nothing was sent upstream. HTTP 400 is a request it cannot route (an unknown
    # button's `unknown_action:<customId>`, a body it cannot read): a refusal of this request, not of the provider.
    error = data.get("error")
    own = error if isinstance(error, Mapping) and error.get("type") == "new_api_error" else None
    if own is not None and status == 400:
        return ClientError(str(own.get("message") or "").strip() or "refused by the upstream")

    if status == 429 or status >= 500:
        refused = code in _REFUSALS or own is not None
        return Retryable(description or f"HTTP {status}", sent=not refused and _maybe_ran(status))

    if code is None:
        if status == 404 and follow_up:  # a server's own 404 page in JSON (Spring's), read as it is in HTML
            return ClientError("the task was not found upstream")
        return _unreadable(status, "an answer without a result code")
    upstream_id = _as_id(data.get("result"))
    if upstream_id is not None and len(upstream_id) > MAX_ID_CHARS:
        if code in (1, 22):  # taken, under an id the relay cannot keep: it cannot follow the task, which may run
            return Retryable(f"code {code} with a task id longer than {MAX_ID_CHARS} characters", sent=True)
        upstream_id = None
    props = data.get("properties")
    properties: Mapping[str, Any] = props if isinstance(props, Mapping) else {}

    if code in (1, 22):
        if upstream_id is None:  # taken, but the relay cannot follow it
            return Retryable(f"code {code} without a task id", sent=True)
        # new-api rewrites trueai's code 21 "Waiting for window confirm" (remix) to code 1 and passes the rest on
        # (relay/relay-mj.go): the task waits in MODAL for `submit/modal`, it was not taken to run.
        if code == 1 and (bool(properties.get("remix")) or "window confirm" in description.lower()):
            return NeedsModal(upstream_id)
        return Accepted(upstream_id, queued=code == 22)
    if code == 21:
        modal = (
            bool(properties.get("remix"))
            or "window confirm" in description.lower()
            or str(properties.get("status", "")).upper() == "MODAL"
        )
        if modal and upstream_id:
            return NeedsModal(upstream_id)
        if upstream_id and ("status" in properties or "imageUrl" in properties):
            return Accepted(upstream_id)
        return ClientError(description or "the upstream refused the parameters (code 21)")
    if code == 24:
        word = properties.get("bannedWord")
        text = description or "banned prompt"
        return ClientError(f"{text}: {word}" if word else text, banned=True)
    if code == 9 and any(word in description.lower() for word in _UPLOAD_WORDS):
        return Retryable(description, image=True)
    if code in (23, 9, 5, 30):
        return Retryable(description or f"code {code}")
    if code == 3:
        if follow_up or status == 404:
            return ClientError(description or "the task was not found upstream")
        return Retryable(description or "no account available upstream")
    if code == 4:
        if _busy(description):
            return Retryable(description)
        if any(word in description for word in _ACCOUNT_LIMIT_WORDS):
            return ProviderUnusable(description)
        return ClientError(description or "the upstream refused the request as invalid")
    if code == 25:
        return ProviderUnusable(description or "the upstream account has no balance")
    return _unreadable(status, f"unexpected result code {code}")


_URL_START = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")


def _joined_links(text: str) -> list[str]:
    """Links joined by commas; a comma inside a link (a CDN's transformations, `w_100,h_100`) is the link's: a
    piece that does not begin as a URL, after one that does, goes on with it."""
    links: list[str] = []
    for piece in text.split(","):
        if links and _URL_START.match(links[-1]) and piece.strip() and not _URL_START.match(piece):
            links[-1] += "," + piece
        else:
            links.append(piece)
    return links


def classify_upload(status: int, body: bytes) -> UploadOutcome:
    """Map one `submit/upload-discord-images` reply: code 1 with `result` a list of links (trueai) or one
    comma-joined string gives `Uploaded`; every other answer is classed as a submit of a new task would be."""
    try:
        data = _decode(body) if status == 200 and body.strip() else None
    except ValueError:
        data = None
    if isinstance(data, Mapping) and _code(data.get("code")) == 1 and "success" not in data:
        result = data.get("result")
        parts = result if isinstance(result, list) else _joined_links(str(result or ""))
        links = tuple(text for text in (str(part).strip() for part in parts if part is not None) if text)
        if not links:
            return ProviderUnusable("an upload answer without links")
        return Uploaded(links)
    outcome = classify_submit(status, body)
    if isinstance(outcome, Accepted | NeedsModal):
        return ProviderUnusable(f"an unexpected upload answer (HTTP {status})")
    return outcome


def parse_seed(status: int, body: bytes) -> str | None:
    """One `task/{id}/image-seed` reply: the seed; None when the upstream does not know the task (404, 204, code 3,
    new-api's task_not_found) or has no seed for it yet (code 4). Anything that is not an answer raises ValueError."""
    if status in (401, 403):
        raise ValueError(f"upstream refused the credentials (HTTP {status})")
    if status in (204, 404) or (status == 200 and not body.strip()):
        return None
    try:
        data = _decode(body)
    except ValueError:
        raise ValueError(f"a non-JSON image-seed answer (HTTP {status})") from None
    if not isinstance(data, Mapping) or data.get("success") is False:
        raise ValueError(f"an unexpected image-seed answer (HTTP {status})")
    code = _code(data.get("code"))
    description = str(data.get("description") or "").lower()
    if data.get("type") == "upstream_error":  # new-api's own envelope: only "no such task" is an answer
        if any(word in description for word in ("task_not_found", "task_no_found")):
            return None
        raise ValueError(f"the upstream could not answer: {description.strip() or code}")
    if code in (3, 4):
        return None
    if code != 1 or status != 200:
        raise ValueError(f"an unexpected image-seed answer (HTTP {status}, code {code})")
    return _as_id(data.get("result"))


def _progress(value: Any, status: TaskStatus) -> int:
    if status is TaskStatus.SUCCESS:
        return 100
    if isinstance(value, bool):
        return 0
    if not isinstance(value, int | float):
        try:
            value = float(str(value or "").strip().rstrip("%").strip())
        except ValueError:
            return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0  # "inf%", 1e999, NaN: no progress anyone can read
    return max(0, min(100, int(value)))


def _status(value: Any) -> TaskStatus:
    text = str(value or "").strip().upper()
    if not text:
        return TaskStatus.SUBMITTED  # new-api reports "" until its first poll
    try:
        return TaskStatus(text)
    except ValueError:
        return TaskStatus.IN_PROGRESS if text in ("RUNNING", "PROCESSING") else TaskStatus.SUBMITTED


def _millis(value: Any) -> int | None:
    code = _code(value)
    return code if code else None


def _buttons(value: Any) -> tuple[Button, ...]:
    if not isinstance(value, list):
        return ()
    out: list[Button] = []
    for item in value:
        if not (type(item) is dict or isinstance(item, Mapping)) or not item.get("customId"):
            continue
        out.append(
            Button(
                str(item["customId"]),
                str(item.get("label") or ""),
                str(item.get("emoji") or ""),
                _code(item.get("type")) or 2,
                _code(item.get("style")) or 2,
            )
        )
    return tuple(out)


def parse_task(data: Any) -> TaskView | None:
    """One task JSON in any dialect's shape, or None when it is not a task (no id)."""
    if not isinstance(data, Mapping):
        return None
    upstream_id = _task_id(data.get("id"))
    if upstream_id is None:  # no task of the relay's: it keeps no id that long
        return None
    status = _status(data.get("status"))
    fail_reason = str(data.get("failReason") or "").strip() or None
    if status is TaskStatus.FAILURE and fail_reason is None:
        fail_reason = str(data.get("description") or "").strip() or "the upstream reported a failure"
    image_url = str(data.get("imageUrl") or "").strip() or None
    props = data.get("properties")
    properties: dict[str, Any] = dict(props) if isinstance(props, Mapping) else {}
    state = data.get("state")
    final_prompt = str(properties.get("finalPrompt") or data.get("promptEn") or "").strip() or None
    return TaskView(
        upstream_id=upstream_id,
        status=status,
        progress=_progress(data.get("progress"), status),
        image_url=image_url,
        fail_reason=fail_reason,
        banned=status is TaskStatus.FAILURE and looks_banned(fail_reason),
        state=str(state) if state not in (None, "") else None,
        action=str(data.get("action") or "") or None,
        buttons=_buttons(data.get("buttons")),
        submit_time=_millis(data.get("submitTime")),
        start_time=_millis(data.get("startTime")),
        finish_time=_millis(data.get("finishTime")),
        properties=properties,
        final_prompt=final_prompt,
    )


def parse_hook(body: bytes) -> TaskView | None:
    """A `notifyHook` call's body: the task JSON, as `fetch` answers it; None when it is not a task."""
    try:
        return parse_task(_decode(body))
    except ValueError:
        return None


# What an upstream's answer says when it does not know a task id (new-api's own, novicezk's and trueai's words).
_NOT_FOUND_WORDS = ("task_no_found", "task_not_found", "not found", "不存在")


def _says_unknown(data: Any) -> bool:
    """Whether an envelope says the upstream does not know the task: code 3 (NOT_FOUND), or words that say so."""
    if not isinstance(data, Mapping):
        return False
    description = str(data.get("description") or data.get("message") or "").lower()
    return _code(data.get("code")) == 3 or any(word in description for word in _NOT_FOUND_WORDS)


def parse_fetch(status: int, body: bytes) -> TaskView | None:
    """One `task/{id}/fetch` reply. Unknown ids come back as 200 empty or `null` (novicezk), 204 (trueai), an empty
    404, or an envelope that says so (new-api's 400 `task_no_found`, code 3); all of those are None. Anything else
    that is not a task (an error envelope, a gateway's page) says nothing of the task and raises ValueError: taken for
    "unknown", it would end a job the upstream may still be running as lost."""
    if status == 204 or (status in (200, 404) and not body.strip()):
        return None
    if status in (401, 403):
        raise ValueError(f"upstream refused the credentials (HTTP {status})")
    try:
        data = _decode(body)
    except ValueError:
        raise ValueError(f"a non-JSON fetch answer (HTTP {status})") from None
    if data is None and status == 200:
        return None
    view = parse_task(data) if status == 200 else None
    if view is not None:
        return view
    if status in (200, 400, 404) and _says_unknown(data):
        return None
    if status != 200:
        raise ValueError(f"fetch answered HTTP {status}")
    raise ValueError("a fetch answer that is not a task")


def _task_array(status: int, body: bytes, what: str) -> list[Any]:
    """The JSON array of tasks a list reply holds (`what`: the endpoint, for the errors)."""
    if status in (401, 403):
        raise ValueError(f"upstream refused the credentials (HTTP {status})")
    if status != 200:
        raise ValueError(f"{what} answered HTTP {status}")
    try:
        data = _decode(body) if body.strip() else []
    except ValueError:
        raise ValueError(f"a non-JSON {what} answer") from None
    if isinstance(data, Mapping) and isinstance(data.get("result"), list):
        data = data["result"]  # some resellers wrap the list in the submit envelope
    if not isinstance(data, list):
        raise ValueError(f"a {what} answer that is not a list")
    return data


def parse_task_list(status: int, body: bytes) -> list[TaskView]:
    """One `task/list-by-condition` reply: a JSON array of tasks (unknown ids omitted)."""
    return [view for view in map(_task_or_none, _task_array(status, body, "list-by-condition")) if view is not None]


def _task_or_none(data: Any) -> TaskView | None:
    """One task of a list, or None when it cannot be read: its neighbours are read all the same."""
    try:
        return parse_task(data)
    except Exception:
        return None


def parse_all_tasks(status: int, body: bytes) -> Listed:
    """One `GET task/list` reply: every task the upstream keeps (novicezk), or its newest 100 (trueai), newest first.
    A task that cannot be read is passed over, its state kept if it has one."""
    data = _task_array(status, body, "task/list")
    views: list[TaskView] = []
    unreadable: set[str] = set()
    for entry in data:
        view = _task_or_none(entry)
        if view is not None:
            views.append(view)
        elif isinstance(entry, Mapping) and isinstance(entry.get("state"), str | int):
            unreadable.add(str(entry["state"]))
    return Listed(tuple(views), frozenset(unreadable), len(data))
