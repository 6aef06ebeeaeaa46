"""Upstream answers as the real servers give them, read as what they mean for the job and the provider. Each case
cites the source it was taken from."""

from __future__ import annotations

import json

import pytest

from adapters import ClientError, NeedsModal, ProviderUnusable, Retryable
from adapters.replies import classify_submit

# new-api refuses a request it cannot route in its middleware, before any channel is chosen, with its OpenAI-style
# envelope (not the Midjourney one): `{"error": {"message", "type": "new_api_error"}}`, HTTP 400.
#
# Source: Calcium-Ion/new-api ef8ae4d, `middleware/distributor.go` (`Distribute` -> `getModelRequest` ->
# `service.GetMjRequestModel`; an error there is `abortWithOpenAiMessage(c, http.StatusBadRequest, "Invalid request, "
# + err.Error())`) and `middleware/utils.go` (`abortWithOpenAiMessage` writes `{"error": {"message":
# MessageWithRequestId(message, id), "type": "new_api_error"}}`); QuantumNous/new-api `middleware/distributor.go` and
# `middleware/utils.go` do the same (plus `"code": ""`). `service/midjourney.go` `CoverPlusActionToNormalAction` knows
# only upsample / variation / pan / reroll / Outpaint / CustomZoom / Inpaint and answers any other customId with
# `unknown_action:<customId>`: the relay's own PicReader, PromptAnalyzer and Picread::Retry buttons (`MJ::Job::...`,
# `MJ::Picread::Retry`, relay/core/buttons.py) are all refused so.
#
# That is a refusal of one request: the provider must not be set aside for everyone (an "unusable" answer cools it).


def new_api_middleware_refusal(message: str) -> bytes:
    # common.MessageWithRequestId: fmt.Sprintf("%s (request id: %s)", message, id)
    return json.dumps(
        {
            "error": {
                "message": f"Invalid request, {message} (request id: 20250401123456789abcdef)",
                "type": "new_api_error",
            }
        }
    ).encode()


@pytest.mark.parametrize(
    "custom_id",
    ["MJ::Job::PicReader::1", "MJ::Job::PromptAnalyzer::2", "MJ::Picread::Retry"],
)
def test_new_api_refusing_an_unknown_button_is_a_client_error_not_an_unusable_provider(custom_id: str) -> None:
    outcome = classify_submit(400, new_api_middleware_refusal(f"unknown_action:{custom_id}"), follow_up=True)
    assert isinstance(outcome, ClientError), outcome
    assert "unknown_action" in outcome.description


# A follow-up that trueai parks for a confirmation, as new-api forwards it.
#
# trueai-org/midjourney-proxy ed32197, `src/Midjourney.Services/TaskService.cs` (`SubmitAction`, about lines 1716 and
# 1751): a Pan / Variation / reroll with remix on (and always CustomZoom / Inpaint) answers
# `SubmitResultVO.Of(ReturnCode.EXISTED, "Waiting for window confirm", task.Id)` with properties `finalPrompt` and
# `remix: true` (`Midjourney.Base/Data/Constants.cs`: TASK_PROPERTY_REMIX = "remix"), serialized by System.Text.Json in
# camelCase (`Midjourney.API/Program.cs`), the task saved in status MODAL.
#
# new-api passes that body on with one change: Calcium-Ion/new-api ef8ae4d `relay/relay-mj.go` (`RelayMidjourneySubmit`)
# and QuantumNous/new-api `relay/mjproxy_handler.go`: `if midjRequest.Action != INPAINT && != CUSTOM_ZOOM {
# strings.Replace(string(responseBody), ""code":21", ""code":1", -1) }`. So behind new-api a remix follow-up comes
# back as code 1 with the same description, result and `remix: true`: the task waits in MODAL for `submit/modal`, it was
# not taken to run.


def trueai_modal_reply_through_new_api(task_id: str) -> bytes:
    trueai = json.dumps(
        {
            "code": 21,
            "description": "Waiting for window confirm",
            "result": task_id,
            "properties": {"finalPrompt": "a cat --ar 3:2", "remix": True},
        },
        separators=(",", ":"),
    )
    return trueai.replace('"code":21', '"code":1').encode()  # new-api's rewrite, as it does it


def test_a_remix_follow_up_forwarded_by_new_api_as_code_1_needs_a_modal() -> None:
    reply = trueai_modal_reply_through_new_api("1744000000000123")
    assert json.loads(reply)["code"] == 1
    assert classify_submit(200, reply, follow_up=True) == NeedsModal("1744000000000123")


# new-api failing after its upstream took the task.
#
# Calcium-Ion/new-api ef8ae4d `relay/relay-mj.go` `RelayMidjourneySubmit` (and QuantumNous/new-api
# `relay/mjproxy_handler.go`, the same code): `service.DoMidjourneyHttpRequest` sends the submit upstream; the deferred
# charge (`consumeQuota && StatusCode == 200` -> `PostConsumeQuota`) is registered; only then is the task written,
# and `if err = midjourneyTask.Insert(); err != nil { return &dto.MidjourneyResponse{Code: 4, Description:
# "insert_midjourney_task_failed"} }`. `controller/relay.go` `RelayMidjourney` answers that as HTTP 400
# `{"description": "<description> <result>", "type": "upstream_error", "code": 4}`.
#
# So this code 4 comes after the upstream answered (code 1/22 for an accepted task, charged): the task may be running.
# It is not a refusal of the request: the job must end "may have run", not "the upstream refused the request".


def test_new_api_failing_to_record_a_task_its_upstream_took_may_have_run() -> None:
    reply = json.dumps({"description": "insert_midjourney_task_failed ", "type": "upstream_error", "code": 4}).encode()
    outcome = classify_submit(400, reply)
    assert isinstance(outcome, Retryable) and outcome.sent, outcome


# new-api's own 5xx, answered by its middleware before any channel is chosen.
#
# Calcium-Ion/new-api ef8ae4d `middleware/auth.go` (`TokenAuth`, which `router/relay-router.go` puts in front of every
# `/mj` and `/:mode/mj` route): `userCache, err := model.GetUserCache(token.UserId); if err != nil {
# abortWithOpenAiMessage(c, http.StatusInternalServerError, err.Error()) }`; `middleware/utils.go`
# `abortWithOpenAiMessage` writes `{"error": {"message": ..., "type": "new_api_error"}}` and aborts: the submit never
# reached a channel. The relay's own rule (README, "Providers and routing"): a 5xx carrying the server's own error
# envelope was handled and refused by the server, and another provider may run the job.


def test_new_apis_own_500_before_routing_is_not_a_maybe_taken_submit() -> None:
    reply = json.dumps(
        {"error": {"message": "record not found (request id: 2025040112345)", "type": "new_api_error"}}
    ).encode()
    outcome = classify_submit(500, reply)
    assert isinstance(outcome, Retryable) and not outcome.sent, outcome


# trueai refusing the relay's own account (its per-user drawing limits, its banned-word lock), not the request.
#
# trueai-org/midjourney-proxy ed32197 `src/Midjourney.API/Controllers/SubmitController.cs` `NewTask` (every submit
# endpoint calls it): `throw new LogicException("用户今日绘图次数已达上限")` (the user's drawing limit for today),
# `"总绘图次数已达上限"` (the user's total drawing limit), `"访客今日绘图次数已达上限"` (a guest's limit for today) and
# `"账号已被临时封锁，请勿使用违规词作图"` (the account is locked for a while after banned words). `Imagine` answers a
# LogicException as `Ok(SubmitResultVO.Fail(ReturnCode.VALIDATION_ERROR, lex.Message))` (HTTP 200, code 4); the other
# endpoints (describe, blend, shorten, action, ...) do not catch it, and
# `Filters/CustomLogicExceptionFilterAttribute.cs`
# answers HTTP 200 `Result.Fail(lex.Message)` = `{"success": false, "code": -1, "message", "timestamp"}`
# (`Midjourney.Base/Models/Result.cs`).
#
# These refuse every request of the relay's account on that provider until the limit resets: the provider cannot serve
# now (another provider may), the request itself is fine. Read as a client error, each job routed there fails with 400
# and the provider stays "healthy", so it keeps taking (and failing) jobs.


LIMITS = [
    "用户今日绘图次数已达上限",
    "总绘图次数已达上限",
    "访客今日绘图次数已达上限",
    "账号已被临时封锁，请勿使用违规词作图",
]


@pytest.mark.parametrize("message", LIMITS)
def test_an_account_limit_on_imagine_makes_the_provider_unusable_not_the_request_refused(message: str) -> None:
    reply = json.dumps({"code": 4, "description": message, "result": None, "properties": {}}).encode()
    outcome = classify_submit(200, reply)
    assert isinstance(outcome, ProviderUnusable), outcome


@pytest.mark.parametrize("message", LIMITS)
@pytest.mark.parametrize("follow_up", [False, True])
def test_an_account_limit_on_other_endpoints_makes_the_provider_unusable(message: str, follow_up: bool) -> None:
    reply = json.dumps({"success": False, "code": -1, "message": message, "timestamp": "638790000000000000"}).encode()
    outcome = classify_submit(200, reply, follow_up=follow_up)
    assert isinstance(outcome, ProviderUnusable), outcome
