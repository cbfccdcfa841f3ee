"""Helpers for cache tests: condition waits, a TCP proxy that can cut Redis off, and child
processes holding their own caches (driven over a pipe)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import redis

from tasklab.cache import TieredCache
from tasklab.settings import Settings


def wait_until(
    predicate: Callable[[], object], timeout_s: float = 5.0, interval_s: float = 0.002
) -> bool:
    """Poll ``predicate`` until it is truthy; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


class TcpProxy:
    """127.0.0.1:<port> forwarded to a Redis port. ``cut()`` drops every connection and
    refuses new ones (a partition for whoever connects through it); ``restore()`` heals it.
    Redis itself keeps running and keeps its data."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._up = True
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        self._up = False
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._server.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self._up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


# --- child processes ----------------------------------------------------------------------------
class CacheProcess:
    """A spawned Python process holding TieredCaches by name; ``call`` runs one command."""

    def __init__(self, redis_url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=child_main, args=(child_conn, redis_url), daemon=True)
        self.process.start()

    def call(self, op: str, *args: Any, timeout_s: float = 30.0) -> Any:
        self.send(op, *args)
        return self.receive(timeout_s)

    def send(self, op: str, *args: Any) -> None:
        self.conn.send((op, args))

    def receive(self, timeout_s: float = 30.0) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError("child process did not answer in time")
        ok, result = self.conn.recv()
        if not ok:
            raise AssertionError(f"child failed:\n{result}")
        return result

    def stop(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, AssertionError):
            self.call("exit", timeout_s=5)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def child_main(conn: multiprocessing.connection.Connection, redis_url: str) -> None:
    # Like the test process: settings come from arguments only, not the caller's environment.
    for name in [n for n in os.environ if n.upper().startswith("TASKLAB_")]:
        del os.environ[name]
    os.chdir(tempfile.mkdtemp(prefix="tasklab-cache-child-"))
    logging.getLogger("tasklab.cache").setLevel(logging.ERROR)  # the parent asserts on logs
    host = _ChildHost(redis_url)
    while True:
        op, args = conn.recv()
        if op == "exit":
            conn.send((True, None))
            return
        try:
            conn.send((True, getattr(host, op)(*args)))
        except Exception:
            conn.send((False, traceback.format_exc()))


class _ChildHost:
    def __init__(self, redis_url: str) -> None:
        self.settings = Settings(redis_url=redis_url)
        self.redis = redis.Redis.from_url(redis_url)
        self.caches: dict[str, TieredCache] = {}
        self.watches: dict[str, threading.Thread] = {}
        self.evicted_at: dict[str, float | None] = {}

    def open(self, name: str, options: dict[str, Any]) -> bool:
        cache = self.caches[name] = TieredCache(self.settings, name=name, **options)
        return cache.wait_coherent(10)

    def fill(self, name: str, keys: list[str]) -> list[bool]:
        cache = self.caches[name]
        for key in keys:
            cache.get(key)
        assert cache.l1 is not None
        return [key in cache.l1 for key in keys]

    def watch(self, name: str, keys: list[str], timeout_s: float) -> None:
        """Record (in the background) when every key has left L1."""
        l1 = self.caches[name].l1
        assert l1 is not None

        def run() -> None:
            gone = wait_until(lambda: not any(k in l1 for k in keys), timeout_s, 0.0002)
            self.evicted_at[name] = time.monotonic() if gone else None

        thread = self.watches[name] = threading.Thread(target=run)
        thread.start()

    def watched(self, name: str) -> float | None:
        self.watches.pop(name).join()
        return self.evicted_at.pop(name)

    def get(self, name: str, key: str) -> Any:
        return self.caches[name].get(key)

    def stampede(
        self, name: str, key: str, threads: int, start_at: float, loader_s: float
    ) -> dict[str, Any]:
        """``threads`` threads call get_or_set(key) at ``start_at`` (CLOCK_MONOTONIC)."""
        cache = self.caches[name]
        calls: list[int] = []
        results: list[Any] = []

        def loader() -> str:
            calls.append(1)
            self.redis.incr(f"test:loads:{name}:{key}")
            time.sleep(loader_s)
            return "loaded"

        def run() -> None:
            time.sleep(max(0.0, start_at - time.monotonic()))
            results.append(cache.get_or_set(key, loader))

        workers = [threading.Thread(target=run) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return {"calls": len(calls), "results": sorted(set(results)), "answered": len(results)}


def forked_child(cache: TieredCache, conn: multiprocessing.connection.Connection, key: str) -> None:
    """Runs in a fork of the test process: fill L1 from the inherited cache, report, then
    report when the parent's write evicted the key."""
    try:
        ok = cache.wait_coherent(10)
        cache.get(key)
        assert cache.l1 is not None
        conn.send(("filled", ok and key in cache.l1, cache.get(key)))
        gone = wait_until(lambda: key not in cache.l1, 5.0, 0.0002)  # type: ignore[operator]
        conn.send(("evicted", time.monotonic() if gone else None, cache.get(key)))
    except Exception:
        conn.send(("error", traceback.format_exc(), None))
