"""The web console: one page, a style sheet and a script, shipped in the package (no CDN, no web
font, no Node at run time) and served by `gpufleet server` at `/`.

The page holds no data, so it and its assets need no token. The script is a client of the same API
the CLI uses (`Authorization: Bearer` with the token the user typed, kept in sessionStorage): every
number, status, queue position and wait reason it shows comes from the API's answers, and every
rule (who sees what, who may stop what) is the API's. User text is only ever set as text, never as
HTML; the Content-Security-Policy allows no inline script and nothing from elsewhere.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

# name -> media type: the only files served (nothing else of the package can be asked for)
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def asset(name: str) -> bytes:
    """A file of the console, as the package ships it."""
    return resources.files(__name__).joinpath("static", name).read_bytes()


def router() -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.api_route("/", methods=["GET", "HEAD"])
    def page() -> Response:
        return Response(asset("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)

    @r.api_route("/console/{name}", methods=["GET", "HEAD"])
    def static(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, f"no console file named {name!r}")
        return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)

    return r
