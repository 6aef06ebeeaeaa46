from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from adapters.simulator.grid import render_grid
from relay.core.images import ImageError, ImageStore, load_or_create_secret

JOB = "job_0123456789abcdef01234567"
NOW = 1_800_000_000.0


def store(tmp_path: Path, secrets: list[str] | None = None) -> ImageStore:
    return ImageStore(tmp_path / "images", secrets or ["s1"], ttl_s=600)


def signed(url: str) -> tuple[str, str, str, str]:
    parts = urlsplit(url)
    _, _, job_id, name = parts.path.split("/")
    query = parse_qs(parts.query)
    return job_id, name, query["exp"][0], query["sig"][0]


def test_a_grid_is_kept_and_split_into_four_tiles(tmp_path: Path) -> None:
    images = store(tmp_path)
    grid = render_grid("x", (3, 2), 60)
    assert images.save_grid(JOB, grid) == (120, 80)
    assert images.read(JOB, "grid.png") == grid
    tiles = [Image.open(io.BytesIO(images.read(JOB, f"{i}.png"))) for i in range(1, 5)]
    assert all(t.size == (60, 40) and t.format == "PNG" for t in tiles)
    assert len({t.tobytes() for t in tiles}) == 4
    assert sorted(p.name for p in images.path(JOB, "grid.png").parent.iterdir()) == [
        f"{JOB}-{name}" for name in ("1.png", "2.png", "3.png", "4.png", "grid.png")
    ]


def test_other_formats_are_kept_as_png(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(buffer, format="JPEG")
    images = store(tmp_path)
    assert images.save_grid(JOB, buffer.getvalue()) == (40, 40)
    with Image.open(images.path(JOB, "grid.png")) as kept:
        assert kept.format == "PNG"


@pytest.mark.parametrize("data", [b"not an image", b"", render_grid("x", (1, 1), 16)[:40]])
def test_broken_images_are_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(ImageError):
        store(tmp_path).save_grid(JOB, data)


def test_names_and_ids_cannot_escape_the_store(tmp_path: Path) -> None:
    images = store(tmp_path)
    for job_id, name in ((JOB, "../x.png"), ("../../etc", "grid.png"), (JOB, "5.png")):
        with pytest.raises(ValueError):
            images.path(job_id, name)


def test_signed_urls_verify_until_they_expire(tmp_path: Path) -> None:
    images = store(tmp_path)
    url = images.url("http://relay:1/", JOB, "1.png", NOW)
    assert url.startswith(f"http://relay:1/files/{JOB}/1.png?exp=")
    job_id, name, exp, sig = signed(url)
    assert images.verify(job_id, name, exp, sig, NOW + 599)
    assert not images.verify(job_id, name, exp, sig, NOW + 601)
    assert not images.verify(job_id, "2.png", exp, sig, NOW)
    assert not images.verify(job_id, name, str(int(exp) + 1000), sig, NOW)
    assert not images.verify(job_id, name, exp, "A" * len(sig), NOW)
    assert not images.verify(job_id, name, "soon", sig, NOW)
    assert not images.verify(job_id, name, exp, "", NOW)
    assert not images.verify(job_id, name, exp, "é", NOW)


def test_secrets_rotate_without_breaking_links(tmp_path: Path) -> None:
    old_url = store(tmp_path, ["old"]).url("http://r", JOB, "1.png", NOW)
    rotated = store(tmp_path, ["new", "old"])
    assert rotated.verify(*signed(old_url), NOW)
    new_url = rotated.url("http://r", JOB, "1.png", NOW)
    assert not store(tmp_path, ["old"]).verify(*signed(new_url), NOW)
    with pytest.raises(ValueError):
        ImageStore(tmp_path, [], 60)


def test_the_relay_keeps_its_own_secret(tmp_path: Path) -> None:
    path = tmp_path / "d" / "signing.key"
    first = load_or_create_secret(path)
    assert len(first) >= 32 and load_or_create_secret(path) == first
    assert os.stat(path).st_mode & 0o777 == 0o600
    path.write_text("")  # left empty by a crash: never used as a key
    replaced = load_or_create_secret(path)
    assert len(replaced) >= 32 and replaced != first and path.read_text() == replaced
