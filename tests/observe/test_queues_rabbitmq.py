"""Queue depth on a real RabbitMQ by passive declare (needs TEST_RABBITMQ_URL)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer, Queue

from tasklab.observe.queues import QueueProbe, amqp_queue_depths
from tasklab.settings import Settings
from tests.conftest import required_url

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def rabbitmq_url() -> str:
    return required_url("TEST_RABBITMQ_URL")


@pytest.fixture
def queue_name(rabbitmq_url: str) -> Iterator[str]:
    """A queue of this test's own on the shared server, deleted afterwards."""
    name = f"tasklab-test-{uuid.uuid4().hex[:8]}"
    with Connection(rabbitmq_url, transport_options={"confirm_publish": True}) as conn:
        queue = Queue(name, Exchange(name), routing_key=name, durable=False)
        queue(conn.default_channel).declare()
        yield name
        queue(conn.channel()).delete()


def publish(url: str, queue: str, n: int) -> None:
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.default_channel, exchange=Exchange(queue), routing_key=queue)
        for i in range(n):
            producer.publish({"i": i})


def test_rabbitmq_depth_is_the_ready_message_count(rabbitmq_url: str, queue_name: str) -> None:
    publish(rabbitmq_url, queue_name, 3)

    with Connection(rabbitmq_url) as conn:
        depths = amqp_queue_depths(conn, [queue_name, f"{queue_name}-missing"])

    assert depths[queue_name].total == 3
    assert depths[f"{queue_name}-missing"].total == 0


def test_the_probe_on_rabbitmq_leaves_unacked_unknown(
    rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    publish(rabbitmq_url, queue_name, 2)
    probe = QueueProbe(Settings(home_dir=tmp_path, broker_url=rabbitmq_url), queues=[queue_name])
    try:
        snapshot = probe.snapshot()
    finally:
        probe.close()

    assert snapshot.depths[queue_name].total == 2
    assert snapshot.unacked is None
