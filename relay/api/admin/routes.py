"""The admin routes: the API under `/admin/api/`, the UI at `/admin/`."""

from __future__ import annotations

from starlette.routing import Route

from relay.api.admin import keys, ui, views


def routes() -> list[Route]:
    return [
        Route("/admin/api/keys", keys.list_keys, methods=["GET"]),
        Route("/admin/api/keys", keys.create_key, methods=["POST"]),
        Route("/admin/api/keys/{key_id}", keys.get_key, methods=["GET"]),
        Route("/admin/api/keys/{key_id}", keys.update_key, methods=["PATCH"]),
        Route("/admin/api/keys/{key_id}/topup", keys.topup_key, methods=["POST"]),
        Route("/admin/api/keys/{key_id}/revoke", keys.revoke_key, methods=["POST"]),
        Route("/admin/api/usage", views.usage, methods=["GET"]),
        Route("/admin/api/jobs", views.list_jobs, methods=["GET"]),
        Route("/admin/api/providers", views.providers, methods=["GET"]),
        Route("/admin/api/ledger.csv", views.ledger_csv, methods=["GET"]),
        Route("/admin", ui.redirect, methods=["GET"]),
        Route("/admin/", ui.page, methods=["GET"]),
        Route("/admin/static/{name}", ui.static, methods=["GET"]),
    ]
