"""The midjourney-proxy dialect (novicezk and its forks, trueai-org): `mj-api-secret` header, `/mj/...` paths.

The mode travels in `accountFilter.modes` (trueai and the plus forks honour it; novicezk ignores it) and, for
trueai-style servers that mount every controller under `/mj-{mode}/mj/`, optionally as that path prefix. The prompt
always carries the mode flag as well, which is what a server with neither mechanism goes by.
"""

from __future__ import annotations

from typing import Any

import httpx

from adapters.base import SubmitRequest
from adapters.http import HttpOptions, HttpUpstream


class MidjourneyProxyUpstream(HttpUpstream):
    dialect = "midjourney-proxy"

    def __init__(
        self,
        name: str,
        options: HttpOptions,
        *,
        mode_prefix: bool = False,
        account_filter: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(name, options, transport=transport)
        self.mode_prefix = mode_prefix
        self.account_filter = account_filter

    def auth_headers(self) -> dict[str, str]:
        return {"mj-api-secret": self.options.secret} if self.options.secret else {}

    def submit_path(self, request: SubmitRequest) -> str:
        prefix = f"/mj-{request.mode}" if self.mode_prefix else ""
        return f"{prefix}/mj/submit/{request.kind}"

    def submit_body(self, request: SubmitRequest) -> dict[str, Any]:
        body = super().submit_body(request)
        if self.account_filter:
            body["accountFilter"] = {"modes": [request.mode.upper()]}
        return body
