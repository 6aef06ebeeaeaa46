"""The operator's surface: the admin API under `/admin/api/` and the web UI at `/admin/` that calls it.

Both exist only when `server.admin_token` is configured (otherwise every path under `/admin` is a 404), and every
API call must carry `Authorization: Bearer <admin_token>`, compared in constant time. Errors come in the OpenAI
envelope, as on every route that is not native.

    auth      the admin token check
    inputs    typed, bounded request bodies and query values
    keys      key routes: list, create (the secret shown once), top up, update, revoke
    views     usage, jobs (with signed image links), providers, ledger export
    ui        the static page, its script and stylesheet, with a Content-Security-Policy
"""

from __future__ import annotations

from relay.api.admin.routes import routes

__all__ = ["routes"]
