"""`GET /openapi.json` against what the running relay really accepts: a body the relay takes must be valid under the
document's schema (a gateway or a client validating against it would refuse it otherwise), every way of sending a
key the relay honours must be a security scheme of the document, and the document must be valid OpenAPI 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi
from starlette.routing import Route

from relay.app import routes
from tests.api.native_helpers import png
from tests.helpers import RunningRelay, relay_config, running_relay

# Bodies midjourney-proxy clients send that the relay takes (seed documents and the clients they name): a blank
# mask (the seed example of submit/modal), the bot's short names, task ids typed as integers (what `/v1/mj` answers
# them as), null for a list or a value with nothing in it.
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("/mj/submit/modal", {"taskId": "1234567890", "prompt": "a cat", "maskBase64": ""}),
    ("/mj/submit/imagine", {"prompt": "a cat", "botType": "mj"}),
    ("/mj/submit/imagine", {"prompt": "a cat", "botType": " Niji "}),
    ("/mj/submit/imagine", {"prompt": "a cat", "botType": ""}),
    ("/mj/submit/imagine", {"prompt": "a cat", "base64Array": None, "accountFilter": {"modes": None}}),
    ("/mj/submit/blend", {"base64Array": [png(), png((0, 90, 200))], "dimensions": None}),
    ("/mj/submit/blend", {"base64Array": [png(), png((0, 90, 200))], "dimensions": ""}),
    ("/v1/mj/submit/action", {"taskId": 1234567890, "customId": "MJ::JOB::upsample::1::abc"}),
    ("/v1/mj/task/list-by-condition", {"ids": [1234567890, "1234567891"]}),
]


def _spec(client: httpx.Client) -> dict[str, Any]:
    reply = client.get("/openapi.json")
    assert reply.status_code == 200
    return reply.json()  # type: ignore[no-any-return]


def _body_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    operation = spec["paths"][path]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    # The operation's schema, with the document's components to resolve its `$ref`s against.
    return {**schema, "components": spec["components"]}


def test_the_document_is_valid_openapi(relay: RunningRelay) -> None:
    with httpx.Client(base_url=relay.base, timeout=30) as client:
        validate_openapi(_spec(client))


@pytest.mark.parametrize(("path", "body"), ACCEPTED, ids=[f"{p}:{sorted(b)}" for p, b in ACCEPTED])
def test_a_body_the_relay_takes_is_valid_under_the_document(
    relay: RunningRelay, path: str, body: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {relay.key}"}
    with httpx.Client(base_url=relay.base, timeout=30, headers=headers) as client:
        reply = client.post(path, json=body)
        answer = reply.json()
        assert reply.status_code != 400, reply.text  # taken (or answered as an unknown task)
        assert not isinstance(answer, dict) or answer["code"] != 4, reply.text
        schema = _body_schema(_spec(client), path)
    jsonschema.Draft202012Validator(schema).validate(body)


def test_every_way_of_sending_a_native_key_is_a_security_scheme(relay: RunningRelay) -> None:
    ways = {
        "bearer": {"Authorization": f"Bearer {relay.key}"},
        "mj-api-secret": {"mj-api-secret": relay.key},
        "bare": {"Authorization": relay.key},
    }
    with httpx.Client(base_url=relay.base, timeout=30) as client:
        spec = _spec(client)
        for headers in ways.values():
            reply = client.get("/mj/task/1234567890/fetch", headers=headers)
            assert reply.status_code == 404 and reply.json()["code"] == 3, reply.text  # the key was taken
    schemes = spec["components"]["securitySchemes"]
    offered = set()
    for requirement in spec["paths"]["/mj/task/{task_id}/fetch"]["get"]["security"]:
        for name in requirement:
            scheme = schemes[name]
            if scheme["type"] == "http" and scheme["scheme"] == "bearer":
                offered.add("bearer")
            elif scheme["type"] == "apiKey" and scheme["in"] == "header":
                offered.add({"mj-api-secret": "mj-api-secret", "authorization": "bare"}[scheme["name"].lower()])
    assert offered == set(ways)


def test_every_route_the_relay_serves_is_in_the_document_with_its_methods(tmp_path: Path) -> None:
    served = {
        (route.path, method.lower())
        for route in routes()
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    config = relay_config(tmp_path, server={"admin_token": "admin-token-for-tests"})
    with running_relay(config) as relay, httpx.Client(base_url=relay.base, timeout=30) as client:
        spec = _spec(client)
        listed = {(path, method) for path, operations in spec["paths"].items() for method in operations}
        assert listed == served
        # The admin API takes the admin token, as the document's scheme for it says, and not a relay key.
        assert spec["paths"]["/admin/api/keys"]["get"]["security"] == [{"adminToken": []}]
        assert client.get("/admin/api/keys", headers={"Authorization": "Bearer admin-token-for-tests"}).is_success
        assert client.get("/admin/api/keys", headers={"Authorization": f"Bearer {relay.key}"}).status_code == 401


def test_the_bound_of_n_is_the_relays_own(tmp_path: Path) -> None:
    config = relay_config(tmp_path, api={"max_n": 6})
    with running_relay(config) as relay, httpx.Client(base_url=relay.base, timeout=30) as client:
        schema = _body_schema(_spec(client), "/v1/images/generations")
        reply = client.post(
            "/v1/images/generations",
            json={"prompt": "a cat", "n": 7},
            headers={"Authorization": f"Bearer {relay.key}"},
        )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n", reply.text
    assert not jsonschema.Draft202012Validator(schema).is_valid({"prompt": "a cat", "n": 7})
    jsonschema.Draft202012Validator(schema).validate({"prompt": "a cat", "n": 6})


def _validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "components": spec["components"]})


def test_answers_are_as_the_document_tells_them(relay: RunningRelay) -> None:
    headers = {"Authorization": f"Bearer {relay.key}"}
    with httpx.Client(base_url=relay.base, timeout=30, headers=headers) as client:
        spec = _spec(client)
        task_id = client.post("/mj/submit/imagine", json={"prompt": "a cat"}).json()["result"]
        fetched = client.get(f"/mj/task/{task_id}/fetch")
        fetch_doc = spec["paths"]["/mj/task/{task_id}/fetch"]["get"]["responses"]["200"]["content"]
        task_schema = spec["components"]["schemas"]["MjTask"]
        _validator(spec, fetch_doc["application/json"]["schema"]).validate(fetched.json())
        assert set(fetched.json()) == set(task_schema["properties"])  # every field told, none that is not sent
        assert set(task_schema["required"]) == set(task_schema["properties"])
        missing = client.get("/v1/models/no-such-model")
        error_doc = spec["paths"]["/v1/models/{model}"]["get"]["responses"]["default"]["content"]
        _validator(spec, error_doc["application/json"]["schema"]).validate(missing.json())
        inner = spec["components"]["schemas"]["OpenAIError"]["properties"]["error"]
        assert set(inner["required"]) == set(missing.json()["error"])
        body = {"model": "mj-fast", "stream": True, "messages": [{"role": "user", "content": "a cat"}]}
        with client.stream("POST", "/v1/chat/completions", json=body) as streamed:
            media_type = streamed.headers["content-type"].split(";")[0]
            for _ in streamed.iter_lines():
                pass
        chat_doc = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
        assert media_type in chat_doc


def test_the_idempotency_key_the_openai_routes_take_is_a_parameter(relay: RunningRelay) -> None:
    headers = {"Authorization": f"Bearer {relay.key}", "Idempotency-Key": "order-1"}
    with httpx.Client(base_url=relay.base, timeout=30, headers=headers) as client:
        spec = _spec(client)
        assert client.post("/v1/images/generations", json={"prompt": "a cat", "n": 1}).status_code == 200
        again = client.post("/v1/images/generations", json={"prompt": "a dog", "n": 1})
    assert again.status_code == 422 and again.json()["error"]["code"] == "idempotency_key_reused", again.text
    for path in ("/v1/images/generations", "/v1/chat/completions"):
        params = spec["paths"][path]["post"].get("parameters", [])
        assert {(p["in"], p["name"].lower()) for p in params} == {("header", "idempotency-key")}


def test_the_image_names_a_link_may_have_are_the_documents(relay: RunningRelay) -> None:
    headers = {"Authorization": f"Bearer {relay.key}"}
    with httpx.Client(base_url=relay.base, timeout=30, headers=headers) as client:
        spec = _spec(client)
        url = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 1}).json()["data"][0]["url"]
        link = httpx.URL(url)
        assert client.get(url).status_code == 200
        other = client.get(link.copy_with(path=link.path.rsplit("/", 1)[0] + "/other.png"))
    params = spec["paths"]["/files/{job_id}/{name}"]["get"]["parameters"]
    names = next(p["schema"] for p in params if p["name"] == "name")["enum"]
    assert link.path.rsplit("/", 1)[1] in names and "grid.png" in names
    assert other.status_code == 404 and "other.png" not in names
