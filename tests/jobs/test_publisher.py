"""Publisher: messages reach a real Redis broker; a broker that is gone fails fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tasklab.embedded import EmbeddedRedis
from tasklab.errors import BrokerUnavailable
from tasklab.jobs.publisher import Outgoing, Publisher
from tasklab.settings import Settings


def _settings(tmp_path: Path, url: str) -> Settings:
    return Settings(home_dir=tmp_path / ".tasklab", redis_url=url, publish_timeout_s=0.5)


def _queued(client: redis.Redis, queue: str) -> int:
    """Messages waiting on ``queue``: kombu keeps one list per priority step (queue:N)."""
    lists = [queue, *(k.decode() for k in client.keys(f"{queue}:*"))]
    return sum(int(client.llen(key)) for key in lists if client.type(key) == b"list")


def test_publish_many_puts_every_message_on_its_queue(
    tmp_path: Path, broker: EmbeddedRedis
) -> None:
    publisher = Publisher(_settings(tmp_path, broker.url))
    messages = [Outgoing("tasklab.probe_job.noop", f"job-{i}", "low", 0) for i in range(5)]
    messages.append(Outgoing("tasklab.probe_job.noop", "job-x", "high", 0, message_id="m-x"))
    client = redis.Redis.from_url(broker.url)

    ids = publisher.publish_many(messages)

    assert len(ids) == 6 and len(set(ids)) == 6 and ids[-1] == "m-x"
    assert _queued(client, "low") == 5
    assert _queued(client, "high") == 1
    publisher.close()


def test_publish_many_to_a_stopped_broker_raises_broker_unavailable(
    tmp_path: Path, broker: EmbeddedRedis
) -> None:
    publisher = Publisher(_settings(tmp_path, broker.url))
    broker.stop()
    with pytest.raises(BrokerUnavailable):
        publisher.publish_many([Outgoing("tasklab.probe_job.noop", "job-1", "low", 0)])
    with pytest.raises(BrokerUnavailable, match="circuit is open"):
        publisher.publish_many([Outgoing("tasklab.probe_job.noop", "job-2", "low", 0)])
    publisher.close()
