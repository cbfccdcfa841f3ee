"""``tasklab drill``: break the stack on purpose, then prove that nothing was lost or done twice.

- ``kill``: durable probe jobs (``tasklab.probe_job.effect`` writes one row to
  ``tasklab_effects`` through ``job.transaction()``) run on a worker that is SIGKILLed while it
  runs one, ``kills`` times: the whole worker (a replacement starts), then only the pool
  process running the job, alternately.
- ``outage``: jobs are submitted at a steady rate while the broker is away for ``outage_s``
  seconds, by ``fault``: ``stop`` (the lab's own Redis, restarted empty on the same port),
  or, on any broker, the link to it through the stack's proxy (``tasklab.lab.netproxy``) in
  ``outage`` (connections reset and refused), ``blackhole`` (nothing passes) or ``slow``.
- ``flush``: a backlog of jobs is queued, then the broker restarts empty (the lab's own).
- ``api``: the reference API takes orders with the broker down (they settle in its local
  fallback executor) and is SIGKILLed mid-run; broker, API and workers come back, the client
  sends its unanswered requests again with their ``Idempotency-Key``, and the reaper (in the
  workers) finishes what the dead API left: expired leases, jobs waiting in SQL.

Each ends with its ledger — submitted, accepted, succeeded, dead, cancelled, lost (must be 0),
duplicate effects (must be 0), and ``recover_s``: from the end of the fault (the kill, the
broker back, the API back) until the last job it affected finished — and, where the shop is
involved, the service's ``check_invariants``. The job layer's recovery knobs are set short
(``RecoveryKnobs``) and recorded in the result. A worker that exits on its own is restarted
and reported (``WorkerWatch``). Child processes (broker, workers, API) are started only by
threads that outlive them — the main thread, or the watch, which lives as long as the stack:
PR_SET_PDEATHSIG signals a child when the *thread* that started it ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import sqlalchemy as sa
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import Engine

from tasklab.lab import summary
from tasklab.lab.errors import LabError
from tasklab.lab.faults import (
    BROKER_FAULTS,
    DEFAULT_SLOW_MS,
    LINK_FAULTS,
    POLL_S,
    BrokerCut,
    WorkerWatch,
    default_fault,
    exit_reason,
    kill_node,
    own_broker,
    restart_broker,
    running_jobs,
    sigkill,
    wait_for,
)
from tasklab.lab.harness import LabStack, WorkerConfig, WorkerNode
from tasklab.lab.ledger import Ledger, take_ledger
from tasklab.lab.partition import (
    PARTITION,
    PARTITION_TARGETS,
    PartitionSizes,
    check_partition,
    run_partition,
)
from tasklab.lab.progress import lab_progress, log_to_file, phase
from tasklab.lab.results import LabResult, Series, Target, finish, resolve_targets
from tasklab.lab.soak import SOAK_TARGETS, SoakSizes, run_soak
from tasklab.lab.soak_faults import WAITING  # PENDING until the relay published them
from tasklab.lab.soak_report import SOAK
from tasklab.lab.workload import JobsDriver, Probe, Sample, Ticket, submit_all
from tasklab.settings import Settings, mask_url

__all__ = [  # the fault tools live in tasklab.lab.faults; kept importable from here
    "POLL_S",
    "WorkerWatch",
    "exit_reason",
    "kill_node",
    "own_broker",
    "restart_broker",
    "running_jobs",
    "sigkill",
    "wait_for",
]

DRILLS = ("kill", "outage", "flush", "api", SOAK, PARTITION)
# Drills on the production defaults, with no RecoveryKnobs.
UNKNOBBED = (SOAK, PARTITION)
# Per drill: nothing lost, nothing done twice or not at all, the shop consistent, recovered
# in bounded time (with RecoveryKnobs' defaults: a lease of 3 s, a reaper tick of 0.5 s, a
# worker boot). The soak, on production defaults, has its own (tasklab.lab.soak).
TARGETS_OF_EVERY_DRILL = (
    ("lost", "==", 0.0),
    ("duplicate_effects", "==", 0.0),
    ("missing_effects", "==", 0.0),
    ("recover_s", "<=", 30.0),
)
# A kill drill that interrupted no job proved nothing: it must fail, not pass. Nor an outage
# drill whose submits were refused: the job layer takes every submit while the broker is away.
KILL_TARGETS = (("interrupted", ">=", 1.0),)
OUTAGE_TARGETS = (("refused", "==", 0.0),)
SHOP_DRILLS = ("api",)
# Drills that take the broker away, and the faults each can make (``stop`` needs the lab's own
# broker; the others go through the stack's proxy and work on any broker).
BROKER_DRILLS = {
    "outage": BROKER_FAULTS,
    "api": ("stop", "outage"),
    "flush": ("stop",),  # the broker must come back empty
    SOAK: ("stop", "outage"),  # stop on the lab's own Redis; outage through a proxy else
}
# Figures whose failure means data was lost or corrupted (the rest are about speed).
CORRECTNESS = ("lost", "duplicate_effects", "missing_effects", "stuck", "invariant_violations")


def _targets_of(scenario: str) -> Sequence[tuple[str, str, float]]:
    if scenario == SOAK:
        return SOAK_TARGETS
    return PARTITION_TARGETS if scenario == PARTITION else TARGETS_OF_EVERY_DRILL


def default_targets(scenarios: Sequence[str]) -> list[Target]:
    targets = [
        Target(f"{s}.{name}", op, value) for s in scenarios for name, op, value in _targets_of(s)
    ]
    targets += [
        Target(f"{s}.invariant_violations", "==", 0.0) for s in scenarios if s in SHOP_DRILLS
    ]
    targets += [Target(f"kill.{n}", op, v) for n, op, v in KILL_TARGETS if "kill" in scenarios]
    if "outage" in scenarios:
        targets += [Target(f"outage.{n}", op, v) for n, op, v in OUTAGE_TARGETS]
    return targets


@dataclass(frozen=True)
class RecoveryKnobs:
    """The job layer's recovery settings, short so that a drill ends in seconds (production
    defaults: lease 30 s, reaper 5 s, requeue 60 s, breaker 5 s, publish timeout 1 s)."""

    lease_s: float = 3.0
    reaper_interval_s: float = 0.5
    requeue_after_s: float = 3.0
    breaker_reset_s: float = 1.0
    publish_timeout_s: float = 0.5

    def apply(self, settings: Settings) -> Settings:
        # Prefetch 1: a killed worker takes as few reserved messages down with it as it can.
        return settings.model_copy(update={**asdict(self), "worker_prefetch_multiplier": 1})


@dataclass(frozen=True)
class DrillSizes:
    kill_jobs: int = 30
    kill_hold_s: float = 0.5  # each job holds this long before writing its effect
    kills: int = 2
    outage_rate_per_s: float = 20.0
    outage_before_s: float = 2.0
    outage_s: float = 5.0
    outage_after_s: float = 3.0
    outage_hold_s: float = 0.2  # slower than the rate: a backlog is in the broker when it stops
    flush_jobs: int = 120
    flush_hold_s: float = 0.05
    api_users: int = 10
    api_orders: int = 60  # accepted before the API is killed
    api_clients: int = 4  # client threads placing orders
    api_sync_batches: int = 2  # slower jobs, so that the kill finds one running
    # The API's fallback executor, small so that it is busy and has a backlog (jobs waiting
    # in SQL) when the API is killed: both recovery paths of the reaper get exercised.
    api_local_workers: int = 1
    api_local_queue_max: int = 0
    timeout_s: float = 60.0  # the most any wait for recovery may take
    soak: SoakSizes = field(default_factory=SoakSizes)  # on production defaults, no knobs
    partition: PartitionSizes = field(default_factory=PartitionSizes)  # the same

    @classmethod
    def tiny(cls) -> DrillSizes:
        return cls(
            kill_jobs=10,
            kill_hold_s=0.4,
            kills=2,
            outage_rate_per_s=10.0,
            outage_before_s=1.0,
            outage_s=2.0,
            outage_after_s=1.0,
            flush_jobs=30,
            api_users=4,
            api_orders=15,
            api_clients=2,
            api_sync_batches=1,
            timeout_s=45.0,
            soak=SoakSizes.tiny(),
        )


@dataclass(frozen=True)
class Kill:
    at: float  # epoch seconds
    job_ids: list[str]  # jobs the victim was running
    victim: str  # "worker" (main process and pool) or "pool process" (the one running a job)


class PacedSubmitter(threading.Thread):
    """Submits ``n`` probe jobs at ``rate_per_s`` in the background (the main thread owns the
    broker: a child process dies with the *thread* that started it, PR_SET_PDEATHSIG)."""

    def __init__(
        self,
        driver: JobsDriver,
        probe: Probe,
        *,
        n: int,
        rate_per_s: float,
        update: Callable[[int], None],
    ) -> None:
        super().__init__(name="lab-paced-submit", daemon=True)
        self.driver = driver
        self.probe = probe
        self.n = n
        self.interval_s = 1.0 / rate_per_s
        self.update = update
        self.tickets: list[Ticket] = []
        self.refused = 0  # submits that raised: refused to the caller, so not lost

    def run(self) -> None:
        start = time.monotonic()
        for i in range(self.n):
            time.sleep(max(0.0, start + i * self.interval_s - time.monotonic()))
            try:
                self.tickets.append(self.driver.submit(self.probe))
            except Exception:
                self.refused += 1
            self.update(i + 1)


def recover_s(samples: Sequence[Sample], *, fault_start: float, fault_end: float) -> float:
    """From the end of the fault until the last job it affected (submitted before the fault
    ended and not finished when it began) finished; 0 if it affected none."""
    affected = [
        s for s in samples if s.sent_at <= fault_end and (s.finished_at or 1e18) > fault_start
    ]
    if not affected:
        return 0.0
    last = max(s.finished_at or time.time() for s in affected)
    return max(0.0, last - fault_end)


LEDGER_COLUMNS = (
    "submitted",
    "accepted",
    "succeeded",
    "dead",
    "cancelled",
    "lost",
    "duplicate_effects",
    "missing_effects",
    "invariant_violations",
    "worker_exits",
)


def ledger_figures(ledger: Ledger, *, submitted: int) -> dict[str, float]:
    return {
        "submitted": submitted,
        "accepted": ledger.submitted,
        "succeeded": ledger.succeeded,
        "dead": ledger.dead,
        "cancelled": ledger.cancelled,
        "lost": ledger.lost,
        "duplicate_effects": ledger.duplicate_effects,
        "missing_effects": ledger.missing_effects,
        "effects": ledger.effects,
        "retried": ledger.retried,
        "balanced": float(ledger.balanced),
    }


def via_counts(engine: Engine, owner: str) -> dict[str, int]:
    """How the owner's jobs last ran: ``broker`` (a worker) or ``local`` (the fallback)."""
    from tasklab.jobs.records import jobs

    stmt = sa.select(jobs.c.via, sa.func.count()).where(jobs.c.owner == owner).group_by(jobs.c.via)
    with engine.connect() as conn:
        return {str(via): int(n) for via, n in conn.execute(stmt)}


class Drill:
    """One drill run: settings with short recovery knobs, the result it fills, its progress."""

    def __init__(
        self,
        settings: Settings,
        sizes: DrillSizes,
        knobs: RecoveryKnobs,
        worker: WorkerConfig,
        result: LabResult,
        progress: Progress,
        *,
        fault: str = "stop",
        delay_ms: float = DEFAULT_SLOW_MS,
    ) -> None:
        self.settings = knobs.apply(settings)
        self.fault = fault  # how the outage and api drills take the broker away
        self.delay_ms = delay_ms
        self.sizes = sizes
        self.worker = replace(worker, prefetch_multiplier=1)
        self.result = result
        self.progress = progress

    @contextlib.contextmanager
    def running(
        self, *, workers: str = "start", links: bool = False
    ) -> Iterator[tuple[LabStack, WorkerWatch]]:
        """A fresh stack for one drill, its workers watched; ``links``: behind the proxies."""
        with LabStack(self.settings, worker=self.worker, workers=workers, links=links) as stack:
            if not self.result.servers:
                self.result.servers = stack.server_versions()
                self.result.params["broker"] = stack.broker_label
            if stack.links is not None:  # the server itself, and the proxies in between
                self.result.params["broker"] = mask_url(stack.links.server_url(stack.broker_url))
                self.result.params["links"] = stack.links.describe()
            with WorkerWatch(stack, self.worker) as watch:
                yield stack, watch

    def collect(self, scenario: str, driver: JobsDriver, tickets: list[Ticket]) -> list[Sample]:
        with phase(self.progress, f"{scenario}: jobs finished", len(tickets)) as update:
            samples = driver.collect(tickets, timeout_s=self.sizes.timeout_s, progress=update)
        self.result.series.append(
            Series(
                "drill: completions per second",
                scenario,
                "line",
                "seconds",
                "jobs/s",
                summary.completions_over_time(samples),
            )
        )
        return samples

    def record(self, scenario: str, figures: dict[str, float], watch: WorkerWatch) -> None:
        """The scenario's figures, its ledger row, and any worker that exited on its own."""
        figures = {**figures, "worker_exits": len(watch.exits)}
        self.result.add_figures(scenario, figures)
        row = {"drill": scenario, **{k: figures[k] for k in LEDGER_COLUMNS if k in figures}}
        row["recover_s"] = round(figures.get("recover_s", 0.0), 3)
        self.result.tables.setdefault("ledger", []).append(row)
        for reason in watch.exits:
            self.result.notes.append(f"{scenario}: a worker exited and was restarted: {reason}")

    # --- kill ---------------------------------------------------------------------------------
    def kill(self) -> None:
        s = self.sizes
        with self.running() as (stack, watch):
            driver = JobsDriver(stack.jobs, owner=stack.owner("kill"))
            probe = Probe("effect", {"hold_s": s.kill_hold_s})
            tickets = submit_all(driver, [probe] * s.kill_jobs)
            kills = self.kill_workers(stack, watch, driver.owner)
            samples = self.collect("kill", driver, tickets)
            ledger = take_ledger(
                stack.jobs.engine, owner=driver.owner, submitted_ids=[t.id for t in tickets]
            )
            finished = {x.id: x.finished_at or time.time() for x in samples}
            per_kill = [
                max((finished.get(j, k.at) for j in k.job_ids), default=k.at) - k.at for k in kills
            ]
            figures = {
                **ledger_figures(ledger, submitted=len(tickets)),
                "kills": len(kills),
                "kills_worker": sum(1 for k in kills if k.victim == "worker"),
                "kills_pool_process": sum(1 for k in kills if k.victim != "worker"),
                "interrupted": sum(len(k.job_ids) for k in kills),
                "recover_s": max(per_kill, default=0.0),
            }
            self.record("kill", figures, watch)

    def kill_workers(self, stack: LabStack, watch: WorkerWatch, owner: str) -> list[Kill]:
        """Kill ``kills`` times, each time once a job runs: first a whole worker (main process
        and pool: a crashed host, an OOM-killed container), then only the pool process that
        runs the job (the worker lives on and forks a new one), alternately."""
        times = self.sizes.kills
        kills: list[Kill] = []
        with phase(self.progress, "kill: SIGKILL a worker mid-task", times) as update:
            for n in range(times):
                found = self.node_running_a_job(stack, watch, owner)
                if found is None:
                    self.result.notes.append(
                        f"kill: no job was running for kill {n + 1} of {times}; stopped there"
                    )
                    break
                node, running = found
                if n % 2 == 0 or self.worker.pool != "prefork":
                    kills.append(Kill(time.time(), list(running), "worker"))
                    watch.kill(node)
                else:
                    pid = next(iter(running.values()))
                    jobs = [job for job, p in running.items() if p == pid]
                    kills.append(Kill(time.time(), jobs, "pool process"))
                    sigkill([pid])
                update(len(kills))
        return kills

    def node_running_a_job(
        self, stack: LabStack, watch: WorkerWatch, owner: str
    ) -> tuple[WorkerNode, dict[str, int]] | None:
        """A live worker node with some of ``owner``'s jobs STARTED in it: job id -> pid."""
        deadline = time.monotonic() + self.sizes.timeout_s
        while time.monotonic() < deadline:
            running = running_jobs(stack.jobs.engine, owner)
            for node in watch.nodes():
                pids = set(node.pids())
                mine = {job: pid for job, pid in running.items() if pid in pids}
                if mine:
                    return node, mine
            counts = stack.jobs.counts()
            if not running and not any(counts.get(st, 0) for st in WAITING):
                return None  # nothing left to interrupt
            time.sleep(POLL_S)
        return None

    # --- outage -------------------------------------------------------------------------------
    def outage(self) -> None:
        s = self.sizes
        with self.running(links=self.fault in LINK_FAULTS) as (stack, watch):
            cut = BrokerCut(stack, self.fault, delay_ms=self.delay_ms)
            driver = JobsDriver(stack.jobs, owner=stack.owner("outage"))
            total_s = s.outage_before_s + s.outage_s + s.outage_after_s
            n = max(1, round(total_s * s.outage_rate_per_s))
            probe = Probe("effect", {"hold_s": s.outage_hold_s})
            with phase(self.progress, f"outage: submit through a broker {self.fault}", n) as update:
                submitter = PacedSubmitter(
                    driver, probe, n=n, rate_per_s=s.outage_rate_per_s, update=update
                )
                submitter.start()
                time.sleep(s.outage_before_s)
                stopped_at, back_at = cut.during(s.outage_s)
                submitter.join()
            tickets = submitter.tickets
            samples = self.collect("outage", driver, tickets)
            engine = stack.jobs.engine
            ledger = take_ledger(engine, owner=driver.owner, submitted_ids=[t.id for t in tickets])
            via = via_counts(engine, driver.owner)
            during = [t for t in tickets if stopped_at <= t.sent_at <= back_at]
            waiting = [x for x in samples if x.sent_at < stopped_at < (x.started_at or 1e18)]
            figures = {
                **ledger_figures(ledger, submitted=n),
                "refused": submitter.refused,
                "outage_s": back_at - stopped_at,
                "via_local": via.get("local", 0),
                "via_broker": via.get("broker", 0),
                "waiting_at_outage": len(waiting),  # queued in the broker when it stopped
                "submitted_during_outage": len(during),
                **summary.submit_figures(during, prefix="outage_submit_ms"),
                "recover_s": recover_s(samples, fault_start=stopped_at, fault_end=back_at),
            }
            self.record("outage", figures, watch)

    # --- flush --------------------------------------------------------------------------------
    def flush(self) -> None:
        s = self.sizes
        with self.running() as (stack, watch):
            server = own_broker(stack)
            driver = JobsDriver(stack.jobs, owner=stack.owner("flush"))
            probe = Probe("effect", {"hold_s": s.flush_hold_s})
            tickets = submit_all(driver, [probe] * s.flush_jobs)
            ids = [t.id for t in tickets]
            started = max(1, len(ids) // 10)
            wait_for(lambda: driver.finished_count(ids) >= started, timeout_s=s.timeout_s)
            waiting = len(ids) - driver.finished_count(ids)
            stopped_at, back_at = restart_broker(server)
            samples = self.collect("flush", driver, tickets)
            ledger = take_ledger(stack.jobs.engine, owner=driver.owner, submitted_ids=ids)
            figures = {
                **ledger_figures(ledger, submitted=len(tickets)),
                "waiting_at_flush": waiting,
                "recover_s": recover_s(samples, fault_start=stopped_at, fault_end=back_at),
            }
            self.record("flush", figures, watch)

    # --- api ----------------------------------------------------------------------------------
    def api(self) -> None:
        from tasklab.lab.api_drill import ApiDrill

        with self.running(workers="none", links=self.fault in LINK_FAULTS) as (stack, watch):
            figures = ApiDrill(self, stack).run()
            self.record("api", figures, watch)


def run_drill(
    settings: Settings,
    *,
    scenarios: Sequence[str] = ("kill",),
    sizes: DrillSizes | None = None,
    knobs: RecoveryKnobs | None = None,
    worker: WorkerConfig | None = None,
    targets: Sequence[str] = (),
    console: Console | None = None,
    fault: str | None = None,
    delay_ms: float = DEFAULT_SLOW_MS,
) -> LabResult:
    """Run the drills one after another, each on a fresh stack; write and print the result.
    ``fault``: how the outage and api drills take the broker away (default: ``stop`` the
    lab's own broker, ``outage`` by proxy when a broker URL is given); ``delay_ms``: a
    ``slow`` link's delay per chunk."""
    console = console or Console()
    sizes = sizes or DrillSizes()
    knobs = knobs or RecoveryKnobs()
    fault = fault or default_fault(settings)
    check_drills(settings, scenarios, fault)
    slos = resolve_targets(default_targets(scenarios), targets)
    worker = worker or WorkerConfig.from_settings(settings)
    result = LabResult(
        "drill",
        params={
            "scenarios": list(scenarios),
            "sizes": asdict(sizes),
            "recovery": asdict(knobs),
            "worker": asdict(replace(worker, prefetch_multiplier=1)),
        },
    )
    if set(scenarios) & {"outage", "api"}:
        result.params["broker_fault"] = fault
        if fault == "slow":
            result.params["slow_delay_ms"] = delay_ms
    log_path = settings.home_dir / "lab" / "logs" / f"drill-{result.run_id}.log"
    with lab_progress(console) as progress, log_to_file(log_path):
        drill = Drill(
            settings, sizes, knobs, worker, result, progress, fault=fault, delay_ms=delay_ms
        )
        for scenario in DRILLS:
            if scenario == SOAK and SOAK in scenarios:
                # Production defaults: the settings as given, no RecoveryKnobs, the
                # settings' own worker prefetch (recorded in params.soak).
                run_soak(settings, sizes.soak, result, progress)
            elif scenario == PARTITION and PARTITION in scenarios:
                run_partition(settings, sizes.partition, result, progress)
            elif scenario in scenarios:
                getattr(drill, scenario)()
    # The envelope records the settings the drills ran with: their recovery knobs applied
    # (the soak's own are in params.soak.production), or, for the soak alone, as given.
    knobbed = [s for s in scenarios if s not in UNKNOBBED]
    used = knobs.apply(settings) if knobbed else settings
    return finish(result, used, targets=slos, console=console, scope=scenarios)


def check_drills(settings: Settings, scenarios: Sequence[str], fault: str) -> None:
    """Refuse, before anything starts, a drill that is unknown or cannot make ``fault`` here."""
    unknown = set(scenarios) - set(DRILLS)
    if unknown or not scenarios:
        raise LabError(f"unknown drill(s) {sorted(unknown)}; known: {', '.join(DRILLS)}")
    if PARTITION in scenarios:
        check_partition(settings)
    if fault not in BROKER_FAULTS:
        raise LabError(f"unknown broker fault {fault!r}; known: {', '.join(BROKER_FAULTS)}")
    taking = [s for s in scenarios if s in BROKER_DRILLS]
    wrong = [s for s in taking if s in ("outage", "api") and fault not in BROKER_DRILLS[s]]
    if wrong:
        known = ", ".join(BROKER_DRILLS[wrong[0]])
        raise LabError(f"drill {wrong[0]} cannot make a broker {fault}; it makes: {known}")
    own = settings.broker_url is None and settings.redis_url is None
    # the soak picks its own fault (stop on the lab's Redis, else outage): not --fault's
    picks = ("outage", "api", SOAK)
    stopping = [s for s in taking if s not in picks or (fault == "stop" and s != SOAK)]
    if stopping and not own:
        raise LabError(
            f"drill {', '.join(stopping)} stops and restarts the broker: it needs the lab's "
            "embedded Redis (unset REDIS_URL and BROKER_URL); the outage, api and soak "
            "drills cut the link to any broker instead (--fault outage)"
        )
