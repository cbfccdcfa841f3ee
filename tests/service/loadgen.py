"""A small HTTP/1.1 keep-alive client on asyncio streams, for firing many requests at a real
server. httpx costs ~8 ms of CPU per request here, which made the load generator, not the
server, the bottleneck of the concurrency tests; this costs a fraction of that."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    json: Any = None


async def run_calls(
    base_url: str, calls: list[Call], *, connections: int = 32, timeout_s: float = 60.0
) -> list[Reply]:
    """Send ``calls`` over ``connections`` keep-alive connections; replies in call order."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    replies: list[Reply | None] = [None] * len(calls)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(calls)):
        queue.put_nowait(i)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while not queue.empty():
                i = queue.get_nowait()
                writer.write(_request(calls[i], host))
                replies[i] = await _read_reply(reader)
        finally:
            writer.close()

    workers = [connection() for _ in range(min(connections, len(calls)) or 1)]
    await asyncio.wait_for(asyncio.gather(*workers), timeout_s)
    return [r for r in replies if r is not None]


def _request(call: Call, host: str) -> bytes:
    body = b"" if call.json is None else orjson.dumps(call.json)
    lines = [f"{call.method} {call.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    if call.json is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in call.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise ValueError(f"reply without Content-Length: {status_line}")
    body = await reader.readexactly(int(headers["content-length"]))
    return Reply(int(status_line.split(" ", 2)[1]), headers, body)
