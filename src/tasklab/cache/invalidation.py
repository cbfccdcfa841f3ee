"""Cross-process L1 coherence over Redis pub/sub.

Every write (``set``, ``delete``, ``delete_tag``, ``warm``, ``clear``) publishes a notice on the
cache's channel in the same round trip as the write. Each process runs one listener thread per
cache that evicts the named keys from its L1; a process ignores its own notices.

A lost subscription means notices may have been missed, so L1 cannot be trusted: the owner clears
it on ``on_lost`` and bypasses it until ``on_connected`` (after a fresh SUBSCRIBE). A silent
network partition is caught by PINGs: no reply within ``dead_after_s`` counts as lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasklab.cache import constants

logger = logging.getLogger("tasklab.cache")

POLL_S = 0.05  # how long one get_message waits; bounds stop() latency
PING_INTERVAL_S = 1.0
DEAD_AFTER_S = 3.0
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0
SUBSCRIBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Notice:
    """Evict ``keys`` (None: everything) — sent by the cache instance ``sender``."""

    sender: str
    keys: tuple[str, ...] | None


def encode_notice(sender: str, keys: Iterable[str]) -> bytes:
    return orjson.dumps({"s": sender, "k": list(keys)})


def encode_clear(sender: str) -> bytes:
    return orjson.dumps({"s": sender, "all": True})


def decode_notice(data: bytes) -> Notice:
    """Parse a notice; raise ValueError if it is not one."""
    body = orjson.loads(data)
    if not isinstance(body, dict) or not isinstance(body.get("s"), str):
        raise ValueError("not a cache invalidation notice")
    if body.get("all"):
        return Notice(body["s"], None)
    keys = body.get("k")
    if keys == {}:  # Lua's cjson writes an empty table as an object
        keys = []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError("notice keys must be a list of strings")
    return Notice(body["s"], tuple(keys))


class InvalidationListener:
    """A daemon thread subscribed to one cache's channel, reconnecting with backoff."""

    def __init__(
        self,
        url: str,
        *,
        cache: str,
        sender: str,
        on_notice: Callable[[Notice], None],
        on_connected: Callable[[bool], None],
        on_lost: Callable[[BaseException], None],
        timeout_s: float = 1.0,
    ) -> None:
        self.url = url
        self.cache = cache
        self.sender = sender
        self.on_notice = on_notice
        self.on_connected = on_connected  # argument: True if this is a reconnection
        self.on_lost = on_lost
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._ever_connected = False
        self._reported_down = False
        self._thread = threading.Thread(
            target=self._run, name=f"tasklab-cache-inval-{cache}", daemon=True
        )

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def _run(self) -> None:
        delay = RETRY_MIN_S
        while not self._stop.is_set():
            try:
                self._session()
            except (redis.RedisError, OSError) as e:
                if self._stop.is_set():
                    break
                if self._report_lost(e):
                    delay = RETRY_MIN_S
            except Exception as e:  # a bug in a hook must not kill coherence silently
                logger.exception("cache %r: invalidation listener failed", self.cache)
                self._report_lost(e)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, RETRY_MAX_S)
        self._connected.clear()

    def _session(self) -> None:
        client = redis.Redis.from_url(
            self.url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0),
            client_name=f"tasklab-cache-inval:{self.cache}",
        )
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(constants.channel(self.cache))
            self._await_subscribed(pubsub)
            self._report_connected()
            self._listen(pubsub)
        finally:
            pubsub.close()
            client.close()

    def _await_subscribed(self, pubsub: Any) -> None:
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while time.monotonic() < deadline and not self._stop.is_set():
            message = pubsub.get_message(timeout=POLL_S)
            if message is not None and message["type"] == "subscribe":
                return
        raise redis.ConnectionError("no SUBSCRIBE confirmation")

    def _listen(self, pubsub: Any) -> None:
        last_seen = next_ping = time.monotonic()
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=POLL_S)
            now = time.monotonic()
            if message is not None:
                last_seen = now
                if message["type"] == "message":
                    self._dispatch(message["data"])
            if now >= next_ping:
                pubsub.ping()
                next_ping = now + PING_INTERVAL_S
            if now - last_seen > DEAD_AFTER_S:
                raise redis.ConnectionError(f"no PING reply for {DEAD_AFTER_S:.0f}s")

    def _dispatch(self, data: bytes) -> None:
        try:
            notice = decode_notice(data)
        except ValueError:
            logger.debug("cache %r: ignoring malformed notice %r", self.cache, data[:100])
            return
        if notice.sender != self.sender:
            self.on_notice(notice)

    def _report_connected(self) -> None:
        reconnected = self._ever_connected
        self._ever_connected = True
        self._reported_down = False
        self.on_connected(reconnected)
        self._connected.set()

    def _report_lost(self, error: BaseException) -> bool:
        """Tell the owner once per outage; True if this call was the transition."""
        self._connected.clear()
        if self._reported_down:
            return False
        self._reported_down = True
        self.on_lost(error)
        return True


__all__ = ["InvalidationListener", "Notice", "decode_notice", "encode_clear", "encode_notice"]
