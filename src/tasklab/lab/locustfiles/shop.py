"""Locust users for the reference service (``tasklab load`` runs this file headless).

Usable on its own too::

    locust -f src/tasklab/lab/locustfiles/shop.py --host http://127.0.0.1:8000 \\
        --tokens-file .tasklab/tokens.jsonl ShopUser OrderUser SyncUser

- ``ShopUser``: the seed-004 mix — balance 50, history 30, expiring 20, order 10 (task
  weights; as shares of requests: 45 %, 27 %, 18 %, 9 %), short think times.
- ``OrderUser``: orders only, no think time: the high-load writer.
- ``CatalogUser``: catalog reads only (listing pages and product details), no think time;
- ``SyncUser``: the data-sync flow — submit a batch, poll its status until it is done;
  the whole flow is reported as its own entry (``sync flow``, submit to done).

Every user takes one token of the tokens file (``tasklab seed``: JSON lines with ``user_id``
and ``token``), round robin. Failures are named by reason (``HTTP 503``, ``job DEAD``...).
This file imports nothing from tasklab: it runs wherever Locust does.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

from locust import FastHttpUser, between, constant, events, task

FINAL = ("SUCCEEDED", "DEAD", "CANCELLED")
PLATFORMS = ("shopify", "amazon", "etsy")
SORTS = ("id", "price", "-price", "name", "-name")
_tokens: list[str] = []
_admin_tokens: list[str] = []
_next_token = itertools.count()
_lock = threading.Lock()


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    parser.add_argument("--tokens-file", default="", help="JSON lines {user_id, token}.")
    parser.add_argument("--use-points", type=int, default=1, help="Points spent per order.")
    parser.add_argument("--poll-interval-s", type=float, default=0.2)
    parser.add_argument("--poll-timeout-s", type=float, default=20.0)


def _token(path: str, *, admin: bool = False) -> str:
    """A user's token, round robin; an administrator's for data sync (admin-only)."""
    with _lock:
        if not _tokens:
            with open(path) as f:
                items = [json.loads(line) for line in f if line.strip()]
            _tokens.extend(str(i["token"]) for i in items if not i.get("admin"))
            _admin_tokens.extend(str(i["token"]) for i in items if i.get("admin"))
        found = _admin_tokens if admin else _tokens
        if not found:
            raise RuntimeError(f"no {'admin' if admin else 'user'} tokens in {path}")
        return found[next(_next_token) % len(found)]


class _ShopClient(FastHttpUser):
    abstract = True
    admin = False
    headers: dict[str, str] = {}
    product_ids: list[int] = [1]

    def on_start(self) -> None:
        options = self.environment.parsed_options
        token = _token(options.tokens_file, admin=self.admin)
        self.headers = {"Authorization": f"Bearer {token}"}
        reply = self.client.get(
            "/api/v1/products?page_size=100", headers=self.headers, name="products (setup)"
        )
        if reply.status_code == 200:
            self.product_ids = [int(p["id"]) for p in reply.json()["items"]] or [1]

    def get_json(self, path: str, name: str) -> None:
        with self.client.get(path, headers=self.headers, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")

    def place_order(self) -> None:
        i = next(_next_token)
        body = {
            "items": [{"product_id": self.product_ids[i % len(self.product_ids)], "quantity": 1}],
            "use_points": self.environment.parsed_options.use_points,
        }
        with self.client.post(
            "/api/v1/orders", json=body, headers=self.headers, name="order", catch_response=True
        ) as r:
            if r.status_code != 202:
                r.failure(f"HTTP {r.status_code}")


class ShopUser(_ShopClient):
    weight = 6
    wait_time = between(0.01, 0.05)

    @task(5)
    def points(self) -> None:
        self.get_json("/api/v1/points", "points")

    @task(3)
    def history(self) -> None:
        self.get_json("/api/v1/points/history", "history")

    @task(2)
    def expiring(self) -> None:
        self.get_json("/api/v1/points/expiring?days=7", "expiring")

    @task(1)
    def order(self) -> None:
        self.place_order()


class OrderUser(_ShopClient):
    weight = 2
    wait_time = constant(0)

    @task
    def order(self) -> None:
        self.place_order()


class PointsUser(_ShopClient):
    """Balance reads as fast as the server answers (the service's read target)."""

    weight = 2
    wait_time = constant(0)

    @task
    def points(self) -> None:
        self.get_json("/api/v1/points", "points")


class CatalogUser(_ShopClient):
    """Catalog reads at full speed: canonical listing pages (20 a page, up to the first three
    pages of each sort) and product details, the traffic the catalog cache is for."""

    weight = 4
    wait_time = constant(0)
    pages = 1

    def on_start(self) -> None:
        super().on_start()
        # the first three pages that exist (an empty page is never cached)
        self.pages = max(1, min(3, -(-len(self.product_ids) // 20)))

    @task(3)
    def products(self) -> None:
        i = next(_next_token)
        sort = SORTS[i % len(SORTS)]
        page = 1 + i % self.pages
        self.get_json(f"/api/v1/products?page_size=20&page={page}&sort={sort}", "products")

    @task(5)
    def product(self) -> None:
        product_id = self.product_ids[next(_next_token) % len(self.product_ids)]
        self.get_json(f"/api/v1/products/{product_id}", "product")


class SyncUser(_ShopClient):
    weight = 1
    admin = True  # data sync is for administrators
    wait_time = between(0.5, 1.0)

    @task
    def sync_flow(self) -> None:
        options = self.environment.parsed_options
        started = time.perf_counter()
        platform = PLATFORMS[next(_next_token) % len(PLATFORMS)]
        with self.client.post(
            "/api/v1/data-sync/sync-batch",
            json={"platform": platform, "limit": 4, "priority": 5},
            headers=self.headers,
            name="sync-batch",
            catch_response=True,
        ) as r:
            if r.status_code != 202:
                r.failure(f"HTTP {r.status_code}")
                return
            job_id = r.json()["job_id"]
        status = self.poll(job_id, options.poll_interval_s, options.poll_timeout_s)
        events.request.fire(  # type: ignore[no-untyped-call]
            request_type="FLOW",
            name="sync flow",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=None if status == "SUCCEEDED" else RuntimeError(f"job {status}"),
            context={},
        )

    def poll(self, job_id: str, interval_s: float, timeout_s: float) -> str:
        """The job's status once final (or ``not done`` after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.client.get(
                f"/api/v1/data-sync/task-status/{job_id}",
                headers=self.headers,
                name="task-status",
                catch_response=True,
            ) as r:
                if r.status_code != 200:
                    r.failure(f"HTTP {r.status_code}")
                    return f"HTTP {r.status_code}"
                status = str(r.json()["status"])
            if status in FINAL:
                return status
            time.sleep(interval_s)
        return "not done"
