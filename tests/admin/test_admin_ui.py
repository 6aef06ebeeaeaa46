"""The admin web UI in headless Chromium (the system's `chromium`, driven by Playwright): an operator signs in,
creates a key, tops it up, sees the job made with it (its usage and its image), revokes it, and the relay then
refuses that key.

Skipped only where no `chromium` is installed and this is not CI; `.ci/run` installs it, and under CI a missing
browser fails the test instead."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect, sync_playwright

from tests.admin.conftest import TOKEN, admin_config
from tests.helpers import RunningRelay, running_relay, wait_for

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RunningRelay]:
    """Started before the browser: Playwright's sync API keeps an event loop running in the test's thread."""
    with running_relay(admin_config(tmp_path)) as running:
        yield running


@pytest.fixture
def browser(relay: RunningRelay) -> Iterator[Browser]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _refused(relay: RunningRelay, secret: str) -> bool:
    try:
        relay.openai(secret).models.list()
    except openai.AuthenticationError:
        return True
    return False


def _sign_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def test_admin_ui_manages_a_key_from_creation_to_refusal(relay: RunningRelay, browser: Browser) -> None:
    page = browser.new_page()
    problems: list[str] = []  # script errors and Content-Security-Policy violations

    def console(message: ConsoleMessage) -> None:
        # the refused sign-in below is the one expected failure (its 401 is logged as a failed resource)
        if message.type == "error" and "status of 401" not in message.text:
            problems.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(relay.base + "/admin/")

    # A wrong token is refused and shows nothing.
    _sign_in(page, "not-the-admin-token")
    expect(page.locator("#status")).to_contain_text("refused")
    expect(page.locator("#view-keys")).to_be_hidden()

    _sign_in(page, TOKEN)
    expect(page.locator("#view-keys")).to_be_visible()
    expect(page.locator('#keys-table tr[data-key-name="test"]')).to_have_count(1)

    # Create a key: its secret is shown once.
    page.fill("#new-key-name", "ui-key")
    page.fill("#new-key-quota", "1")
    page.click("#create-key")
    secret_shown = page.locator("#new-key-secret")
    expect(secret_shown).to_have_text(re.compile(r"^sk-mjr-\S{20,}$"))
    secret = secret_shown.inner_text()
    row = page.locator('#keys-table tr[data-key-name="ui-key"]')
    expect(row.locator(".balance")).to_have_text("1")
    key_id = row.get_attribute("data-key-id")
    assert key_id

    # Top it up.
    row.locator(".topup-amount").fill("9")
    row.locator(".topup").click()
    expect(row.locator(".balance")).to_have_text("10")

    # A job with the key, through the OpenAI SDK.
    image = relay.openai(secret).images.generate(model="mj-fast", prompt="a lighthouse at dusk")
    assert image.data and image.data[0].url

    # Its usage: 2 credits (an mj-fast imagine), in the tables and as a bar of the chart.
    page.click('#nav [data-view="usage"]')
    by_key = page.locator("#usage-by-key tbody tr", has_text="ui-key")
    expect(by_key).to_have_count(1)
    expect(by_key.locator("td").nth(2)).to_have_text("2")
    expect(page.locator("#usage-by-model tbody")).to_contain_text("mj-fast")
    expect(page.locator("#usage-by-action tbody")).to_contain_text("imagine")
    expect(page.locator('#usage-chart rect.bar[data-credits="2"]')).to_have_count(1)

    # Its image: the job's thumbnail, loaded through its signed link.
    page.click('#nav [data-view="jobs"]')
    page.select_option("#jobs-key", key_id)
    page.click("#jobs-search")
    card = page.locator(f'article.job[data-key-id="{key_id}"]')
    expect(card).to_have_count(1)
    expect(card).to_contain_text("SUCCEEDED")
    thumbnail = card.locator("img.thumb")
    expect(thumbnail).to_be_visible()
    expect(thumbnail).to_have_attribute("src", re.compile(r"/files/[a-z0-9_]+/grid\.png\?exp=\d+&sig="))
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())

    # The providers.
    page.click('#nav [data-view="providers"]')
    expect(page.locator('#providers-table tr[data-provider="sim"] .state')).to_have_text("healthy")

    # Revoke it (a second click confirms), and the relay refuses it.
    page.click('#nav [data-view="keys"]')
    revoke = row.locator(".revoke")
    revoke.click()
    expect(revoke).to_have_text("Really revoke?")
    expect(row.locator(".state")).to_have_text("active")
    revoke.click()
    expect(row.locator(".state")).to_have_text("revoked")
    wait_for(lambda: _refused(relay, secret))
    with pytest.raises(openai.AuthenticationError) as refused:
        relay.openai(secret).images.generate(model="mj-fast", prompt="one more")
    assert refused.value.status_code == 401
    assert problems == []

    # The token lives in the tab: a reload stays signed in; signing out forgets it.
    page.reload()
    expect(page.locator("#view-keys")).to_be_visible()
    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_a_double_click_tops_up_once_and_creates_one_key(relay: RunningRelay, browser: Browser) -> None:
    """A button's action is under way until its answer came: a second click (or Enter) in the meantime sends nothing."""
    page = browser.new_page()
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url) if request.method == "POST" else None)
    page.goto(relay.base + "/admin/")
    _sign_in(page, TOKEN)
    row = page.locator('#keys-table tr[data-key-name="test"]')
    expect(row.locator(".balance")).to_have_text("1000")

    row.locator(".topup-amount").fill("9")
    row.locator(".topup").dblclick()
    expect(page.locator("#status")).to_have_text("Topped up test by 9 credits.")
    expect(row.locator(".balance")).to_have_text("1009")

    page.fill("#new-key-name", "twice")
    page.fill("#new-key-quota", "1")
    page.dblclick("#create-key")
    expect(page.locator("#status")).to_have_text("Created twice.")
    expect(page.locator('#keys-table tr[data-key-name="twice"]')).to_have_count(1)
    key_id = row.get_attribute("data-key-id")
    assert [url.rsplit("/api/", 1)[1] for url in sent if "/api/" in url] == [f"keys/{key_id}/topup", "keys"]


def test_signing_out_leaves_no_secret_or_listing_in_the_page(relay: RunningRelay, browser: Browser) -> None:
    """Signing out (or a token refused) forgets what the page was shown with the token: a new key's secret, shown
    once, is not in the page for whoever uses the tab next, nor shown again by the next sign-in; nor are the keys,
    usage, jobs (with their signed image links) or providers."""
    page = browser.new_page()
    page.goto(relay.base + "/admin/")
    _sign_in(page, TOKEN)
    page.fill("#new-key-name", "shown-once")
    page.fill("#new-key-quota", "1")
    page.click("#create-key")
    secret = page.locator("#new-key-secret")
    expect(secret).to_have_text(re.compile(r"^sk-mjr-\S{20,}$"))
    shown = secret.inner_text()
    hook = page.locator("#new-key-hook").inner_text()
    relay.openai().images.generate(model="mj-fast", prompt="a lighthouse at dusk")
    for view in ("usage", "jobs", "providers"):
        page.click(f'#nav [data-view="{view}"]')
    expect(page.locator("#jobs-list img.thumb")).to_have_count(1)
    expect(page.locator('#providers-table tr[data-provider="sim"]')).to_have_count(1)

    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    html = page.content()
    assert shown not in html and hook not in html
    assert "shown-once" not in html and "/files/" not in html and "lighthouse" not in html
    assert page.locator("#keys-table tbody tr, #providers-table tbody tr, #usage-by-key tbody tr").count() == 0

    _sign_in(page, TOKEN)
    expect(page.locator('#keys-table tr[data-key-name="shown-once"]')).to_have_count(1)
    expect(page.locator("#new-key")).to_be_hidden()
    assert shown not in page.content()


def test_more_jobs_are_of_the_search_shown(relay: RunningRelay, browser: Browser) -> None:
    """*More* continues the search whose page is shown: filters changed since (without *Search*) are not mixed into
    its list."""
    with httpx.Client(base_url=relay.base, timeout=30) as http:
        other = http.post(
            "/admin/api/keys", json={"name": "other", "quota": 10}, headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
        for secret, count in ((other["secret"], 1), (relay.key, 25)):
            for n in range(count):
                sent = http.post(
                    "/mj/submit/imagine", json={"prompt": f"a lighthouse {n}"}, headers={"mj-api-secret": secret}
                )
                assert sent.json()["code"] == 1, sent.text
    wait_for(lambda: all(state == "SUCCEEDED" for state, *_ in relay.jobs()), timeout=60)

    page = browser.new_page()
    page.goto(relay.base + "/admin/")
    _sign_in(page, TOKEN)
    test_id = page.locator('#keys-table tr[data-key-name="test"]').get_attribute("data-key-id")
    page.click('#nav [data-view="jobs"]')
    page.select_option("#jobs-key", test_id)
    page.click("#jobs-search")
    expect(page.locator("#jobs-list article.job")).to_have_count(24)
    page.select_option("#jobs-key", other["id"])  # chosen, not searched
    page.click("#jobs-more")
    expect(page.locator("#jobs-more")).to_be_hidden()
    cards = page.locator("#jobs-list article.job")
    assert {cards.nth(i).get_attribute("data-key-id") for i in range(cards.count())} == {test_id}
    assert cards.count() == 25


def test_more_is_hidden_while_a_new_search_is_under_way(relay: RunningRelay, browser: Browser) -> None:
    """While a search is under way the list on show is the last one's: More, clicked then, had no cursor of the new
    search to go on from, read its first page and put it under the old list, and then the new search's own answer
    showed More again over a list that had it twice."""
    with httpx.Client(base_url=relay.base, timeout=30) as http:
        for n in range(25):
            sent = http.post("/mj/submit/imagine", json={"prompt": f"a kite {n}"}, headers={"mj-api-secret": relay.key})
            assert sent.json()["code"] == 1, sent.text
    wait_for(lambda: all(state == "SUCCEEDED" for state, *_ in relay.jobs()), timeout=60)
    page = browser.new_page()
    page.goto(relay.base + "/admin/")
    _sign_in(page, TOKEN)
    page.click('#nav [data-view="jobs"]')
    expect(page.locator("#jobs-list article.job")).to_have_count(24)
    expect(page.locator("#jobs-more")).to_be_visible()
    held: list[Route] = []
    page.route("**/api/jobs?*", lambda route: held.append(route))
    page.select_option("#jobs-state", "SUCCEEDED")
    page.click("#jobs-search")
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    assert len(held) == 1
    expect(page.locator("#jobs-more")).to_be_hidden()  # the new search's list is not shown yet
    held[0].continue_()
    page.unroute("**/api/jobs?*")
    expect(page.locator("#jobs-more")).to_be_visible()
    page.click("#jobs-more")
    expect(page.locator("#jobs-more")).to_be_hidden()
    cards = page.locator("#jobs-list article.job")
    assert cards.count() == 25
    assert len({cards.nth(i).get_attribute("data-job-id") for i in range(25)}) == 25


def test_an_answer_that_comes_after_signing_out_is_not_shown(relay: RunningRelay, browser: Browser) -> None:
    """A request sent with the token and answered after signing out (a slow usage or providers read) puts nothing
    in the page: the usage it was shown with would be there again, under the sign-in form, for whoever uses the tab
    next."""
    relay.openai().images.generate(model="mj-fast", prompt="a lighthouse at dusk")
    page = browser.new_page()
    page.goto(relay.base + "/admin/")
    _sign_in(page, TOKEN)
    expect(page.locator('#keys-table tr[data-key-name="test"]')).to_have_count(1)
    held: list[Route] = []
    page.route("**/api/usage?*", lambda route: held.append(route))
    page.route("**/api/providers", lambda route: held.append(route))
    page.click('#nav [data-view="usage"]')
    page.click('#nav [data-view="providers"]')
    for _ in range(100):
        if len(held) == 2:
            break
        page.wait_for_timeout(50)
    assert len(held) == 2
    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    for route in held:
        route.continue_()
    page.wait_for_timeout(1000)
    assert page.locator("#usage-total").inner_text() == ""
    assert page.locator("#usage-by-key tbody tr, #providers-table tbody tr").count() == 0
    expect(page.locator("#status")).to_have_text("")  # nor an error of its own
