"""Bad input of every class answers 4xx application/problem+json naming the field at fault,
never 5xx, and writes nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tasklab.embedded import EmbeddedRedis
from tasklab.jobs.records import jobs as jobs_table
from tasklab.service.app import create_app
from tasklab.service.domain.models import Order, OrderItem
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.service.conftest import SEED, Account, count_rows, make_settings, read_tokens

# No case writes (each checks it), so the module's cases share one seeded shop and one app:
# an app's start and stop cost about a second, its requests milliseconds.
pytestmark = pytest.mark.asyncio(loop_scope="module")
LINE = {"product_id": 1, "quantity": 1}


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    field: str | None = None
    method: str = "POST"
    path: str = "/api/v1/orders"
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def _order(**changes: Any) -> dict[str, Any]:
    return {"items": [LINE], "use_points": 0, **changes}


CASES = [
    # missing and extra fields
    Case("missing items", 422, "items", json={"use_points": 0}),
    Case("missing quantity", 422, "items.0.quantity", json=_order(items=[{"product_id": 1}])),
    Case("extra top-level field", 422, "coupon", json=_order(coupon="FREE")),
    Case("extra line field", 422, "items.0.colour", json=_order(items=[{**LINE, "colour": 1}])),
    # wrong types
    Case(
        "quantity as a string",
        422,
        "items.0.quantity",
        json=_order(items=[{"product_id": 1, "quantity": "2"}]),
    ),
    Case(
        "product id as a float",
        422,
        "items.0.product_id",
        json=_order(items=[{"product_id": 1.5, "quantity": 1}]),
    ),
    Case(
        "quantity as a boolean",
        422,
        "items.0.quantity",
        json=_order(items=[{"product_id": 1, "quantity": True}]),
    ),
    Case("items as a string", 422, "items", json=_order(items="abc")),
    Case("items as null", 422, "items", json=_order(items=None)),
    Case("use_points as a string", 422, "use_points", json=_order(use_points="10")),
    Case("a JSON array body", 422, "body", json=[LINE]),
    # out of range
    Case(
        "negative quantity",
        422,
        "items.0.quantity",
        json=_order(items=[{"product_id": 1, "quantity": -1}]),
    ),
    Case(
        "zero quantity",
        422,
        "items.0.quantity",
        json=_order(items=[{"product_id": 1, "quantity": 0}]),
    ),
    Case(
        "huge quantity",
        422,
        "items.0.quantity",
        json=_order(items=[{"product_id": 1, "quantity": 10**6}]),
    ),
    Case(
        "64-bit overflowing quantity",
        422,
        "items.0.quantity",
        json=_order(items=[{"product_id": 1, "quantity": 2**70}]),
    ),
    Case(
        "64-bit overflowing product id",
        422,
        "items.0.product_id",
        json=_order(items=[{"product_id": 2**63, "quantity": 1}]),
    ),
    Case("negative use_points", 422, "use_points", json=_order(use_points=-5)),
    Case("absurd use_points", 422, "use_points", json=_order(use_points=10**12)),
    Case("empty item list", 422, "items", json=_order(items=[])),
    Case("101 items", 422, "items", json=_order(items=[LINE] * 101)),
    Case("10,000 items", 413, json=_order(items=[LINE] * 10_000)),
    # refers to something impossible
    Case(
        "unknown product",
        422,
        "items.0.product_id",
        json=_order(items=[LINE, {"product_id": 999_999, "quantity": 1}][::-1]),
    ),
    Case("more points than the order costs", 422, "use_points", json=_order(use_points=10**8)),
    # not JSON, too large
    Case(
        "non-JSON body",
        400,
        "body",
        content=b"{items: [}",
        headers={"content-type": "application/json"},
    ),
    Case("text/plain body", 415, content=b"items=1", headers={"content-type": "text/plain"}),
    Case("no content type", 415, content=b'{"items": []}'),
    Case(
        "1 MB body",
        413,
        content=b"[" + b"1," * 500_000 + b"1]",
        headers={"content-type": "application/json"},
    ),
    Case(
        "idempotency key too long",
        422,
        "Idempotency-Key",
        json=_order(),
        headers={"Idempotency-Key": "k" * 129},
    ),
    # query and path parameters
    Case("page_size 10^9", 422, "page_size", "GET", "/api/v1/products?page_size=1000000000"),
    Case("page 0", 422, "page", "GET", "/api/v1/orders?page=0"),
    Case("page not a number", 422, "page", "GET", "/api/v1/points/history?page=two"),
    Case("unknown sort", 422, "sort", "GET", "/api/v1/products?sort=stock;drop"),
    Case("unknown status filter", 422, "status", "GET", "/api/v1/orders?status=lost"),
    Case("zero days", 422, "days", "GET", "/api/v1/points/expiring?days=0"),
    Case("product id 0", 422, "product_id", "GET", "/api/v1/products/0"),
    Case("product id beyond 32 bits", 422, "product_id", "GET", f"/api/v1/products/{2**40}"),
    Case("product id not a number", 422, "product_id", "GET", "/api/v1/products/abc"),
    Case("unknown product id", 404, method="GET", path="/api/v1/products/999999"),
    Case("unknown order id", 404, method="GET", path="/api/v1/orders/999999"),
    Case("unknown job id", 404, method="GET", path="/api/v1/jobs/0123456789abcdef"),
    Case("job id with odd characters", 422, "job_id", "GET", "/api/v1/jobs/a%00b"),
    Case("unknown route", 404, method="GET", path="/api/v1/nothing"),
    Case("wrong method", 405, method="DELETE", path="/api/v1/orders"),
    # data sync
    Case(
        "sync priority 10",
        422,
        "priority",
        path="/api/v1/data-sync/sync-batch",
        json={"platform": "shopify", "limit": 1, "priority": 10},
    ),
    Case(
        "sync limit 0",
        422,
        "limit",
        path="/api/v1/data-sync/sync-batch",
        json={"platform": "shopify", "limit": 0, "priority": 1},
    ),
    Case(
        "sync platform with odd characters",
        422,
        "platform",
        path="/api/v1/data-sync/sync-batch",
        json={"platform": "../etc", "limit": 1},
    ),
    Case(
        "sync of an unknown platform",
        422,
        "platform",
        path="/api/v1/data-sync/sync-batch",
        json={"platform": "nowhere", "limit": 1},
    ),
    Case(
        "sync of an unknown file",
        404,
        path="/api/v1/data-sync/sync-single-file",
        json={"file_id": 999_999},
    ),
    Case(
        "sync file without id",
        422,
        "file_id",
        path="/api/v1/data-sync/sync-single-file",
        json={"priority": 1},
    ),
]


@pytest.fixture(scope="module")
def shop_settings(
    tmp_path_factory: pytest.TempPathFactory, embedded_redis: EmbeddedRedis
) -> Settings:
    settings = make_settings(tmp_path_factory.mktemp("bad-input"), embedded_redis.url)
    seed(settings, **SEED)
    return settings


@pytest.fixture(scope="module")
def accounts(shop_settings: Settings) -> list[Account]:
    return read_tokens(shop_settings.home_dir / "tokens.jsonl")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(shop_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(shop_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


@pytest.fixture
def nothing_written(shop_settings: Settings) -> Iterator[None]:
    before = [count_rows(shop_settings, t) for t in (Order, OrderItem, jobs_table)]
    yield
    assert [count_rows(shop_settings, t) for t in (Order, OrderItem, jobs_table)] == before


def _caller(accounts: list[Account], path: str) -> Account:
    """Data sync is for administrators (the last account); the rest for a plain user."""
    return accounts[-1] if path.startswith("/api/v1/data-sync/") else accounts[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_bad_input_is_a_4xx_problem_naming_the_field_and_writes_nothing(
    client: httpx.AsyncClient, accounts: list[Account], case: Case, nothing_written: None
) -> None:
    response = await client.request(
        case.method,
        case.path,
        json=case.json,
        content=case.content,
        headers={**_caller(accounts, case.path).headers, **case.headers},
    )
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == case.status and problem["title"] and problem["detail"]
    assert problem["type"].startswith("urn:tasklab:problem:")
    if case.field is not None:
        assert case.field in [e["field"] for e in problem["errors"]], problem


async def test_a_chunked_body_growing_past_the_limit_is_a_413(
    client: httpx.AsyncClient, accounts: list[Account], nothing_written: None
) -> None:
    async def chunks() -> Any:
        for _ in range(100):
            yield b" " * 4096

    response = await client.post(
        "/api/v1/orders",
        content=chunks(),
        headers={**accounts[0].headers, "content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
