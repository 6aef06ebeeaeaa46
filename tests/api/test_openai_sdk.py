"""The OpenAI image path as a user of the official SDK meets it: a relay on a loopback socket, the real `openai`
client, the simulator behind."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import re
import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.helpers import RunningRelay, create_key, pg_database_sync, relay_config, running_relay, serve, sql, wait_for


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_models_lists_the_configured_models(relay: RunningRelay) -> None:
    ids = [m.id for m in relay.openai().models.list().data]
    assert ids == ["mj-fast", "mj-relax", "mj-turbo"]


def test_generate_url_serves_a_png_of_the_requested_aspect_ratio(relay: RunningRelay) -> None:
    result = relay.openai().images.generate(model="mj-fast", prompt="a lighthouse at dusk", size="1792x1024")
    assert len(result.data) == 1
    item = result.data[0]
    assert item.revised_prompt == "a lighthouse at dusk --ar 7:4 --fast"
    assert item.url is not None and item.url.startswith(relay.base + "/files/")
    download = httpx.get(item.url)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    image = png(download.content)
    assert image.width / image.height == pytest.approx(7 / 4, abs=0.05)


def test_generate_b64_json_gives_four_distinct_tiles_for_n4(relay: RunningRelay) -> None:
    result = relay.openai().images.generate(model="mj-fast", prompt="a red fox", response_format="b64_json", n=4)
    tiles = [base64.b64decode(item.b64_json or "") for item in result.data]
    assert len(tiles) == 4
    assert len({hashlib.sha256(t).hexdigest() for t in tiles}) == 4
    for tile in tiles:
        assert png(tile).size == (64, 64)


def test_n_above_four_uses_several_jobs_and_bills_each(relay: RunningRelay) -> None:
    before, _ = relay.balance()
    result = relay.openai().images.generate(model="mj-fast", prompt="a harbour", n=6, response_format="b64_json")
    assert len(result.data) == 6
    assert len({item.b64_json for item in result.data}) == 6
    assert [row[0] for row in relay.jobs()] == ["SUCCEEDED", "SUCCEEDED"]
    assert relay.balance() == (before - 2 * 2, 0)  # two mj-fast jobs at 2 credits each, nothing left held


def test_a_lower_max_n_bounds_the_images_n_but_not_chat(tmp_path: Path) -> None:
    """`api.max_n` is the largest `n` a client may ask of the images route; a chat asks for no `n` (its answer is
    one job's grid), so an operator's lower bound must not refuse every chat completion."""
    with running_relay(relay_config(tmp_path, api={"max_n": 2})) as relay:
        client = relay.openai()
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(model="mj-fast", prompt="a harbour", n=3)
        assert caught.value.param == "n"
        reply = client.chat.completions.create(model="mj-fast", messages=[{"role": "user", "content": "a koi pond"}])
        assert (reply.choices[0].message.content or "").startswith("![Midjourney grid](")
        streamed = client.chat.completions.create(
            model="mj-fast", messages=[{"role": "user", "content": "a paper crane"}], stream=True
        )
        assert "![Midjourney grid](" in "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert relay.jobs() == [("SUCCEEDED", None, "captured", "sim")] * 2


def test_model_decides_the_mode_flag(relay: RunningRelay) -> None:
    result = relay.openai().images.generate(model="mj-relax", prompt="a quiet lake --fast --ar 3:2")
    assert result.data[0].revised_prompt == "a quiet lake --ar 3:2 --relax"


def test_chat_completion_answers_with_markdown_images(relay: RunningRelay) -> None:
    reply = relay.openai().chat.completions.create(
        model="mj-fast", messages=[{"role": "user", "content": "a koi pond"}]
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "stop"
    content = reply.choices[0].message.content or ""
    urls = re.findall(r"\((http[^)]+)\)", content)
    assert len(urls) == 5  # the grid and four tiles
    assert content.startswith("![")
    for url in urls:
        assert httpx.get(url).status_code == 200


def test_a_chat_prompt_pasted_from_discord_is_sent_without_the_command_and_its_label(relay: RunningRelay) -> None:
    client = relay.openai()
    for typed in ("/imagine prompt: a koi pond", "/imagined cities"):
        client.chat.completions.create(model="mj-fast", messages=[{"role": "user", "content": typed}])
    sent = sql(relay.config, "SELECT prompt FROM jobs ORDER BY created_at, id")
    assert sent == [("a koi pond --fast",), ("/imagined cities --fast",)]


def test_chat_stream_opens_with_role_shows_progress_and_ends_with_stop(relay: RunningRelay) -> None:
    chunks = list(
        relay.openai().chat.completions.create(
            model="mj-fast",
            messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "a paper crane"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1
    body = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "Generating… 0%" in body
    assert re.search(r"!\[[^\]]*\]\(http", body)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_a_bad_key_is_an_authentication_error(relay: RunningRelay) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        relay.openai("sk-not-a-key").images.generate(model="mj-fast", prompt="x")
    assert caught.value.code == "invalid_api_key"


def test_a_bad_size_is_a_bad_request_naming_size_and_holds_nothing(relay: RunningRelay) -> None:
    before = relay.balance()
    with pytest.raises(openai.BadRequestError) as caught:
        relay.openai().images.generate(model="mj-fast", prompt="x", size="big")  # type: ignore[arg-type]
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "size"
    assert relay.balance() == before
    assert relay.jobs() == []


def test_an_unknown_model_is_not_found(relay: RunningRelay) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        relay.openai().images.generate(model="dall-e-3", prompt="x")
    assert caught.value.code == "model_not_found"


def test_a_banned_prompt_is_a_content_policy_violation_and_is_not_charged(relay: RunningRelay) -> None:
    before = relay.balance()
    with pytest.raises(openai.BadRequestError) as caught:
        relay.openai().images.generate(model="mj-fast", prompt="something forbidden")
    assert caught.value.code == "content_policy_violation"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert relay.balance() == before
    assert relay.jobs() == [("FAILED", "banned", "released", "sim")]  # the provider that refused it


@pytest.mark.parametrize("stream", [False, True])
def test_a_banned_chat_prompt_names_messages_as_chats_other_errors_do(relay: RunningRelay, stream: bool) -> None:
    """On chat the prompt is the last user message: a refused one names `messages`, not a `prompt` field the
    request has not got."""
    with pytest.raises(openai.BadRequestError) as caught:
        relay.openai().chat.completions.create(
            model="mj-fast", messages=[{"role": "user", "content": "something forbidden"}], stream=stream
        )
    assert caught.value.code == "content_policy_violation"
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "messages"
    assert relay.balance() == (1000, 0)


def test_a_failed_job_is_a_502_and_its_hold_is_released(relay: RunningRelay) -> None:
    before = relay.balance()
    with pytest.raises(openai.InternalServerError) as caught:
        relay.openai().images.generate(model="mj-fast", prompt="a bridge sim:fail")
    assert caught.value.status_code == 502
    assert "failed" in caught.value.message
    assert relay.balance() == before
    assert relay.jobs() == [("FAILED", "failed", "released", "sim")]


def test_a_short_balance_is_insufficient_quota_and_holds_nothing(tmp_path: Path) -> None:
    with running_relay(relay_config(tmp_path), quota=3) as relay:
        relay.openai().images.generate(model="mj-fast", prompt="first")  # 2 of 3 credits
        with pytest.raises(openai.RateLimitError) as caught:
            relay.openai().images.generate(model="mj-fast", prompt="second")
        assert caught.value.code == "insufficient_quota"
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert relay.balance() == (1, 0)
        assert len(relay.jobs()) == 1


@pytest.mark.postgres
def test_the_image_path_runs_on_postgresql(tmp_path: Path) -> None:
    with pg_database_sync() as url, running_relay(relay_config(tmp_path, database={"url": url})) as relay:
        result = relay.openai().images.generate(model="mj-fast", prompt="a red fox", n=6, response_format="b64_json")
        assert len(result.data) == 6
        assert relay.jobs() == [("SUCCEEDED", None, "captured", "sim")] * 2
        assert relay.balance() == (996, 0)


def test_the_sdks_retries_after_a_timeout_follow_the_running_job_and_charge_once(tmp_path: Path) -> None:
    config = relay_config(
        tmp_path, providers=[{"name": "sim", "dialect": "simulator", "simulator": {"relax_s": 1.5, "tile_px": 32}}]
    )
    with running_relay(config) as relay:
        with openai.OpenAI(base_url=relay.base + "/v1", api_key=relay.key, timeout=0.8, max_retries=2) as client:
            result = client.images.generate(model="mj-relax", prompt="a slow river")
        assert len(result.data) == 1 and result.data[0].url
        assert relay.jobs() == [("SUCCEEDED", None, "captured", "sim")]
        assert relay.balance() == (999, 0)


def slow_first_image() -> tuple[threading.Event, list[str], Starlette]:
    """A server of one reference image (`/ref.png`) whose first download comes only once the event is set; the paths
    served, in order."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    release, served = threading.Event(), list[str]()

    async def image(request: Request) -> Response:
        served.append(request.url.path)
        if len(served) == 1:
            await asyncio.to_thread(release.wait, 10)
        return Response(buffer.getvalue(), media_type="image/png")

    return release, served, Starlette(routes=[Route("/ref.png", image)])


def test_a_chat_whose_client_left_while_its_reference_image_came_starts_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK gives up on a request whose reference image is slow to download and retries it: the retry starts the
    job, and the request it gave up on, once its image comes, starts none (one job, one charge)."""
    release, served, app = slow_first_image()
    config = relay_config(tmp_path, api={"references": {"allow_private": True}})
    try:
        with serve(app) as images, running_relay(config) as relay:
            reference = {"type": "image_url", "image_url": {"url": images + "/ref.png"}}
            with caplog.at_level(logging.INFO):
                # 3 s: the retry's whole job must fit in it too (1 s did not, on a loaded machine)
                with openai.OpenAI(base_url=relay.base + "/v1", api_key=relay.key, timeout=3, max_retries=1) as client:
                    reply = client.chat.completions.create(
                        model="mj-fast",
                        messages=[{"role": "user", "content": [{"type": "text", "text": "a garden"}, reference]}],
                    )
                assert "![Midjourney grid]" in (reply.choices[0].message.content or "") and len(served) == 2
                release.set()

                def answered() -> int:
                    return sum(
                        r.getMessage() == "request" and r.__dict__["fields"]["route"] == "/v1/chat/completions"
                        for r in caplog.records
                    )

                wait_for(lambda: answered() == 2)  # the retry, and the request it gave up on
            assert relay.jobs() == [("SUCCEEDED", None, "captured", "sim")]
            assert relay.balance() == (998, 0)
    finally:
        release.set()


def test_a_chat_in_a_model_the_key_may_not_use_downloads_none_of_its_reference_images(tmp_path: Path) -> None:
    served: list[str] = []

    async def image(request: Request) -> Response:
        served.append(request.url.path)
        return Response(b"", media_type="image/png")

    config = relay_config(tmp_path, api={"references": {"allow_private": True}})
    with serve(Starlette(routes=[Route("/ref.png", image)])) as images, running_relay(config) as relay:
        narrow = relay.openai(create_key(relay.config, name="relax only", models=["mj-relax"]))
        reference = {"type": "image_url", "image_url": {"url": images + "/ref.png"}}
        with pytest.raises(openai.PermissionDeniedError):
            narrow.chat.completions.create(
                model="mj-fast", messages=[{"role": "user", "content": [{"type": "text", "text": "a pier"}, reference]}]
            )
        assert served == [] and relay.jobs() == []


def test_identical_requests_that_are_not_retries_each_run(relay: RunningRelay) -> None:
    body = {"model": "mj-fast", "prompt": "twins"}
    headers = {"Authorization": f"Bearer {relay.key}"}
    for _ in range(2):
        assert httpx.post(relay.base + "/v1/images/generations", json=body, headers=headers).status_code == 200
    assert len(relay.jobs()) == 2
    headers["Idempotency-Key"] = "order-17"
    first = httpx.post(relay.base + "/v1/images/generations", json=body, headers=headers, timeout=30).json()
    again = httpx.post(relay.base + "/v1/images/generations", json=body, headers=headers, timeout=30).json()
    assert len(relay.jobs()) == 3
    assert first["data"][0]["url"].split("?")[0] == again["data"][0]["url"].split("?")[0]


def test_a_retry_of_a_failed_request_starts_afresh(relay: RunningRelay) -> None:
    body = {"model": "mj-fast", "prompt": "a bridge sim:fail"}
    headers = {"Authorization": f"Bearer {relay.key}", "x-stainless-retry-count": "0"}
    assert httpx.post(relay.base + "/v1/images/generations", json=body, headers=headers).status_code == 502
    headers["x-stainless-retry-count"] = "1"
    assert httpx.post(relay.base + "/v1/images/generations", json=body, headers=headers).status_code == 502
    assert [row[:2] for row in relay.jobs()] == [("FAILED", "failed")] * 2


def test_a_retry_follows_its_first_attempt_once_its_reference_image_is_gone(tmp_path: Path) -> None:
    """A chat request's reference image is at a link that works only a while (a presigned URL): the SDK's retry of
    the request, once the link is gone, is answered with the first attempt's images, rather than refused for an
    image its job no longer needs while that job runs and is charged."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    served: list[str] = []

    async def image(request: Request) -> Response:
        served.append(request.url.path)
        if len(served) > 1:  # the link has expired
            return Response(b"expired", status_code=403)
        return Response(buffer.getvalue(), media_type="image/png")

    config = relay_config(tmp_path, api={"references": {"allow_private": True}})
    with serve(Starlette(routes=[Route("/ref.png", image)])) as images, running_relay(config) as relay:
        reference = {"type": "image_url", "image_url": {"url": images + "/ref.png"}}
        body = {
            "model": "mj-fast",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a dam"}, reference]}],
        }
        headers = {"Authorization": f"Bearer {relay.key}", "x-stainless-retry-count": "0"}
        first = httpx.post(relay.base + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert first.status_code == 200, first.text
        headers["x-stainless-retry-count"] = "1"
        retry = httpx.post(relay.base + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert retry.status_code == 200, retry.text
        assert retry.json()["id"] == first.json()["id"]
        assert relay.jobs() == [("SUCCEEDED", None, "captured", "sim")]
        assert relay.balance() == (998, 0)


def test_a_first_attempt_still_connected_after_its_slow_reference_image_follows_the_retry_that_started(
    tmp_path: Path,
) -> None:
    """The SDK gave up on a request whose reference image was slow to come and retried it, but the first request's
    connection stayed open (a proxy in between keeps it): its image comes after the retry started the job, and it
    follows that job instead of starting a second one (one job upstream, one charge, one answer for both)."""
    release, served, app = slow_first_image()
    config = relay_config(tmp_path, api={"references": {"allow_private": True}})
    try:
        with serve(app) as images, running_relay(config) as relay:
            reference = {"type": "image_url", "image_url": {"url": images + "/ref.png"}}
            content = [{"type": "text", "text": "a quay"}, reference]
            body = json.dumps({"model": "mj-fast", "messages": [{"role": "user", "content": content}]}).encode()
            host, port = relay.base.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=30) as first:
                first.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + relay.key.encode()
                    + b"\r\nContent-Type: application/json\r\nx-stainless-retry-count: 0\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + body
                )
                wait_for(lambda: len(served) == 1)
                headers = {
                    "Authorization": f"Bearer {relay.key}",
                    "Content-Type": "application/json",
                    "x-stainless-retry-count": "1",
                }
                retry = httpx.post(relay.base + "/v1/chat/completions", content=body, headers=headers, timeout=30)
                assert retry.status_code == 200, retry.text
                release.set()
                answer = b""
                while chunk := first.recv(65536):
                    answer += chunk
            status, _, rest = answer.partition(b"\r\n")
            assert b" 200 " in status, answer
            assert json.loads(rest.partition(b"\r\n\r\n")[2])["id"] == retry.json()["id"]
            # The first request's job was held as the retry's was, and ended unsent: never upstream, not charged.
            assert sorted(relay.jobs()) == [
                ("FAILED", "interrupted", "released", None),
                ("SUCCEEDED", None, "captured", "sim"),
            ]
            assert relay.balance() == (998, 0)
    finally:
        release.set()
