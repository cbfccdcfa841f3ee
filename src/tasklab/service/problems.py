"""Every error the API answers, as RFC 9457 ``application/problem+json``, mapped here only.

Domain errors, request validation, HTTP errors (unknown route, wrong method, body too large)
and database outages each become one problem type. Bad input is always a 4xx; a 5xx means the
server or the database is at fault, never the request.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

from tasklab.errors import DatabaseUnavailable
from tasklab.service.domain.errors import (
    Forbidden,
    IdempotencyConflict,
    InvalidField,
    NotFound,
    OrderNotCancellable,
    RateLimited,
    SchemaMissing,
    ShopError,
    Unauthorized,
)
from tasklab.service.schemas import Problem

log = logging.getLogger("tasklab.service")
PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:tasklab:problem:"
_TITLES = {
    400: "Malformed request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}
_SLUGS = {
    400: "malformed",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "too-large",
    415: "unsupported-media-type",
    422: "validation",
    429: "rate-limited",
    500: "internal",
    503: "unavailable",
}
_LOCATIONS = {"body", "query", "path", "header", "cookie"}


class ProblemResponse(Response):
    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def problem(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> ProblemResponse:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + (slug or _SLUGS.get(status, "error")),
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extra)
    return ProblemResponse(body, status_code=status, headers=headers)


def field_problem(loc: tuple[Any, ...] | list[Any], message: str, kind: str) -> dict[str, str]:
    """{"field": "items.0.quantity", "location": "body", ...} from a pydantic location."""
    parts = list(loc)
    location = parts.pop(0) if parts and parts[0] in _LOCATIONS else "body"
    field = ".".join(str(p) for p in parts) or location
    return {"field": field, "location": str(location), "message": message, "type": kind}


def rate_limited(exc: RateLimited) -> ProblemResponse:
    """429 with ``Retry-After`` (whole seconds until the limit's window lets requests in)."""
    return problem(
        429,
        str(exc),
        slug=exc.slug,
        headers={"Retry-After": str(exc.retry_after_s)},
        retry_after_s=exc.retry_after_s,
    )


# --- handlers ----------------------------------------------------------------------------------


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        return problem(
            400,
            "the request body is not valid JSON",
            errors=[field_problem(["body"], "invalid JSON", "json_invalid")],
        )
    if _body_not_json(request) and any(tuple(e.get("loc", ()))[:1] == ("body",) for e in raw):
        return problem(415, "send the request body as application/json")
    errors = [
        field_problem(e.get("loc", ()), str(e.get("msg", "invalid")), str(e.get("type", "invalid")))
        for e in raw
    ]
    first = errors[0] if errors else {"field": "request", "message": "invalid"}
    return problem(422, f"{first['field']}: {first['message']}", errors=errors)


def _body_not_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return request.method in ("POST", "PUT", "PATCH") and not (
        ctype == "application/json" or ctype.endswith("+json")
    )


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "")
    headers = dict(exc.headers or {})
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route for {request.method} {request.url.path}"
    if exc.status_code == 405:
        # Starlette names the methods of the first route on the path only.
        headers["Allow"] = ", ".join(_allowed_methods(request))
        detail = f"{request.method} is not allowed here; use {headers['Allow']}"
    return problem(exc.status_code, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _shop(request: Request, exc: Exception) -> Response:
    if isinstance(exc, InvalidField):
        return problem(
            422,
            str(exc),
            errors=[field_problem(["body", *exc.field.split(".")], exc.message, exc.kind)],
        )
    if isinstance(exc, NotFound):
        return problem(404, str(exc))
    if isinstance(exc, IdempotencyConflict):
        return problem(409, str(exc), slug="idempotency-conflict")
    if isinstance(exc, OrderNotCancellable):
        return problem(409, str(exc), slug="not-cancellable")
    if isinstance(exc, RateLimited):
        return rate_limited(exc)
    if isinstance(exc, Unauthorized):
        return problem(401, str(exc), headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, Forbidden):
        return problem(403, str(exc))
    if isinstance(exc, SchemaMissing):
        return problem(
            503, str(exc), slug="schema-missing", title="Database schema is not migrated"
        )
    log.error("unmapped domain error %s: %s", type(exc).__name__, exc)
    return problem(500, "internal error")


def _schema_missing(exc: Exception) -> bool:
    """PostgreSQL says "undefined table" (a ProgrammingError), SQLite "no such table"."""
    return isinstance(exc, ProgrammingError) or "no such table" in str(exc)


async def _database(request: Request, exc: Exception) -> Response:
    if _schema_missing(exc):
        log.error("database schema error on %s %s: %s", request.method, request.url.path, exc)
        return problem(
            503,
            "the database schema is missing or outdated: run `tasklab db upgrade`",
            slug="schema-missing",
            title="Database schema is not migrated",
        )
    log.warning(
        "database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__
    )
    return problem(
        503,
        "the database is unavailable; retry later",
        slug="database-unavailable",
        headers={"Retry-After": "1"},
    )


async def _dbapi(request: Request, exc: Exception) -> Response:
    """A driver error: a dropped connection (the pool is invalidated and reconnects) is a
    retryable 503 like any unavailable database; anything else is a bug."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return await _database(request, exc)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "internal error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(ShopError, _shop)
    for db_error in (
        OperationalError,
        InterfaceError,
        ProgrammingError,
        PoolTimeout,
        DatabaseUnavailable,
        ConnectionRefusedError,
    ):
        app.add_exception_handler(db_error, _database)
    app.add_exception_handler(DBAPIError, _dbapi)
    app.add_exception_handler(Exception, _unexpected)


def problem_content() -> dict[str, Any]:
    return {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these problem statuses."""
    return {
        s: {"description": _TITLES.get(s, "Error"), "content": problem_content()} for s in statuses
    }


def problem_schemas() -> dict[str, Any]:
    """Problem and its parts, for the OpenAPI components."""
    schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"Problem": schema, **defs}
