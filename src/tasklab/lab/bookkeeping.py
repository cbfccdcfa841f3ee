"""What the bench's tasks do: one Redis round trip of two commands (INCR and EXPIRE of a
counter, pipelined) on the broker's Redis, as the shared peer harness's task body does
(INCR + RPUSH), so that the bench and the harness compare the queues on the same work."""

from __future__ import annotations

import threading
from typing import Any

COUNTER_KEY = "tasklab:bench:done"
COUNTER_TTL_S = 3600
_clients: dict[str, Any] = {}
_lock = threading.Lock()


def count_done(broker_url: str) -> None:
    """One round trip; nothing where the broker is not Redis (RabbitMQ: no-op body)."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return
    client = _clients.get(broker_url)
    if client is None:
        import redis

        with _lock:
            client = _clients.setdefault(broker_url, redis.Redis.from_url(broker_url))
    pipe = client.pipeline(transaction=False)
    pipe.incr(COUNTER_KEY)
    pipe.expire(COUNTER_KEY, COUNTER_TTL_S)
    pipe.execute()
