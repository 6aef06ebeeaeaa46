"""The midjourney-proxy dialect (novicezk and its forks, trueai-org): `mj-api-secret` header, `/mj/...` paths.

The mode travels in `accountFilter.modes` (trueai and the plus forks honour it; novicezk ignores it) and, for
trueai-style servers that mount every controller under `/mj-{mode}/mj/`, optionally as that path prefix. The prompt
always carries the mode flag as well, which is what a server with neither mechanism goes by. `GET task/list`
lists the tasks the server keeps, each with the `state` its submit carried: how a task whose submit was never
answered is found again (`Upstream.list_tasks`).
"""

from __future__ import annotations

from typing import Any

from adapters.base import Mode
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
    ) -> None:
        super().__init__(name, options)
        self.use_mode_prefix = mode_prefix
        self.account_filter = account_filter

    def auth_headers(self) -> dict[str, str]:
        return {"mj-api-secret": self.options.secret} if self.options.secret else {}

    def mode_prefix(self, mode: Mode) -> str:
        return f"/mj-{mode}" if self.use_mode_prefix else ""

    def all_tasks_path(self) -> str | None:
        return f"{self.api_prefix}/task/list"  # novicezk: every task it keeps; trueai: its newest 100

    def mode_fields(self, mode: Mode) -> dict[str, Any]:
        return {"accountFilter": {"modes": [mode.upper()]}} if self.account_filter else {}
