"""The dashboard at /ui: static pages (vanilla JS, no build step) that read the /v1 API
from the browser, plus the little configuration they need."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from api.deps import SettingsDep
from core.enums import JobKind, JobStatus

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
STATIC_PATH = "/ui/static"

# The pages build every element with DOM calls and textContent; the policy makes sure
# no inline script or style could run even if some string slipped through.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class UiConfig(BaseModel):
    flower_url: str
    statuses: list[str]
    kinds: list[str]


@router.get("/ui")
def ui_redirect() -> RedirectResponse:
    """Relative, so the page also works behind a proxy that adds a path prefix."""
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/")
def ui_page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/ui/config.json")
def ui_config(settings: SettingsDep) -> UiConfig:
    return UiConfig(
        flower_url=settings.flower_url,
        statuses=[s.value for s in JobStatus],
        kinds=[k.value for k in JobKind],
    )


def static_files() -> StaticFiles:
    """The scripts and styles; mounted by create_app at STATIC_PATH."""
    return StaticFiles(directory=UI_DIR / "static")
