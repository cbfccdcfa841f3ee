"""The lab's TCP proxy in front of the real Redis, PostgreSQL and RabbitMQ: each mode as the
clients tasklab uses see it (redis-py, psycopg through SQLAlchemy, kombu), and the heal. Redis
is the session's embedded one (``redis_url``, flushed per test)."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator

import kombu
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from tasklab.lab.netproxy import LinkMode, LinkProxy, ProxyError, through, url_address
from tests.conftest import required_url

# Long enough that a call failing within it failed because of the mode, not a slow machine.
PATIENT_S = 30.0
SHORT_S = 0.5


@pytest.fixture
def proxy_to_redis(redis_url: str) -> Iterator[LinkProxy]:
    with LinkProxy.for_url(redis_url, name="redis") as proxy:
        yield proxy


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    # No retries: each call shows what the link did to it.
    return redis.Redis.from_url(url, socket_timeout=timeout_s, retry=None, retry_on_error=[])


# --- URLs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/15", "redis://127.0.0.1:7000/15"),
        ("redis://:secret@cache.internal/2", "redis://:secret@127.0.0.1:7000/2"),
        ("amqp://guest:guest@mq:5672//", "amqp://guest:guest@127.0.0.1:7000//"),
        ("amqp://guest:guest@mq/tasklab", "amqp://guest:guest@127.0.0.1:7000/tasklab"),
        (
            "postgresql+psycopg://app:pw@db.internal:5433/shop?sslmode=require",
            "postgresql+psycopg://app:pw@127.0.0.1:7000/shop?sslmode=require",
        ),
        ("postgresql://postgres@127.0.0.1/test", "postgresql://postgres@127.0.0.1:7000/test"),
    ],
)
def test_a_url_through_a_proxy_keeps_everything_but_host_and_port(url: str, expected: str) -> None:
    assert through(url, "127.0.0.1", 7000) == expected


def test_a_url_without_a_port_points_at_its_schemes_default_port() -> None:
    assert url_address("postgresql+psycopg://u@db.internal/x") == ("db.internal", 5432)
    assert url_address("amqp://guest:guest@mq//") == ("mq", 5672)
    assert url_address("rediss://cache:6380/0") == ("cache", 6380)


def test_a_unix_socket_url_cannot_be_proxied() -> None:
    with pytest.raises(ProxyError, match="no host"):
        through("unix:///run/redis.sock", "127.0.0.1", 7000)


def test_an_unknown_mode_is_refused_with_the_known_ones(proxy_to_redis: LinkProxy) -> None:
    with pytest.raises(ProxyError, match="pass, outage, blackhole, slow"):
        proxy_to_redis.set_mode("meteor")
    assert proxy_to_redis.mode is LinkMode.PASS


# --- Redis ------------------------------------------------------------------------------------
def test_redis_through_the_proxy_answers_in_pass_mode(
    proxy_to_redis: LinkProxy, redis_url: str
) -> None:
    client = redis_client(proxy_to_redis.url(redis_url), PATIENT_S)
    key = f"tasklab-test-proxy-{uuid.uuid4().hex}"
    try:
        client.set(key, "through", ex=60)
        assert client.get(key) == b"through"
    finally:
        client.delete(key)
        client.close()
    stats = proxy_to_redis.stats()
    assert stats.accepted == 1 and stats.bytes_up > 0 and stats.bytes_down > 0


def test_an_outage_gives_redis_clients_a_connection_error_not_a_timeout(
    proxy_to_redis: LinkProxy, redis_url: str
) -> None:
    url = proxy_to_redis.url(redis_url)
    open_client = redis_client(url, PATIENT_S)
    assert open_client.ping()

    proxy_to_redis.outage()

    assert proxy_to_redis.stats().open == 0  # the open connection was reset
    with pytest.raises(redis.ConnectionError):
        open_client.ping()
    with pytest.raises(redis.ConnectionError, match="refused"):
        redis_client(url, PATIENT_S).ping()
    with socket.socket() as raw, pytest.raises(ConnectionRefusedError):
        raw.connect(proxy_to_redis.address)


def test_a_blackhole_makes_redis_calls_time_out_on_open_and_new_connections(
    proxy_to_redis: LinkProxy, redis_url: str
) -> None:
    url = proxy_to_redis.url(redis_url)
    open_client = redis_client(url, SHORT_S)
    assert open_client.ping()

    proxy_to_redis.blackhole()

    with pytest.raises(redis.TimeoutError):
        open_client.ping()
    with pytest.raises(redis.TimeoutError):  # accepted, and then nothing
        redis_client(url, SHORT_S).ping()
    assert proxy_to_redis.stats().open >= 1  # the connections stay open


def test_bytes_sent_into_a_blackhole_are_answered_after_the_heal(
    proxy_to_redis: LinkProxy,
) -> None:
    with socket.create_connection(proxy_to_redis.address, timeout=SHORT_S) as raw:
        proxy_to_redis.blackhole()
        raw.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            raw.recv(64)

        proxy_to_redis.heal()

        raw.settimeout(PATIENT_S)
        assert raw.recv(64) == b"+PONG\r\n"


def test_redis_answers_again_after_an_outage_and_a_blackhole_heal(
    proxy_to_redis: LinkProxy, redis_url: str
) -> None:
    url = proxy_to_redis.url(redis_url)
    port = proxy_to_redis.port
    for cut in (proxy_to_redis.outage, proxy_to_redis.blackhole):
        cut()
        proxy_to_redis.heal()
        assert redis_client(url, PATIENT_S).ping()
    assert proxy_to_redis.port == port  # listening again where the clients look
    assert proxy_to_redis.mode is LinkMode.PASS


def test_a_slow_link_delays_a_reply_past_a_shorter_timeout_but_not_a_longer_one(
    proxy_to_redis: LinkProxy, redis_url: str
) -> None:
    url = proxy_to_redis.url(redis_url)
    proxy_to_redis.slow(400)

    assert proxy_to_redis.mode is LinkMode.SLOW and proxy_to_redis.delay_ms == 400
    with pytest.raises(redis.TimeoutError):
        redis_client(url, 0.2).ping()
    assert redis_client(url, PATIENT_S).ping()


def test_a_server_that_refuses_the_proxy_resets_the_client(redis_url: str) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead_port = free.getsockname()[1]
    with LinkProxy("127.0.0.1", dead_port) as proxy:
        with pytest.raises(redis.ConnectionError):
            redis_client(proxy.url(redis_url), PATIENT_S).ping()
        assert proxy.stats().refused == 1


# --- PostgreSQL -------------------------------------------------------------------------------
@pytest.fixture
def postgres_direct_url() -> str:
    return required_url("TEST_POSTGRES_URL").replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def proxy_to_postgres(postgres_direct_url: str) -> Iterator[LinkProxy]:
    with LinkProxy.for_url(postgres_direct_url, name="postgres") as proxy:
        yield proxy


def pg_engine(url: str, connect_timeout_s: int) -> sa.Engine:
    return sa.create_engine(
        url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": connect_timeout_s}
    )


@pytest.mark.postgres
def test_postgres_through_the_proxy_answers_and_an_outage_fails_open_and_new_connections(
    proxy_to_postgres: LinkProxy, postgres_direct_url: str
) -> None:
    engine = pg_engine(proxy_to_postgres.url(postgres_direct_url), 30)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 41 + 1")).scalar_one() == 42
            proxy_to_postgres.outage()
            with pytest.raises(OperationalError):
                conn.execute(sa.text("select 1"))
        with pytest.raises(OperationalError, match="refused"):
            engine.connect()
        proxy_to_postgres.heal()
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_blackhole_times_out_a_postgres_connect_and_holds_a_query_until_the_heal(
    proxy_to_postgres: LinkProxy, postgres_direct_url: str
) -> None:
    engine = pg_engine(proxy_to_postgres.url(postgres_direct_url), 1)
    answers: list[int] = []
    try:
        with engine.connect() as conn:
            proxy_to_postgres.blackhole()
            with pytest.raises(OperationalError, match="timeout"):
                engine.connect()
            query = threading.Thread(
                target=lambda: answers.append(conn.execute(sa.text("select 7")).scalar_one())
            )
            query.start()
            query.join(SHORT_S)
            assert query.is_alive() and not answers  # no answer crosses the cut

            proxy_to_postgres.heal()

            query.join(PATIENT_S)
            assert answers == [7]
    finally:
        engine.dispose()


# --- RabbitMQ ---------------------------------------------------------------------------------
@pytest.fixture
def rabbitmq_url() -> str:
    return required_url("TEST_RABBITMQ_URL")


@pytest.fixture
def proxy_to_rabbitmq(rabbitmq_url: str) -> Iterator[LinkProxy]:
    with LinkProxy.for_url(rabbitmq_url, name="rabbitmq") as proxy:
        yield proxy


def amqp_connection(url: str, timeout_s: float) -> kombu.Connection:
    return kombu.Connection(url, connect_timeout=timeout_s, transport_options={"max_retries": 0})


@pytest.mark.rabbitmq
def test_rabbitmq_through_the_proxy_carries_a_message_and_an_outage_refuses_it(
    proxy_to_rabbitmq: LinkProxy, rabbitmq_url: str
) -> None:
    url = proxy_to_rabbitmq.url(rabbitmq_url)
    name = f"tasklab-test-proxy-{uuid.uuid4().hex[:8]}"
    with amqp_connection(url, PATIENT_S) as conn:
        queue = kombu.Queue(name, kombu.Exchange(name), routing_key=name, auto_delete=False)
        bound = queue(conn.default_channel)
        bound.declare()
        try:
            with conn.Producer() as producer:
                producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name)
            message = bound.get(no_ack=True)
            assert message is not None and message.payload == {"n": 1}

            proxy_to_rabbitmq.outage()

            with pytest.raises(conn.connection_errors):
                bound.get(no_ack=True)
            with pytest.raises(ConnectionRefusedError):
                amqp_connection(url, PATIENT_S).connect()
        finally:
            proxy_to_rabbitmq.heal()
            with amqp_connection(url, PATIENT_S) as again:
                queue(again.default_channel).delete()


@pytest.mark.rabbitmq
def test_a_blackhole_times_out_a_rabbitmq_connect_until_the_heal(
    proxy_to_rabbitmq: LinkProxy, rabbitmq_url: str
) -> None:
    url = proxy_to_rabbitmq.url(rabbitmq_url)
    proxy_to_rabbitmq.blackhole()
    with pytest.raises(socket.timeout):
        amqp_connection(url, 1.0).connect()

    proxy_to_rabbitmq.heal()

    with amqp_connection(url, PATIENT_S) as conn:
        assert conn.connect() is not None and conn.connected
