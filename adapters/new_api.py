"""The new-api dialect (New API and one-api-style resellers): Bearer auth, `/mj-{mode}/mj/...` paths.

new-api strips a `/mj-{mode}` prefix before forwarding and deletes `accountFilter` unless its operator enabled it,
so the prompt flag is what actually picks the mode upstream; the prefix is still sent, on every submit-like call
(submits, modal, upload), for forks that read it. Reads (fetch, list-by-condition, image-seed) go to `/mj/...`,
answered from new-api's own database.
"""

from __future__ import annotations

from adapters.base import Mode
from adapters.http import HttpUpstream


class NewApiUpstream(HttpUpstream):
    dialect = "new-api"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.options.secret}"} if self.options.secret else {}

    def mode_prefix(self, mode: Mode) -> str:
        return f"/mj-{mode}"

    @property
    def carries_mode(self) -> bool:
        return False  # new-api strips the prefix: only a prompt's flag reaches the upstream
