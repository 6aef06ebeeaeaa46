"""The reply mapping as a table, without HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import (
    Accepted,
    ClientError,
    NeedsModal,
    ProviderUnusable,
    Retryable,
    TaskStatus,
    TaskView,
    Uploaded,
    replies,
)
from adapters.replies import (
    _unstorable,
    classify_submit,
    classify_upload,
    looks_banned,
    parse_all_tasks,
    parse_fetch,
    parse_hook,
    parse_seed,
    parse_task,
    parse_task_list,
)


def body(data: object) -> bytes:
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("status", "reply", "expected"),
    [
        (200, body({"code": 1, "result": "1"}), Accepted("1")),
        (200, body({"code": "1", "result": 12}), Accepted("12")),
        (200, body({"code": 22, "result": "2"}), Accepted("2", queued=True)),
        (200, body({"code": 1, "result": ["u1", "u2"]}), Accepted("u1,u2")),
        (200, body({"code": 1, "result": None}), Retryable("code 1 without a task id", sent=True)),
        # taken under an id longer than the relay keeps: it cannot follow the task, which is not sent elsewhere
        (
            200,
            body({"code": 22, "result": "u" * 129}),
            Retryable("code 22 with a task id longer than 128 characters", sent=True),
        ),
        (200, body({"code": 1, "result": "u" * 128}), Accepted("u" * 128)),
        (200, body({"code": 21, "result": "3", "properties": {"status": "MODAL"}}), NeedsModal("3")),
        (200, body({"code": 21, "description": "参数错误"}), ClientError("参数错误")),
        (200, body({"code": 24, "description": "banned"}), ClientError("banned", banned=True)),
        (200, body({"code": 23}), Retryable("code 23")),
        (200, body({"code": 3}), Retryable("no account available upstream")),
        (200, body({"code": 25}), ProviderUnusable("the upstream account has no balance")),
        # trueai's code 9 is its queue full, a fault, or the request's images it could not upload (the last is no
        # fault of the provider's), told apart by the words
        (
            200,
            body({"code": 9, "description": "提交失败，队列已满，请稍后重试"}),
            Retryable("提交失败，队列已满，请稍后重试"),
        ),
        (
            200,
            body({"code": 9, "description": "上传图片到discord失败"}),
            Retryable("上传图片到discord失败", image=True),
        ),
        (200, body({"code": 9, "description": "上传图片到云存储异常"}), Retryable("上传图片到云存储异常", image=True)),
        (200, body({"code": 4, "description": "上传图片到discord失败"}), ClientError("上传图片到discord失败")),
        # A success status the relay cannot read may mean the task was taken: never sent elsewhere.
        (
            200,
            body({"code": 77}),
            Retryable("unexpected result code 77 (HTTP 200); the task may have been taken", sent=True),
        ),
        (
            200,
            body({"description": "no code"}),
            Retryable("an answer without a result code (HTTP 200); the task may have been taken", sent=True),
        ),
        (200, body([1]), Retryable("an unexpected JSON answer (HTTP 200); the task may have been taken", sent=True)),
        (400, body({"code": 77}), ProviderUnusable("unexpected result code 77 (HTTP 400)")),
        (400, b"<html>", ProviderUnusable("a non-JSON answer (HTTP 400)")),
        (503, b"", Retryable("empty answer (HTTP 503)", sent=True)),
        (503, b"down", Retryable("HTTP 503", sent=False)),
        (429, body({"code": 1, "result": "x"}), Retryable("HTTP 429", sent=False)),
        (404, b"", ProviderUnusable("the submit endpoint was not found (HTTP 404)")),
        # a body over a gateway's limit: the request's size, whatever the page says
        (
            413,
            b"<html>413 Request Entity Too Large</html>",
            ClientError("the request is larger than the upstream takes (HTTP 413)"),
        ),
        (413, b"", ClientError("the request is larger than the upstream takes (HTTP 413)")),
        (404, b"nope", ProviderUnusable("HTTP 404")),
        (400, b"nope", ProviderUnusable("a non-JSON answer (HTTP 400)")),
        (
            200,
            body({"type": "upstream_error", "code": 24, "description": ""}),
            ClientError("banned prompt", banned=True),
        ),
        (
            400,
            body({"type": "upstream_error", "code": 4, "description": "task_not_found"}),
            ClientError("task_not_found"),
        ),
        (400, body({"type": "upstream_error", "code": 7, "description": "odd"}), ClientError("odd")),
    ],
)
def test_submit_classification(status: int, reply: bytes, expected: object) -> None:
    assert classify_submit(status, reply) == expected


def test_follow_ups_treat_missing_tasks_as_the_clients_mistake() -> None:
    assert isinstance(classify_submit(200, body({"code": 3}), follow_up=True), ClientError)
    assert isinstance(classify_submit(404, b"", follow_up=True), ClientError)
    assert isinstance(classify_submit(404, b"<html>", follow_up=True), ClientError)
    assert isinstance(classify_submit(404, body({"code": 3}), follow_up=False), ClientError)
    # A JSON 404 without a code (Spring's own page, as a midjourney-proxy answers a path it lacks) is read as the
    # same page in HTML is: not a reason to set the provider aside for every new job.
    spring = body({"timestamp": "2026-12-06T05:00:00.000+00:00", "status": 404, "error": "Not Found", "path": "/x"})
    assert isinstance(classify_submit(404, spring, follow_up=True), ClientError)
    assert isinstance(classify_submit(404, spring, follow_up=False), ProviderUnusable)


def test_a_banned_word_is_named() -> None:
    outcome = classify_submit(
        200, body({"code": 24, "description": "可能包含敏感词", "properties": {"bannedWord": "w"}})
    )
    assert outcome == ClientError("可能包含敏感词: w", banned=True)


def test_task_parsing_normalises_every_shape() -> None:
    view = parse_task(
        {
            "id": 42,
            "status": "failure",
            "progress": "",
            "failReason": "Banned prompt detected",
            "submitTime": "1700000000000",
            "buttons": [{"customId": "MJ::JOB::upsample::1::h", "label": "U1"}, {"label": "no id"}, "junk"],
            "properties": {"finalPrompt": "p"},
        }
    )
    assert view is not None
    assert (view.upstream_id, view.status, view.progress, view.banned) == ("42", TaskStatus.FAILURE, 0, True)
    assert view.submit_time == 1700000000000 and [b.custom_id for b in view.buttons] == ["MJ::JOB::upsample::1::h"]
    assert parse_task({"status": "SUCCESS"}) is None and parse_task("x") is None


@pytest.mark.parametrize(
    ("status", "progress", "expected"),
    [
        ("SUCCESS", "", 100),
        ("IN_PROGRESS", "46%", 46),
        ("IN_PROGRESS", 62, 62),
        ("IN_PROGRESS", "x", 0),
        ("IN_PROGRESS", True, 0),
        ("IN_PROGRESS", "250%", 100),
        ("RUNNING", "10%", 10),
        ("IN_PROGRESS", "inf%", 0),
        ("IN_PROGRESS", "-Infinity", 0),
        ("IN_PROGRESS", "1e999", 0),
        ("IN_PROGRESS", float("inf"), 0),
        ("IN_PROGRESS", "nan%", 0),
    ],
)
def test_progress_parsing(status: str, progress: object, expected: int) -> None:
    view = parse_task({"id": "1", "status": status, "progress": progress})
    assert view is not None and view.progress == expected


def test_unknown_statuses_and_failure_without_reason() -> None:
    assert parse_task({"id": "1", "status": "WEIRD"}).status is TaskStatus.SUBMITTED  # type: ignore[union-attr]
    view = parse_task({"id": "1", "status": "FAILURE", "description": "boom"})
    assert view is not None and view.fail_reason == "boom"
    assert TaskStatus.CANCEL.terminal and not TaskStatus.MODAL.terminal


def test_fetch_and_list_parsing_edges() -> None:
    assert parse_fetch(200, b"null") is None
    with pytest.raises(ValueError):
        parse_fetch(500, b"{}")
    assert parse_task_list(200, b"") == []
    with pytest.raises(ValueError):
        parse_task_list(200, b"{bad")


@pytest.mark.parametrize(
    "odd",
    [
        '"progress": 1e999',
        '"progress": "inf%"',
        '"submitTime": ' + "9" * 5000,  # more digits than Python reads
        '"submitTime": "' + "9" * 5000 + '"',
        '"buttons": [{"customId": "x", "type": "' + "9" * 5000 + '"}]',
        '"buttons": [{"customId": "x", "style": "²"}]',  # a digit to str.isdigit, not to int
        '"progress": NaN',  # what Python's json.dumps (and others) writes for a float that is not a number
        '"progress": -Infinity',
        '"properties": {"ratio": Infinity}',
    ],
)
def test_a_task_with_an_unreadable_number_leaves_its_neighbours_in_a_list_readable(odd: str) -> None:
    body = f'[{{"id": "a", "status": "IN_PROGRESS", "progress": "46%"}}, {{"id": "b", {odd}}}]'.encode()
    views = parse_task_list(200, body)
    assert views[0].upstream_id == "a" and views[0].progress == 46
    assert [view.upstream_id for view in views[1:]] in ([], ["b"])
    assert parse_hook(f'{{"id": "b", "status": "IN_PROGRESS", {odd}}}'.encode()) is not None


@pytest.mark.parametrize(
    "odd",
    [
        b'"failReason": "cut in the middle of \xe7\x8c"',  # a character cut short (bytes counted, not characters)
        b'"description": "\xff\xfe latin-1 \xe9t\xe9"',  # bytes that are no UTF-8 at all
        b'"failReason": "half an escaped pair \\ud83d and a raw one \xed\xa0\x80 \xe7"',
    ],
)
def test_a_task_with_bytes_that_are_not_utf8_leaves_its_neighbours_in_a_list_readable(odd: bytes) -> None:
    """A task's text that is not UTF-8 is kept with U+FFFD where its bytes could not be read, as an unpaired
    surrogate is: one task's bytes must not make the whole list (every other job of the provider) unreadable."""
    body = b'[{"id": "a", "status": "IN_PROGRESS", "progress": "46%"}, {"id": "b", "status": "FAILURE", ' + odd + b"}]"
    views = parse_task_list(200, body)
    assert [view.upstream_id for view in views] == ["a", "b"] and views[0].progress == 46
    assert views[1].fail_reason is not None and "\ufffd" in views[1].fail_reason
    views[1].fail_reason.encode("utf-8")  # storable: no unpaired surrogate is left
    view = parse_hook(b'{"id": "b", "status": "FAILURE", ' + odd + b"}")
    assert view is not None and view.fail_reason == views[1].fail_reason


@pytest.mark.parametrize("digits", [replies.MAX_DIGITS + 1, 150, 4300])
def test_an_integer_with_more_digits_than_the_relay_reads_is_none_wherever_it_is(digits: int) -> None:
    """Integers are read by the C parser, except in a body with a run of digits longer than `MAX_DIGITS`: an integer
    of 101 to 4300 digits (which Python would read) is no integer of any upstream's, and is None like a longer one,
    wherever it is (a task's time, its properties, which are kept as they came)."""
    long = "9" * digits
    body = f'{{"id": "b", "status": "IN_PROGRESS", "submitTime": {long}, "properties": {{"n": {long}, "m": 7}}}}'
    view = parse_hook(body.encode())
    assert view is not None and view.submit_time is None
    assert view.properties == {"n": None, "m": 7}
    shorter = "9" * replies.MAX_DIGITS  # as many as are read: an integer
    view = parse_hook(f'{{"id": "b", "submitTime": {shorter}, "properties": {{"s": "{long}"}}}}'.encode())
    assert view is not None and view.submit_time == int(shorter) and view.properties == {"s": long}


def test_a_task_whose_id_is_longer_than_the_relay_keeps_is_no_task_of_its() -> None:
    views = parse_task_list(200, json.dumps([{"id": "u" * 129, "status": "SUCCESS"}, {"id": "a"}]).encode())
    assert [view.upstream_id for view in views] == ["a"]
    assert parse_hook(json.dumps({"id": "u" * 129, "status": "SUCCESS", "state": "job"}).encode()) is None


def test_a_task_that_cannot_be_read_is_left_out_of_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    read = replies.parse_task

    def parse(data: Any) -> TaskView | None:
        if data.get("id") == "b":
            raise RuntimeError("a reply nobody foresaw")
        return read(data)

    monkeypatch.setattr(replies, "parse_task", parse)
    assert [v.upstream_id for v in parse_task_list(200, b'[{"id": "a"}, {"id": "b"}, {"id": "c"}]')] == ["a", "c"]


def test_banned_reasons() -> None:
    assert looks_banned("可能包含敏感词") and looks_banned("Banned prompt detected")
    assert not looks_banned(None) and not looks_banned("timeout")


@pytest.mark.parametrize(
    ("status", "reply", "expected"),
    [
        (200, body({"code": 1, "result": ["a", None, " b "]}), Uploaded(("a", "b"))),
        (200, body({"code": "1", "result": "a,b,,"}), Uploaded(("a", "b"))),
        (  # a comma inside a link (a CDN's transformations) is the link's
            200,
            body({"code": 1, "result": "https://cdn.example/w_100,h_100/a.png, https://cdn.example/b.png,"}),
            Uploaded(("https://cdn.example/w_100,h_100/a.png", "https://cdn.example/b.png")),
        ),
        (200, body({"code": 1, "result": None}), ProviderUnusable("an upload answer without links")),
        (200, body({"code": 1, "success": False}), ClientError("refused by the upstream")),
        (200, body({"code": 21, "result": "3", "properties": {"remix": True}}), ProviderUnusable),
        (503, b"", Retryable("empty answer (HTTP 503)", sent=True)),
        (200, body({"code": 24, "description": "banned"}), ClientError("banned", banned=True)),
    ],
)
def test_upload_classification(status: int, reply: bytes, expected: object) -> None:
    outcome = classify_upload(status, reply)
    assert isinstance(outcome, expected) if isinstance(expected, type) else outcome == expected


@pytest.mark.parametrize(
    ("status", "reply", "expected"),
    [
        (200, body({"code": 1, "result": "123"}), "123"),
        (200, body({"code": 1, "result": 123}), "123"),
        (200, body({"code": 1, "result": None}), None),
        (200, b"null", ValueError),
        (200, body({"code": 9, "description": "odd"}), ValueError),
        (400, body({"code": 1, "result": "1"}), ValueError),
        (400, body({"type": "upstream_error", "code": 4, "description": "quota_not_enough"}), ValueError),
        (400, body({"type": "upstream_error", "code": 4, "description": "task_no_found "}), None),
    ],
)
def test_seed_parsing(status: int, reply: bytes, expected: object) -> None:
    if expected is ValueError:
        with pytest.raises(ValueError):
            parse_seed(status, reply)
    else:
        assert parse_seed(status, reply) == expected


def test_the_final_prompt_is_the_finalprompt_property_else_prompt_en() -> None:
    both = parse_task({"id": "1", "promptEn": "en", "properties": {"finalPrompt": "final"}})
    only_en = parse_task({"id": "1", "prompt": "zh", "promptEn": "en"})
    neither = parse_task({"id": "1", "prompt": "zh", "promptEn": "", "properties": {"finalPrompt": ""}})
    assert both is not None and only_en is not None and neither is not None
    assert (both.final_prompt, only_en.final_prompt, neither.final_prompt) == ("final", "en", None)


def test_upstream_text_is_made_storable_and_everything_else_left_as_it_came() -> None:
    dirty = (
        b'[{"id": "1", "status": "FAILURE", "failReason": "a\\u0000b\\ud800c", "buttons": [{"customId": "\\udfffx"}]}]'
    )
    (view,) = parse_task_list(200, dirty)
    assert view.fail_reason == "ab\ufffdc" and view.buttons[0].custom_id == "\ufffdx"
    (raw,) = parse_task_list(200, b'[{"id": "2", "status": "FAILURE", "failReason": "\xed\xa0\x80 raw"}]')
    assert raw.fail_reason == "\ufffd raw"
    clean = b'[{"id": "3", "status": "FAILURE", "failReason": "\\ud83d\\ude00 \\u00e9 fine"}]'
    (kept,) = parse_task_list(200, clean)
    assert kept.fail_reason == "\U0001f600 \u00e9 fine"


@pytest.mark.parametrize(
    ("status", "body", "sent"),
    [
        # the server's own error envelope: it handled the request and refused it, so another provider may run it
        (500, b'{"success": false, "code": -1, "message": "boom"}', False),
        (500, b'{"code": 9, "description": "system error"}', False),
        # a code that is no refusal: the server's own "taken", or a gateway's status echoed as a code
        (500, b'{"code": 1, "result": "1"}', True),
        (504, b'{"code": 504, "message": "Gateway Time-out"}', True),
        # nothing readable from the server: the task may have been taken
        (500, b'{"description": "no code"}', True),
        (500, b"<html>internal error</html>", True),
        (502, b"", True),
        (504, b"gateway timeout", True),
        # 503 and 429 say it was not taken, whatever the body
        (503, b"down", False),
        (429, b"slow down", False),
    ],
)
def test_a_5xx_is_sent_elsewhere_only_when_the_server_said_it_refused(status: int, body: bytes, sent: bool) -> None:
    outcome = classify_submit(status, body)
    assert isinstance(outcome, Retryable) and outcome.sent is sent


_PIECES = st.sampled_from(
    [
        *("a", " ", "é", "\\\\", "\\u0000", "\\u0041", "\\u4e2d"),
        *("\\ud83d", "\\ude00", "\\ud83d\\ude00", "\\uD83D\\uDE00", "\\uDBFF", "\\uDC00", "\\uDBFF\\uDFFF"),
        *("\\\\ud800", "\\\\u0000", "\\\\\\ud800", "\\\\\\\\u0000", "\\ud83d\\u0041", "\\ud83d\\\\ude00"),
    ]
)


def _unsafe(value: object) -> bool:
    """Whether a decoded JSON value holds a string no database of the relay's takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return "\x00" in value
    if isinstance(value, list):
        return any(_unsafe(item) for item in value)
    if isinstance(value, dict):
        return any(_unsafe(key) or _unsafe(item) for key, item in value.items())
    return False


@settings(max_examples=1000, deadline=None)
@given(st.lists(_PIECES, max_size=12), st.lists(_PIECES, max_size=4))
def test_only_json_that_decodes_to_unstorable_text_takes_the_slow_path(text: list[str], key: list[str]) -> None:
    """The fast path (the C parser alone) is taken exactly when nothing decoded holds NUL or a lone surrogate:
    escaped emoji and escaped backslashes (whatever text follows them) stay on it."""
    body = ('{"' + "".join(key) + '": "' + "".join(text) + '"}').encode()
    decoded = json.loads(body)
    assert _unstorable(body) == _unsafe(decoded), body


@pytest.mark.parametrize(
    ("text", "unstorable"),
    [
        ("\ud800", True),  # a surrogate written as its UTF-8-like bytes, which the json module decodes
        ("ok \udfff", True),
        ("\ud7ff", False),  # the code point just below the surrogates: same lead byte, fine
        ("中文 \ue000", False),
    ],
)
def test_surrogates_written_as_raw_bytes_take_the_slow_path(text: str, unstorable: bool) -> None:
    body = ('{"id": "1", "prompt": "' + text + '"}').encode("utf-8", "surrogatepass")
    assert _unstorable(body) is unstorable
    view = parse_hook(body)
    assert view is not None and view.upstream_id == "1"


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_json_in_another_unicode_encoding_is_made_storable_too(encoding: str) -> None:
    """The json module reads UTF-16 and UTF-32 as well, where the byte checks see nothing: such a body is cleaned."""
    body = '{"code": 1, "result": "abc\\ud800\\u0000"}'.encode(encoding)
    assert classify_submit(200, body) == Accepted("abc\ufffd")
    hook = '{"id": "1", "status": "SUCCESS", "state": "job\\udfff", "imageUrl": "http://x/a.png"}'.encode(encoding)
    view = parse_hook(hook)
    assert view is not None and view.state == "job\ufffd"


def listed_task(task_id: str, state: str | None, submitted_s: float) -> dict[str, Any]:
    submitted = int(submitted_s * 1000)
    return {"id": task_id, "status": "SUCCESS", "progress": "100%", "state": state, "submitTime": submitted}


def task_list(*tasks: dict[str, Any]) -> bytes:
    return body(list(tasks))


MARK = 1_700_000_000.0  # when the submits looked up may have left, unix seconds


@pytest.mark.parametrize(
    ("status", "reply"),
    [(401, b""), (403, b"{}"), (500, b"[]"), (404, b"[]"), (200, b"{bad"), (200, body({"code": 4})), (200, b'"x"')],
)
def test_a_task_list_answer_that_is_no_list_is_refused(status: int, reply: bytes) -> None:
    with pytest.raises(ValueError):
        parse_all_tasks(status, reply)


def test_a_task_list_in_an_envelope_is_read() -> None:
    listed = parse_all_tasks(200, body({"code": 1, "result": [listed_task("t1", "job_a", MARK)]}))
    assert [view.state for view in listed.views] == ["job_a"]


def test_a_listed_task_that_cannot_be_read_keeps_its_state() -> None:
    """A task the relay cannot read may be a job's: its state is kept (the lookup then says nothing of that job)."""
    unreadable = [{"id": None, "status": "SUCCESS", "state": "job_a"}, {"id": None, "state": 7}, "no task", {}]
    listed = parse_all_tasks(200, task_list(*unreadable, listed_task("t1", "job_b", MARK)))  # type: ignore[arg-type]
    assert listed.unreadable == {"job_a", "7"} and listed.count == 5
    assert [view.state for view in listed.views] == ["job_b"]
