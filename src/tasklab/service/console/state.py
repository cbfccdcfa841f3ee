"""What the console's routes use, built once per app from the API's services, the templates
with their filters, and the mapping of a refusal to a page (or to the login form)."""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from tasklab.celery_app import TASK_MODULES
from tasklab.database import SqlRunner
from tasklab.service.console.access import Access, Refused
from tasklab.service.console.nodes import Nodes
from tasklab.service.deps import Services
from tasklab.settings import Settings

log = logging.getLogger(__name__)

DASH = "\u2013"  # shown for a figure nobody can tell
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


@dataclass
class ConsoleState:
    services: Services
    access: Access
    nodes: Nodes
    sql: SqlRunner
    results_dir: Path

    @classmethod
    def build(cls, services: Services) -> ConsoleState:
        settings = services.settings
        import_task_modules(settings)
        return cls(
            services=services,
            access=Access(services.auth, settings.console_viewers),
            nodes=Nodes(settings, services.jobs.engine).start(),
            sql=services.auth.sql,
            results_dir=settings.results_dir,
        )

    def close(self) -> None:
        self.nodes.close()


def import_task_modules(settings: Settings) -> None:
    """The modules workers import: retrying a job needs its declaration (its attempts)."""
    for name in [*TASK_MODULES, *settings.imports]:
        try:
            importlib.import_module(name)
        except ImportError as e:  # the page says so when a retry of that task is refused
            log.warning("console: cannot import task module %s: %s", name, e)


def console_of(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


async def refused(request: Request, exc: Exception) -> Response:
    """A page asked for without a session goes to the login form and comes back after it;
    anything else gets a page that says why, with the refusal's status."""
    assert isinstance(exc, Refused)
    wants_page = request.method == "GET" and "/fragments/" not in request.url.path
    if exc.status == 401 and wants_page and "authorization" not in request.headers:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/console/login?next={quote(target)}", status_code=303)
    context = {"status_code": exc.status, "reason": exc.reason, "operator": None, "csrf": ""}
    return templates.TemplateResponse(
        request, "error.html", context, status_code=exc.status, headers=exc.headers
    )


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Refused, refused)


# --- template filters ------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if ts is None:
        return DASH
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(ts: float | None) -> str:
    return DASH if ts is None else _duration(time.time() - ts) + " ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _mib(n: int | None) -> str:
    return DASH if n is None else f"{n / 2**20:.0f} MiB"


def _or_dash(value: Any) -> Any:
    return DASH if value is None else value


templates.env.filters.update(
    when=_when, ago=_ago, duration=_duration, mib=_mib, or_dash=_or_dash, tojson_pretty=json.dumps
)
