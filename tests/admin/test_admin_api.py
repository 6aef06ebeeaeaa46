"""The admin API through real HTTP: the token, every endpoint, and hostile input refused with nothing changed."""

from __future__ import annotations

import asyncio
import csv
import fnmatch
import io
import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from relay.config import ConfigError, parse_config
from relay.logs import JsonFormatter
from relay.services import Relay
from tests.admin.conftest import TOKEN, Admin, admin_config
from tests.helpers import FakeClock, create_key, pg_database_sync, relay_config, running_relay, sql, wait_for

ENDPOINTS = [
    ("GET", "/admin/api/keys"),
    ("POST", "/admin/api/keys"),
    ("GET", "/admin/api/keys/key_000000000000"),
    ("PATCH", "/admin/api/keys/key_000000000000"),
    ("POST", "/admin/api/keys/key_000000000000/topup"),
    ("POST", "/admin/api/keys/key_000000000000/revoke"),
    ("GET", "/admin/api/usage"),
    ("GET", "/admin/api/jobs"),
    ("GET", "/admin/api/providers"),
    ("GET", "/admin/api/ledger.csv"),
]


def _error(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = answer.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    return error


def _ledger(admin: Admin, **params: str) -> list[dict[str, str]]:
    answer = admin.get("ledger.csv", params=params)
    assert answer.status_code == 200, answer.text
    return list(csv.DictReader(io.StringIO(answer.text)))


# -- the token ---------------------------------------------------------------------------------------------------


def test_without_a_token_configured_the_admin_surface_does_not_exist(tmp_path: Path) -> None:
    with running_relay(relay_config(tmp_path)) as relay, httpx.Client(base_url=relay.base) as http:
        for method, path in [*ENDPOINTS, ("GET", "/admin/"), ("GET", "/admin"), ("GET", "/admin/static/app.js")]:
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer x"}):
                answer = http.request(method, path, headers=headers, json={"name": "x", "amount": 1})
                assert _error(answer, 404)["code"] == "not_found", (method, path)
        # and nothing was made by the bodies sent
        assert sql(relay.config, "SELECT count(*) FROM keys") == [(1,)]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer " + TOKEN[:-1] + "x"},  # same length, last character wrong
        {"Authorization": "Bearer " + TOKEN + "x"},
        {"Authorization": "Basic " + TOKEN},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer " + TOKEN.upper()},
        {"Authorization": b"Bearer \xff\xfe"},
    ],
)
def test_every_endpoint_needs_the_admin_token(admin: Admin, headers: dict[str, str | bytes]) -> None:
    before = admin.keys()
    with httpx.Client(base_url=admin.relay.base) as anonymous:
        for method, path in ENDPOINTS:
            answer = anonymous.request(method, path, headers=headers, json={"name": "mallory", "amount": 5})
            assert _error(answer, 401)["type"] == "invalid_request_error", (method, path)
    assert admin.keys() == before


def test_a_client_key_is_not_an_admin_token(admin: Admin) -> None:
    answer = httpx.get(admin.relay.base + "/admin/api/keys", headers={"Authorization": f"Bearer {admin.relay.key}"})
    _error(answer, 401)


def test_the_admin_token_is_checked_in_config_and_kept_out_of_logs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.admin_token"):
        parse_config("server: {admin_token: short}")
    with pytest.raises(ConfigError, match="server.admin_token"):
        parse_config("server: {admin_token: 'has a space in it 0123456789'}")
    assert parse_config("server: {admin_token: '${MJ_ADMIN_TEST:-}'}", env={}).server.admin_token is None
    configured = parse_config("server: {admin_token: '${MJ_ADMIN_TEST}'}", env={"MJ_ADMIN_TEST": TOKEN})
    assert configured.server.admin_token == TOKEN
    assert TOKEN not in repr(configured)

    Relay(admin_config(tmp_path), FakeClock())  # registers what the logs must never show
    record = logging.LogRecord("relay", logging.INFO, __file__, 1, f"token {TOKEN} seen", None, None)
    line = JsonFormatter().format(record)
    assert TOKEN not in line and "***" in line


# -- keys --------------------------------------------------------------------------------------------------------


def test_keys_create_list_topup_update_revoke(admin: Admin) -> None:
    created = admin.create("alice", 10, models=["mj-fast"], rpm=30, expires_at="2199-12-31")
    secret = created["secret"]
    assert secret.startswith("sk-mjr-") and created["hook_secret"].startswith("whsec_")
    assert created["balance"] == 10 and created["held"] == 0 and created["available"] == 10
    assert created["models"] == ["mj-fast"] and created["rpm"] == 30
    assert created["expires_at"] == 7_258_032_000.0  # 2199-12-31T00:00:00Z
    key_id = created["id"]

    listed = {key["id"]: key for key in admin.keys()}
    assert sorted(key["name"] for key in listed.values()) == ["alice", "test"]
    assert "secret" not in listed[key_id] and "hook_secret" not in listed[key_id]
    assert secret not in admin.get("keys").text
    assert admin.get(f"keys/{key_id}").json() == listed[key_id]

    # the key works with the relay
    assert [m.id for m in admin.relay.openai(secret).models.list()]

    topped = admin.post(f"keys/{key_id}/topup", {"amount": 15, "note": "invoice 7"})
    assert topped.status_code == 200, topped.text
    assert topped.json()["balance"] == 25
    topups = [row for row in _ledger(admin, key=key_id) if row["kind"] == "topup"]
    assert [(r["amount"], r["note"]) for r in topups] == [("10", "initial quota"), ("15", "invoice 7")]

    changed = admin.patch(f"keys/{key_id}", {"name": "alice-2", "models": None, "rpm": None, "expires_at": None})
    assert changed.status_code == 200, changed.text
    assert changed.json() | {"name": "alice-2"} == changed.json()
    assert (changed.json()["models"], changed.json()["rpm"], changed.json()["expires_at"]) == (None, None, None)
    assert admin.patch(f"keys/{key_id}", {"rpm": 5}).json()["rpm"] == 5
    assert admin.get(f"keys/{key_id}").json()["name"] == "alice-2"  # a field not given stays

    revoked = admin.post(f"keys/{key_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert admin.post(f"keys/{key_id}/revoke").json()["revoked_at"] == revoked.json()["revoked_at"]
    other = next(key for key in admin.keys() if key["name"] == "test")
    assert other["revoked"] is False  # only that key

    def refused() -> bool:
        try:
            admin.relay.openai(secret).models.list()
        except openai.AuthenticationError:
            return True
        return False

    wait_for(refused)
    # a revoked key can be neither topped up nor changed
    _error(admin.post(f"keys/{key_id}/topup", {"amount": 1}), 400)
    _error(admin.patch(f"keys/{key_id}", {"rpm": 9}), 400)
    assert admin.get(f"keys/{key_id}").json()["balance"] == 25


def test_revoking_a_key_revokes_no_other_key_whose_name_is_its_id(admin: Admin) -> None:
    target = admin.create("shop", 5)
    namesake = create_key(admin.relay.config, 5, name="namesake")
    # A name an earlier command line accepted (it now refuses names like key ids, as this API does).
    sql(admin.relay.config, "UPDATE keys SET name = ? WHERE name = 'namesake'", target["id"])
    assert admin.post(f"keys/{target['id']}/revoke").json()["revoked"] is True
    assert {key["name"]: key["revoked"] for key in admin.keys()} == {"test": False, "shop": True, target["id"]: False}
    assert [m.id for m in admin.relay.openai(namesake).models.list()]


def test_unknown_keys_are_404(admin: Admin) -> None:
    for answer in [
        admin.get("keys/key_ffffffffffff"),
        admin.post("keys/key_ffffffffffff/topup", {"amount": 1}),
        admin.patch("keys/key_ffffffffffff", {"rpm": 1}),
        admin.post("keys/key_ffffffffffff/revoke"),
    ]:
        _error(answer, 404)


BAD_CREATES: list[Any] = [
    {"quota": 5},
    {"name": "", "quota": 5},
    {"name": "   ", "quota": 5},
    {"name": "x" * 101, "quota": 5},
    {"name": "a\u0000b", "quota": 5},
    {"name": "a\nb", "quota": 5},
    {"name": "a\u202eb", "quota": 5},
    {"name": "key_abc123", "quota": 5},
    {"name": 5, "quota": 5},
    {"name": "ok", "quota": -1},
    {"name": "ok", "quota": 10**12 + 1},
    {"name": "ok", "quota": 10**30},
    {"name": "ok", "quota": "5"},
    {"name": "ok", "quota": 1.5},
    {"name": "ok", "quota": True},
    {"name": "ok", "quota": 5, "admin": True},
    {"name": "ok", "models": ["nope"]},
    {"name": "ok", "models": []},
    {"name": "ok", "models": "mj-fast"},
    {"name": "ok", "models": ["mj-fast", 3]},
    {"name": "ok", "rpm": 0},
    {"name": "ok", "rpm": 10**7},
    {"name": "ok", "rpm": "10"},
    {"name": "ok", "expires_at": "2001-01-01"},
    {"name": "ok", "expires_at": 1},
    {"name": "ok", "expires_at": "tomorrow"},
    {"name": "ok", "expires_at": "9999-12-31"},
    {"name": "ok", "expires_at": 1.9e9},
    {"name": "ok", "expires_at": "1" * 41},
    {"name": "ok", "expires_at": 10**400},  # too large for a float: a 400, not an OverflowError
    {"name": "ok", "expires_at": -(10**400)},
    ["name", "ok"],
    "ok",
]


def test_bad_key_creations_are_400_and_make_nothing(admin: Admin) -> None:
    before, ledger_before = admin.keys(), _ledger(admin)
    for body in BAD_CREATES:
        _error(admin.post("keys", body), 400)
    for raw in [b"", b"{", b"\xff", b'{"name": "\\ud800", "quota": 1}', b"[" * 100 + b"]" * 100]:
        _error(admin.http.post("/admin/api/keys", content=raw, headers={"content-type": "application/json"}), 400)
    assert admin.keys() == before
    assert _ledger(admin) == ledger_before


def test_bad_topups_and_updates_are_400_and_change_nothing(admin: Admin) -> None:
    key_id = admin.create("bob", 7)["id"]
    before, ledger_before = admin.keys(), _ledger(admin)
    for body in [
        {},
        {"amount": 0},
        {"amount": -5},
        {"amount": 10**12 + 1},
        {"amount": "10"},
        {"amount": 2.5},
        {"amount": True},
        {"amount": None},
        {"amount": 5, "note": "n" * 201},
        {"amount": 5, "note": "a\u0000"},
        {"amount": 5, "balance": 1000},
    ]:
        _error(admin.post(f"keys/{key_id}/topup", body), 400)
    for body in [
        {},
        {"name": None},
        {"name": ""},
        {"name": "key_x"},
        {"rpm": -1},
        {"models": ["nope"]},
        {"expires_at": "2001-01-01"},
        {"expires_at": 10**400},
        {"balance": 10**6},
        {"revoked_at": None},
    ]:
        _error(admin.patch(f"keys/{key_id}", body), 400)
    for path in ["keys/bad%20id", "keys/" + "k" * 33, "keys/k%00"]:
        _error(admin.get(path), 400)
        _error(admin.post(path + "/topup", {"amount": 1}), 400)
    assert admin.keys() == before
    assert _ledger(admin) == ledger_before


def test_bad_queries_are_400(admin: Admin) -> None:
    for path, params in [
        ("usage", {"since": "yesterday"}),
        ("usage", {"since": "1900-01-01"}),
        ("usage", {"since": "2030-01-02", "until": "2030-01-01"}),
        ("usage", {"since": "2020-01-01", "until": "2030-01-01"}),
        ("usage", {"group_by": "prompt"}),
        ("usage", {"group_by": "day,day"}),
        ("usage", {"key": "bad key"}),
        ("usage", {"since": "1" * 300}),
        ("jobs", {"state": "DONE"}),
        ("jobs", {"limit": "0"}),
        ("jobs", {"limit": "201"}),
        ("jobs", {"limit": "-1"}),
        ("jobs", {"limit": "²"}),
        ("jobs", {"cursor": "!!"}),
        ("jobs", {"cursor": "bm90IGEgY3Vyc29y"}),
        ("jobs", {"cursor": "aW5mIGpvYl94"}),  # "inf job_x"
        ("jobs", {"since": "2030-01-02", "until": "2030-01-01"}),
        ("jobs", {"key": "x" * 40}),
        ("ledger.csv", {"since": "never"}),
        ("ledger.csv", {"key": "a/b"}),
    ]:
        _error(admin.get(path, params=params), 400)
    _error(admin.get("jobs?state=FAILED&state=SUCCEEDED"), 400)


# -- usage, jobs, images ------------------------------------------------------------------------------------------


def _flow(admin: Admin) -> None:
    key = admin.create("carol", 10)
    client = admin.relay.openai(key["secret"])
    urls = [client.images.generate(model="mj-fast", prompt=f"a lighthouse {i}").data[0].url for i in range(3)]
    assert all(url for url in urls)

    usage = admin.get("usage", params={"key": key["id"]}).json()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert usage["data"] == [
        {
            "key": key["id"],
            "model": "mj-fast",
            "action": "imagine",
            "day": today,
            "key_name": "carol",
            "jobs": 3,
            "credits": 6,
            "released_jobs": 0,
            "released_credits": 0,
        }
    ]
    assert usage["total"] == {"jobs": 3, "credits": 6}
    by_model = admin.get("usage", params={"group_by": "model"}).json()["data"]
    assert by_model == [{"model": "mj-fast", "jobs": 3, "credits": 6, "released_jobs": 0, "released_credits": 0}]
    assert admin.get("usage", params={"since": "2001-01-01", "until": "2001-02-01"}).json()["data"] == []
    assert admin.get(f"keys/{key['id']}").json()["balance"] == 4

    first = admin.get("jobs", params={"key": key["id"], "limit": "2"}).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    second = admin.get("jobs", params={"key": key["id"], "limit": "2", "cursor": first["next_cursor"]}).json()
    assert second["has_more"] is False and second["next_cursor"] is None and len(second["data"]) == 1
    jobs = first["data"] + second["data"]
    assert len({job["id"] for job in jobs}) == 3
    assert [job["created_at"] for job in jobs] == sorted((job["created_at"] for job in jobs), reverse=True)
    for job in jobs:
        assert job["key_id"] == key["id"] and job["state"] == "SUCCEEDED" and job["hold_state"] == "captured"
        assert "upstream_id" not in job and "upstream_image_url" not in job
        assert [image["name"] for image in job["images"]] == ["grid.png", "1.png", "2.png", "3.png", "4.png"]
        for image in job["images"][:2]:
            picture = httpx.get(image["url"])
            assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    assert admin.get("jobs", params={"key": key["id"], "state": "FAILED,PENDING"}).json()["data"] == []
    assert admin.get("jobs", params={"key": key["id"], "since": "2199-01-01"}).json()["data"] == []
    everyone = admin.get("jobs").json()["data"]
    assert {job["id"] for job in jobs} <= {job["id"] for job in everyone}

    ledger = _ledger(admin, key=key["id"])
    assert [row["kind"] for row in ledger].count("capture") == 3
    assert {row["key_name"] for row in ledger} == {"carol"}
    assert all(row["key_id"] == key["id"] for row in ledger)


def test_usage_jobs_images_and_ledger(admin: Admin) -> None:
    _flow(admin)


@pytest.mark.postgres
def test_usage_jobs_images_and_ledger_on_postgres(tmp_path: Path) -> None:
    with pg_database_sync() as url, running_relay(admin_config(tmp_path, database={"url": url})) as relay:
        with httpx.Client(base_url=relay.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
            _flow(Admin(relay, http))


def test_ledger_export_is_csv(admin: Admin) -> None:
    admin.create("=cmd|' /C calc'!A0", 3)
    answer = admin.get("ledger.csv")
    assert answer.headers["content-type"].startswith("text/csv")
    assert "attachment" in answer.headers["content-disposition"]
    assert answer.headers["cache-control"] == "no-store"
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert {row["key_name"] for row in rows} >= {"test", "'=cmd|' /C calc'!A0"}
    assert _ledger(admin, since="2199-01-01") == []


def test_the_ledger_export_lets_the_relay_run_between_its_pages(admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export is read a page at a time so that the relay's other requests run between pages; it is written as
    CSV a page at a time too, not all at once after the last page: a ledger of millions of rows would otherwise hold
    the event loop for seconds while it is rendered."""
    from relay.store import ledger

    key = admin.create("pages", 1)
    for amount in range(1, 30):
        assert admin.post(f"keys/{key['id']}/topup", {"amount": amount}).status_code == 200
    monkeypatch.setattr(ledger, "EXPORT_PAGE", 10)
    turns = [0]  # turns of the relay's event loop, counted from the first cell written
    rendered: list[int] = []  # the turn each cell was written in
    tickers: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[None]]] = []
    cell = ledger._cell

    async def tick() -> None:
        while True:
            turns[0] += 1
            await asyncio.sleep(0)

    def counted(text: str | None) -> str:
        if not tickers:
            loop = asyncio.get_running_loop()
            tickers.append((loop, loop.create_task(tick())))
        rendered.append(turns[0])
        return cell(text)

    monkeypatch.setattr(ledger, "_cell", counted)
    try:
        rows = _ledger(admin)
    finally:
        for loop, task in tickers:
            loop.call_soon_threadsafe(task.cancel)
    assert len(rows) >= 30
    most = max(rendered.count(turn) for turn in set(rendered)) // 4  # four text cells a row
    assert most <= 10, f"{most} rows written in one turn of the event loop"


def test_providers_with_their_state(admin: Admin) -> None:
    answer = admin.get("providers")
    assert answer.status_code == 200
    (provider,) = answer.json()["data"]
    assert provider["name"] == "sim" and provider["dialect"] == "simulator"
    assert provider["state"] == "healthy" and provider["recorded"] is None
    assert provider["in_flight"] == 0 and set(provider["modes"]) == {"fast", "relax", "turbo"}


# -- the UI's files ----------------------------------------------------------------------------------------------


def test_the_ui_is_served_with_a_content_security_policy(admin: Admin) -> None:
    with httpx.Client(base_url=admin.relay.base) as anonymous:  # the page needs no token; the API does
        redirect = anonymous.get("/admin")
        assert redirect.status_code == 308 and redirect.headers["location"] == "admin/"
        page = anonymous.get("/admin/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "http" not in policy
        assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
        script = anonymous.get("/admin/static/app.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert "sessionStorage" in script.text
        style = anonymous.get("/admin/static/style.css")
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
        for missing in ["/admin/static/index.html", "/admin/static/..%2fui.py", "/admin/static/nope.js"]:
            _error(anonymous.get(missing), 404)


def test_images_on_another_public_origin_are_allowed_by_the_policy(tmp_path: Path) -> None:
    config = admin_config(tmp_path, server={"public_url": "https://relay.example.com/base"})
    with running_relay(config) as relay:
        policy = httpx.get(relay.base + "/admin/").headers["content-security-policy"]
    assert "img-src 'self' https://relay.example.com blob:" in policy


def test_every_ui_file_is_package_data() -> None:
    """An installed relay (not an editable one: the Docker image) serves the UI only if the wheel carries it."""
    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    static = root / "relay" / "api" / "admin" / "static"
    files = sorted(static.iterdir())
    assert {path.name for path in files} >= {"index.html", "app.js", "style.css"}
    for path in files:
        assert any(fnmatch.fnmatch(f"static/{path.name}", glob) for glob in globs["relay.api.admin"]), path.name
