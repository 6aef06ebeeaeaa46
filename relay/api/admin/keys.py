"""Key routes: list, one key, create (its secret is in this answer and nowhere else, ever), top up, update the
policies, revoke. Each checks its whole input before it calls the key store, so a refused request changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from relay.api.admin import inputs
from relay.api.admin.auth import admin
from relay.api.common import json_body, relay_of, validate
from relay.errors import InvalidRequest, NotFound
from relay.store.keys import KeyNotFound, KeyRecord


def key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "key",
        "name": record.name,
        "prefix": record.prefix,
        "balance": record.balance,
        "held": record.held,
        "available": record.available,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "revoked": record.revoked,
        "models": None if record.models is None else list(record.models),
        "rpm": record.rpm,
        "expires_at": record.expires_at,
    }


@contextmanager
def _refusals() -> Iterator[None]:
    """What the key store refuses (it checks every value again) as a 400; a key gone meanwhile as a 404."""
    try:
        yield
    except KeyNotFound:
        raise NotFound("No such key.", param="key_id") from None
    except ValueError as exc:
        raise InvalidRequest(f"Refused: {exc}.") from None


async def _existing(request: Request) -> KeyRecord:
    key_id = inputs.key_id(request.path_params["key_id"])
    record = await relay_of(request).keys.get(key_id)
    if record is None:
        raise NotFound(f"No key with id {key_id!r}.", param="key_id")
    return record


@admin
async def list_keys(request: Request) -> JSONResponse:
    records = await relay_of(request).keys.list()
    return JSONResponse({"object": "list", "data": [key_json(record) for record in records]})


@admin
async def get_key(request: Request) -> JSONResponse:
    return JSONResponse(key_json(await _existing(request)))


@admin
async def create_key(request: Request) -> JSONResponse:
    relay = relay_of(request)
    body = validate(inputs.KeyCreate, await json_body(request))
    now = relay.clock.now()
    models = inputs.models(body.models, list(relay.config.models))
    expires_at = inputs.expiry(body.expires_at, now)
    with _refusals():
        record, secret = await relay.keys.create(
            body.name, body.quota, now, models=models, rpm=body.rpm, expires_at=expires_at
        )
    answer = key_json(record) | {"secret": secret, "hook_secret": record.hook_secret}
    return JSONResponse(answer, status_code=201)


@admin
async def topup_key(request: Request) -> JSONResponse:
    relay = relay_of(request)
    record = await _existing(request)
    body = validate(inputs.TopUp, await json_body(request))
    if record.revoked:
        raise InvalidRequest("The key is revoked; a revoked key cannot be topped up.", param="key_id")
    with _refusals():
        topped = await relay.keys.topup(record.id, body.amount, relay.clock.now(), note=body.note)
    return JSONResponse(key_json(topped))


@admin
async def update_key(request: Request) -> JSONResponse:
    relay = relay_of(request)
    record = await _existing(request)
    data = await json_body(request)
    body = validate(inputs.KeyUpdate, data)
    given = body.model_fields_set
    if not given:
        raise InvalidRequest("Give at least one of name, models, rpm, expires_at.")
    now = relay.clock.now()
    changes: dict[str, Any] = {}
    if "name" in given:
        if body.name is None:
            raise InvalidRequest("Invalid value for 'name': a key keeps a name.", param="name")
        changes["name"] = body.name
    if "models" in given:
        changes["models"] = inputs.models(body.models, list(relay.config.models))
    if "rpm" in given:
        changes["rpm"] = body.rpm
    if "expires_at" in given:
        changes["expires_at"] = inputs.expiry(body.expires_at, now)
    if record.revoked:
        raise InvalidRequest("The key is revoked; a revoked key cannot be changed.", param="key_id")
    with _refusals():
        updated = await relay.keys.update(record.id, now, **changes)
    return JSONResponse(key_json(updated))


@admin
async def revoke_key(request: Request) -> JSONResponse:
    relay = relay_of(request)
    record = await _existing(request)
    if not record.revoked:
        await relay.keys.revoke(record.id, relay.clock.now())
    return JSONResponse(key_json(await _existing(request)))
