"""The "/v1/mj" reseller dialect: Bearer auth, `/v1/mj/...` paths, the mode as body `model` (`mj-fast`,
`mj-relax`, `mj-turbo`), task ids and seeds sometimes typed as integers, list-by-condition capped at 100 ids."""

from __future__ import annotations

from typing import Any

from adapters.base import Mode
from adapters.http import HttpUpstream


class MjV1Upstream(HttpUpstream):
    dialect = "mj-v1"
    max_batch = 100
    api_prefix = "/v1/mj"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.options.secret}"} if self.options.secret else {}

    def mode_fields(self, mode: Mode) -> dict[str, Any]:
        return {"model": f"mj-{mode}"}
