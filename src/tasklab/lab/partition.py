"""``tasklab drill partition``: one worker node of three is cut off from the broker and the
database while it runs jobs, for longer than a lease; the others take its jobs over.

Each node is a process tree of its own (main process and pool, its own node name and home
folder) that shares only the broker and the database with the others, as separate machines
would. The cut node reaches both through proxies of the drill's (``tasklab.lab.netproxy``):
the cut is a *blackhole* — connections stay open and nothing passes — which is what a lost
network link looks like to a process, and what no connection-refused error reveals. The cut
node keeps running what it holds (it does not know); what the drill proves, with the
production defaults:

- the other nodes take over each job the cut node was running, within ``lease_s +
  reaper_interval_s`` of the cut, plus the queue wait (``QUEUE_WAIT_ALLOWANCE_S``);
- the cut node notices the dead links within ``link_fail_after x (link_check_interval_s +
  link_probe_s)`` and says so in its log (``tasklab.links``);
- when the link heals, its zombie attempts record nothing (the ledger's duplicate effects:
  0) and it runs jobs again by itself;
- the ledger: lost 0, duplicate effects 0, missing effects 0, stuck 0.

It needs a database server (PostgreSQL): nodes that share a SQLite file share a machine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import sqlalchemy as sa
from rich.progress import Progress
from sqlalchemy import Engine

from tasklab.jobs.records import FINAL, JobStatus, jobs
from tasklab.lab.errors import LabError
from tasklab.lab.faults import WorkerWatch, lease_pid
from tasklab.lab.harness import LabStack, WorkerConfig, WorkerNode
from tasklab.lab.ledger import take_ledger
from tasklab.lab.links import StackLinks, start_links
from tasklab.lab.progress import phase
from tasklab.lab.results import LabResult
from tasklab.lab.soak_faults import OpenLoop, not_final
from tasklab.lab.workload import JobsDriver, Probe
from tasklab.links import link_probe_s
from tasklab.settings import Settings

PARTITION = "partition"
# A job taken over is published again and waits its turn behind the backlog before another
# node claims it; at half the nodes' capacity that wait is short.
QUEUE_WAIT_ALLOWANCE_S = 10.0
NOTICE_ALLOWANCE_S = 5.0  # a loaded machine's scheduling, on top of the links' own bound
HELD_WAIT_S = 15.0  # the cut waits this long for the cut node's every slot to run a job
PARTITION_TARGETS = (
    ("lost", "==", 0.0),
    ("duplicate_effects", "==", 0.0),
    ("missing_effects", "==", 0.0),
    ("stuck", "==", 0.0),
    ("held", ">=", 1.0),  # a cut that held no job proved nothing
    ("takeover_over_bound", "==", 0.0),
    ("notice_over_bound", "==", 0.0),
    ("cut_node_claims_during_cut", "==", 0.0),
    ("cut_node_jobs_after_heal", ">=", 1.0),
)


@dataclass(frozen=True)
class PartitionSizes:
    nodes: int = 3
    hold_s: float = 1.0  # each probe job's run time
    load_factor: float = 0.6  # offered, as a share of what the nodes can run
    cut_after_s: float = 10.0  # the load runs this long before the cut
    cut_s: float | None = None  # None: lease_s x 1.5 + reaper_interval_s
    after_s: float = 20.0  # the load goes on this long after the heal
    drain_timeout_s: float = 180.0
    tick_s: float = 0.1

    @classmethod
    def short(cls) -> PartitionSizes:
        return cls(hold_s=0.3, cut_after_s=6.0, after_s=15.0, drain_timeout_s=120.0)

    def cut_for(self, settings: Settings) -> float:
        if self.cut_s is not None:
            return self.cut_s
        return settings.lease_s * 1.5 + settings.reaper_interval_s


def takeover_bound_s(settings: Settings) -> float:
    return settings.lease_s + settings.reaper_interval_s + QUEUE_WAIT_ALLOWANCE_S


def notice_bound_s(settings: Settings) -> float:
    probe_s = settings.link_check_interval_s + link_probe_s(settings)
    return settings.link_fail_after * probe_s + NOTICE_ALLOWANCE_S


def check_partition(settings: Settings) -> None:
    if settings.sync_database_url.startswith("sqlite"):
        raise LabError(
            "drill partition needs a database server: nodes sharing a SQLite file share a "
            "machine; set DATABASE_URL to a PostgreSQL database"
        )
    if settings.link_check_interval_s <= 0:
        raise LabError("drill partition needs link_check_interval_s > 0 (tasklab.links)")


class Partition:
    def __init__(
        self, settings: Settings, sizes: PartitionSizes, result: LabResult, progress: Progress
    ) -> None:
        self.settings = settings
        self.sizes = sizes
        self.result = result
        self.progress = progress
        self.fig: dict[str, float] = {}
        self.notes: list[str] = []

    def run(self) -> dict[str, float]:
        s = self.sizes
        worker = WorkerConfig.from_settings(self.settings)
        cut_s = s.cut_for(self.settings)
        self.result.params[PARTITION] = {
            **asdict(s),
            "cut_s": cut_s,
            "worker": asdict(worker),
            "takeover_bound_s": takeover_bound_s(self.settings),
            "notice_bound_s": notice_bound_s(self.settings),
            **{k: getattr(self.settings, k) for k in _KNOBS},
        }
        with LabStack(self.settings, worker=worker, workers="none") as stack:
            links, cut_settings = start_links(stack.settings)
            try:
                # each node a machine of its own: its home folder (metrics, logs) too
                nodes = [
                    stack.spawn(worker, settings=_homed(stack, stack.settings, i))
                    for i in range(s.nodes - 1)
                ]
                cut = stack.spawn(worker, settings=_homed(stack, cut_settings, s.nodes - 1))
                stack.wait_ready([*nodes, cut])
                with WorkerWatch(stack, worker) as watch:
                    self.offer_and_cut(stack, cut, links, cut_s, worker)
                    self.fig["worker_exits"] = float(len(watch.exits))
            finally:
                links.stop()
        self.result.notes += self.notes
        return self.fig

    def offer_and_cut(
        self,
        stack: LabStack,
        cut: WorkerNode,
        links: StackLinks,
        cut_s: float,
        worker: WorkerConfig,
    ) -> None:
        s = self.sizes
        capacity = s.nodes * worker.concurrency / s.hold_s
        rate = s.load_factor * capacity
        driver = JobsDriver(stack.jobs, owner=stack.owner(PARTITION))
        duration_s = s.cut_after_s + cut_s + s.after_s
        engine = stack.jobs.engine
        with phase(self.progress, "partition: offer", max(1, round(rate * duration_s))) as upd:
            loop = OpenLoop(
                driver,
                Probe("effect", {"hold_s": s.hold_s}),
                rate_per_s=rate,
                duration_s=duration_s,
                tick_s=s.tick_s,
                update=upd,
            )
            loop.start()
            try:
                time.sleep(s.cut_after_s)
                held = self.wait_held(engine, driver.owner, cut, worker.concurrency)
                log_from = _log_size(cut)
                cut_at = time.time()
                for proxy in links.proxies.values():
                    proxy.blackhole()
                pids = set(cut.pids())
                taken = self.watch_cut(engine, held, pids, cut, log_from, cut_at, cut_s)
                links.heal()
                healed_at = time.time()
            finally:
                loop.join()
        self.fig.update(offered_per_s=rate, capacity_per_s=capacity, cut_s=cut_s)
        self.takeovers(held, taken, cut_at)
        self.after_heal(stack, engine, driver.owner, cut, pids, log_from, cut_at, healed_at)
        drained = self.drain(engine, driver.owner)
        ledger = take_ledger(engine, owner=driver.owner, submitted_ids=[t.id for t in loop.tickets])
        self.fig.update(
            submitted=float(len(loop.tickets)),
            refused=float(loop.refused),
            succeeded=float(ledger.succeeded),
            dead=float(ledger.dead),
            lost=float(ledger.lost),
            duplicate_effects=float(ledger.duplicate_effects),
            missing_effects=float(ledger.missing_effects),
            stuck=float(0 if drained else ledger.in_flight),
        )

    def wait_held(self, engine: Engine, owner: str, cut: WorkerNode, slots: int) -> dict[str, int]:
        """The jobs the cut node runs (id -> attempt), once every slot runs one, or at least
        one after ``HELD_WAIT_S``."""
        deadline = time.monotonic() + HELD_WAIT_S
        while True:
            held = running_on(engine, owner, set(cut.pids()))
            if len(held) >= slots or (held and time.monotonic() > deadline):
                return held
            if time.monotonic() > deadline + HELD_WAIT_S:
                return held
            time.sleep(0.05)

    def watch_cut(
        self,
        engine: Engine,
        held: dict[str, int],
        pids: set[int],
        cut: WorkerNode,
        log_from: int,
        cut_at: float,
        cut_s: float,
    ) -> dict[str, float]:
        """During the cut: when each held job was taken over (running or finished by another
        node), and when the cut node said its links were down."""
        taken: dict[str, float] = {}
        noticed: dict[str, float] = {}
        while time.time() < cut_at + cut_s:
            pids |= set(cut.pids())  # a pool process replaced meanwhile is the node's too
            for job_id in held.keys() - taken.keys():
                if taken_over(engine, job_id, held[job_id], pids):
                    taken[job_id] = time.time() - cut_at
            down = _down_lines(_log_since(cut, log_from))
            for link in ("broker", "database"):
                if link not in noticed and f"link to the {link} " in down:
                    noticed[link] = time.time() - cut_at
            time.sleep(0.5)
        for link in ("broker", "database"):
            self.fig[f"noticed_{link}_s"] = noticed.get(link, -1.0)
        bound = notice_bound_s(self.settings)
        self.fig["notice_over_bound"] = float(
            sum(1 for link in ("broker", "database") if noticed.get(link, bound + 1) > bound)
        )
        return taken

    def takeovers(self, held: dict[str, int], taken: dict[str, float], cut_at: float) -> None:
        bound = takeover_bound_s(self.settings)
        self.fig["held"] = float(len(held))
        self.fig["taken_over"] = float(len(taken))
        self.fig["takeover_s_max"] = max(taken.values(), default=-1.0)
        # a held job not taken over during the cut counts as over its bound
        self.fig["takeover_over_bound"] = float(
            sum(1 for job_id in held if taken.get(job_id, bound + 1) > bound)
        )

    def after_heal(
        self,
        stack: LabStack,
        engine: Engine,
        owner: str,
        cut: WorkerNode,
        pids: set[int],
        log_from: int,
        cut_at: float,
        healed_at: float,
    ) -> None:
        pids |= set(cut.pids())  # pool processes recycled meanwhile
        started = started_by(engine, owner, pids, since=cut_at)
        notice_s = max(self.fig.get("noticed_database_s", 0.0), 0.0)
        during = [t for t in started if cut_at + notice_s < t < healed_at]
        after = [t for t in started if t >= healed_at]
        self.fig["cut_node_claims_during_cut"] = float(len(during))
        self.fig["cut_node_jobs_after_heal"] = float(len(after))
        self.fig["cut_node_back_s"] = (min(after) - healed_at) if after else -1.0
        if "is back" not in _log_since(cut, log_from):
            self.notes.append("partition: the cut node never logged its links back")

    def drain(self, engine: Engine, owner: str) -> bool:
        deadline = time.monotonic() + self.sizes.drain_timeout_s
        while time.monotonic() < deadline:
            if not_final(engine, [owner]) == 0:
                return True
            time.sleep(0.5)
        return False


_KNOBS = (
    "lease_s",
    "reaper_interval_s",
    "requeue_after_s",
    "link_check_interval_s",
    "link_timeout_s",
    "link_fail_after",
)


def running_on(engine: Engine, owner: str, pids: set[int]) -> dict[str, int]:
    """STARTED jobs of ``owner`` whose lease a process in ``pids`` holds: id -> attempt."""
    stmt = sa.select(jobs.c.id, jobs.c.lease_owner, jobs.c.attempt).where(
        jobs.c.owner == owner, jobs.c.status == JobStatus.STARTED.value
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return {str(i): int(a) for i, lease, a in rows if lease_pid(lease) in pids}


def taken_over(engine: Engine, job_id: str, attempt: int, pids: set[int]) -> bool:
    stmt = sa.select(jobs.c.status, jobs.c.lease_owner, jobs.c.attempt).where(jobs.c.id == job_id)
    with engine.connect() as conn:
        row = conn.execute(stmt).one()
    status, lease, now_attempt = row
    return int(now_attempt) > attempt and (
        status in {s.value for s in FINAL} or lease_pid(lease) not in pids
    )


def started_by(engine: Engine, owner: str, pids: set[int], *, since: float) -> list[float]:
    """When jobs of ``owner`` last started on a process in ``pids``, since ``since``: the
    running ones by their lease, the finished ones by where their result says they ran."""
    stmt = sa.select(jobs.c.lease_owner, jobs.c.result, jobs.c.started_at).where(
        jobs.c.owner == owner, jobs.c.started_at >= since
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        float(t)
        for lease, result, t in rows
        if lease_pid(lease or (result or {}).get("ran_on")) in pids
    ]


def _homed(stack: LabStack, settings: Settings, index: int) -> Settings:
    return settings.model_copy(update={"home_dir": stack.lab_dir / "nodes" / f"node{index}"})


def _log_size(node: WorkerNode) -> int:
    try:
        return node.log_path.stat().st_size
    except OSError:
        return 0


def _log_since(node: WorkerNode, offset: int) -> str:
    try:
        with node.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _down_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "is down" in line)


def run_partition(
    settings: Settings, sizes: PartitionSizes, result: LabResult, progress: Progress
) -> None:
    """The partition scenario of ``tasklab drill``: its figures go in as ``partition.*``."""
    check_partition(settings)
    result.add_figures(PARTITION, Partition(settings, sizes, result, progress).run())


def partition_targets() -> Sequence[tuple[str, str, float]]:
    return PARTITION_TARGETS
