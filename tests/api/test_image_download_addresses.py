"""Where the relay may fetch a finished job's image from, on its upstream's word. The upstream names the image URL;
the relay fetches it from inside the operator's network, so a URL on another host than the provider's own is
fetched only from public addresses (checked after the lookup, and connected to as checked), redirects included.
The provider's own host, and the hosts `images.download_hosts` lists, are always allowed."""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from adapters import HttpOptions, UpstreamUnavailable, create_http_upstream
from adapters.h1 import HttpFailure, Lane
from adapters.http import _tls
from relay.core.providers import download_egress, download_pin
from tests.api.native_helpers import png
from tests.api.test_native_odd_upstreams import Canned, relay_before, task
from tests.helpers import relay_config, serve, wait_for


class Cdn:
    """A server of one PNG at `/p.png` (and a redirect at `/to?url=...`), counting what it was asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []  # (path, Host header)
        self.lock = threading.Lock()
        self.data = base64.b64decode(png(size=16).split(",", 1)[1])

    def app(self) -> Starlette:
        async def image(request: Request) -> Response:
            with self.lock:
                self.asked.append((request.url.path, request.headers.get("host", "")))
            return Response(self.data, media_type="image/png")

        async def to(request: Request) -> Response:
            with self.lock:
                self.asked.append((request.url.path, request.headers.get("host", "")))
            return RedirectResponse(request.query_params["url"], status_code=302)

        return Starlette(routes=[Route("/p.png", image), Route("/to", to)])


def _finish(tmp_path: Path, image_url: str, **images: Any) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """A job whose upstream (on 127.0.0.1) ends it with `image_url`: the task as a native client then sees it, and
    the jobs' rows (state, error code, hold, provider)."""
    canned = Canned()
    canned.on("submit/imagine", (200, {"code": 1, "result": "u-1"}))
    canned.on("task/list-by-condition", (200, [task("u-1", "SUCCESS", "100%", imageUrl=image_url)]))
    sections = {"images": {"download_attempts": 1, **images}}
    with relay_before(canned, tmp_path, sections=sections) as (client, relay):
        task_id = client.post("/mj/submit/imagine", json={"prompt": "a cat"}).json()["result"]
        wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["status"] in ("SUCCESS", "FAILURE"))
        return client.get(f"/mj/task/{task_id}/fetch").json(), relay.jobs()


def test_an_image_on_a_loopback_host_other_than_the_providers_is_not_fetched(tmp_path: Path) -> None:
    """The upstream (on 127.0.0.1) names an image on `localhost`: another host, that resolves to a loopback
    address (a service next to the relay). The relay never connects to it, and the job fails as a download
    failure, its hold released."""
    cdn = Cdn()
    with serve(cdn.app()) as base:
        fetched, jobs = _finish(tmp_path, base.replace("127.0.0.1", "localhost") + "/p.png")
    assert fetched["status"] == "FAILURE"
    assert jobs == [("FAILED", "download", "released", "odd")]
    assert cdn.asked == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1:9/p.png",
        "http://[::1]:9/p.png",
        "http://0.0.0.0:9/p.png",
        "https://[::ffff:127.0.0.1]/p.png",
        "http://localhost:9/p.png",
    ],
)
def test_an_image_on_a_private_or_local_address_is_refused_before_any_connection(tmp_path: Path, url: str) -> None:
    """The metadata service's address, a private one, IPv6 loopback, the unspecified address, loopback inside an
    IPv6 form, a name for loopback: the download is refused before a connection is tried (one to 169.254.169.254
    or 10.0.0.1 here would wait out its timeout instead)."""
    config = relay_config(tmp_path)
    pin = download_pin(download_egress(config), "p")
    options = HttpOptions(base_url="http://127.0.0.1:1", download_pin=pin)
    adapter = create_http_upstream("midjourney-proxy", "p", options)

    async def run() -> None:
        try:
            with pytest.raises(UpstreamUnavailable, match="refused: it may not point at private or local addresses"):
                await adapter.download(url)
        finally:
            await adapter.aclose()

    asyncio.run(run())


def test_a_redirect_from_the_providers_host_to_another_local_host_is_refused(tmp_path: Path) -> None:
    """An image on the provider's own host that redirects to `localhost`: the hop is checked as the first URL,
    and refused."""
    cdn = Cdn()
    with serve(cdn.app()) as base:
        elsewhere = base.replace("127.0.0.1", "localhost") + "/p.png"
        fetched, jobs = _finish(tmp_path, f"{base}/to?url={elsewhere}")
    assert fetched["status"] == "FAILURE"
    assert jobs == [("FAILED", "download", "released", "odd")]
    assert [path for path, _ in cdn.asked] == ["/to"]


def test_an_image_on_the_providers_own_host_is_fetched(tmp_path: Path) -> None:
    """The provider's own host (127.0.0.1, another port: midjourney-proxy serving its images) is always allowed,
    through a redirect on it too."""
    cdn = Cdn()
    with serve(cdn.app()) as base:
        fetched, jobs = _finish(tmp_path, f"{base}/to?url={base}/p.png")
    assert fetched["status"] == "SUCCESS"
    assert jobs == [("SUCCEEDED", None, "captured", "odd")]
    assert [path for path, _ in cdn.asked] == ["/to", "/p.png"]


@pytest.mark.parametrize("allowed", ["localhost", "127.0.0.0/8"])
def test_a_host_the_operator_lists_in_download_hosts_is_fetched(tmp_path: Path, allowed: str) -> None:
    """`images.download_hosts` opens a private image host (by name, or by CIDR block of its addresses)."""
    cdn = Cdn()
    with serve(cdn.app()) as base:
        fetched, jobs = _finish(tmp_path, base.replace("127.0.0.1", "localhost") + "/p.png", download_hosts=[allowed])
    assert fetched["status"] == "SUCCESS"
    assert jobs == [("SUCCEEDED", None, "captured", "odd")]
    assert cdn.asked == [("/p.png", base.removeprefix("http://").replace("127.0.0.1", "localhost"))]


def test_a_pinned_lane_connects_to_the_checked_address_and_names_the_host() -> None:
    """A lane given a pin connects where the pin says (the address that was checked, whatever the name resolves
    to by the time of the connection), and sends the URL's own host in `Host`; a pin that refuses stops the call
    before any connection."""
    cdn = Cdn()
    pinned: list[tuple[str, int]] = []

    async def pin(host: str, port: int) -> str:
        pinned.append((host, port))
        if host == "refused.invalid":
            raise HttpFailure("refused", sent=False)
        return "127.0.0.1"

    async def run(base: str) -> None:
        port = int(base.rsplit(":", 1)[1])
        lane = Lane(connect_timeout_s=5, tls=_tls())
        try:
            reply = await lane.request("GET", f"http://images.invalid:{port}/p.png", timeout_s=10, pin=pin)
            assert reply.status == 200 and reply.body == cdn.data
            again = await lane.request("GET", f"http://images.invalid:{port}/p.png", timeout_s=10, pin=pin)
            assert again.status == 200  # on the same connection: checked once, when it was made
            with pytest.raises(HttpFailure, match="refused") as refused:
                await lane.request("GET", f"http://refused.invalid:{port}/p.png", timeout_s=10, pin=pin)
            assert not refused.value.sent
        finally:
            await lane.aclose()
        assert pinned == [("images.invalid", port), ("refused.invalid", port)]
        assert cdn.asked == [("/p.png", f"images.invalid:{port}")] * 2

    with serve(cdn.app()) as base:
        asyncio.run(run(base))
