"""The bench's task body: the shared peer harness's bookkeeping, one Redis round trip."""

from __future__ import annotations

import redis

from tasklab.lab.bookkeeping import COUNTER_KEY, count_done


def test_each_task_counts_itself_in_one_round_trip_and_the_count_expires(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:

        def calls() -> dict[str, int]:
            stats = client.info("commandstats")
            return {
                c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("incrby", "expire")
            }

        before = calls()
        for _ in range(5):
            count_done(redis_url)
        after = calls()
        assert {c: after[c] - before[c] for c in after} == {"incrby": 5, "expire": 5}
        assert int(client.get(COUNTER_KEY) or 0) == 5
        assert 0 < client.ttl(COUNTER_KEY) <= 3600
    finally:
        client.close()


def test_a_broker_that_is_not_redis_gets_no_bookkeeping() -> None:
    count_done("amqp://guest:guest@127.0.0.1:1//")  # nothing connects: no error
