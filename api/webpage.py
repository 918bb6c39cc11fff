"""The property managers' web page: static files from api/web/ (plain HTML, JS and CSS, no build step,
nothing fetched from outside), served without a credential; the page itself logs in and calls the API
with a bearer token.

| route | what |
|---|---|
| `GET /` | the page (index.html) |
| `GET /app/{path}` | `app.js`, `app.css`; a view of the page's own (`/app/board`, ...) is the page |

The views (`/app/board`, `/app/site`, `/app/overview`, `/app/devices/<id>`, `/app/login`) are all the
page again, which shows the view its URL names, so a view can be linked, bookmarked and reloaded.

The data comes from the API routes, each with its own credential check: these routes serve no data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

WEB_DIR: Final = Path(__file__).parent / "web"
INDEX: Final = "index.html"
#: the page's own files and their content types
ASSETS: Final[dict[str, str]] = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
#: the page's views, which it draws from its own URL (history API), so a view can be linked and reloaded
VIEWS: Final = re.compile(r"(|board|site|overview|login|devices/[^/]{1,200})/?")
#: the page is no secret, but it changes with the API: a browser asks again rather than keeping it
_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
}

router = APIRouter(include_in_schema=False)


def _page() -> FileResponse:
    return FileResponse(WEB_DIR / INDEX, media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/")
def index() -> FileResponse:
    """The page (no credential: it holds no data)."""
    return _page()


@router.get("/app/{path:path}")
def app_file(path: str) -> FileResponse:
    """An asset of the page, or the page for one of its views; 404 otherwise."""
    media_type = ASSETS.get(path)
    if media_type is not None:
        return FileResponse(WEB_DIR / path, media_type=media_type, headers=_HEADERS)
    if VIEWS.fullmatch(path):
        return _page()
    raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no page /app/{path}")
