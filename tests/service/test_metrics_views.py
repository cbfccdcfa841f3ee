from __future__ import annotations

import time

import httpx
import psutil

from tests.service.conftest import Account


async def test_the_metrics_views_answer_an_admin(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    admin = accounts[-1]
    assert admin.admin
    await client.get("/api/v1/products", headers=admin.headers)  # some traffic to report
    system = (await client.get("/api/v1/metrics/system", headers=admin.headers)).json()
    assert system["cpu"]["count"] == psutil.cpu_count()
    assert system["memory"]["total_bytes"] == psutil.virtual_memory().total
    host_age_s = time.time() - psutil.boot_time()
    assert host_age_s - 5 <= system["uptime_s"] <= host_age_s + 0.1
    database = (await client.get("/api/v1/metrics/database", headers=admin.headers)).json()
    assert database["query_count"] > 0
    application = await client.get("/api/v1/metrics/application", headers=admin.headers)
    assert application.status_code == 200 and application.json()


async def test_the_metrics_views_refuse_other_users(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    user = accounts[0]
    assert not user.admin
    for view in ("system", "database", "application"):
        response = await client.get(f"/api/v1/metrics/{view}", headers=user.headers)
        assert response.status_code == 403
        assert response.headers["content-type"].startswith("application/problem+json")
        assert (await client.get(f"/api/v1/metrics/{view}")).status_code == 401
