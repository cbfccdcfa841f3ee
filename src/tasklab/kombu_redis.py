"""kombu's Redis transport, reusing one client object per channel for synchronous commands.

kombu builds a new ``redis.Redis`` object for every publish, ack and unacked-bookkeeping
pipeline (``Channel.conn_or_acquire``). With redis-py 8 that constructor fills a table of ~170
response callbacks each time: about 0.2 ms of CPU per publish here, a quarter of a submit. The
client object is only a thread-safe front for the channel's connection pool, so one per
channel (rebuilt when kombu replaces the pool, e.g. after a fork) does the same work.

Used for plain ``redis://`` brokers (see ``celery_app``); TLS and Sentinel URLs keep kombu's
own transport.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        cached = self._sync_client
        if cached is None or cached.connection_pool is not self.pool:
            cached = self._sync_client = self._create_client()  # type: ignore[no-untyped-call]
        yield cached


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
