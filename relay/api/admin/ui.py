"""The admin web UI: one page, its script and its stylesheet, read from the package (no build step, nothing from
another origin). The page asks for the admin token, keeps it in the tab's sessionStorage and sends it to the admin
API; it needs no token to load, and shows nothing without one.

Every answer carries a Content-Security-Policy that lets the page load only its own script, stylesheet and images
(and the relay's image links when `server.public_url` puts them on another origin), connect only to its own origin,
and never be framed."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay.api.admin.auth import enabled
from relay.api.common import relay_of
from relay.errors import NotFound

STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
PAGE = "index.html"


@cache
def _read(name: str) -> bytes:
    return files("relay.api.admin").joinpath("static", name).read_bytes()


def policy(public_url: str | None) -> str:
    images = "'self'"
    if public_url:
        parts = urlsplit(public_url)
        images += f" {parts.scheme}://{parts.netloc}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src {images} blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _answer(request: Request, body: bytes, media_type: str) -> Response:
    headers = {
        "Content-Security-Policy": policy(relay_of(request).config.server.public_url),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return Response(body, media_type=media_type, headers=headers)


async def redirect(request: Request) -> Response:
    enabled(request)
    return RedirectResponse("admin/", status_code=308)  # relative: works behind a path prefix too


async def page(request: Request) -> Response:
    enabled(request)
    return _answer(request, _read(PAGE), "text/html; charset=utf-8")


async def static(request: Request) -> Response:
    enabled(request)
    name = request.path_params["name"]
    if name not in STATIC:
        raise NotFound(f"No route for {request.method} {request.url.path}.")
    return _answer(request, _read(name), STATIC[name])
