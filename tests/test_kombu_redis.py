"""The Redis transport tasklab's Celery apps use: kombu's, with one client object per channel."""

from __future__ import annotations

from pathlib import Path

from kombu import Connection, Exchange, Queue  # type: ignore[attr-defined]

from tasklab.celery_app import make_celery
from tasklab.kombu_redis import TRANSPORT, Channel, Transport
from tasklab.settings import Settings


def test_tasklab_apps_on_plain_redis_use_it_and_tls_urls_keep_kombus_own(
    tmp_path: Path, redis_url: str
) -> None:
    app = make_celery(Settings(home_dir=tmp_path, redis_url=redis_url))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
    tls = make_celery(Settings(home_dir=tmp_path, redis_url="rediss://127.0.0.1:1/0"))
    assert tls.conf.broker_transport != TRANSPORT


def test_messages_round_trip_and_publishes_share_one_client_until_the_pool_changes(
    redis_url: str,
) -> None:
    queue = Queue("tasklab-test-kombu-redis", Exchange("tasklab-test-kombu-redis"), "k")
    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        producer = conn.Producer(serializer="json")
        for i in range(3):
            producer.publish({"n": i}, exchange=queue.exchange, routing_key="k", declare=[queue])
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        got = []
        with conn.SimpleQueue(queue) as simple:
            for _ in range(3):
                message = simple.get(timeout=5)
                got.append(message.payload["n"])
                message.ack()
        assert sorted(got) == [0, 1, 2]
        with channel.conn_or_acquire() as before:
            pass
        channel._pool = None  # what kombu does after a fork: a new pool, so a new client
        with channel.conn_or_acquire() as after:
            assert after is not before and after.connection_pool is channel.pool
            assert after.ping()
