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
import re
import secrets

from relay.clock import Clock
from relay.errors import InvalidImage, InvalidRequest, ServiceUnavailable
from relay.images import IMAGE, ImageError, ImageMissing, ImageStore, StorageError

_OWN_LINK = re.compile(
    r"<?https?://[^\s<>]+/files/([a-z0-9_]{8,40})/(grid\.png|image\.png|[1-4]\.png)\?exp=(\d{1,12})&sig=([\w\-]+)>?"
)


def upload_id() -> str:
    return "up" + str(10**17 + secrets.randbelow(9 * 10**17))


class Uploads:
    def __init__(self, images: ImageStore, clock: Clock) -> None:
        self.images = images
        self.clock = clock

    async def keep(self, data_urls: tuple[str, ...], base_url: str) -> tuple[str, ...]:
        """Keep checked images (data URLs); their links on the relay, in order."""
        ids = [upload_id() for _ in data_urls]
        blobs = await asyncio.to_thread(lambda: [base64.b64decode(url.split(",", 1)[1]) for url in data_urls])
        failed = await self.images.save_many(
            [(image_id, IMAGE, blob) for image_id, blob in zip(ids, blobs, strict=True)]
        )
        for why in failed.values():
            if isinstance(why, StorageError):
                raise ServiceUnavailable("The image store cannot keep images right now; try again shortly.")
        if failed:
            raise InvalidImage(f"An image cannot be kept: {next(iter(failed.values()))}.", param="base64Array")
        now = self.clock.now()
        return tuple(self.images.url(base_url, image_id, IMAGE, now) for image_id in ids)

    async def inline(self, prompt: str, images: tuple[str, ...], limit: int) -> tuple[str, tuple[str, ...]]:
        """The prompt without the relay's own image links, and the reference images with them added."""
        now = self.clock.now()
        found = [
            match
            for match in _OWN_LINK.finditer(prompt)
            if self.images.verify(match.group(1), match.group(2), match.group(3), match.group(4), now)
        ]
        if not found:
            return prompt, images
        if len(images) + len(found) > limit:
            raise InvalidRequest(f"At most {limit} reference images are accepted, links included.", param="prompt")
        try:
            blobs = await asyncio.gather(*(self.images.read(m.group(1), m.group(2)) for m in found))
        except (ImageMissing, ValueError, ImageError):
            raise InvalidRequest(
                "A relay image link in the prompt names an image that is gone.", param="prompt"
            ) from None
        except StorageError:
            raise ServiceUnavailable("The image store cannot be read right now; try again shortly.") from None
        for match in reversed(found):
            prompt = prompt[: match.start()] + prompt[match.end() :]
        inlined = tuple("data:image/png;base64," + base64.b64encode(blob).decode() for blob in blobs)
        return " ".join(prompt.split()), images + inlined
