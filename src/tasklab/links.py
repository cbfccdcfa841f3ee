"""Notice a dead link to the broker or the database within a bounded time, and recover.

A network link can die without closing: packets dropped by a partition, or a proxy that stops
passing bytes. TCP keepalives (set on every connection, see ``tasklab.database`` and
``tasklab.celery_app``) find a peer that is gone, but not a middlebox that still acknowledges
while nothing gets through, and a call blocked on such a socket waits for ever: a worker's
consumer in its ``BRPOP``, a pool process in a claim, the lease keeper in a renewal.

``LinkWatch`` probes each link with a fresh connection and a short timeout every
``link_check_interval_s``. After ``link_fail_after`` failed probes in a row the link is down:
it logs it once, sets ``tasklab_link_up{link}`` to 0, and shuts down this process's sockets
to that address, so every call blocked on them fails now and the libraries' own reconnect
logic (Celery's consumer, SQLAlchemy's pool) takes over. While the link stays down each failed
probe cuts again (a reconnect into a black hole blocks too). The first probe that succeeds
brings it back up. ``on_down`` / ``on_up`` let the worker stop and resume taking work.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil
from sqlalchemy.engine import make_url

from tasklab.observe import metrics
from tasklab.settings import Settings

log = logging.getLogger(__name__)

Probe = Callable[[float], None]  # raises within its timeout if the link does not answer


@dataclass
class Link:
    name: str  # "broker" or "database": the metric's label
    host: str
    port: int
    probe: Probe
    failures: int = 0
    up: bool = True
    addresses: set[str] = field(default_factory=set)  # the host's IPs, resolved once


class LinkWatch:
    """One thread per process; see the module docstring."""

    def __init__(
        self,
        links: list[Link],
        *,
        interval_s: float,
        timeout_s: float,
        fail_after: int,
        on_down: Callable[[Link], None] | None = None,
        on_up: Callable[[Link], None] | None = None,
    ) -> None:
        self.links = links
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.fail_after = fail_after
        self.on_down = on_down
        self.on_up = on_up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for link in links:
            link.addresses = _addresses(link.host)
            metrics.LINK_UP.labels(link.name).set(1)

    def start(self) -> LinkWatch:
        self._thread = threading.Thread(target=self._run, name="tasklab-links", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """Probe every link once (the thread does this every ``interval_s``)."""
        # all at once: one silent link must not delay the verdict on the other
        probes = [(link, Bounded(link.probe, self.timeout_s)) for link in self.links]
        for link, probe in probes:
            try:
                probe.result()
            except Exception as e:
                self._failed(link, e)
            else:
                self._answered(link)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def _failed(self, link: Link, error: Exception) -> None:
        link.failures += 1
        if link.failures < self.fail_after:
            return
        first = link.up
        if first:  # down before the cut: whatever the cut frees finds it down
            link.up = False
            metrics.LINK_UP.labels(link.name).set(0)
            metrics.LINK_LOST.labels(link.name).inc()
        cut = cut_sockets(link.addresses, link.port)
        if not first:
            return
        log.warning(
            "link to the %s (%s:%d) is down: %d probe(s) in a row got no answer within %g s "
            "(%s); cut %d connection(s) to it; taking no new work until it answers",
            link.name,
            link.host,
            link.port,
            link.failures,
            self.timeout_s,
            error,
            cut,
        )
        self._callback(self.on_down, link)

    def _answered(self, link: Link) -> None:
        link.failures = 0
        if link.up:
            return
        link.up = True
        metrics.LINK_UP.labels(link.name).set(1)
        log.warning("link to the %s (%s:%d) is back", link.name, link.host, link.port)
        self._callback(self.on_up, link)

    def _callback(self, callback: Callable[[Link], None] | None, link: Link) -> None:
        if callback is None:
            return
        try:
            callback(link)
        except Exception:  # the watch must outlive a failing hook
            log.exception("link watch: the %s hook failed", link.name)


class ProbeTimeout(Exception):
    pass


def link_probe_s(settings: Settings) -> float:
    """The longest a failed probe takes: its timeout (libpq's is 2 s at least), plus the
    second ``Bounded`` allows."""
    return max(settings.link_timeout_s, 2.0) + 1.0


class Bounded:
    """A probe run in a thread of its own, waited for ``timeout_s`` (+1 s) at most: a client
    library may wait without a timeout somewhere (a close handshake, say), and the watch must
    not hang with it. A probe left waiting is freed when the link is cut."""

    def __init__(self, probe: Probe, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s + 1.0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(
            target=self._run, args=(probe,), name="tasklab-link-probe", daemon=True
        )
        self.thread.start()

    def _run(self, probe: Probe) -> None:
        try:
            probe(self.timeout_s)
        except BaseException as e:
            self.errors.append(e)

    def result(self) -> None:
        self.thread.join(max(0.0, self.deadline - time.monotonic()))
        if self.thread.is_alive():
            raise ProbeTimeout(f"no answer within {self.timeout_s + 1.0:g} s")
        if self.errors:
            raise self.errors[0]


def cut_sockets(addresses: set[str], port: int) -> int:
    """Shut down this process's TCP sockets to ``addresses``:``port``; how many it cut.

    ``shutdown`` (not ``close``) makes a call blocked on the socket in any thread return at
    once, while the descriptor stays owned by the library that opened it."""
    cut = 0
    for conn in psutil.Process().net_connections(kind="tcp"):
        if not conn.raddr or conn.fd < 0:
            continue
        if conn.raddr.port != port or conn.raddr.ip not in addresses:
            continue
        try:
            sock = socket.socket(fileno=os.dup(conn.fd))
        except OSError:
            continue  # closed meanwhile
        try:
            sock.shutdown(socket.SHUT_RDWR)
            cut += 1
        except OSError:
            pass
        finally:
            sock.close()  # the duplicate only
    return cut


def _addresses(host: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return {host}
    found = {str(info[4][0]) for info in infos}
    if host in ("localhost", "127.0.0.1", "::1"):
        found |= {"127.0.0.1", "::1"}
    return found


# Probes: a fresh connection each, with the timeout on connect and on the answer -----------


def redis_probe(url: str) -> Probe:
    import redis

    def probe(timeout_s: float) -> None:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            client.ping()
        finally:
            client.close()

    return probe


def amqp_probe(url: str) -> Probe:
    from kombu import Connection  # type: ignore[attr-defined]

    def probe(timeout_s: float) -> None:
        with Connection(url, connect_timeout=timeout_s) as conn:  # type: ignore[no-untyped-call]
            conn.connect()  # the AMQP handshake waits for the server within connect_timeout

    return probe


def postgres_probe(url: str) -> Probe:
    import psycopg

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    def probe(timeout_s: float) -> None:
        # libpq's connect_timeout is whole seconds, at least 2
        with psycopg.connect(conninfo, connect_timeout=max(2, round(timeout_s))) as conn:
            conn.execute("SELECT 1")

    return probe


def broker_link(url: str) -> Link | None:
    parsed = urlsplit(url)
    host = parsed.hostname or "localhost"
    if parsed.scheme in ("redis", "rediss"):
        return Link("broker", host, parsed.port or 6379, redis_probe(url))
    if parsed.scheme in ("amqp", "pyamqp", "amqps"):
        return Link("broker", host, parsed.port or 5672, amqp_probe(url))
    return None  # a unix socket, or a transport we cannot probe: nothing to watch


def database_link(url: str) -> Link | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or not parsed.host:
        return None  # SQLite is a file: no link
    return Link("database", parsed.host, parsed.port or 5432, postgres_probe(url))


def watch_links(
    settings: Settings,
    *,
    broker: bool = True,
    database: bool = True,
    on_down: Callable[[Link], None] | None = None,
    on_up: Callable[[Link], None] | None = None,
) -> LinkWatch | None:
    """Start watching this process's links (none when ``link_check_interval_s`` is 0, or
    when there is nothing to watch: an embedded SQLite has no link)."""
    if settings.link_check_interval_s <= 0:
        return None
    links = [
        *([link] if broker and (link := broker_link(settings.effective_broker_url)) else []),
        *([link] if database and (link := database_link(settings.sync_database_url)) else []),
    ]
    if not links:
        return None
    return LinkWatch(
        links,
        interval_s=settings.link_check_interval_s,
        timeout_s=settings.link_timeout_s,
        fail_after=settings.link_fail_after,
        on_down=on_down,
        on_up=on_up,
    ).start()
