"""Bearer tokens: 401 problem+json without a valid one; a user sees only their own data."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from tasklab.embedded import EmbeddedRedis
from tasklab.service.app import create_app
from tasklab.service.domain import tokens
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.service.conftest import SEED, Account, make_settings, read_tokens

PROTECTED = [
    ("GET", "/api/v1/products"),
    ("GET", "/api/v1/products/1"),
    ("GET", "/api/v1/points"),
    ("GET", "/api/v1/points/history"),
    ("GET", "/api/v1/points/expiring"),
    ("GET", "/api/v1/orders"),
    ("GET", "/api/v1/orders/1"),
    ("POST", "/api/v1/orders/1/cancel"),
    ("POST", "/api/v1/orders"),
    ("GET", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/abc"),
    ("POST", "/api/v1/data-sync/sync-batch"),
    ("POST", "/api/v1/data-sync/sync-single-file"),
    ("GET", "/api/v1/data-sync/task-status/abc"),
]
ORDER = {"items": [{"product_id": 1, "quantity": 1}], "use_points": 0}


# The tests that write nothing share one seeded shop and one running app (an app's stop waits
# about a second for the console's first poll); the two that place orders have their own.
SHARED = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def shared_shop(
    tmp_path_factory: pytest.TempPathFactory, embedded_redis: EmbeddedRedis
) -> Settings:
    settings = make_settings(tmp_path_factory.mktemp("auth"), embedded_redis.url)
    seed(settings, **SEED)
    return settings


@pytest.fixture(scope="module")
def shared_accounts(shared_shop: Settings) -> list[Account]:
    return read_tokens(shared_shop.home_dir / "tokens.jsonl")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_client(shared_shop: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(shared_shop)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["status"] == 401


@SHARED
@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_api_endpoint_answers_401_without_a_token(
    shared_client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await shared_client.request(method, path, json=ORDER if method == "POST" else None)
    _assert_401(response)


@SHARED
async def test_wrong_malformed_and_other_users_tokens_are_refused(
    shared_client: httpx.AsyncClient, shared_accounts: list[Account]
) -> None:
    client = shared_client
    alice, bob = shared_accounts[0], shared_accounts[1]
    bob_secret = bob.token.split(".", 1)[1]
    bad = [
        "garbage",
        "1.",
        f"{alice.user_id}.wrong-secret",
        f"{alice.user_id}.{bob_secret}",
        "99999999999.x",
        f"{alice.user_id + 1000}.{bob_secret}",
        "x" * 500,
    ]
    for token in bad:
        _assert_401(
            await client.get("/api/v1/points", headers={"Authorization": f"Bearer {token}"})
        )
    _assert_401(
        await client.get("/api/v1/points", headers={"Authorization": f"Basic {alice.token}"})
    )


@SHARED
async def test_health_ready_openapi_and_docs_need_no_token(
    shared_client: httpx.AsyncClient,
) -> None:
    for path in ("/health", "/ready", "/openapi.json", "/docs"):
        assert (await shared_client.get(path)).status_code == 200, path


async def test_a_user_sees_only_their_own_orders_and_jobs(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    alice, bob = accounts[0], accounts[1]
    placed = (await client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    order_path = f"/api/v1/orders/{placed['order_id']}"
    job_paths = [
        f"/api/v1/jobs/{placed['job_id']}",
        f"/api/v1/data-sync/task-status/{placed['job_id']}",
    ]

    assert (await client.get(order_path, headers=alice.headers)).status_code == 200
    for path in (order_path, *job_paths):
        response = await client.get(path, headers=bob.headers)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
    assert (await client.get("/api/v1/orders", headers=bob.headers)).json()["total"] == 0
    assert (await client.get("/api/v1/jobs", headers=bob.headers)).json()["total"] == 0
    assert (await client.get("/api/v1/orders", headers=alice.headers)).json()["total"] == 1
    own_points = (await client.get("/api/v1/points", headers=bob.headers)).json()
    assert own_points["user_id"] == bob.user_id


async def test_the_admin_can_read_any_order_and_job(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    alice, admin = accounts[0], accounts[-1]
    assert admin.admin and not alice.admin
    placed = (await client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    order = await client.get(f"/api/v1/orders/{placed['order_id']}", headers=admin.headers)
    job = await client.get(f"/api/v1/jobs/{placed['job_id']}", headers=admin.headers)
    assert (order.status_code, job.status_code) == (200, 200)


def test_tokens_carry_the_user_id_and_only_the_secrets_hash_is_kept() -> None:
    token, stored = tokens.issue(42)
    user_id, secret = tokens.split(token) or (0, "")
    assert user_id == 42 and secret not in stored and len(stored) == 64
    assert tokens.matches(secret, stored)
    assert not tokens.matches(secret + "x", stored)
    assert tokens.split("abc.def") is None and tokens.split(f"{2**31}.x") is None
