"""Relays that keep their images in an S3-compatible bucket (moto's server): jobs run end to end through the
official SDK and the native API, and two relays sharing a database and a bucket serve each other's links."""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from relay.app import build_app
from relay.clock import SystemClock
from relay.config import Config
from relay.images import Links, StorageError, formats
from relay.services import Relay
from tests.api.native_helpers import png
from tests.cli.test_cli import cli, process
from tests.helpers import (
    CuttableProxy,
    RunningRelay,
    create_key,
    free_port,
    relay_config,
    running_relay,
    serve,
    wait_for,
)
from tests.images.conftest import ACCESS, Bucket

SECRET = "one-signing-secret-for-every-relay-process"
TILES = ("1.png", "2.png", "3.png", "4.png")
URL = "http://127.0.0.1"


def s3_config(tmp_path: Path, bucket: Bucket) -> Config:
    return relay_config(tmp_path, images={"s3": bucket.config(prefix="relay/"), "signing_secret": SECRET})


def image(response: httpx.Response) -> Image.Image:
    """A served image, checked to be the relay's own answer (no redirect to where it is kept)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "private, max-age=3600"
    assert "location" not in response.headers
    opened = Image.open(io.BytesIO(response.content))
    assert opened.format == "PNG"
    return opened


def job_and_name(url: str) -> tuple[str, str]:
    job_id, name = url.split("/files/", 1)[1].split("?", 1)[0].split("/")
    return job_id, name


def key(job_id: str, name: str) -> str:
    return f"relay/{job_id[-2:]}/{job_id}-{name}"


def nothing_on_disk(config: Config) -> bool:
    folder = config.images_dir()
    return not folder.exists() or not any(folder.iterdir())


def native_imagine(client: httpx.Client, prompt: str) -> dict[str, Any]:
    task_id = client.post("/mj/submit/imagine", json={"prompt": prompt}).json()["result"]
    wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["status"] in ("SUCCESS", "FAILURE"))
    task: dict[str, Any] = client.get(f"/mj/task/{task_id}/fetch").json()
    assert task["status"] == "SUCCESS", task
    return task


@contextmanager
def native_client(relay: RunningRelay) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.base, headers={"mj-api-secret": relay.key}, timeout=30) as client:
        yield client


def test_jobs_through_the_sdk_and_the_native_api_keep_their_images_in_the_bucket(
    tmp_path: Path, bucket: Bucket
) -> None:
    config = s3_config(tmp_path, bucket)
    with running_relay(config) as relay, native_client(relay) as client:
        result = relay.openai().images.generate(model="mj-fast", prompt="a lighthouse", n=2)
        urls = [item.url or "" for item in result.data]
        assert [job_and_name(url)[1] for url in urls] == ["1.png", "2.png"]
        job_id = job_and_name(urls[0])[0]
        served = [httpx.get(url) for url in urls]
        assert [image(s).size for s in served] == [(64, 64), (64, 64)]
        assert served[0].content == bucket.get(key(job_id, "1.png"))  # cut from the grid and written back

        inline = relay.openai().images.generate(model="mj-fast", prompt="a fox", n=4, response_format="b64_json")
        blobs = [base64.b64decode(item.b64_json or "") for item in inline.data]
        assert len(set(blobs)) == 4 and all(Image.open(io.BytesIO(b)).size == (64, 64) for b in blobs)

        task = native_imagine(client, "a harbour at night")
        assert job_and_name(task["imageUrl"]) == (task["id"], "grid.png")
        grid = image(httpx.get(task["imageUrl"]))
        assert grid.size == (128, 128) and httpx.get(task["imageUrl"]).content == bucket.get(
            key(task["id"], "grid.png")
        )
        answers = result.model_dump_json() + inline.model_dump_json() + str(task)
        assert bucket.endpoint not in answers and bucket.name not in answers
    assert nothing_on_disk(config)
    kept = bucket.keys()
    assert key(task["id"], "grid.png") in kept and key(job_id, "grid.png") in kept
    assert all(k.startswith("relay/") for k in kept)


def test_two_relays_sharing_a_database_and_a_bucket_serve_each_others_links(
    tmp_path: Path, bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuts: list[bytes] = []
    cut = formats.cut
    monkeypatch.setattr(formats, "cut", lambda grid: cuts.append(grid) or cut(grid))
    config = s3_config(tmp_path, bucket)
    key_secret = create_key(config)
    with serve(build_app(config)) as first, serve(build_app(config)) as second:
        one = RunningRelay(first, config, key_secret)
        other = RunningRelay(second, config, key_secret)
        try:
            # An SDK answer from the first relay: every tile (cut by the second, from the grid in the bucket).
            result = one.openai().images.generate(model="mj-fast", prompt="a heron", n=4)
            urls = [item.url or "" for item in result.data]
            job_id = job_and_name(urls[0])[0]
            assert key(job_id, "1.png") not in bucket.keys()
            from_other = [httpx.get(url.replace(first, second)) for url in urls]
            assert [image(r).size for r in from_other] == [(64, 64)] * 4
            assert len(cuts) == 1 and key(job_id, "4.png") in bucket.keys()
            from_first = [httpx.get(url) for url in urls]  # the first relay reads the tiles the second stored
            assert [r.content for r in from_first] == [r.content for r in from_other] and len(cuts) == 1

            # A native task submitted to the second relay, fetched and served through the first.
            with native_client(other) as submit_to, native_client(one) as fetch_from:
                task = native_imagine(submit_to, "a quiet lake")
                fetched = fetch_from.get(f"/mj/task/{task['id']}/fetch").json()
                assert fetched["imageUrl"].startswith(first + "/files/")
                assert image(httpx.get(fetched["imageUrl"])).size == (128, 128)

                # An upload kept by the first relay is served by the second.
                links = fetch_from.post("/mj/submit/upload-discord-images", json={"base64Array": [png()]}).json()
                (link,) = links["result"]
                assert image(httpx.get(link.replace(first, second))).size == (8, 8)
        finally:
            for relay in (one, other):
                for client in relay.clients:
                    client.close()


def test_an_image_gone_from_the_bucket_is_a_404_in_the_envelope(tmp_path: Path, bucket: Bucket) -> None:
    with running_relay(s3_config(tmp_path, bucket)) as relay, native_client(relay) as client:
        task = native_imagine(client, "a ghost")
        tile = Links([SECRET], 600).url(relay.base, task["id"], "3.png", time.time())
        bucket.delete(key(task["id"], "grid.png"))
        for url in (task["imageUrl"], tile):
            missing = httpx.get(url)
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"


def test_a_relay_whose_bucket_cannot_be_used_does_not_start(tmp_path: Path, bucket: Bucket) -> None:
    config = relay_config(tmp_path, images={"s3": bucket.config(bucket="no-such-bucket-here", max_attempts=1)})

    async def start() -> None:
        await Relay(config, SystemClock()).open()

    with pytest.raises(StorageError, match=r"images\.s3: the bucket 'no-such-bucket-here' cannot be used"):
        asyncio.run(start())
    assert not Path(config.database_url().split(":///", 1)[1]).exists()  # nothing was opened


def test_a_bucket_serve_cannot_use_is_one_clear_error_and_no_listening_line(
    tmp_path: Path, bucket: Bucket, store_proxy: CuttableProxy
) -> None:
    """A bucket not made, or a store not up yet (a compose file's relay started before its MinIO): one line naming
    the bucket and why, exit 3, as a database serve cannot use is told; it was uvicorn's traceback of the failed
    start, as one JSON log line."""
    store_proxy.refuse()
    for name, s3, why in (
        ("no-such-bucket-here", bucket.config(bucket="no-such-bucket-here", max_attempts=1), "HTTP 404"),
        (bucket.name, bucket.config(endpoint_url=store_proxy.endpoint, max_attempts=1), "EndpointConnectionError"),
    ):
        config = {"data_dir": str(tmp_path / "data"), "images": {"s3": s3}}
        (tmp_path / "relay.yaml").write_text(yaml.safe_dump(config))
        result = cli(tmp_path, "serve", "--config", "relay.yaml", "--port", "0")
        assert result.returncode == 3, result
        assert "listening" not in result.stdout and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line == f"mj-relay: images.s3: the bucket '{name}' cannot be used ({why})", line
        assert ACCESS["secret_access_key"] not in result.stderr and str(store_proxy.endpoint) not in line
        assert not (tmp_path / "data" / "mj-relay.db").exists()  # nothing was opened


def test_a_job_that_finishes_while_the_bucket_is_down_is_kept_once_it_is_back_and_charged(
    tmp_path: Path, bucket: Bucket, store_proxy: CuttableProxy
) -> None:
    s3 = bucket.config(endpoint_url=store_proxy.endpoint, prefix="relay/", max_attempts=1)
    config = relay_config(tmp_path, images={"s3": s3, "signing_secret": SECRET, "download_attempts": 1})
    with running_relay(config) as relay, native_client(relay) as client:
        before = native_imagine(client, "a kite")
        price = 1000 - relay.balance()[0]
        store_proxy.refuse()  # the bucket goes down: its connections are closed, new ones refused
        refused = httpx.get(before["imageUrl"])  # a link to what it keeps: try again shortly, in the envelope
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "service_unavailable"
        task_id = client.post("/mj/submit/imagine", json={"prompt": "a lantern"}).json()["result"]
        time.sleep(4)  # finished upstream after 0.3 s; its grid cannot be kept meanwhile
        assert client.get(f"/mj/task/{task_id}/fetch").json()["status"] == "IN_PROGRESS"
        store_proxy.restore()
        wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["status"] in ("SUCCESS", "FAILURE"), 20)
        task = client.get(f"/mj/task/{task_id}/fetch").json()
        assert task["status"] == "SUCCESS", task
        assert image(httpx.get(task["imageUrl"])).size == (128, 128)
        assert httpx.get(task["imageUrl"]).content == bucket.get(key(task_id, "grid.png"))
        assert relay.jobs() == [("SUCCEEDED", None, "captured", "sim")] * 2
        assert relay.balance() == (1000 - 2 * price, 0) and price > 0


def test_a_result_the_bucket_will_not_keep_by_its_deadline_fails_its_job_and_releases_the_hold(
    tmp_path: Path, bucket: Bucket
) -> None:
    config = relay_config(
        tmp_path,
        images={"s3": bucket.config(max_attempts=1), "signing_secret": SECRET, "download_attempts": 1},
        jobs={"poll_interval_s": 0.05, "deadline_s": {"fast": 3}},
    )
    with running_relay(config) as relay, native_client(relay) as client:
        bucket.client.delete_bucket(Bucket=bucket.name)  # the relay started with it: now every write is refused
        task_id = client.post("/mj/submit/imagine", json={"prompt": "a lantern"}).json()["result"]
        wait_for(lambda: client.get(f"/mj/task/{task_id}/fetch").json()["status"] in ("SUCCESS", "FAILURE"))
        task = client.get(f"/mj/task/{task_id}/fetch").json()
        assert task["status"] == "FAILURE" and task["imageUrl"] is None
        assert bucket.name not in str(task) and bucket.endpoint not in str(task)
        assert relay.jobs() == [("FAILED", "internal", "released", "sim")]
        assert relay.balance() == (1000, 0)


def test_a_bucket_that_stops_answering_is_a_503_to_try_again(tmp_path: Path, bucket: Bucket) -> None:
    with running_relay(s3_config(tmp_path, bucket)) as relay, native_client(relay) as client:
        task = native_imagine(client, "a moth")
        for kept in bucket.keys():
            bucket.delete(kept)
        bucket.client.delete_bucket(Bucket=bucket.name)
        refused = httpx.get(task["imageUrl"])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["message"] == "The image cannot be read right now; try again shortly."
        assert bucket.name not in refused.text and bucket.endpoint not in refused.text
        # the same wait wherever the store is what failed: a relay image link in a prompt, an upload
        linked = client.post("/mj/submit/imagine", json={"prompt": f"{task['imageUrl']} a moth again"})
        uploaded = client.post("/mj/submit/upload-discord-images", json={"base64Array": [png()]})
        for answer in (linked, uploaded):
            assert answer.status_code == 503 and answer.headers["retry-after"] == "5", answer.text
        assert len(relay.jobs()) == 1 and relay.balance()[1] == 0  # nothing held, no job made


def test_serve_says_the_images_are_kept_in_the_bucket(tmp_path: Path, bucket: Bucket) -> None:
    """The line `serve` prints once it listens names where the images are kept: the bucket and its prefix, not the
    image directory, which a relay that keeps them in a bucket never writes (an operator who backs it up, or looks
    there for an image, finds nothing)."""
    data = tmp_path / "data"
    s3 = bucket.config(prefix="relay/")
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump({"data_dir": str(data), "images": {"s3": s3}}))
    port = free_port()
    with process(
        tmp_path, "serve", "--config", "relay.yaml", "--port", str(port), ready_url=f"{URL}:{port}/readyz"
    ) as proc:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        output = proc.stdout.read() if proc.stdout else ""
    (listening,) = [line for line in output.splitlines() if line.startswith("mj-relay listening on ")]
    assert f"images in the bucket {bucket.name} under relay/," in listening, listening
    assert str(data / "images") not in listening and ACCESS["secret_access_key"] not in output
