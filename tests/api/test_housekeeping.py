"""Front ends' housekeeping requests, sent with the official SDK as the front ends send them: each gets a short
answer and costs nothing (no job, no hold, no charge, no submit upstream), streamed or not."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from adapters.simulator import SimEngine, SimSettings, build_sim_app
from tests.helpers import RunningRelay, create_key, relay_config, running_relay, serve, sql
from tests.unit.test_housekeeping import LOBECHAT_TITLE, NEXTCHAT_SUMMARY, NEXTCHAT_TOPIC, OPEN_WEBUI_TITLE

SECRET = "sim-secret-0001"
ANSWER = "Midjourney image"


@pytest.fixture
def engine() -> SimEngine:
    return SimEngine(SimSettings(fast_s=0.2, relax_s=0.3, tile_px=32))


@contextmanager
def relay_with(tmp_path: Path, engine: SimEngine, **sections: Any) -> Iterator[RunningRelay]:
    with serve(build_sim_app(engine, "midjourney-proxy", SECRET)) as upstream:  # type: ignore[arg-type]
        provider = {"name": "up", "dialect": "midjourney-proxy", "base_url": upstream, "secret": SECRET}
        with running_relay(relay_config(tmp_path, providers=[provider], **sections)) as relay:
            yield relay


@pytest.fixture
def relay(tmp_path: Path, engine: SimEngine) -> Iterator[RunningRelay]:
    with relay_with(tmp_path, engine) as running:
        yield running


CONVERSATIONS = {
    "open-webui title": [{"role": "user", "content": OPEN_WEBUI_TITLE}],
    "nextchat topic": [
        {"role": "user", "content": "a lighthouse at dusk"},
        {"role": "assistant", "content": "![Midjourney grid](http://relay/files/job/grid.png)"},
        {"role": "user", "content": NEXTCHAT_TOPIC},
    ],
    # The summary prompt comes after the real user turn: read as a prompt, it would run that turn once more.
    "nextchat summary": [
        {"role": "user", "content": "a lighthouse at dusk"},
        {"role": "assistant", "content": "![Midjourney grid](http://relay/files/job/grid.png)"},
        {"role": "system", "content": NEXTCHAT_SUMMARY},
    ],
    "lobechat title": [
        {"role": "system", "content": LOBECHAT_TITLE},
        {"role": "user", "content": "user: a lighthouse at dusk\nassistant: ![grid](x)"},
    ],
}


def costs_nothing(relay: RunningRelay, engine: SimEngine) -> None:
    assert relay.balance() == (1000, 0)
    assert relay.jobs() == []
    assert engine.submits == 0


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_a_housekeeping_request_is_answered_without_a_job(
    relay: RunningRelay, engine: SimEngine, conversation: str
) -> None:
    reply = relay.openai().chat.completions.create(model="mj-fast", messages=CONVERSATIONS[conversation])  # type: ignore[arg-type]
    assert reply.object == "chat.completion"
    assert reply.model == "mj-fast"
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop"
    costs_nothing(relay, engine)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_a_streamed_housekeeping_request_is_answered_without_a_job(
    relay: RunningRelay, engine: SimEngine, conversation: str
) -> None:
    stream = relay.openai().chat.completions.create(
        model="mj-fast",
        messages=CONVERSATIONS[conversation],  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0
    costs_nothing(relay, engine)


def test_an_unknown_model_is_still_refused(relay: RunningRelay, engine: SimEngine) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        relay.openai().chat.completions.create(model="gpt-4o", messages=CONVERSATIONS["nextchat topic"])  # type: ignore[arg-type]
    assert raised.value.code == "model_not_found"
    costs_nothing(relay, engine)


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_the_key_may_not_use_is_refused_as_a_job_of_it_would_be(
    relay: RunningRelay, engine: SimEngine, stream: bool
) -> None:
    narrow = create_key(relay.config, name="relax only", models=["mj-relax"])
    client = relay.openai(narrow)
    with pytest.raises(openai.PermissionDeniedError) as ordinary:
        client.chat.completions.create(model="mj-fast", messages=[{"role": "user", "content": "a lighthouse"}])
    with pytest.raises(openai.PermissionDeniedError) as chore:
        client.chat.completions.create(model="mj-fast", messages=CONVERSATIONS["nextchat topic"], stream=stream)  # type: ignore[arg-type]
    assert chore.value.status_code == ordinary.value.status_code == 403
    assert chore.value.body == ordinary.value.body
    assert isinstance(chore.value.body, dict) and chore.value.body["code"] == "model_not_allowed"
    reply = client.chat.completions.create(model="mj-relax", messages=CONVERSATIONS["nextchat topic"])  # type: ignore[arg-type]
    assert reply.choices[0].message.content == ANSWER
    assert sql(relay.config, "SELECT balance, held FROM keys WHERE name = 'relax only'") == [(1000, 0)]
    costs_nothing(relay, engine)


def test_an_ordinary_request_still_runs_its_job(relay: RunningRelay, engine: SimEngine) -> None:
    reply = relay.openai().chat.completions.create(
        model="mj-fast", messages=[{"role": "user", "content": "a lighthouse at dusk"}]
    )
    assert (reply.choices[0].message.content or "").startswith("![Midjourney grid](")
    assert engine.submits == 1 and relay.balance() == (998, 0)


def test_the_guard_can_be_switched_off(tmp_path: Path, engine: SimEngine) -> None:
    with relay_with(tmp_path, engine, api={"housekeeping": {"enabled": False}}) as relay:
        reply = relay.openai().chat.completions.create(model="mj-fast", messages=CONVERSATIONS["nextchat topic"])  # type: ignore[arg-type]
        assert (reply.choices[0].message.content or "").startswith("![Midjourney grid](")
        assert engine.submits == 1 and relay.balance() == (998, 0)


def test_configured_patterns_and_answer(tmp_path: Path, engine: SimEngine) -> None:
    housekeeping = {"patterns": [r"^Name this chat\b"], "answer": "Image chat"}
    with relay_with(tmp_path, engine, api={"housekeeping": housekeeping}) as relay:
        client = relay.openai()
        reply = client.chat.completions.create(
            model="mj-relax", messages=[{"role": "user", "content": "name this chat: a lighthouse"}]
        )
        assert reply.choices[0].message.content == "Image chat"
        reply = client.chat.completions.create(model="mj-relax", messages=CONVERSATIONS["nextchat topic"])  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "Image chat"  # the built-in prompts are still known
        costs_nothing(relay, engine)
