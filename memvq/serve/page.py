"""The web page of the query API (`GET /`): one static HTML file, `static/index.html`, whose plain JavaScript asks
`POST /v1/answer` and shows the answer, the passages read (the answer span marked), the time per stage and the
API's errors, with a field for the API key when the server asks for one.

The page holds no data, so it is served without the API key (`PAGE_PATHS`, the guard's open paths). Its
Content-Security-Policy allows its own inline script and style (by their sha256) and requests to this server only:
nothing loads from anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE_PATHS = frozenset({"/"})  # the page's exact paths: reachable without the API key


def _inline_hashes(html: str, tag: str) -> str:
    """CSP sources for the page's inline `<tag>` blocks (written without attributes)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


def _headers(html: str) -> dict[str, str]:
    """The page's security headers: its own inline code and same-origin requests only, never framed or cached."""
    policy = (
        f"default-src 'none'; script-src {_inline_hashes(html, 'script')}; style-src {_inline_hashes(html, 'style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def page_router() -> APIRouter:
    """`GET /`: the page (read once, from the package's files)."""
    html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    headers = _headers(html)
    router = APIRouter(include_in_schema=False)

    @router.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    return router
