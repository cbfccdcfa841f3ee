"""tasklab.links: a dead link is noticed within its bound, its blocked calls are freed, and
it comes back by itself."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasklab.links import Link, LinkWatch, cut_sockets, redis_probe
from tasklab.observe import metrics


class SilentServer:
    """Accepts connections and never answers: what a client sees of a link whose packets are
    dropped by something that still completes the handshake."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _blocked_ping(port: int) -> tuple[threading.Thread, list[BaseException]]:
    """A redis-py call with no timeout, as a consumer's BRPOP is: it waits for ever."""
    errors: list[BaseException] = []
    # No retries: redis-py would reconnect into the same silence (the watch cuts again then).
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=None, retry=Retry(NoBackoff(), 0)
    )

    def run() -> None:
        try:
            client.ping()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_cutting_a_link_frees_a_call_blocked_on_it(silent: SilentServer) -> None:
    thread, errors = _blocked_ping(silent.port)
    thread.join(0.5)
    assert thread.is_alive(), "the call should block on a server that never answers"

    assert cut_sockets({"127.0.0.1"}, silent.port) == 1

    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(errors[0], redis.ConnectionError)


def test_cut_sockets_leaves_other_links_alone(silent: SilentServer) -> None:
    other = SilentServer()
    try:
        thread, errors = _blocked_ping(other.port)
        thread.join(0.3)
        cut_sockets({"127.0.0.1"}, silent.port)
        thread.join(0.5)
        assert thread.is_alive() and not errors
        cut_sockets({"127.0.0.1"}, other.port)
        thread.join(5)
        assert errors
    finally:
        other.close()


def test_a_link_that_stops_answering_is_down_within_its_bound_and_back_when_it_answers(
    silent: SilentServer, redis_url: str
) -> None:
    answering = threading.Event()  # off: probe the silent server; on: a real Redis
    silent_probe, real_probe = (
        redis_probe(f"redis://127.0.0.1:{silent.port}/0"),
        redis_probe(redis_url),
    )

    def probe(timeout_s: float) -> None:
        (real_probe if answering.is_set() else silent_probe)(timeout_s)

    downs: list[str] = []
    ups: list[str] = []
    link = Link("broker", "127.0.0.1", silent.port, probe)
    watch = LinkWatch(
        [link],
        interval_s=0.2,
        timeout_s=0.3,
        fail_after=2,
        on_down=lambda lk: downs.append(lk.name),
        on_up=lambda lk: ups.append(lk.name),
    )
    thread, errors = _blocked_ping(silent.port)
    started = time.monotonic()
    watch.start()
    try:
        thread.join(5)
        found_s = time.monotonic() - started
        assert errors, "the blocked call was not freed"
        # fail_after x (interval + timeout), with room for a loaded machine
        assert found_s < 2 * (0.2 + 0.3) + 3
        # the hook runs right after the cut that freed the call
        deadline = time.monotonic() + 3
        while not downs and time.monotonic() < deadline:
            time.sleep(0.02)
        assert downs == ["broker"] and not link.up
        assert _gauge("broker") == 0

        answering.set()
        deadline = time.monotonic() + 5
        while not link.up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.up and ups == ["broker"] and downs == ["broker"]
        assert _gauge("broker") == 1
    finally:
        watch.stop()


def test_one_failed_probe_below_the_threshold_changes_nothing(silent: SilentServer) -> None:
    link = Link(
        "database", "127.0.0.1", silent.port, redis_probe(f"redis://127.0.0.1:{silent.port}")
    )
    watch = LinkWatch([link], interval_s=60, timeout_s=0.2, fail_after=3)
    thread, errors = _blocked_ping(silent.port)
    watch.check()
    watch.check()
    thread.join(0.3)
    assert link.up and thread.is_alive() and not errors
    watch.check()
    thread.join(5)
    assert not link.up and errors


def _gauge(link: str) -> float:
    return metrics.LINK_UP.labels(link)._value.get()  # type: ignore[attr-defined]


def test_a_probe_that_hangs_counts_as_failed_within_its_timeout() -> None:
    release = threading.Event()
    link = Link("broker", "127.0.0.1", 1, lambda timeout_s: release.wait(60) and None)
    watch = LinkWatch([link], interval_s=60, timeout_s=0.2, fail_after=1)
    started = time.monotonic()
    watch.check()
    release.set()
    assert not link.up
    assert time.monotonic() - started < 0.2 + 1.0 + 1.0


def test_a_silent_link_does_not_delay_the_verdict_on_another(silent: SilentServer) -> None:
    release = threading.Event()
    hanging = Link("broker", "127.0.0.1", 1, lambda timeout_s: release.wait(60) and None)
    quick = Link(
        "database", "127.0.0.1", silent.port, redis_probe(f"redis://127.0.0.1:{silent.port}")
    )
    watch = LinkWatch([hanging, quick], interval_s=60, timeout_s=0.5, fail_after=1)
    started = time.monotonic()
    watch.check()
    release.set()
    assert not hanging.up and not quick.up
    # in parallel: one probe's time (0.5 s + 1 s), not the sum of both
    assert time.monotonic() - started < 2 * (0.5 + 1.0)
