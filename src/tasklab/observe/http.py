"""HTTP metrics: a pure ASGI middleware and the ``GET /metrics`` route.

Pure ASGI (not ``BaseHTTPMiddleware``): no extra task per request, no body buffering, streaming
responses untouched. Requests are labelled by route *template* (``/api/v1/orders/{order_id}``),
never by raw path, so the label set stays bounded; a request no route matched is "unmatched".
"""

from __future__ import annotations

from time import perf_counter

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasklab.observe import multiproc
from tasklab.observe.metrics import HTTP_DURATION, HTTP_IN_PROGRESS, HTTP_REQUESTS
from tasklab.observe.registry import api_registry
from tasklab.settings import Settings

PROCESS_TIME_HEADER = "X-Process-Time"
UNMATCHED = "unmatched"
# Clients choose the method string: anything else is "OTHER", so a scanner cannot add series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
METRICS_PATH = "/metrics"


class MetricsMiddleware:
    """Count, time and gauge every HTTP request; add ``X-Process-Time`` (seconds)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
        root_path = scope.get("root_path", "")
        status = 500  # what the client gets if the app raises before answering

        async def send_with_timing(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append(PROCESS_TIME_HEADER, f"{perf_counter() - start:.4f}")
            await send(message)

        in_progress = HTTP_IN_PROGRESS.labels(method)
        in_progress.inc()
        try:
            await self.app(scope, receive, send_with_timing)
        finally:
            in_progress.dec()
            route = route_template(scope, root_path)
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_DURATION.labels(method, route).observe(perf_counter() - start)


def route_template(scope: Scope, root_path: str = "") -> str:
    """The matched route's path template, mount prefixes included; "unmatched" if none.

    Starlette's router stores the matched route in ``scope["route"]`` (the innermost one when
    routers are mounted) and appends each mount's prefix to ``scope["root_path"]``.
    """
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    mount_prefix = scope.get("root_path", "")[len(root_path) :]
    return f"{mount_prefix}{path}" or "/"


def metrics_response(registry: CollectorRegistry, accept: str | None) -> Response:
    encoder, content_type = choose_encoder(accept or "")
    return Response(encoder(registry), media_type=content_type)


def install(app: FastAPI, settings: Settings, *, path: str = METRICS_PATH) -> CollectorRegistry:
    """Add the middleware and ``GET /metrics``; return the registry the route serves.

    Multiprocess-aware: with ``PROMETHEUS_MULTIPROC_DIR`` set (``tasklab up``/``tasklab api``),
    the route aggregates all processes; it also logs a warning if this process imported
    prometheus_client before the variable was set, or runs several workers without it.
    """
    multiproc.check(settings)
    registry = api_registry()
    app.add_middleware(MetricsMiddleware)

    def metrics_endpoint(request: Request) -> Response:
        # A plain def: FastAPI runs it in the threadpool, so reading the multiprocess files
        # never blocks the event loop.
        return metrics_response(registry, request.headers.get("accept"))

    app.add_api_route(
        path, metrics_endpoint, methods=["GET"], include_in_schema=False, name="metrics"
    )
    app.state.metrics_registry = registry
    return registry
