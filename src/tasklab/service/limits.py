"""Request body limit (pure ASGI): 413 problem+json before the body is read when
Content-Length says it is too large, and while reading when a chunked body grows too large."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasklab.service.problems import problem

# The largest valid request (100 order lines) is about 5 KiB.
MAX_BODY_BYTES = 64 * 1024


class BodyTooLarge(HTTPException):
    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, f"the request body exceeds {max_body_bytes} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await problem(
                413, str(BodyTooLarge(self.max_body_bytes).detail), headers={"Connection": "close"}
            )(scope, receive, send)
            return
        if declared is not None:  # the server enforces Content-Length: nothing to count
            await self.app(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # Raised inside the body read: FastAPI re-raises HTTPExceptions as they are,
                    # so the problem handler answers 413.
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return limited


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
