"""Every bad input gets OpenAI's envelope with the right status, and changes nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers import RunningRelay, relay_config, running_relay, sql


def post(relay: RunningRelay, path: str, headers: dict[str, str] | None = None, **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {relay.key}", **(headers or {})}
    return httpx.post(relay.base + path, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


def error(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"].startswith("req_")
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nope", 404, "not_found"),
        ("GET", "/v1/images/generations", 405, "method_not_allowed"),
        ("DELETE", "/v1/chat/completions", 405, "method_not_allowed"),
        ("POST", "/v1/models", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods(relay: RunningRelay, method: str, path: str, status: int, code: str) -> None:
    response = httpx.request(method, relay.base + path, headers={"Authorization": f"Bearer {relay.key}"})
    assert response.status_code == status
    assert error(response)["code"] == code


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "could not parse the JSON body"),
        (b"", "body is empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "could not parse the JSON body"),
    ],
)
def test_unparseable_bodies(relay: RunningRelay, body: bytes, message: str) -> None:
    response = post(relay, "/v1/images/generations", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert message in str(error(response)["message"])


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "n": "4"}, "n"),
        ({"prompt": "x", "size": "huge"}, "size"),
        ({"prompt": "x", "quality": "ultra"}, "quality"),
        ({"prompt": "x", "style": "noir"}, "style"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": "x", "output_format": "webp"}, "output_format"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "stream": True}, "stream"),
    ],
)
def test_invalid_image_requests_name_the_param_and_hold_nothing(
    relay: RunningRelay, payload: dict[str, object], param: str
) -> None:
    response = post(relay, "/v1/images/generations", json={"model": "mj-fast", **payload})
    assert response.status_code == 400, response.text
    assert error(response)["param"] == param
    assert response.headers["x-should-retry"] == "false"
    assert relay.balance() == (1000, 0) and relay.jobs() == []


TEXT = {"type": "text", "text": "a cat"}


def said(*parts: object) -> list[dict[str, object]]:
    """A chat's messages: one user message of these content parts (text, and parts a job would run without)."""
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "ftp://a"}]}]}, "messages"),
        ({"messages": said(TEXT, {"type": "text", "text": 5})}, "messages"),
        ({"messages": said(TEXT, {"text": "in the snow"})}, "messages"),
        (
            {"messages": said(TEXT, {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})},
            "messages",
        ),
        ({"messages": said(TEXT, {"type": "file", "file": {"file_id": "file-1"}})}, "messages"),
        ({"messages": said(TEXT, {"type": "input_image", "image_url": "https://a/b.png"})}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ],
)
def test_invalid_chat_requests_name_the_param_and_hold_nothing(
    relay: RunningRelay, payload: dict[str, object], param: str
) -> None:
    response = post(relay, "/v1/chat/completions", json={"model": "mj-fast", **payload})
    assert response.status_code == 400, response.text
    assert error(response)["param"] == param
    assert relay.balance() == (1000, 0) and relay.jobs() == []


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/v1/chat/completions", {"model": "m" * 200_000, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/images/generations", {"model": "m" * 200_000, "prompt": "x"}, "model"),
        ("/v1/images/generations", {"model": "mj-fast", "prompt": "x", "quality": "q" * 200_000}, "quality"),
        ("/v1/images/generations", {"model": "mj-fast", "prompt": "x", "style": "s" * 200_000}, "style"),
    ],
)
def test_a_refused_value_is_shown_cut_short(
    relay: RunningRelay, path: str, payload: dict[str, object], param: str
) -> None:
    response = post(relay, path, json=payload)
    assert response.status_code in (400, 404) and error(response)["param"] == param
    assert len(response.content) < 1000
    assert relay.balance() == (1000, 0) and relay.jobs() == []


def test_a_chat_with_another_model_is_not_found(relay: RunningRelay) -> None:
    response = post(
        relay, "/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 404 and error(response)["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Basic abc"}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
        ({"Authorization": "Bearer sk-mjr-wrong"}, "invalid_api_key"),
    ],
)
def test_missing_or_wrong_keys_are_401(relay: RunningRelay, headers: dict[str, str], code: str) -> None:
    for path in ("/v1/images/generations", "/v1/chat/completions"):
        response = httpx.post(relay.base + path, headers=headers, json={"prompt": "x"})
        assert response.status_code == 401 and error(response)["code"] == code
    assert httpx.get(relay.base + "/v1/models", headers=headers).status_code == 401


def test_a_revoked_key_is_refused(tmp_path: Path) -> None:
    config = relay_config(tmp_path)
    with running_relay(config) as relay:
        sql(config, "UPDATE keys SET revoked_at = 1")
        response = post(relay, "/v1/images/generations", json={"prompt": "x"})
        assert response.status_code == 401 and error(response)["code"] == "key_revoked"


def test_a_body_over_the_limit_is_413_before_it_is_read(tmp_path: Path) -> None:
    with running_relay(relay_config(tmp_path, server={"max_body_bytes": 2048})) as relay:
        response = post(relay, "/v1/images/generations", content=b"x" * 5000)
        assert response.status_code == 413 and error(response)["code"] == "request_too_large"

        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"y" * 1000

        response = post(relay, "/v1/chat/completions", content=chunks())  # chunked: no Content-Length
        assert response.status_code == 413
        assert relay.jobs() == []


def test_ops_endpoints_answer_without_a_key(relay: RunningRelay) -> None:
    assert httpx.get(relay.base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(relay.base + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
