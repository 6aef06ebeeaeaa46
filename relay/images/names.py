"""The names of a job's images, and the key each is kept under.

A job keeps `grid.png` (a 2x2 grid) or `image.png` (one image); the four tiles `1.png`..`4.png` (top left, top
right, bottom left, bottom right) are cut from the grid. Every backend keeps an image under the same key,
`<last two characters of the job id>/<job id>-<name>`: 100 folders in a directory, 100 prefixes in a bucket (ids are
digits; so a directory can be copied into a bucket as it is). Ids are the relay's own and names come from this
fixed list, both checked here: no text a client chose ever reaches a path or an object key.
"""

from __future__ import annotations

import re

__all__ = ["GRID", "IMAGE", "NAMES", "TILE_NAMES", "key"]

GRID = "grid.png"
IMAGE = "image.png"
TILE_NAMES = ("1.png", "2.png", "3.png", "4.png")
NAMES = (GRID, IMAGE, *TILE_NAMES)
_JOB_ID = re.compile(r"[a-z0-9_]{8,40}")


def key(job_id: str, name: str) -> str:
    """Where a job's image is kept, relative to the store's root. Raises ValueError for anything but a relay id
    (a job's, or an upload's) and one of `NAMES`."""
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError("not a job id")
    if name not in NAMES:
        raise ValueError("not an image name")
    return f"{job_id[-2:]}/{job_id}-{name}"
