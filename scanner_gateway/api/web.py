"""The scan terminal web page (static files shipped in the package; no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from scanner_gateway.api.paths import HOME_PATH

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

router = APIRouter(tags=["web"])


@router.get(HOME_PATH, include_in_schema=False)
@router.head(HOME_PATH, include_in_schema=False)  # uptime monitors check the home page with HEAD
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")
