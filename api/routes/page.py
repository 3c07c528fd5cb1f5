"""The search page (plain HTML and JS, no build step) and its Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
_PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def page_policy(html: str) -> str:
    """The page's Content-Security-Policy: its own inline script, by hash, and nothing else runs (no other
    inline script, no eval, no script from elsewhere, no plugin); it talks to this origin only, shows images from
    here (blob: for those fetched with a key), and no other site may frame it. Hashes rather than a separate
    file: as strict as script-src 'self', and the page stays one file."""
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
                      for m in _SCRIPT.findall(html))
    return (f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    html = _PAGE.read_text()
    return HTMLResponse(html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": page_policy(html)})
