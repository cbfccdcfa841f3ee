"""The jobs console: server-rendered pages to see and operate queues and jobs (docs/console.md).

``install(app)`` mounts it on the API at ``/console``; ``create_console_app(settings)`` is the
console alone (``tasklab console``). Its state is built by the API's lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from tasklab.settings import Settings

if TYPE_CHECKING:  # FastAPI is imported where it is used: the CLI imports this package
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse


def install(app: FastAPI) -> None:
    """The routes, the refusal pages, and the console's state inside the app's lifespan
    (after the services it reads, closed before them)."""
    from tasklab.service.console.routes import router
    from tasklab.service.console.state import ConsoleState, install_handlers

    app.include_router(router)
    install_handlers(app)
    outer = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(running: FastAPI) -> AsyncIterator[Any]:
        async with outer(running) as state:
            running.state.console = ConsoleState.build(running.state.services)
            try:
                yield state
            finally:
                running.state.console.close()

    app.router.lifespan_context = lifespan


def create_console_app(settings: Settings) -> FastAPI:
    """Only the console (and ``/`` sending to it), with the API's lifespan."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    from tasklab.service.app import _lifespan

    app = FastAPI(lifespan=_lifespan(settings), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    install(app)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/console", status_code=307)

    return app


__all__ = ["create_console_app", "install"]
