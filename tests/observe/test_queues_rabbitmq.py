"""Queue figures on a real RabbitMQ: ready and consumers by passive declare, unacked absent
there; ready, unacked and consumers by the management API (the shared server's when it has
the plugin on, else a node of the session's own). Needs TEST_RABBITMQ_URL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from prometheus_client import REGISTRY

from tasklab.embedded import free_port
from tasklab.observe.queues import (
    ManagementApi,
    QueueGauges,
    QueueProbe,
    amqp_queue_depths,
    amqp_vhost,
    management_url,
)
from tasklab.settings import Settings
from tests.conftest import required_url
from tests.observe.conftest import wait_until
from tests.support.rabbitmq import RABBITMQ_SERVER, ManagedRabbitMQ, management_answers

pytestmark = pytest.mark.rabbitmq
STATS_WAIT_S = 30.0  # the management API's figures lag by its statistics interval


@pytest.fixture
def rabbitmq_url() -> str:
    return required_url("TEST_RABBITMQ_URL")


@dataclass(frozen=True)
class Managed:
    broker_url: str
    management_url: str


@pytest.fixture(scope="session")
def managed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Managed]:
    """A RabbitMQ whose management API answers: the shared one if it does, else our own."""
    shared = required_url("TEST_RABBITMQ_URL")
    shared_api = management_url(Settings(broker_url=shared))
    if shared_api is not None and management_answers(shared_api):
        yield Managed(shared, shared_api)
        return
    if not RABBITMQ_SERVER.exists():
        pytest.skip("no management API on the shared RabbitMQ and no rabbitmq-server to start")
    node = ManagedRabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    try:
        yield Managed(node.url, node.management_url)
    finally:
        node.stop()


def own_queue(url: str) -> Iterator[str]:
    """A queue of this test's own, deleted afterwards."""
    name = f"tasklab-test-{uuid.uuid4().hex[:8]}"
    with Connection(url) as conn:
        queue = Queue(name, Exchange(name), routing_key=name, durable=False)
        queue(conn.default_channel).declare()
        yield name
        queue(conn.channel()).delete()


@pytest.fixture
def queue_name(rabbitmq_url: str) -> Iterator[str]:
    yield from own_queue(rabbitmq_url)


@pytest.fixture
def managed_queue(managed: Managed) -> Iterator[str]:
    yield from own_queue(managed.broker_url)


def publish(url: str, queue: str, n: int) -> None:
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.default_channel, exchange=Exchange(queue), routing_key=queue)
        for i in range(n):
            producer.publish({"i": i})


class HeldConsumer:
    """A consumer on ``queue`` that takes ``take`` messages and acknowledges none."""

    def __init__(self, url: str, queue: str, *, take: int) -> None:
        self.conn = Connection(url)
        self.received: list[Any] = []
        channel = self.conn.channel()
        channel.basic_qos(0, take, False)  # the broker sends it no more than it holds
        self.consumer = Consumer(
            channel, [Queue(queue, Exchange(queue), routing_key=queue, durable=False)]
        )
        self.consumer.register_callback(lambda body, message: self.received.append(message))
        self.consumer.consume()
        while len(self.received) < take:
            self.conn.drain_events(timeout=10)

    def close(self) -> None:
        self.consumer.cancel()
        self.conn.release()


def passive_settings(url: str, tmp_path: Path) -> Settings:
    return Settings(home_dir=tmp_path, broker_url=url, amqp_management_url="off")


def test_a_passive_declare_gives_ready_messages_and_consumers_and_no_unacked(
    rabbitmq_url: str, queue_name: str
) -> None:
    publish(rabbitmq_url, queue_name, 3)
    holder = HeldConsumer(rabbitmq_url, queue_name, take=1)
    try:
        with Connection(rabbitmq_url) as conn:
            depths = amqp_queue_depths(conn, [queue_name, f"{queue_name}-missing"])
    finally:
        holder.close()

    assert depths[queue_name].total == 2  # the held one is not ready
    assert depths[queue_name].consumers == 1
    assert depths[queue_name].unacked is None  # a declare cannot tell
    missing = depths[f"{queue_name}-missing"]
    assert (missing.total, missing.consumers) == (0, 0)


def test_without_the_management_api_unacked_is_absent_from_the_metrics_not_zero(
    rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    publish(rabbitmq_url, queue_name, 2)
    probe = QueueProbe(passive_settings(rabbitmq_url, tmp_path), queues=[queue_name])
    try:
        snapshot = probe.snapshot()
    finally:
        probe.close()
    QueueGauges().record(snapshot)

    assert snapshot.depths[queue_name].total == 2
    assert snapshot.unacked is None
    labels = {"queue": queue_name}
    assert REGISTRY.get_sample_value("tasklab_queue_depth", labels) == 2
    assert REGISTRY.get_sample_value("tasklab_queue_consumers", labels) == 0
    assert REGISTRY.get_sample_value("tasklab_queue_unacked", labels) is None


def test_a_management_api_that_does_not_answer_falls_back_to_passive_declares(
    rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    publish(rabbitmq_url, queue_name, 1)
    closed = f"http://127.0.0.1:{free_port()}"
    settings = Settings(home_dir=tmp_path, broker_url=rabbitmq_url, amqp_management_url=closed)
    probe = QueueProbe(settings, queues=[queue_name])
    try:
        snapshot = probe.snapshot()
    finally:
        probe.close()

    assert snapshot.depths[queue_name].total == 1
    assert snapshot.depths[queue_name].consumers == 0
    assert snapshot.unacked is None


def test_the_management_api_gives_ready_unacked_and_consumers_per_queue(
    managed: Managed, managed_queue: str, tmp_path: Path
) -> None:
    publish(managed.broker_url, managed_queue, 3)
    holder = HeldConsumer(managed.broker_url, managed_queue, take=1)
    settings = Settings(
        home_dir=tmp_path, broker_url=managed.broker_url, amqp_management_url=managed.management_url
    )
    probe = QueueProbe(settings, queues=[managed_queue, f"{managed_queue}-missing"])
    try:
        snapshot = wait_until(
            probe.snapshot,
            lambda s: s.depths[managed_queue].unacked == 1,
            timeout_s=STATS_WAIT_S,
            what="the management API's statistics",
        )
    finally:
        probe.close()
        holder.close()
    QueueGauges().record(snapshot)

    depth = snapshot.depths[managed_queue]
    assert (depth.total, depth.unacked, depth.consumers) == (2, 1, 1)
    assert snapshot.unacked == 1  # all the probe's queues
    missing = snapshot.depths[f"{managed_queue}-missing"]
    assert (missing.total, missing.unacked, missing.consumers) == (0, 0, 0)
    assert REGISTRY.get_sample_value("tasklab_queue_unacked", {"queue": managed_queue}) == 1


def test_the_management_api_is_read_as_the_broker_urls_user_on_its_vhost(
    managed: Managed, managed_queue: str
) -> None:
    publish(managed.broker_url, managed_queue, 1)
    wrong_user = managed.broker_url.replace("guest:guest@", "guest:not-the-password@")
    api = ManagementApi(managed.management_url, managed.broker_url, timeout_s=5.0)
    refused = ManagementApi(managed.management_url, wrong_user, timeout_s=5.0)
    try:
        depths = wait_until(
            lambda: api.queue_depths([managed_queue]),
            lambda d: d is not None and d[managed_queue].total == 1,
            timeout_s=STATS_WAIT_S,
            what="the management API's statistics",
        )
        assert depths is not None and depths[managed_queue].consumers == 0
        assert refused.queue_depths([managed_queue]) is None  # 401: passive declares instead
    finally:
        api.close()
        refused.close()


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", "/"),
        ("amqp://guest:guest@127.0.0.1:5672", "/"),
        ("amqp://guest:guest@127.0.0.1:5672/tasklab", "tasklab"),
        ("amqp://guest:guest@127.0.0.1:5672/%2Fshop", "/shop"),
    ],
)
def test_the_vhost_is_read_from_the_broker_url_as_kombu_reads_it(url: str, vhost: str) -> None:
    assert amqp_vhost(url) == vhost


def test_the_management_url_defaults_to_the_brokers_host_on_port_15672() -> None:
    assert management_url(Settings(broker_url="amqp://u:p@mq.internal:5672//")) == (
        "http://mq.internal:15672"
    )
    assert management_url(Settings(broker_url="amqp://mq//", amqp_management_url="off")) is None
