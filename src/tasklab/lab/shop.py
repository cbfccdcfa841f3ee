"""The reference service as the lab runs it: seeded data, the API in a subprocess, the orders'
ledger and the service's invariants.

The service itself (``tasklab.service``) is used as it is: ``seed`` and ``check_invariants``
are its domain functions, the API is ``tasklab api`` in a child process (uvicorn), so a drill
can SIGKILL it like any crash would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy as sa
from sqlalchemy import Engine

from tasklab.embedded import free_port
from tasklab.lab.errors import LabError
from tasklab.processes import die_with_parent, kill_tree
from tasklab.settings import Settings, to_env
from tasklab.supervisor import child_env, tasklab_argv

API_START_TIMEOUT_S = 60.0
API_STOP_TIMEOUT_S = 10.0
POLL_S = 0.1


@dataclass(frozen=True)
class ShopSizes:
    """What ``seed`` creates for a lab run: stock and points plenty, so that orders are paid
    unless a run wants them rejected."""

    users: int = 50
    products: int = 20
    stock: int = 1_000_000
    points: int = 1_000_000


@dataclass(frozen=True)
class Account:
    user_id: int
    token: str
    admin: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def seed_shop(settings: Settings, sizes: ShopSizes) -> Path:
    """Migrate and seed the service's data; return the tokens file (one JSON line per user)."""
    from tasklab.service.domain.seed import seed

    report = seed(
        settings,
        users=sizes.users,
        products=sizes.products,
        stock=sizes.stock,
        points=sizes.points,
        tokens_out=settings.home_dir / "tokens.jsonl",
    )
    return report.tokens_out


def unlimited(settings: Settings) -> Settings:
    """The settings with the API's rate limits off and its per-user order quota out of reach
    (for the lab's own load runs: a load test whose workers fall behind would otherwise
    measure the quota's 429s)."""
    return settings.model_copy(
        update={"rate_limits_enabled": False, "orders_in_flight_max": 1_000_000_000}
    )


def read_admin(path: Path) -> Account:
    """The administrator of a tokens file (data sync is for administrators)."""
    for line in Path(path).read_text().splitlines():
        item = json.loads(line) if line.strip() else {}
        if item.get("admin"):
            return Account(int(item["user_id"]), str(item["token"]), True)
    raise LabError(f"{path} has no administrator's token; run `tasklab seed`")


def read_tokens(path: Path) -> list[Account]:
    """The users of a tokens file (``{"user_id", "token"}`` per line), admins left out."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise LabError(f"cannot read the tokens file {path}: {e}") from e
    accounts = []
    for line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            account = Account(int(item["user_id"]), str(item["token"]), bool(item.get("admin")))
        except (ValueError, KeyError, TypeError) as e:
            raise LabError(f"{path}: not a tokens line ({e}): {line[:80]!r}") from e
        if not account.admin:
            accounts.append(account)
    if not accounts:
        raise LabError(f"{path} has no (non-admin) user tokens; run `tasklab seed`")
    return accounts


def product_ids(engine: Engine) -> list[int]:
    from tasklab.service.domain.models import Product

    with engine.connect() as conn:
        return [int(i) for i in conn.execute(sa.select(Product.id).order_by(Product.id)).scalars()]


def invariant_violations(settings: Settings, *, pending_threshold_s: float) -> list[str]:
    """The service's ``check_invariants`` on the run's database."""
    from tasklab.service.domain.invariants import check_invariants

    return check_invariants(settings, pending_threshold_s=pending_threshold_s)


# --- orders -----------------------------------------------------------------------------------


def pending_orders(engine: Engine, order_ids: Sequence[int] | None = None) -> int:
    """Orders still ``pending`` (of ``order_ids``, or all)."""
    from tasklab.service.domain.models import Order, OrderStatus

    stmt = (
        sa.select(sa.func.count())
        .select_from(Order)
        .where(Order.status == OrderStatus.PENDING.value)
    )
    if order_ids is None:
        with engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())
    total = 0
    with engine.connect() as conn:
        for chunk in _chunks(list(order_ids)):
            total += int(conn.execute(stmt.where(Order.id.in_(chunk))).scalar_one())
    return total


def wait_orders_settled(
    engine: Engine,
    *,
    order_ids: Sequence[int] | None = None,
    timeout_s: float,
    max_s: float = 900.0,
) -> int:
    """Poll until no order (of ``order_ids``) is pending; returns how many still are. Gives
    up once no order settled for ``timeout_s`` (a backlog that is still shrinking is waited
    for: a burst the API took faster than the workers settle it), or after ``max_s``."""
    now = time.monotonic()
    deadline, give_up = now + timeout_s, now + max_s
    left = pending_orders(engine, order_ids)
    while left and time.monotonic() < min(deadline, give_up):
        time.sleep(POLL_S * 2)
        before, left = left, pending_orders(engine, order_ids)
        if left < before:
            deadline = time.monotonic() + timeout_s
    return left


def order_outcomes(engine: Engine) -> dict[str, float]:
    """Every order of the run by status, rejections by reason."""
    from tasklab.service.domain.models import Order

    stmt = sa.select(Order.status, Order.reason, sa.func.count()).group_by(
        Order.status, Order.reason
    )
    out: dict[str, float] = {"orders": 0.0}
    with engine.connect() as conn:
        for status, reason, n in conn.execute(stmt):
            out["orders"] += n
            out[f"orders_{status}"] = out.get(f"orders_{status}", 0.0) + n
            if reason:
                out[f"orders_rejected_{reason}"] = float(n)
    return out


@dataclass(frozen=True)
class OrderLedger:
    """Where the accepted orders ended, from SQL: their settlement jobs and ledger rows."""

    accepted: int
    succeeded: int  # settlement job SUCCEEDED: the order is paid or rejected
    dead: int
    cancelled: int
    lost: int  # still pending, or its job missing or not final, after the wait
    retried: int  # settlement jobs that took more than one attempt
    effects: int  # points-ledger rows written by the orders (one per paid order)
    duplicate_effects: int  # ledger rows beyond the first, per order
    paid: int
    rejected: int

    def figures(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def order_ledger(engine: Engine, order_ids: Sequence[int]) -> OrderLedger:
    from tasklab.jobs.records import FINAL, JobStatus
    from tasklab.service.domain.models import OrderStatus

    orders = _orders(engine, order_ids)
    per_order = _ledger_rows(engine, order_ids)
    job_rows = _job_rows(engine, [j for _, j in orders.values() if j])
    job_status = [job_rows.get(job_id or "", ("missing", 0))[0] for _, job_id in orders.values()]
    order_status = [status for status, _ in orders.values()]
    final = {s.value for s in FINAL}
    unsettled = sum(
        1
        for status, job in zip(order_status, job_status, strict=True)
        if status == OrderStatus.PENDING.value or job not in final
    )
    return OrderLedger(
        accepted=len(order_ids),
        succeeded=job_status.count(JobStatus.SUCCEEDED.value),
        dead=job_status.count(JobStatus.DEAD.value),
        cancelled=job_status.count(JobStatus.CANCELLED.value),
        lost=len(order_ids) - len(orders) + unsettled,
        retried=sum(1 for _, attempt in job_rows.values() if attempt > 1),
        effects=sum(per_order.values()),
        duplicate_effects=sum(max(0, n - 1) for n in per_order.values()),
        paid=order_status.count(OrderStatus.PAID.value),
        rejected=order_status.count(OrderStatus.REJECTED.value),
    )


def _orders(engine: Engine, order_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
    """order id -> (status, settlement job id)."""
    from tasklab.service.domain.models import Order

    out: dict[int, tuple[str, str | None]] = {}
    with engine.connect() as conn:
        for chunk in _chunks(list(order_ids)):
            stmt = sa.select(Order.id, Order.status, Order.job_id).where(Order.id.in_(chunk))
            out.update({int(r.id): (str(r.status), r.job_id) for r in conn.execute(stmt)})
    return out


def _ledger_rows(engine: Engine, order_ids: Sequence[int]) -> dict[int, int]:
    """order id -> points-ledger rows written for it."""
    from tasklab.service.domain.models import LedgerEntry

    out: dict[int, int] = {}
    with engine.connect() as conn:
        for chunk in _chunks(list(order_ids)):
            stmt = (
                sa.select(LedgerEntry.order_id, sa.func.count())
                .where(LedgerEntry.order_id.in_(chunk))
                .group_by(LedgerEntry.order_id)
            )
            out.update({int(oid or 0): int(n) for oid, n in conn.execute(stmt)})
    return out


def _job_rows(engine: Engine, job_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """job id -> (status, attempt)."""
    from tasklab.jobs.records import jobs

    out: dict[str, tuple[str, int]] = {}
    with engine.connect() as conn:
        for chunk in _chunks(list(job_ids)):
            stmt = sa.select(jobs.c.id, jobs.c.status, jobs.c.attempt).where(jobs.c.id.in_(chunk))
            out.update({str(r.id): (str(r.status), int(r.attempt)) for r in conn.execute(stmt)})
    return out


def _chunks(items: list[Any], size: int = 500) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# --- the API process --------------------------------------------------------------------------


class ApiProcess:
    """``tasklab api`` (uvicorn) on 127.0.0.1, logging to a file."""

    def __init__(
        self, settings: Settings, *, log_path: Path, port: int | None = None, workers: int = 1
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.port = port or free_port()
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = API_START_TIMEOUT_S) -> str:
        """Start it and wait until ``/health`` answers (the lifespan has run); returns the URL."""
        argv = tasklab_argv(
            "api", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                env=child_env(to_env(self.settings)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self._wait_healthy(timeout_s)
        return self.url

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    raise LabError(f"the API exited at start:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(POLL_S)
        self.stop()
        raise LabError(f"the API did not answer /health in {timeout_s:.0f} s:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no lifespan exit, local jobs cut short."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        if self.process is not None:
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            kill_tree(self.process.pid, timeout_s=API_STOP_TIMEOUT_S)
            self.process.wait()
            self.process = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# --- a client placing orders ------------------------------------------------------------------


@dataclass(frozen=True)
class OrderRequest:
    key: str  # its Idempotency-Key: a retry with it returns the same order
    account: Account
    body: dict[str, Any]


class OrderClient:
    """Places orders on the API from a few threads, one ``Idempotency-Key`` per order, as a
    careful client would: a request that got no answer (or a 5xx) is kept, to be sent again
    with the same key (``retry``), which returns the order if the first attempt created it."""

    def __init__(
        self,
        url: str,
        accounts: Sequence[Account],
        products: Sequence[int],
        *,
        threads: int = 4,
        use_points: int = 1,
        timeout_s: float = 5.0,
    ) -> None:
        if not accounts or not products:
            raise LabError("placing orders needs seeded users and products")
        self.url = url.rstrip("/")
        self.accounts = list(accounts)
        self.products = list(products)
        self.threads = threads
        self.use_points = use_points
        self.timeout_s = timeout_s
        self.accepted: dict[str, dict[str, Any]] = {}  # key -> the 202 body
        self.unanswered: dict[str, OrderRequest] = {}
        self.refused: dict[str, int] = {}  # 4xx answers by status: the request was wrong
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self._workers = [
            threading.Thread(target=self._loop, name=f"lab-orders-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for t in self._workers:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=self.timeout_s + 1)
        self._workers = []

    def _loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as http:
            while not self._stop.is_set():
                self.send(http, self._next())

    def _next(self) -> OrderRequest:
        with self._lock:
            n = self.sent
            self.sent += 1
        product = self.products[n % len(self.products)]
        body = {"items": [{"product_id": product, "quantity": 1}], "use_points": self.use_points}
        return OrderRequest(uuid.uuid4().hex, self.accounts[n % len(self.accounts)], body)

    def send(self, http: httpx.Client, request: OrderRequest) -> bool:
        headers = {**request.account.headers, "Idempotency-Key": request.key}
        try:
            reply = http.post("/api/v1/orders", json=request.body, headers=headers)
        except httpx.TransportError:
            reply = None
        with self._lock:
            if reply is not None and reply.status_code == 202:
                self.accepted[request.key] = reply.json()
                self.unanswered.pop(request.key, None)
                return True
            if reply is None or reply.status_code >= 500:
                self.unanswered[request.key] = request
            else:
                status = f"HTTP {reply.status_code}"
                self.refused[status] = self.refused.get(status, 0) + 1
        return False

    def retry(self, *, timeout_s: float) -> int:
        """Send every unanswered request again (same key, same body) until each is accepted
        or ``timeout_s`` passes; returns how many were accepted on a retry."""
        deadline = time.monotonic() + timeout_s
        recovered = 0
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as http:
            while self.unanswered and time.monotonic() < deadline:
                for request in list(self.unanswered.values()):
                    recovered += self.send(http, request)
                if self.unanswered:
                    time.sleep(POLL_S)
        return recovered

    def sync_batches(self, count: int, *, admin: Account, platform: str = "shopify") -> list[str]:
        """Start ``count`` data-sync jobs (slower than an order: a few files parsed) as the
        ``admin`` (data sync is for administrators); their job ids."""
        ids = []
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as http:
            for _ in range(count):
                account = admin
                reply = http.post(
                    "/api/v1/data-sync/sync-batch",
                    json={"platform": platform, "limit": 4, "priority": 5},
                    headers=account.headers,
                )
                if reply.status_code == 202:
                    ids.append(str(reply.json()["job_id"]))
        return ids

    def order_ids(self) -> list[int]:
        with self._lock:
            return sorted({int(body["order_id"]) for body in self.accepted.values()})

    def job_ids(self) -> list[str]:
        with self._lock:
            return [str(b["job_id"]) for b in self.accepted.values() if b.get("job_id")]
