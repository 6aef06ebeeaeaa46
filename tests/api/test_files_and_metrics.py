"""Image links are the relay's own, signed and expiring; metrics carry no ids, prompts or keys."""

from __future__ import annotations

import gc
import io
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image, PngImagePlugin

from adapters.simulator import SimEngine, SimSettings, SimulatorUpstream
from relay.collector import Pauses
from tests.helpers import RunningRelay, bomb_png, relay_config, running_relay, wait_for


def test_only_the_signed_link_serves_the_image(relay: RunningRelay) -> None:
    url = relay.openai().images.generate(model="mj-fast", prompt="a lantern").data[0].url or ""
    assert httpx.get(url).status_code == 200
    tampered = re.sub(r"sig=([^&]+)", lambda m: "sig=" + "A" * len(m.group(1)), url)
    later = re.sub(r"exp=(\d+)", lambda m: f"exp={int(m.group(1)) + 1}", url)
    other_tile = url.replace("/1.png?", "/2.png?")
    unsigned = url.split("?")[0]
    for bad in (tampered, later, other_tile, unsigned):
        response = httpx.get(bad)
        assert response.status_code == 403 and response.json()["error"]["code"] == "invalid_signature"
    assert httpx.get(url.replace("/1.png?", "/9.png?")).status_code == 404
    assert httpx.get(relay.base + "/files/job_x/1.png?exp=1&sig=x").status_code == 403


def test_links_expire(tmp_path: Path) -> None:
    with running_relay(relay_config(tmp_path, images={"url_ttl_s": 60})) as relay:
        url = relay.openai().images.generate(model="mj-fast", prompt="a lantern").data[0].url or ""
        expires = int(re.search(r"exp=(\d+)", url).group(1))  # type: ignore[union-attr]
        assert 55 <= expires - time.time() <= 61


def test_a_public_url_is_used_for_links(tmp_path: Path) -> None:
    config = relay_config(tmp_path, server={"public_url": "https://img.example.com/relay/"})
    with running_relay(config) as relay:
        url = relay.openai().images.generate(model="mj-fast", prompt="a lantern").data[0].url or ""
        assert url.startswith("https://img.example.com/relay/files/")


class BombGrids(SimulatorUpstream):
    """The simulator, with every finished grid a PNG that says it has 400 million pixels."""

    async def download(self, url: str) -> bytes:
        return bomb_png(20_000, 20_000)


def test_a_grid_too_large_to_decode_fails_its_job_and_is_not_charged(tmp_path: Path) -> None:
    config = relay_config(tmp_path, images={"download_attempts": 1})
    upstream = BombGrids("sim", SimEngine(SimSettings(fast_s=0.3, tile_px=64)))
    with running_relay(config, upstreams={"sim": upstream}) as relay:
        for response_format in ("url", "b64_json"):
            with pytest.raises(openai.APIStatusError) as caught:
                relay.openai().images.generate(model="mj-fast", prompt="a lantern", response_format=response_format)
            assert caught.value.status_code == 502
        assert relay.jobs() == [("FAILED", "download", "released", "sim")] * 2
        assert relay.balance() == (1000, 0)


class DamagedGrids(SimulatorUpstream):
    """The simulator, with every finished grid damaged inside, its header and end marker whole: kept as it is
    (only its header is read then), found damaged when its tiles are cut."""

    async def download(self, url: str) -> bytes:
        grid = bytearray(await super().download(url))
        grid[40:60] = b"\x00" * 20
        return bytes(grid)


def test_a_kept_grid_found_damaged_when_its_tiles_are_cut_is_a_clean_error_on_every_route(tmp_path: Path) -> None:
    upstream = DamagedGrids("sim", SimEngine(SimSettings(fast_s=0.3, tile_px=64)))
    with running_relay(relay_config(tmp_path), upstreams={"sim": upstream}) as relay:
        with pytest.raises(openai.InternalServerError) as caught:
            relay.openai().images.generate(model="mj-fast", prompt="a lantern", response_format="b64_json")
        assert caught.value.status_code == 500 and "The stored image is damaged." in str(caught.value)
        url = relay.openai().images.generate(model="mj-fast", prompt="a lantern").data[0].url or ""
        served = httpx.get(url)
        assert served.status_code == 500 and served.json()["error"]["message"] == "The stored image is damaged."


class SignedGrids(SimulatorUpstream):
    """The simulator, with every finished image a PNG that says who made it, as Midjourney's do: the upstream
    account's name and its job id in text chunks, and an EXIF chunk."""

    async def download(self, url: str) -> bytes:
        image = Image.open(io.BytesIO(await super().download(url)))
        info = PngImagePlugin.PngInfo()
        info.add_text("Author", "upstream_account_name")
        info.add_itxt("Description", "a lantern Job ID: 0f0e0d0c-upstream-job-id", zip=True)
        exif = Image.Exif()
        exif[0x013B] = "upstream_account_name"
        out = io.BytesIO()
        image.save(out, format="PNG", pnginfo=info, exif=exif)
        return out.getvalue()


def test_kept_images_say_nothing_of_the_upstream_that_made_them(tmp_path: Path) -> None:
    upstream = SignedGrids("sim", SimEngine(SimSettings(fast_s=0.3, tile_px=64)))
    with (
        running_relay(relay_config(tmp_path), upstreams={"sim": upstream}) as relay,
        httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30) as client,
    ):
        task_id = client.post("/mj/submit/imagine", json={"prompt": "a lantern"}).json()["result"]
        wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["status"] in ("SUCCESS", "FAILURE"))
        task = client.get(f"/mj/task/{task_id}/fetch").json()
        assert task["status"] == "SUCCESS", task
        grid = httpx.get(task["imageUrl"])
        assert grid.status_code == 200
        for told in (b"upstream_account_name", b"Job ID", b"upstream-job-id", b"eXIf", b"tEXt", b"iTXt"):
            assert told not in grid.content
        shown = Image.open(io.BytesIO(grid.content))
        assert shown.size == (128, 128) and not shown.info.get("exif")
        tile = httpx.get(task["imageUrl"].replace("/grid.png?", "/1.png?"))
        assert tile.status_code == 403  # signed for the grid only
        button = next(b["customId"] for b in task["buttons"] if "upsample::1" in b["customId"])
        upscale_id = client.post("/mj/submit/action", json={"taskId": task_id, "customId": button}).json()["result"]
        wait_for(lambda: client.get(f"/mj/task/{upscale_id}/fetch").json()["status"] in ("SUCCESS", "FAILURE"))
        image = httpx.get(client.get(f"/mj/task/{upscale_id}/fetch").json()["imageUrl"])
        assert image.status_code == 200 and b"upstream_account_name" not in image.content
        Image.open(io.BytesIO(image.content)).load()


def test_metrics_count_requests_and_jobs_without_secrets(relay: RunningRelay) -> None:
    relay.openai().images.generate(model="mj-fast", prompt="a very particular lantern")
    httpx.get(relay.base + "/v1/nope")
    text = httpx.get(relay.base + "/metrics").text
    assert 'mj_relay_http_requests_total{method="POST",route="/v1/images/generations",status="2xx"} 1.0' in text
    assert 'mj_relay_http_requests_total{method="GET",route="unmatched",status="4xx"} 1.0' in text
    assert 'mj_relay_jobs_total{kind="imagine",model="mj-fast",outcome="succeeded",provider="sim"} 1.0' in text
    assert 'mj_relay_upstream_request_seconds_count{operation="submit",outcome="accepted",provider="sim"} 1.0' in text
    assert 'mj_relay_jobs_in_flight{provider="sim"} 0.0' in text
    assert "particular" not in text and relay.key not in text
    assert not re.search(r"(job|req)_[0-9a-f]{12}", text)


def test_metrics_time_the_garbage_collector_s_pauses_while_the_relay_runs(tmp_path: Path) -> None:
    def collections(text: str, generation: int) -> float:
        found = re.search(rf'mj_relay_gc_pause_seconds_count{{generation="{generation}"}} (\S+)', text)
        assert found is not None
        return float(found.group(1))

    with running_relay(relay_config(tmp_path)) as relay:
        before = collections(httpx.get(relay.base + "/metrics").text, 1)
        gc.collect(1)
        assert collections(httpx.get(relay.base + "/metrics").text, 1) >= before + 1
    assert not any(isinstance(getattr(callback, "__self__", None), Pauses) for callback in gc.callbacks)
