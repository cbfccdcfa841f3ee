"""A TCP proxy the lab controls, put between the stack and a server (broker, database), so that
a drill can break the link to any server, including one it does not own.

``LinkProxy(upstream_host, upstream_port)`` relays bytes between its clients and the server; its
mode switches at run time, from any thread, and each switch has taken effect when it returns:

- ``pass``: bytes flow (``heal()`` returns here from any other mode);
- ``outage``: every open connection is reset (RST) and the listening socket is closed, so a
  new connection is refused at once, as when the server's host is up and the server is not;
- ``blackhole``: connections stay open, nothing passes either way, and new connections are
  accepted and get nothing, as when packets are dropped. Bytes read before the cut wait in the
  proxy and pass after ``heal()``, as TCP would retransmit them. A closed client is noticed
  only after the heal too: nothing crosses a cut;
- ``slow``: each chunk waits ``delay_ms`` before it is passed on, in each direction (a request
  and its reply: twice the delay).

One limit to know: the proxy's own kernel answers TCP for the server, so TCP keepalives and
``tcp_user_timeout`` between a client and the proxy never fail in a blackhole. Only what the
application waits for (socket and statement timeouts, AMQP heartbeats, a lease's renewals)
notices it; a real dropped link would also fail keepalives.

The relay runs on an asyncio loop in a daemon thread of its own, so sync code uses it as a
context manager::

    with LinkProxy.for_url(settings.effective_broker_url) as link:
        url = link.url(settings.effective_broker_url)  # the same URL, through the proxy
        ...
        link.blackhole()
        ...
        link.heal()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tasklab.lab.errors import LabError

CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
SWITCH_TIMEOUT_S = 10.0  # the most a mode switch or a start/stop waits for the loop
# Ports a URL means when it names none.
DEFAULT_PORTS = {
    "redis": 6379,
    "rediss": 6379,
    "amqp": 5672,
    "pyamqp": 5672,
    "amqps": 5671,
    "postgresql": 5432,
    "postgres": 5432,
}

log = logging.getLogger(__name__)


class LinkMode(StrEnum):
    PASS = "pass"
    OUTAGE = "outage"
    BLACKHOLE = "blackhole"
    SLOW = "slow"


class ProxyError(LabError):
    """A proxy could not start, or a URL cannot be sent through one."""


@dataclass(frozen=True)
class LinkStats:
    """What the proxy has seen: connections open now, accepted and refused since it started
    (a refusal: the server refused the proxy's own connection), bytes passed each way."""

    open: int
    accepted: int
    refused: int
    bytes_up: int  # client -> server
    bytes_down: int  # server -> client


def url_address(url: str) -> tuple[str, int]:
    """(host, port) a server URL points at (``redis://``, ``amqp://``, ``postgresql+psycopg://``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if not parts.hostname:
        raise ProxyError(f"{_masked(url)}: no host to put a proxy in front of (a unix socket?)")
    port = parts.port or DEFAULT_PORTS.get(scheme)
    if port is None:
        raise ProxyError(f"{_masked(url)}: no port, and no default port for {scheme!r}")
    return parts.hostname, port


def through(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced by ``host:port``: user, password, path (vhost,
    database number, database name) and query kept."""
    url_address(url)  # refuse what cannot be proxied
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{address}" if userinfo else address
    return urlunsplit(parts._replace(netloc=netloc))


def _masked(url: str) -> str:
    from tasklab.settings import mask_url

    return str(mask_url(url))


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP RST (SO_LINGER 0), not a FIN: the peer's next read fails."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and, once the mode lets it, its connection to the server."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                _reset(writer)


class LinkProxy:
    """A TCP relay from ``listen_host:listen_port`` (0: a free port) to the server at
    ``upstream_host:upstream_port``, whose mode a drill switches at run time."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        *,
        name: str = "",
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.name = name or f"{upstream_host}:{upstream_port}"
        self._port = listen_port
        self._mode = LinkMode.PASS
        self._delay_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None  # set while bytes may pass
        self._counts = {"accepted": 0, "refused": 0, "bytes_up": 0, "bytes_down": 0}

    @classmethod
    def for_url(cls, url: str, *, listen_host: str = "127.0.0.1", name: str = "") -> LinkProxy:
        """A proxy (not started) in front of the server ``url`` points at."""
        host, port = url_address(url)
        return cls(host, port, listen_host, name=name)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> LinkProxy:
        """Listen (on a free port if none was given) and relay, in a thread of its own."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"link-proxy-{self.name}", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening, end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._close_all())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(SWITCH_TIMEOUT_S)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- where clients connect ----------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port clients connect to (known once started; kept across outages)."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.listen_host, self._port

    def url(self, url: str) -> str:
        """``url`` (the server's, or any URL of the same kind) sent through this proxy."""
        if not self._port:
            raise ProxyError(f"proxy {self.name} is not started: it has no port yet")
        return through(url, self.listen_host, self._port)

    # --- modes ----------------------------------------------------------------------------------
    @property
    def mode(self) -> LinkMode:
        return self._mode

    @property
    def delay_ms(self) -> float:
        return self._delay_s * 1000.0

    def heal(self) -> None:
        """Back to ``pass``: listen again if needed; held bytes and parked connections go on."""
        self._switch(LinkMode.PASS)

    def outage(self) -> None:
        """Reset every connection and refuse new ones until ``heal()``."""
        self._switch(LinkMode.OUTAGE)

    def blackhole(self) -> None:
        """Pass nothing either way, on open and new connections, until ``heal()``."""
        self._switch(LinkMode.BLACKHOLE)

    def slow(self, delay_ms: float) -> None:
        """Delay each chunk by ``delay_ms`` before passing it on, both ways."""
        if delay_ms < 0:
            raise ProxyError(f"slow: delay_ms must be >= 0, not {delay_ms}")
        self._switch(LinkMode.SLOW, delay_ms / 1000.0)

    def set_mode(self, mode: LinkMode | str, *, delay_ms: float = 0.0) -> None:
        """Switch by name: ``pass``, ``outage``, ``blackhole`` or ``slow`` (with ``delay_ms``)."""
        try:
            wanted = LinkMode(mode)
        except ValueError as e:
            known = ", ".join(m.value for m in LinkMode)
            raise ProxyError(f"unknown link mode {mode!r}; known: {known}") from e
        if wanted is LinkMode.SLOW:
            self.slow(delay_ms)
        else:
            self._switch(wanted)

    def stats(self) -> LinkStats:
        return LinkStats(open=len(self._links), **self._counts)

    def _switch(self, mode: LinkMode, delay_s: float = 0.0) -> None:
        self._call(self._apply(mode, delay_s))

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the proxy's loop and wait for it (the switch is done on return)."""
        if self._loop is None:
            coro.close()
            raise ProxyError(f"proxy {self.name} is not started")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(SWITCH_TIMEOUT_S)

    # --- on the loop ------------------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.listen_host, self._port, reuse_address=True
            )
        except OSError as e:
            raise ProxyError(f"proxy {self.name}: cannot listen on port {self._port}: {e}") from e
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _apply(self, mode: LinkMode, delay_s: float) -> None:
        assert self._flowing is not None
        self._mode, self._delay_s = mode, delay_s
        if mode is LinkMode.OUTAGE:
            await self._close_all()
            return
        if self._server is None:
            await self._listen()  # on the port it had, so that clients find it again
        if mode is LinkMode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = []
        for link in list(self._links):
            link.reset()
            if link.task is not None:
                link.task.cancel()
                tasks.append(link.task)
        self._links.clear()
        await asyncio.gather(*tasks, return_exceptions=True)  # each ends before the switch does

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of the proxy's own, not asyncio's handler task: an outage cancels it, and
        # asyncio (3.11) logs a cancelled handler task as an error.
        link = _Link(writer)
        link.task = asyncio.get_running_loop().create_task(self._serve(link, reader))
        self._links.add(link)
        self._counts["accepted"] += 1

    async def _serve(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            await self._relay(link, reader)
        except (OSError, asyncio.IncompleteReadError):
            link.reset()
        except asyncio.CancelledError:
            link.reset()
            raise
        finally:
            self._links.discard(link)

    async def _relay(self, link: _Link, client: asyncio.StreamReader) -> None:
        assert self._flowing is not None
        await self._flowing.wait()  # a connection made in a blackhole is parked here
        try:
            server, server_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            self._counts["refused"] += 1
            link.reset()  # the server is down: the client is refused, as it would be
            return
        link.server = server_writer
        up = asyncio.ensure_future(self._pump(client, server_writer, "bytes_up"))
        down = asyncio.ensure_future(self._pump(server, link.client, "bytes_down"))
        try:
            done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a reset on one side: reset both
            await asyncio.gather(up, down)
        finally:
            up.cancel()
            down.cancel()
        for writer in (link.client, server_writer):
            writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str
    ) -> None:
        """Copy one direction until EOF, each chunk waiting for the mode to let it pass."""
        assert self._flowing is not None
        while data := await reader.read(CHUNK_BYTES):
            await self._flowing.wait()  # blackhole: held here, and nothing more is read
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
                await self._flowing.wait()  # cut while it waited
            writer.write(data)
            await writer.drain()
            self._counts[counter] += len(data)
        await self._flowing.wait()  # an EOF does not cross a cut either
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()
