"""The images the simulator serves: finished results, drawn on first read in a few variants per shape and aspect
ratio and then reused (a thousand finished tasks cost a few renders), and uploaded or described images, each kind
kept up to a limit (the newest `MAX_UPLOADS`)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from adapters.simulator.buttons import Shape
from adapters.simulator.grid import render_grid, render_image
from adapters.simulator.pictures import Picture

# Tasks made one after another get different variants, so consecutive results always differ.
VARIANTS = 32
MAX_UPLOADS = 1000
Render = tuple[Shape, int, tuple[int, int]]  # shape, variant, aspect ratio


class Media:
    def __init__(self, tile_px: int) -> None:
        self.tile_px = tile_px
        self._renders: OrderedDict[Render, bytes] = OrderedDict()
        self._uploads: OrderedDict[str, Picture] = OrderedDict()
        self._described: OrderedDict[str, Picture] = OrderedDict()  # by describe task: served once it is done
        self._lock = threading.Lock()

    def keep(self, key: str, image: Picture, *, described: bool = False) -> None:
        with self._lock:
            kept = self._described if described else self._uploads
            kept[key] = image
            while len(kept) > MAX_UPLOADS:
                kept.popitem(last=False)

    def upload(self, key: str) -> bytes | None:
        with self._lock:
            kept = self._uploads.get(key)
        return kept.data if kept else None

    def described(self, task_id: str) -> Picture | None:
        """The image a describe task was given, while it is kept."""
        with self._lock:
            return self._described.get(task_id)

    def cached(self, render: Render) -> bytes | None:
        with self._lock:
            return self._renders.get(render)

    def draw(self, render: Render) -> bytes:
        """A finished result as PNG bytes (a 2x2 grid, or one image); the same render key, the same bytes."""
        found = self.cached(render)
        if found is not None:
            return found
        shape, variant, aspect = render
        draw = render_grid if shape == "grid" else render_image
        data = draw(f"variant {variant}", aspect, self.tile_px)
        with self._lock:
            self._renders[render] = data
            while len(self._renders) > 8 * VARIANTS:
                self._renders.popitem(last=False)
        return data
