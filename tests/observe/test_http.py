"""The HTTP middleware and the /metrics route, on a tiny app of the test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY

from tasklab.observe.http import PROCESS_TIME_HEADER, install
from tasklab.observe.metrics import QUEUE_DEPTH, WORKERS_UP
from tasklab.settings import Settings


def requests_count(method: str, route: str, status: str) -> float:
    value = REGISTRY.get_sample_value(
        "tasklab_http_requests_total", {"method": method, "route": route, "status": status}
    )
    return value or 0.0


def duration_count(method: str, route: str) -> float:
    value = REGISTRY.get_sample_value(
        "tasklab_http_request_duration_seconds_count", {"method": method, "route": route}
    )
    return value or 0.0


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    app = FastAPI()
    orders = APIRouter(prefix="/api/v1/orders")

    @orders.get("/{order_id}")
    async def get_order(order_id: int) -> dict[str, int]:
        return {"id": order_id}

    @orders.post("/{order_id}/fail")
    async def fail(order_id: int) -> None:
        raise RuntimeError("boom")

    app.include_router(orders)
    sub = FastAPI()

    @sub.get("/items/{item_id}")
    def get_item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    app.mount("/sub", sub)
    install(app, Settings(home_dir=tmp_path / ".tasklab"))
    return app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_responses_carry_the_process_time_in_seconds(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/orders/7")

    assert response.status_code == 200
    seconds = float(response.headers[PROCESS_TIME_HEADER])
    assert 0 <= seconds < 5
    assert len(response.headers[PROCESS_TIME_HEADER].split(".")[1]) == 4


async def test_requests_are_labelled_by_route_template_not_raw_path(
    client: httpx.AsyncClient,
) -> None:
    route = "/api/v1/orders/{order_id}"
    before = requests_count("GET", route, "200")
    durations_before = duration_count("GET", route)

    for order_id in (1, 2, 3):
        await client.get(f"/api/v1/orders/{order_id}")

    assert requests_count("GET", route, "200") == before + 3
    assert duration_count("GET", route) == durations_before + 3
    assert (
        REGISTRY.get_sample_value(
            "tasklab_http_requests_total",
            {"method": "GET", "route": "/api/v1/orders/1", "status": "200"},
        )
        is None
    )


async def test_mounted_apps_get_their_prefix_in_the_template(client: httpx.AsyncClient) -> None:
    before = requests_count("GET", "/sub/items/{item_id}", "200")

    await client.get("/sub/items/abc")

    assert requests_count("GET", "/sub/items/{item_id}", "200") == before + 1


async def test_paths_no_route_matches_are_counted_as_unmatched(client: httpx.AsyncClient) -> None:
    before = requests_count("GET", "unmatched", "404")

    response = await client.get("/no/such/path/42")

    assert response.status_code == 404
    assert PROCESS_TIME_HEADER in response.headers
    assert requests_count("GET", "unmatched", "404") == before + 1


async def test_unknown_methods_share_one_label(client: httpx.AsyncClient) -> None:
    route = "/api/v1/orders/{order_id}"
    before = requests_count("OTHER", route, "405")

    response = await client.request("BREW", "/api/v1/orders/1")

    assert response.status_code == 405
    assert requests_count("OTHER", route, "405") == before + 1
    assert (
        REGISTRY.get_sample_value(
            "tasklab_http_requests_total", {"method": "BREW", "route": route, "status": "405"}
        )
        is None
    )


async def test_an_exception_in_the_app_is_counted_as_a_500(client: httpx.AsyncClient) -> None:
    route = "/api/v1/orders/{order_id}/fail"
    before = requests_count("POST", route, "500")

    response = await client.post("/api/v1/orders/1/fail")

    assert response.status_code == 500
    assert requests_count("POST", route, "500") == before + 1
    assert REGISTRY.get_sample_value("tasklab_http_requests_in_progress", {"method": "POST"}) == 0


async def test_metrics_route_serves_http_metrics_but_not_the_exporters_gauges(
    client: httpx.AsyncClient,
) -> None:
    QUEUE_DEPTH.labels("default").set(3)
    WORKERS_UP.set(2)
    await client.get("/api/v1/orders/1")

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert (
        'tasklab_http_requests_total{method="GET",route="/api/v1/orders/{order_id}"'
        in response.text
    )
    assert "process_resident_memory_bytes" in response.text
    assert "tasklab_queue_depth" not in response.text
    assert "tasklab_workers_up" not in response.text
