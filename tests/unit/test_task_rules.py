"""The pure rules of native tasks: which kind a button makes, which mode a request runs in and which model prices
it, what a prompt has to draw, and what a task looks like to a client."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from adapters import TaskStatus, TaskView
from relay.config import ModelConfig
from relay.core.buttons import kind_of
from relay.core.lifecycle import Step, observe
from relay.core.modes import ModeHints, UnknownModel, choose_mode, price_model
from relay.core.notify import sign
from relay.core.prompt import prompt_text
from relay.domain import TASKS, JobState, ResultShape, TaskKind

MODELS = {
    "mj-fast": ModelConfig(mode="fast"),
    "mj-relax": ModelConfig(mode="relax"),
    "niji-relax": ModelConfig(mode="relax", bot="NIJI_JOURNEY"),
}


@pytest.mark.parametrize(
    ("custom_id", "kind"),
    [
        ("MJ::JOB::upsample::2::3f1e", TaskKind.UPSCALE),
        ("MJ::JOB::upsample_v6_2x_subtle::1::3f1e::SOLO", TaskKind.UPSCALE),
        ("MJ::JOB::variation::4::3f1e", TaskKind.VARIATION),
        ("MJ::JOB::high_variation::1::3f1e::SOLO", TaskKind.VARIATION),
        ("MJ::JOB::reroll::0::3f1e::SOLO", TaskKind.REROLL),
        ("MJ::Outpaint::50::1::3f1e::SOLO", TaskKind.ZOOM),
        ("MJ::CustomZoom::3f1e", TaskKind.ZOOM),
        ("MJ::JOB::pan_left::1::3f1e::SOLO", TaskKind.PAN),
        ("MJ::Inpaint::1::3f1e::SOLO", TaskKind.VARY_REGION),
        ("MJ::Job::PicReader::3", TaskKind.IMAGINE),
        ("MJ::Job::PromptAnalyzer::5", TaskKind.IMAGINE),
        ("MJ::Picread::Retry", TaskKind.DESCRIBE),
        ("MJ::Job::PicReader::all", None),  # "Imagine all": four grids upstream, under ids joined by commas
        ("MJ::Job::PicReader::³", None),
        ("MJ::JOB::animate_high::1::3f1e::SOLO", None),
        ("MJ::BOOKMARK::3f1e", None),
        ("upsample::1", None),
        ("MJ::JOB::upsample::1::" + "x" * 300, None),
        ("", None),
    ],
)
def test_a_button_makes_one_kind_of_task(custom_id: str, kind: TaskKind | None) -> None:
    assert kind_of(custom_id) == kind


def test_every_kind_has_one_row_and_made_from_buttons_only_when_it_has_no_direct_call() -> None:
    assert set(TASKS) == set(TaskKind)
    assert {k for k, spec in TASKS.items() if spec.direct} == {
        TaskKind.IMAGINE,
        TaskKind.BLEND,
        TaskKind.DESCRIBE,
        TaskKind.SHORTEN,
        TaskKind.SWAP_FACE,
    }
    assert TASKS[TaskKind.UPSCALE].shape is ResultShape.IMAGE and TASKS[TaskKind.DESCRIBE].shape is ResultShape.TEXT


@pytest.mark.parametrize(
    ("hints", "inherited", "mode"),
    [
        (ModeHints(path="relax", model="mj-fast", filter_modes=["TURBO"], prompt="x --fast"), None, "relax"),
        (ModeHints(model="mj-relax", filter_modes=["TURBO"], prompt="x --fast"), None, "relax"),
        (ModeHints(model="mj-turbo"), None, "turbo"),  # mj-{mode} means its mode even when not configured
        (ModeHints(model="niji-relax"), None, "relax"),
        (ModeHints(filter_modes=["", "bogus", "Turbo", "FAST"], prompt="x --fast"), None, "turbo"),
        (ModeHints(prompt="x --relax then --turbo"), None, "turbo"),
        (ModeHints(prompt="x --relaxed"), None, "fast"),
        (ModeHints(), "relax", "relax"),
        (ModeHints(prompt="x --fast"), "relax", "fast"),
        (ModeHints(), None, "fast"),
    ],
)
def test_the_mode_rule(hints: ModeHints, inherited: str | None, mode: str) -> None:
    assert choose_mode(hints, MODELS, inherited) == mode  # type: ignore[arg-type]


def test_an_unknown_model_is_refused_even_when_the_path_decides() -> None:
    for hints in (ModeHints(model="dall-e-3"), ModeHints(path="fast", model="gpt-image-1")):
        with pytest.raises(UnknownModel):
            choose_mode(hints, MODELS)


def test_the_price_model_follows_the_mode_sent() -> None:
    assert price_model(MODELS, "relax", "MID_JOURNEY", named="mj-fast") == "mj-relax"  # the mode sent decides
    assert price_model(MODELS, "relax", "NIJI_JOURNEY") == "niji-relax"
    assert price_model(MODELS, "relax", "NIJI_JOURNEY", named="mj-relax") == "mj-relax"
    assert price_model(MODELS, "fast", "NIJI_JOURNEY") == "mj-fast"  # no niji model of that mode: the mode's first
    assert price_model(MODELS, "turbo", "MID_JOURNEY") is None


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ("--fast", ""),
        ("a cat --ar 2:3", "a cat"),
        ("https://x/y.png a cat --v 6", "https://x/y.png a cat"),
        ("a --- b", "a --- b"),
        ("  --no cats ", ""),
    ],
)
def test_what_a_prompt_asks_to_draw_is_its_text_before_the_parameters(prompt: str, text: str) -> None:
    assert prompt_text(prompt) == text


def test_a_confirmed_modal_never_returns_to_modal_and_a_text_result_needs_no_image() -> None:
    modal = TaskView("u", TaskStatus.MODAL)
    assert observe(JobState.SUBMITTED, 0, modal) == Step("progress", JobState.MODAL, 0)
    assert observe(JobState.SUBMITTED, 0, modal, confirmed=True) == Step("none")
    # A parked job leaves MODAL only when confirmed or when the task runs: new-api's "" and novicezk's
    # statuses (no MODAL among them) must not take it out.
    for status in (TaskStatus.SUBMITTED, TaskStatus.NOT_START):
        assert observe(JobState.MODAL, 0, TaskView("u", status)) == Step("none")
    running = TaskView("u", TaskStatus.IN_PROGRESS, 15)
    assert observe(JobState.MODAL, 0, running) == Step("progress", JobState.IN_PROGRESS, 15)
    done = TaskView("u", TaskStatus.SUCCESS, 100, final_prompt="1️⃣ a\n\n2️⃣ b")
    assert observe(JobState.IN_PROGRESS, 50, done, ResultShape.TEXT).kind == "success"
    assert observe(JobState.IN_PROGRESS, 50, done, ResultShape.IMAGE).kind == "failure"


def test_a_hook_signature_is_the_hmac_of_the_exact_body() -> None:
    body = b'{"id": "1", "status": "SUCCESS"}'
    assert sign("whsec_abc", body) == "sha256=" + hmac.new(b"whsec_abc", body, hashlib.sha256).hexdigest()
    assert sign("whsec_abc", body + b" ") != sign("whsec_abc", body)
