"""Images a client uploads (`submit/upload-discord-images`), kept by the relay, and the relay's own links put back
into prompts.

An upload is kept in the image store (as PNG) under an id of its own and answered with the relay's signed link,
like any result: no upstream, no Discord link, no charge. A native imagine prompt that carries one of the relay's
own image links (an upload, a grid, a tile) has it taken out of the text and sent as a reference image
(`base64Array`), so it works even when Midjourney cannot reach the relay; a link that is not the relay's, or whose
signature does not hold, stays in the prompt as the client wrote it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import secrets
from dataclasses import dataclass

from relay.clock import Clock
from relay.config import UploadsConfig
from relay.errors import InvalidImage, InvalidRequest, RateLimited, ServiceUnavailable
from relay.images import IMAGE, STORE_RETRY_S, ImageError, ImageMissing, ImageStore, StorageError
from relay.store.keys import KeyStore

log = logging.getLogger("relay.uploads")

# A link to one of the relay's images: `<scheme>://<anything but space, < or >>/files/<id>/<name>?exp=<t>&sig=<s>`,
# maybe in angle brackets. Found in linear time (`own_links`): as one regular expression, the part before `/files/`
# backtracked over the rest of the prompt from every `http://` in it, so a long prompt held the event loop for
# seconds before its length was even checked.
_RUN = re.compile(r"[^\s<>]+")
_SCHEME = re.compile(r"https?://")
_TAIL = re.compile(r"/files/([a-z0-9_]{8,40})/(grid\.png|image\.png|[1-4]\.png)\?exp=(\d{1,12})&sig=([\w\-]+)")


@dataclass(frozen=True, slots=True)
class Link:
    start: int  # where the link is in the prompt, angle brackets included
    end: int
    job_id: str
    name: str
    expires: str
    signature: str


def own_links(prompt: str) -> list[Link]:
    """The links to relay images in a prompt, left to right, each as long as it can be (what one expression
    `<?https?://[^ <>]+/files/<id>/<name>?exp=<t>&sig=<s>>?` finds, with any space for the blank), in time
    linear in the prompt's length."""
    links: list[Link] = []
    for run in _RUN.finditer(prompt):
        at, stop = run.start(), run.end()
        while (scheme := _SCHEME.search(prompt, at, stop)) is not None:
            # The match that starts at the first scheme ends at the last `/files/` a whole tail follows; none
            # after this scheme means none after any later one either.
            tail = None
            found = prompt.rfind("/files/", scheme.end() + 1, stop)
            while found != -1 and (tail := _TAIL.match(prompt, found, stop)) is None:
                found = prompt.rfind("/files/", scheme.end() + 1, found + 6)  # one that starts before it
            if tail is None:
                break
            start = scheme.start() - 1 if scheme.start() > 0 and prompt[scheme.start() - 1] == "<" else scheme.start()
            end = tail.end() + 1 if tail.end() < len(prompt) and prompt[tail.end()] == ">" else tail.end()
            links.append(Link(start, end, *tail.groups()))
            at = tail.end()
    return links


def upload_id() -> str:
    return "up" + str(10**17 + secrets.randbelow(9 * 10**17))


class Uploads:
    def __init__(
        self, images: ImageStore, clock: Clock, keys: KeyStore | None = None, config: UploadsConfig | None = None
    ) -> None:
        """`keys` and `config` bound each key's uploads (`api.uploads`); without them nothing is bounded."""
        self.images = images
        self.clock = clock
        self.keys = keys
        self.config = config or UploadsConfig(max_images=None)

    async def keep(self, key_id: str, data_urls: tuple[str, ...], base_url: str) -> tuple[str, ...]:
        """Keep checked images (data URLs) of a key; their links on the relay, in order. Over the key's bound
        (`api.uploads`): RateLimited, having kept nothing."""
        limit = self.config.max_images
        counted = self.keys is not None and limit is not None
        taken_at = self.clock.now()
        if counted:
            assert self.keys is not None and limit is not None
            window_s = self.config.window_s
            wait = await self.keys.take_uploads(key_id, len(data_urls), limit, window_s, taken_at)
            if wait is not None:
                raise RateLimited(
                    f"Upload limit reached: this API key may upload {limit} images every {window_s} s. "
                    f"Try again in {int(wait)} s.",
                    retry_after=int(wait),
                )
        ids = [upload_id() for _ in data_urls]
        blobs = await asyncio.to_thread(lambda: [base64.b64decode(url.split(",", 1)[1]) for url in data_urls])
        failed = await self.images.save_many(
            [(image_id, IMAGE, blob) for image_id, blob in zip(ids, blobs, strict=True)]
        )
        if failed and counted:
            # The bound is on images kept: those the store did not keep (an image it cannot keep, a store that is
            # down) are uncounted, or a key whose uploads the store refused for a while could keep none for the
            # rest of the window. Those of the request that were kept stay counted, answered or not.
            await self._uncount(key_id, len(failed), taken_at)
        for why in failed.values():
            if isinstance(why, StorageError):
                raise ServiceUnavailable(
                    "The image store cannot keep images right now; try again shortly.", retry_after=STORE_RETRY_S
                )
        if failed:
            raise InvalidImage(f"An image cannot be kept: {next(iter(failed.values()))}.", param="base64Array")
        now = self.clock.now()
        return tuple(self.images.url(base_url, image_id, IMAGE, now) for image_id in ids)

    async def _uncount(self, key_id: str, count: int, taken_at: float) -> None:
        assert self.keys is not None
        try:
            await self.keys.give_back_uploads(key_id, count, self.config.window_s, taken_at)
        except Exception:  # the request's own failure is what its client hears; the images stay counted
            log.exception("uncounting uploads not kept failed", extra={"fields": {"key": key_id, "images": count}})

    async def inline(self, prompt: str, images: tuple[str, ...], limit: int) -> tuple[str, tuple[str, ...]]:
        """The prompt without the relay's own image links, and the reference images with them added; refused beyond
        `limit` images, those links counted."""
        if len(images) > limit:
            raise InvalidRequest(f"At most {limit} reference images are accepted.", param="base64Array")
        now = self.clock.now()
        found = [
            link
            for link in own_links(prompt)
            if self.images.verify(link.job_id, link.name, link.expires, link.signature, now)
        ]
        if not found:
            return prompt, images
        if len(images) + len(found) > limit:
            raise InvalidRequest(f"At most {limit} reference images are accepted, links included.", param="prompt")
        try:
            blobs = await asyncio.gather(*(self.images.read(link.job_id, link.name) for link in found))
        except (ImageMissing, ValueError, ImageError):
            raise InvalidRequest(
                "A relay image link in the prompt names an image that is gone.", param="prompt"
            ) from None
        except StorageError:
            raise ServiceUnavailable(
                "The image store cannot be read right now; try again shortly.", retry_after=STORE_RETRY_S
            ) from None
        for link in reversed(found):
            prompt = prompt[: link.start] + prompt[link.end :]
        inlined = tuple("data:image/png;base64," + base64.b64encode(blob).decode() for blob in blobs)
        return " ".join(prompt.split()), images + inlined
