"""Every path that names a resource, walked as user B with user A's ids: 404 everywhere (the
same answer as for an id that does not exist), for every method the path has. A new route
with an id parameter fails here until the walk knows whose ids it takes."""

from __future__ import annotations

import re

import httpx
from fastapi import FastAPI

from tests.service.conftest import Account

ORDER = {"items": [{"product_id": 1, "quantity": 1}], "use_points": 0}
# Ids that belong to nobody: anyone may read any product.
PUBLIC_PARAMETERS = {"product_id"}


def _templated_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every operation the schema documents with a path parameter."""
    return sorted(
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if "{" in path
        for method in operations
    )


async def test_user_b_gets_404_on_every_resource_of_user_a(
    app: FastAPI, client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    alice, bob = accounts[0], accounts[1]
    placed = (await client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    alices = {"order_id": placed["order_id"], "job_id": placed["job_id"]}
    walked = []
    for method, path in _templated_routes(app):
        names = set(re.findall(r"{(\w+)}", path))
        if names <= PUBLIC_PARAMETERS:
            continue
        assert names <= set(alices), f"{method} {path}: no id of user A for {names - set(alices)}"
        url = path.format(**alices)
        reply = await client.request(method, url, headers=bob.headers)
        assert reply.status_code == 404, f"{method} {url} as user B: {reply.status_code}"
        assert reply.headers["content-type"] == "application/problem+json"
        mine = await client.request(method, url, headers=alice.headers)
        assert mine.status_code != 404, f"{method} {url} as user A: {mine.status_code}"
        walked.append((method, path))
    # the walk saw the order, its cancel, the job and the job's data-sync view
    assert len(walked) >= 4, walked
