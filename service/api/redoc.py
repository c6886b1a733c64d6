"""/redoc: FastAPIOffline's ReDoc page, with its one request to a CDN blocked.

ReDoc's bundle shows Redocly's logo from cdn.redoc.ly in its sidebar whatever its
options: on an air-gapped host every reader's browser tried a DNS lookup and a request
outside. The page's Content-Security-Policy allows images from the gateway only, so the
browser never sends it (ReDoc drops the image when it fails to load).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse

REDOC_URL = "/redoc"
STATIC_URL = "/static-offline-docs"  # where FastAPIOffline serves its assets (its default)
IMAGES_FROM_HERE = "img-src 'self' data: blob:"


def add_redoc(app: FastAPI) -> None:
    """Serve ReDoc at :data:`REDOC_URL` (create the app with ``redoc_url=None``)."""

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = IMAGES_FROM_HERE
        return page
