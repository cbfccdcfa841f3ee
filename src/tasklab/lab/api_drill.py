"""The ``api`` drill: the reference API is SIGKILLed while its local fallback runs orders.

1. The shop is seeded; the broker is stopped (or its link cut, ``Drill.fault``); ``tasklab
   api`` starts anyway (degraded): each order is recorded, its settlement job fails to
   publish and runs in the API's local executor (``via=local``), or waits in SQL when that
   executor is busy (it is kept small, ``api_local_workers``/``api_local_queue_max``, so that
   both happen).
2. A few client threads place orders (one ``Idempotency-Key`` each) and start data-sync jobs;
   once ``api_orders`` were accepted and a job runs locally, the API is SIGKILLed.
3. The broker restarts (empty, same port; or its link heals), a worker starts (its reaper
   with it), the API starts again; the client sends every request that got no answer (or a
   5xx) again, same key.
4. The reaper re-queues the jobs the dead API held (lease expired) and publishes the ones
   waiting in SQL; every accepted order must end ``paid`` or ``rejected``, once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Engine

from tasklab.lab.faults import BrokerCut, running_jobs, wait_for
from tasklab.lab.harness import LabStack
from tasklab.lab.progress import phase
from tasklab.lab.shop import (
    ApiProcess,
    OrderClient,
    ShopSizes,
    invariant_violations,
    order_ledger,
    product_ids,
    read_admin,
    read_tokens,
    seed_shop,
    wait_orders_settled,
)

if TYPE_CHECKING:  # drill.py imports this module (lazily); no import back at run time
    from tasklab.lab.drill import Drill

LOCAL_START_WAIT_S = 5.0  # how long the kill waits for a job to be running locally


def job_states(engine: Engine, ids: list[str]) -> dict[str, tuple[str, str, float | None]]:
    """id -> (status, via, finished_at)."""
    from tasklab.jobs.records import jobs

    out: dict[str, tuple[str, str, float | None]] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), 500):
            stmt = sa.select(jobs.c.id, jobs.c.status, jobs.c.via, jobs.c.finished_at).where(
                jobs.c.id.in_(ids[start : start + 500])
            )
            out.update({str(r.id): (r.status, r.via, r.finished_at) for r in conn.execute(stmt)})
    return out


def unfinished(engine: Engine) -> dict[str, int]:
    """Jobs not final, by status (what a crash now would interrupt)."""
    from tasklab.jobs.records import FINAL, jobs

    stmt = (
        sa.select(jobs.c.status, sa.func.count())
        .where(jobs.c.status.not_in([s.value for s in FINAL]))
        .group_by(jobs.c.status)
    )
    with engine.connect() as conn:
        return {str(s): int(n) for s, n in conn.execute(stmt)}


class ApiDrill:
    def __init__(self, drill: Drill, stack: LabStack) -> None:
        self.drill = drill
        self.stack = stack
        self.sizes = drill.sizes
        self.engine = stack.jobs.engine
        api_settings = stack.settings.model_copy(
            update={
                "local_workers": self.sizes.api_local_workers,
                "local_queue_max": self.sizes.api_local_queue_max,
            }
        )
        self.api = ApiProcess(
            api_settings, log_path=stack.lab_dir / "logs" / f"api-{stack.run_id}.log"
        )

    def run(self) -> dict[str, float]:
        cut = BrokerCut(self.stack, self.drill.fault)
        shop = ShopSizes(users=self.sizes.api_users, products=5)
        tokens = seed_shop(self.stack.settings, shop)
        accounts, self.admin = read_tokens(tokens), read_admin(tokens)
        cut.cut()  # the API's first life: no broker at all
        try:
            self.api.start()
            client = OrderClient(
                self.api.url,
                accounts,
                product_ids(self.engine),
                threads=self.sizes.api_clients,
            )
            before = self.until_killed(client)
            cut.heal()
            self.stack.spawn(self.drill.worker)  # boots (its reaper too) while the API restarts
            self.api.start()
            back_at = time.time()
            retried = client.retry(timeout_s=self.sizes.timeout_s)
            return self.outcome(client, before, back_at=back_at, retried=retried)
        finally:
            self.api.stop()

    def until_killed(self, client: OrderClient) -> dict[str, Any]:
        """Place orders until enough were accepted and a job runs locally, then SIGKILL."""
        want = self.sizes.api_orders
        deadline = time.monotonic() + self.sizes.timeout_s
        with phase(self.drill.progress, "api: orders with the broker down", want) as update:
            client.start()
            while len(client.accepted) < want and time.monotonic() < deadline:
                update(len(client.accepted))
                time.sleep(0.05)
            sync_ids = client.sync_batches(self.sizes.api_sync_batches, admin=self.admin)
            self.wait_local_job()
            killed_at = time.time()
            self.api.kill()
            client.stop()  # the requests in flight failed with it: they are unanswered
            # Nothing writes job records now (no API, no worker yet): this is what it left.
            interrupted = unfinished(self.engine)
            update(want)
        return {
            "killed_at": killed_at,
            "job_ids": client.job_ids(),
            "sync_ids": sync_ids,
            "interrupted": interrupted,
        }

    def wait_local_job(self) -> bool:
        """Wait (briefly) until a job runs in the API's local executor."""
        return wait_for(lambda: bool(running_jobs(self.engine)), timeout_s=LOCAL_START_WAIT_S)

    def outcome(
        self, client: OrderClient, before: dict[str, Any], *, back_at: float, retried: int
    ) -> dict[str, float]:
        s = self.sizes
        order_ids = client.order_ids()
        left = wait_orders_settled(self.engine, order_ids=order_ids, timeout_s=s.timeout_s)
        jobs = [*client.job_ids(), *before["sync_ids"]]
        self.wait_jobs_final(jobs)
        ledger = order_ledger(self.engine, order_ids)
        states = job_states(self.engine, jobs)
        sync_lost = sum(1 for j in before["sync_ids"] if states.get(j, ("",))[0] != "SUCCEEDED")
        violations = invariant_violations(self.stack.settings, pending_threshold_s=0.0)
        for line in violations:
            self.drill.result.notes.append(f"api: invariant violated: {line}")
        figures = {
            "submitted": client.sent,
            **ledger.figures(),
            "lost": ledger.lost + sync_lost,
            # A paid order writes one points-ledger row: paid orders without one.
            "missing_effects": max(0, ledger.paid - (ledger.effects - ledger.duplicate_effects)),
            "orders_pending": left,
            "sync_jobs": len(before["sync_ids"]),
            "unanswered_retried": retried,
            "unanswered_left": len(client.unanswered),
            "refused": sum(client.refused.values()),
            "running_at_kill": before["interrupted"].get("STARTED", 0),
            "waiting_in_sql_at_kill": before["interrupted"].get("PENDING", 0),
            "unfinished_at_kill": sum(before["interrupted"].values()),
            "recovered_by_reaper": self.by_reaper(before, states),
            "invariant_violations": len(violations),
            "recover_s": self.recovery(states, before["killed_at"], back_at),
        }
        return figures

    def wait_jobs_final(self, ids: list[str]) -> None:
        final = {"SUCCEEDED", "DEAD", "CANCELLED"}

        def done() -> bool:
            return all(s[0] in final for s in job_states(self.engine, ids).values())

        wait_for(done, timeout_s=self.sizes.timeout_s)

    @staticmethod
    def by_reaper(before: dict[str, Any], states: dict[str, tuple[str, str, float | None]]) -> int:
        """Jobs accepted by the first API that did not finish before it died and ended on a
        worker: the reaper put them in the broker (nothing else could)."""
        killed_at = float(before["killed_at"])
        return sum(
            1
            for j in [*before["job_ids"], *before["sync_ids"]]
            if j in states
            and states[j][1] == "broker"
            and states[j][0] == "SUCCEEDED"
            and (states[j][2] or 0) > killed_at
        )

    @staticmethod
    def recovery(
        states: dict[str, tuple[str, str, float | None]], killed_at: float, back_at: float
    ) -> float:
        """From the API back until the last job it had to recover (or a retry made) finished."""
        after = [f for _, _, f in states.values() if f is not None and f > killed_at]
        return max(0.0, max(after, default=back_at) - back_at)
