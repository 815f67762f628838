"""The playground page at `/`: static HTML, JavaScript and CSS shipped in `serve/static/`, no build step.

The page calls only the public API (the same endpoints a client would), so it doubles as living
documentation. It is served with a strict Content-Security-Policy: scripts and styles from this origin
only, no inline code, fetches to this origin only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PATH = "/static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def add_routes(app: FastAPI) -> None:
    """`GET /` serves the page; `/static/*` its script and style sheet."""
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
