"""The stack's links: which settings URLs go through which proxy, and back."""

from __future__ import annotations

from pathlib import Path

import redis

from tasklab.lab.links import start_links
from tasklab.lab.netproxy import url_address
from tasklab.settings import Settings


def test_every_url_pointing_at_a_proxied_server_goes_through_its_proxy(tmp_path: Path) -> None:
    settings = Settings(
        home_dir=tmp_path,
        broker_url="amqp://guest:guest@mq.internal:5672/shop",
        redis_url="redis://cache.internal:6379/0",  # not the broker: left alone
        database_url="postgresql://app:pw@db.internal/shop",
    )
    links, proxied = start_links(settings)
    try:
        broker, database = links.broker, links.database
        assert database is not None
        assert proxied.broker_url == f"amqp://guest:guest@127.0.0.1:{broker.port}/shop"
        assert proxied.database_url == f"postgresql://app:pw@127.0.0.1:{database.port}/shop"
        assert proxied.redis_url == settings.redis_url
        assert broker.upstream == ("mq.internal", 5672)
        assert database.upstream == ("db.internal", 5432)
        assert links.server_url(proxied.broker_url) == settings.broker_url
        assert links.describe()["database"] == f"127.0.0.1:{database.port} -> db.internal:5432"
    finally:
        links.stop()


def test_a_redis_broker_and_cache_on_one_server_share_one_proxy_and_sqlite_gets_none(
    tmp_path: Path, redis_url: str
) -> None:
    settings = Settings(home_dir=tmp_path, redis_url=redis_url)
    links, proxied = start_links(settings)
    try:
        assert set(links.proxies) == {"broker"}  # SQLite is a file: no link to cut
        assert url_address(str(proxied.redis_url)) == links.broker.address
        assert proxied.effective_broker_url == proxied.redis_url
        client = redis.Redis.from_url(str(proxied.redis_url), socket_timeout=10)
        assert client.ping()
        client.close()
        assert links.server_url(str(proxied.redis_url)) == redis_url
    finally:
        links.stop()
