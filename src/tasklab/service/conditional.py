"""Conditional GETs: a strong ETag from the body's bytes, ``Cache-Control``, and 304 Not
Modified when ``If-None-Match`` names the current ETag (RFC 9110 13.1.2).

Catalog answers are per user (behind a bearer token), so they are ``private``; ``no-cache``
makes a client revalidate each time, which costs a request but no body while nothing changed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

CACHE_CONTROL = "private, no-cache"
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the If-None-Match ETag is current."}
}


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _matches(header: str, etag: str) -> bool:
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


def conditional_json(request: Request, content: Any) -> Response:
    """``content`` as JSON with its ETag, or an empty 304 if the client holds it already."""
    body = orjson.dumps(content)
    etag = etag_of(body)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if _matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)
