"""Abuse limits on real Redis: per token, per address, failed authentications (cached), the
per-process fallback while Redis is down, and the per-user quotas on orders and data sync."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter

from tasklab.service.app import create_app
from tasklab.service.domain.errors import RateLimited
from tasklab.service.domain.seed import seed
from tasklab.service.rate_limits import KEY_PREFIX, Limits, RateLimiter, token_key
from tasklab.settings import Settings
from tests.service.conftest import SEED, Account, StatementCounter, make_settings, read_tokens

ORDER = {"items": [{"product_id": 1, "quantity": 1}], "use_points": 0}
GENEROUS = "10000/minute"


def _settings(tmp_path: Path, redis_url: str, **limits: Any) -> Settings:
    values = {
        "rate_limit_per_token": GENEROUS,
        "rate_limit_per_address": GENEROUS,
        "rate_limit_failed_auth_per_address": GENEROUS,
        **limits,
    }
    settings = make_settings(tmp_path, redis_url, **values)
    seed(settings, **SEED)
    return settings


async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


def _accounts(settings: Settings) -> list[Account]:
    return read_tokens(settings.home_dir / "tokens.jsonl")


def _assert_429(response: httpx.Response, slug: str = "rate-limited") -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"urn:tasklab:problem:{slug}"
    assert int(response.headers["retry-after"]) >= 1
    assert body["retry_after_s"] == int(response.headers["retry-after"])


async def test_a_token_over_its_limit_gets_429_with_retry_after_while_others_go_on(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _settings(tmp_path, redis_url, rate_limit_per_token="3/minute")
    alice, bob = _accounts(settings)[:2]
    async for client in _client(create_app(settings)):
        for _ in range(3):
            assert (await client.get("/api/v1/points", headers=alice.headers)).status_code == 200
        refused = await client.get("/api/v1/points", headers=alice.headers)
        _assert_429(refused)
        assert "per token" in refused.json()["detail"]
        assert (await client.get("/api/v1/points", headers=bob.headers)).status_code == 200


async def test_an_address_over_its_limit_is_refused_whatever_token_it_sends(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _settings(tmp_path, redis_url, rate_limit_per_address="4/minute")
    accounts = _accounts(settings)
    async for client in _client(create_app(settings)):
        codes = [
            (await client.get("/api/v1/points", headers=a.headers)).status_code for a in accounts
        ]
        assert codes == [200, 200, 200, 200, 429]
        assert (await client.get("/health")).status_code == 200  # only /api/ is counted


async def test_failed_authentications_use_up_the_address_budget_before_any_lookup(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _settings(tmp_path, redis_url, rate_limit_failed_auth_per_address="3/minute")
    alice, bob = _accounts(settings)[:2]
    async for client in _client(create_app(settings)):
        bad = {"Authorization": f"Bearer {alice.user_id}.wrong-{'x' * 8}"}
        for i in range(3):
            wrong = {"Authorization": f"Bearer {alice.user_id}.wrong-{i}"}
            assert (await client.get("/api/v1/points", headers=wrong)).status_code == 401
        _assert_429(await client.get("/api/v1/points", headers=bad))
        # a valid token not yet known to this process is not looked up from this address now
        _assert_429(await client.get("/api/v1/points", headers=bob.headers))


async def test_a_failed_token_is_remembered_so_retrying_it_costs_no_query(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _settings(tmp_path, redis_url)
    alice = _accounts(settings)[0]
    app = create_app(settings)
    bad = {"Authorization": f"Bearer {alice.user_id}.not-her-secret"}
    async for client in _client(app):
        assert (await client.get("/api/v1/points", headers=bad)).status_code == 401
        with StatementCounter(app.state.services.engine.sync_engine) as counter:
            for _ in range(5):
                assert (await client.get("/api/v1/points", headers=bad)).status_code == 401
        assert counter.count == 0


async def test_two_processes_share_the_counters_in_redis(redis_url: str) -> None:
    limits = Limits.from_settings(Settings(rate_limit_per_token="4/minute"))
    first, second = (
        RateLimiter(limits, redis_url=redis_url),
        RateLimiter(limits, redis_url=redis_url),
    )
    try:
        for limiter in (first, second, first, second):
            await limiter.check_request(token="1.abc", address="10.0.0.1")
        assert first.shared and second.shared
        with pytest.raises(RateLimited):
            await second.check_request(token="1.abc", address="10.0.0.1")
    finally:
        await first.aclose()
        await second.aclose()


async def _replies_sent(stats: aioredis.Redis) -> int:
    """Replies the Redis server has written to its clients: one per round trip, however many
    commands a pipeline or a script holds."""
    return int((await stats.info("stats"))["total_writes_processed"])


async def _round_trips(redis_url: str, action: Callable[[], Awaitable[object]]) -> int:
    async with aioredis.from_url(redis_url) as stats:
        before = await _replies_sent(stats)
        own = await _replies_sent(stats) - before  # the reply to the INFO itself
        before = await _replies_sent(stats)
        await action()
        return await _replies_sent(stats) - before - own


async def test_a_request_s_two_counters_cost_one_round_trip_to_redis_refused_or_not(
    redis_url: str,
) -> None:
    limits = Limits.from_settings(Settings(rate_limit_per_token="2/minute"))
    limiter = RateLimiter(limits, redis_url=redis_url)
    refusals: list[RateLimited] = []

    async def check() -> None:
        try:
            await limiter.check_request(token="1.abc", address="10.0.0.1")
        except RateLimited as e:
            refusals.append(e)

    try:
        await check()  # connects and loads the script
        assert await _round_trips(redis_url, check) == 1
        assert refusals == []
        assert await _round_trips(redis_url, check) == 1  # Retry-After included
        assert [1 <= r.retry_after_s <= 60 for r in refusals] == [True]
        assert limiter.shared
    finally:
        await limiter.aclose()


async def test_the_counters_are_those_of_limits_own_redis_storage(redis_url: str) -> None:
    """Same keys and windows: processes of the previous version count with this one."""
    limits = Limits.from_settings(Settings(rate_limit_per_token="3/minute"))
    limiter = RateLimiter(limits, redis_url=redis_url)
    storage = RedisStorage("async+" + redis_url, implementation="redispy", key_prefix=KEY_PREFIX)
    theirs = FixedWindowRateLimiter(storage)
    token = (limits.per_token, "token", token_key("1.abc"))
    try:
        await limiter.check_request(token="1.abc", address="10.0.0.1")
        assert await theirs.hit(*token)
        stats = await theirs.get_window_stats(*token)
        assert stats.remaining == 1
        assert time.time() + 55 < stats.reset_time <= time.time() + 60
        address = await theirs.get_window_stats(limits.per_address, "address", "10.0.0.1")
        assert address.remaining == limits.per_address.amount - 1
        await limiter.check_request(token="1.abc", address="10.0.0.1")
        with pytest.raises(RateLimited):
            await limiter.check_request(token="1.abc", address="10.0.0.1")
    finally:
        await limiter.aclose()


async def test_with_redis_down_each_process_still_enforces_the_limits(
    redis_url: str, unused_tcp_port: int
) -> None:
    limits = Limits.from_settings(Settings(rate_limit_per_token="3/minute"))
    limiter = RateLimiter(limits, redis_url=f"redis://127.0.0.1:{unused_tcp_port}/0")
    try:
        for _ in range(3):
            await limiter.check_request(token="1.abc", address="10.0.0.1")
        assert not limiter.shared
        with pytest.raises(RateLimited) as refused:
            await limiter.check_request(token="1.abc", address="10.0.0.1")
        assert refused.value.retry_after_s >= 1
    finally:
        await limiter.aclose()


async def test_a_user_with_as_many_pending_orders_as_the_quota_gets_429(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _settings(tmp_path, redis_url, orders_in_flight_max=2)
    alice, bob = _accounts(settings)[:2]
    async for client in _client(create_app(settings)):  # no worker: orders stay pending
        for _ in range(2):
            placed = await client.post("/api/v1/orders", json=ORDER, headers=alice.headers)
            assert placed.status_code == 202
        refused = await client.post("/api/v1/orders", json=ORDER, headers=alice.headers)
        _assert_429(refused, "quota-exceeded")
        assert "pending" in refused.json()["detail"]
        ok = await client.post("/api/v1/orders", json=ORDER, headers=bob.headers)
        assert ok.status_code == 202


async def test_data_sync_is_for_administrators_within_their_quota(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _settings(tmp_path, redis_url, data_sync_jobs_in_flight_max=1)
    accounts = _accounts(settings)
    user, admin = accounts[0], accounts[-1]
    body = {"platform": "shopify", "limit": 2, "priority": 9}
    async for client in _client(create_app(settings)):
        refused = await client.post("/api/v1/data-sync/sync-batch", json=body, headers=user.headers)
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        first = await client.post("/api/v1/data-sync/sync-batch", json=body, headers=admin.headers)
        assert first.status_code == 202
        second = await client.post(
            "/api/v1/data-sync/sync-single-file",
            json={"file_id": 1, "priority": 9},
            headers=admin.headers,
        )
        _assert_429(second, "quota-exceeded")
