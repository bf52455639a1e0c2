"""The operator dashboard: Jinja2 page shells filled by a small script polling the JSON API.

Pages carry no data themselves, so ``read_requires_token`` protects the dashboard's data
exactly as it protects the API: the script sends the token the operator pasted (kept in
``sessionStorage``) as a bearer token. Templates, script and styles ship in the package
(no CDN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from coordinator.api.settings import ApiSettings

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
PAGES = {
    "/": ("overview.html", "Overview"),
    "/participants": ("participants.html", "Participants"),
    "/stages": ("stages.html", "Stage jobs"),
    "/rejected": ("rejected.html", "Rejected results"),
    "/events": ("events.html", "Events"),
}


def _render(
    request: Request, settings: ApiSettings, template: str, **extra: object
) -> HTMLResponse:
    context = {
        "title": settings.title,
        "poll_ms": int(settings.poll_interval_s * 1000),
        "read_requires_token": settings.read_requires_token,
        "nav": [(path, label) for path, (_t, label) in PAGES.items()],
        **extra,
    }
    return TEMPLATES.TemplateResponse(request, template, context)


def _page(settings: ApiSettings, template: str, path: str):  # noqa: ANN202 - route factory
    def page(request: Request) -> HTMLResponse:
        return _render(request, settings, template, current=path)

    page.__name__ = f"page_{template.removesuffix('.html')}"
    return page


def mount_dashboard(app: FastAPI, settings: ApiSettings) -> None:
    """Add the dashboard pages and their static assets to ``app``."""
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for path, (template, _label) in PAGES.items():
        app.get(path, response_class=HTMLResponse, include_in_schema=False)(
            _page(settings, template, path)
        )

    @app.get("/participants/{participant_id}", response_class=HTMLResponse, include_in_schema=False)
    def participant_page(
        request: Request, participant_id: Annotated[int, PathParam(ge=0, le=2**62)]
    ) -> HTMLResponse:
        return _render(
            request,
            settings,
            "participant.html",
            current="/participants",
            participant_id=participant_id,
        )
