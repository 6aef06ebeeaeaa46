"""Every route, with generated input: the operations and their body schemas are read from the relay's own
`/openapi.json`, and hypothesis sends well-formed bodies, bodies of the wrong shape, text a database cannot store,
non-JSON bytes, odd path values and every kind of credential. Nothing may answer 5xx; every error must come in its
surface's envelope; and a refused request must change no money and make no job."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.api.errors import native
from tests.api.schema_strategies import from_schema
from tests.helpers import RunningRelay, relay_config, running_relay, sql

EXAMPLES = 2200
# The routes are sent in this many shares, each a test of its own with its own relay, so that the suite's workers
# run them side by side.
SHARES = 4
QUOTA = 80

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# JSON text a database cannot store: lone surrogates and NUL, as JSON escapes (the only way they travel).
_unstorable = st.sampled_from(["\\ud800", "\\udfff", "\\u0000", "a\\ud83d", "\\ud800\\u0000"])


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None, bool]]:
    ops = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            body = None
            if "requestBody" in operation:
                body = operation["requestBody"]["content"]["application/json"]["schema"]
            ops.append((path, method.upper(), body, "security" in operation))
    return ops


def _hostile_body(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Bodies that are almost right: a drawn example with one of its strings (any field, or an item of a list)
    made unstorable."""

    def poison(value: dict[str, Any], escape: str, pick: int) -> bytes:
        text = json.dumps(value)
        strings = [item for item in value.values() if isinstance(item, str)]
        strings += [
            item for items in value.values() if isinstance(items, list) for item in items if isinstance(item, str)
        ]
        if not strings:
            return text.encode()
        target = json.dumps(strings[pick % len(strings)])
        return text.replace(target, target[:-1] + escape + '"', 1).encode()

    objects = from_schema(schema, root).filter(lambda v: isinstance(v, dict))
    return st.builds(poison, objects, _unstorable, st.integers(0, 50))


def _body_strategy(schema: dict[str, Any] | None, root: dict[str, Any]) -> st.SearchStrategy[bytes | None]:
    anything = st.one_of(
        _json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
        st.integers(2, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    )
    if schema is None:
        return st.none() | anything
    valid = from_schema(schema, root).map(lambda v: json.dumps(v).encode())
    return st.one_of(valid, valid, _hostile_body(schema, root), anything)


def _path_value() -> st.SearchStrategy[str]:
    odd = st.sampled_from(["grid.png", "job_abcdefgh", "%", "..", "0", "\u00b2", "9" * 4301, "\u0661\u0662", "-1"])
    return st.one_of(odd, odd, st.integers(min_value=0, max_value=10**30).map(str), st.text(min_size=1, max_size=30))


def _check(relay: RunningRelay, path: str, reply: httpx.Response, before: tuple[int, int, int]) -> None:
    assert reply.status_code < 500, (path, reply.status_code, reply.text[:500])
    if reply.status_code >= 400:
        body = reply.json()
        if native(path):
            assert isinstance(body.get("code"), int) and "description" in body, body
        else:
            assert set(body["error"]) >= {"message", "type", "code"}, body
        jobs, balance, held = _money(relay)
        assert jobs == before[0] and held <= before[2] and balance <= before[1], (path, reply.text[:300])


def _money(relay: RunningRelay) -> tuple[int, int, int]:
    (jobs,) = sql(relay.config, "SELECT count(*) FROM jobs")[0]
    balance, held = relay.balance()
    return int(jobs), balance, held


@pytest.mark.parametrize("share", range(SHARES))
def test_every_route_with_generated_input_answers_without_a_5xx(tmp_path: Path, share: int) -> None:
    config = relay_config(
        tmp_path,
        providers=[
            {
                "name": "sim",
                "dialect": "simulator",
                "simulator": {"fast_s": 0.02, "relax_s": 0.02, "turbo_s": 0.02, "tile_px": 16},
            }
        ],
        jobs={"poll_interval_s": 0.02},
    )
    sent = 0
    with running_relay(config, quota=QUOTA) as relay, httpx.Client(base_url=relay.base, timeout=60) as client:
        spec = client.get("/openapi.json").json()
        every = _operations(spec)
        assert len(every) > 60  # every route, on every native prefix
        operations = sorted(every)[share::SHARES]
        credentials: dict[str, Callable[[], dict[str, str]]] = {
            "bearer": lambda: {"Authorization": f"Bearer {relay.key}"},
            "secret": lambda: {"mj-api-secret": relay.key},
            "wrong": lambda: {"Authorization": "Bearer sk-mjr-wrong"},
            "none": dict,
        }
        strategies = {
            (path, method): st.tuples(
                st.just((path, method, secured)),
                _body_strategy(body, spec),
                _path_value(),
                st.sampled_from(sorted(credentials)),
            )
            for path, method, body, secured in operations
        }

        @settings(
            max_examples=EXAMPLES // SHARES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(st.sampled_from(sorted(strategies)).flatmap(lambda op: strategies[op]))
        def send(case: tuple[tuple[str, str, bool], bytes | None, str, str]) -> None:
            nonlocal sent
            (template, method, secured), body, value, auth = case
            path = template.replace("{task_id}", quote(value, safe="")).replace("{job_id}", quote(value, safe=""))
            if "{name}" in path:
                path = path.replace("{name}", "grid.png") + f"?exp={quote(value, safe='')}&sig={quote(value, safe='')}"
            headers = {"Content-Type": "application/json", **credentials[auth]()}
            before = _money(relay)
            reply = client.request(method, path, content=body, headers=headers)
            sent += 1
            _check(relay, path, reply, before)

        send()
    assert sent >= 500
