"""``tasklab drill soak``: the job layer under sustained overload, with its production defaults.

No knob is tuned for the drill: the settings are the run's own (``lease_s``,
``reaper_interval_s``, ``requeue_after_s``, the worker prefetch, ``bundle_max`` ... as
configured; their defaults unless you set them), recorded in ``params.soak.production``.

1. **Capacity**: a calibration burst of effect probes (``hold_s`` each) measures what the
   workers finish per second (the middle 60 % of the finishes); without one, the estimate
   ``nodes x concurrency / hold_s``.
2. **Open-loop offer** at ``load_factor`` (1.5) x that capacity for ``offer_s``: a fixed
   arrival schedule that never waits for answers, so a backlog builds and never empties while
   jobs are offered. Meanwhile, in this order:

   a. the lab's broker stops for ``outage_s`` and comes back empty (the reapers see it and
      publish every queued job again; the faults below wait until every reaper has looked,
      so that this path does not hide theirs);
   b. a whole worker node (main process and pool) is SIGKILLed while it runs jobs and holds
      reserved messages (bundles if it can find some); a replacement starts;
   c. a separate submitting process (``tasklab.lab.soak_submitter``), streaming submits, is
      frozen until the broker shows jobs it committed and never published (its relay held
      them), then SIGKILLed;
   d. queued jobs are cancelled, running ones too (``cancel(id)``, seen at their next
      ``progress()``), and a few with ``terminate=True`` (their process is killed).
3. **Drain**: until every accepted job is final (bounded by ``drain_timeout_s``).

The ledger: ``accepted``, ``succeeded``, ``cancelled``, ``dead``, ``lost`` (accepted, missing
from SQL), ``stuck`` (not final at the end), ``duplicate_effects``, ``missing_effects``; and
for every job whose carrier died (the killed worker's running and reserved jobs, the killed
submitter's unpublished ones, a terminated bundle's others), its latency from the fault to
its finish against ``tasklab.lab.soak_bound``'s bound: ``over_bound`` counts those past it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis
from rich.progress import Progress

from tasklab.errors import JobStateError
from tasklab.lab import soak_bound, soak_report
from tasklab.lab.faults import (
    BrokerCut,
    WorkerWatch,
    lease_pid,
    running_jobs,
    wait_for,
)
from tasklab.lab.harness import LabStack, WorkerConfig
from tasklab.lab.ledger import take_ledger
from tasklab.lab.progress import phase
from tasklab.lab.results import LabResult
from tasklab.lab.soak_bound import Carried
from tasklab.lab.soak_faults import (
    WAITING,
    BacklogSampler,
    NodeMessages,
    OpenLoop,
    Victim,
    job_rows,
    latest_waiting,
    node_messages,
    not_final,
    owner_rows,
    scan_twice,
    started_jobs,
)
from tasklab.lab.soak_report import SOAK
from tasklab.lab.workload import JobsDriver, Probe, Sample
from tasklab.settings import Settings, mask_url

EPOCH_KEY = "tasklab:broker-epoch"  # the reaper's marker of a broker restarted empty
# Nothing lost, nothing done twice or not at all, nothing left unfinished, every job whose
# carrier died back within its bound, no job cancelled that nobody cancelled, every fault
# applied as planned.
SOAK_TARGETS = (
    ("lost", "==", 0.0),
    ("duplicate_effects", "==", 0.0),
    ("missing_effects", "==", 0.0),
    ("stuck", "==", 0.0),
    ("over_bound", "==", 0.0),
    ("unexpected_cancelled", "==", 0.0),
    ("faults_missed", "==", 0.0),
)
# The settings that decide recovery and what a dead worker holds, as the soak ran them.
PRODUCTION_KNOBS = (
    "lease_s",
    "reaper_interval_s",
    "requeue_after_s",
    "worker_prefetch_multiplier",
    "bundle_max",
    "bundle_budget_s",
    "relay_linger_ms",
    "publish_timeout_s",
    "breaker_reset_s",
    "local_workers",
    "local_queue_max",
    "visibility_timeout_s",
)


@dataclass(frozen=True)
class SoakSizes:
    offer_s: float = 240.0  # how long jobs are offered
    load_factor: float = 1.5  # offered rate over the measured capacity
    hold_s: float = 0.5  # each effect probe holds this long, then writes its row
    tick_s: float = 0.5  # arrivals come in groups this far apart
    nodes: int = 2  # worker nodes (each: the settings' pool and concurrency)
    calibrate_s: float = 6.0  # length of the calibration burst (0: estimate the capacity)
    outage_at_s: float = 20.0  # into the offer
    outage_s: float = 4.0
    faults_at_s: float = 45.0  # the kills and cancels, at the earliest (after the outage)
    kill_wait_s: float = 30.0  # how long to look for a node running and holding jobs
    victim_jobs: int = 5000  # the most the killed submitter would have submitted
    victim_hold_s: float = 0.05
    victim_kill_after: int = 100  # ids it was given before it is frozen and looked at
    cancel_queued: int = 5
    cancel_running: int = 3
    cancel_terminate: int = 2
    drain_timeout_s: float = 600.0

    @classmethod
    def short(cls) -> SoakSizes:
        """Half a minute of offer; what ``tasklab demo`` and ``drill soak --short`` run."""
        return cls(
            offer_s=30.0,
            calibrate_s=3.0,
            outage_at_s=0.5,
            outage_s=2.0,
            faults_at_s=0.0,
            kill_wait_s=15.0,
            victim_kill_after=50,
            cancel_queued=3,
            cancel_running=2,
            cancel_terminate=1,
            drain_timeout_s=180.0,
        )

    @classmethod
    def tiny(cls) -> SoakSizes:
        """The tests' soak: no calibration burst, 20 s of offer."""
        return replace(cls.short(), offer_s=20.0, calibrate_s=0.0, outage_s=1.5)


class Soak:
    """One soak run on a fresh stack; ``run()`` returns its figures and fills ``result``."""

    def __init__(
        self, settings: Settings, sizes: SoakSizes, result: LabResult, progress: Progress
    ) -> None:
        self.settings = settings
        self.sizes = sizes
        self.result = result
        self.progress = progress
        self.worker = replace(WorkerConfig.from_settings(settings), nodes=sizes.nodes)
        self.recovery_s = soak_bound.recovery_s(settings)
        self.fig: dict[str, float] = {}
        self.carried: list[Carried] = []
        self.events: list[dict[str, Any]] = []
        self.cancels: dict[str, list[str]] = {"queued": [], "running": [], "terminate": []}
        self.missed: list[str] = []
        self.t0 = time.time()  # the offer's start
        self.fault_end = 0.0

    def params(self) -> dict[str, Any]:
        knobs = {k: getattr(self.settings, k) for k in PRODUCTION_KNOBS}
        changed = [k for k in PRODUCTION_KNOBS if knobs[k] != Settings.model_fields[k].default]
        return {
            "sizes": asdict(self.sizes),
            "production": knobs,
            "changed_from_defaults": changed,
            "worker": self.worker.as_dict(),
            "recovery_bound_s": self.recovery_s,
        }

    def event(self, what: str, **detail: Any) -> None:
        row = {"at_s": round(time.time() - self.t0, 2), "event": what}
        self.events.append({**row, **detail})

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        s = self.sizes
        self.result.params[SOAK] = self.params()
        # The lab's own Redis is stopped (it comes back empty); any other broker is cut off
        # through the stack's proxy (tasklab.lab.netproxy), its messages kept.
        own = self.settings.broker_url is None and self.settings.redis_url is None
        with LabStack(self.settings, worker=self.worker, links=not own) as stack:
            if not self.result.servers:
                self.result.servers = stack.server_versions()
                self.result.params["broker"] = stack.broker_label
            server = BrokerCut(stack, "stop" if own else "outage")
            if stack.links is not None:  # the server itself, and the proxies in between
                self.result.params["broker"] = mask_url(stack.links.server_url(stack.broker_url))
                self.result.params["links"] = stack.links.describe()
            with WorkerWatch(stack, self.worker) as watch:
                capacity, estimate = self.calibrate(stack)
                rate = s.load_factor * capacity
                main = JobsDriver(stack.jobs, owner=stack.owner(SOAK))
                victim = Victim(
                    stack,
                    owner=stack.owner("soak-submitter"),
                    jobs=s.victim_jobs,
                    hold_s=s.victim_hold_s,
                    log_dir=stack.lab_dir / "logs",
                )
                victim.start()
                self.t0 = time.time()
                probe = Probe("effect", {"hold_s": s.hold_s})
                owners = [main.owner, victim.owner]
                planned = max(1, round(rate * s.offer_s))
                with (
                    BacklogSampler(stack, owners) as backlog,
                    phase(self.progress, "soak: offer (open loop)", planned) as update,
                ):
                    loop = OpenLoop(
                        main,
                        probe,
                        rate_per_s=rate,
                        duration_s=s.offer_s,
                        tick_s=s.tick_s,
                        update=update,
                    )
                    loop.start()
                    try:
                        self.faults(stack, watch, server, victim, main.owner)
                    finally:
                        victim.kill()
                        loop.join()
                    self.event("offer ended", offered=len(loop.tickets))
                    if loop.ended_at < self.fault_end:
                        self.result.notes.append(
                            "soak: the offer ended before the faults did; a longer offer_s "
                            "keeps the backlog under them"
                        )
                    accepted_victim = victim.accepted()
                    drained = self.drain(stack, owners)
                self.fig.update(
                    capacity_per_s=capacity,
                    capacity_estimate_per_s=estimate,
                    offered_per_s=rate,
                    offer_s=loop.ended_at - loop.started_at,
                    offered=loop.planned,
                    refused=loop.refused,
                    schedule_lag_s_max=loop.lag_s_max,
                    backlog_jobs_max=max((v for _, v in backlog.jobs), default=0.0),
                    queue_depth_max=max((v for _, v in backlog.depth), default=0.0),
                    worker_exits=len(watch.exits),
                )
                for reason in watch.exits:
                    self.result.notes.append(f"soak: a worker exited and was restarted: {reason}")
                self.outcome(stack, loop, main.owner, victim, accepted_victim, drained)
                rows = owner_rows(stack.jobs.engine, main.owner)
                self.result.series += soak_report.series(backlog, rows, t0=self.t0)
        return self.fig

    # --- 1. capacity --------------------------------------------------------------------------
    def calibrate(self, stack: LabStack) -> tuple[float, float]:
        """(measured capacity, estimate) in jobs per second: the probes offered the way the
        soak offers them (open loop, in groups), at twice the estimate for ``calibrate_s``,
        so that every worker process is busy from the first finish to the last; the rate of
        the middle 60 % of the finishes."""
        s = self.sizes
        estimate = s.nodes * self.worker.concurrency / s.hold_s
        if s.calibrate_s <= 0:
            return estimate, estimate
        driver = JobsDriver(stack.jobs, owner=stack.owner("soak-calibrate"))
        probe = Probe("effect", {"hold_s": s.hold_s})
        burst = OpenLoop(
            driver,
            probe,
            rate_per_s=2 * estimate,
            duration_s=s.calibrate_s,
            tick_s=s.tick_s,
            update=lambda n: None,
        )
        with phase(self.progress, "soak: calibrate", burst.planned) as update:
            burst.run()  # here, not in a thread of its own: it is all this phase does
            timeout_s = 4 * s.calibrate_s + 30
            samples = driver.collect(burst.tickets, timeout_s=timeout_s, progress=update)
        measured = middle_rate(samples)
        return (measured or estimate), estimate

    # --- 2. the faults, during the offer -----------------------------------------------------
    def faults(
        self, stack: LabStack, watch: WorkerWatch, server: BrokerCut, victim: Victim, owner: str
    ) -> None:
        s = self.sizes
        self.sleep_until(s.outage_at_s)
        stopped_at, back_at = server.during(s.outage_s)
        self.fig["outage_s"] = back_at - stopped_at
        self.event("broker stopped", at_s=round(stopped_at - self.t0, 2), down_s=s.outage_s)
        self.settle(stack, flushed=server.fault == "stop")
        self.sleep_until(s.faults_at_s)
        self.kill_worker(stack, watch)
        self.kill_submitter(stack, victim)
        self.cancel_some(stack, watch, owner)
        self.fault_end = time.time()

    def sleep_until(self, at_s: float) -> None:
        time.sleep(max(0.0, self.t0 + at_s - time.time()))

    def settle(self, stack: LabStack, *, flushed: bool) -> None:
        """Until every reaper saw the broker restarted empty and published the queued jobs
        again: the marker key is back, then one more reaper interval (each reaper ticks on
        its own clock). A broker cut off by its link kept its messages: one interval."""
        client = stack.redis() if flushed else None
        interval = self.settings.reaper_interval_s

        def marked() -> bool:
            try:
                return client is not None and bool(client.exists(EPOCH_KEY))
            except redis.RedisError:
                return False

        seen = wait_for(marked, timeout_s=3 * interval + 10) if flushed else False
        time.sleep(interval + 1.0)
        self.event("reapers settled", epoch_key_seen=seen)

    def kill_worker(self, stack: LabStack, watch: WorkerWatch) -> None:
        """SIGKILL a node that runs jobs (one started less than half a hold ago, so that it
        still runs when the kill lands) and holds reserved messages (with a bundle among them
        if one shows up within half the wait)."""
        s = self.sizes
        engine = stack.jobs.engine
        start = time.monotonic()
        while time.monotonic() - start < s.kill_wait_s:
            running = started_jobs(engine)
            fresh_after = time.time() - s.hold_s / 2  # still running when the kill lands
            for node in watch.nodes():
                pids = set(node.pids())
                mine = {j for j, (pid, _) in running.items() if pid in pids}
                fresh = [j for j in mine if running[j][1] > fresh_after]
                if node.exited or not fresh:
                    continue
                msgs = node_messages(stack, node)
                if msgs is None or not msgs.reserved:
                    continue
                if not msgs.bundles and time.monotonic() - start < s.kill_wait_s / 2:
                    continue
                at = time.time()
                watch.kill(node)
                self.after_worker_kill(stack, pids, mine, msgs, at)
                return
            time.sleep(0.2)
        self.missed.append("worker kill: no node ran a job while holding reserved messages")

    def after_worker_kill(
        self, stack: LabStack, pids: set[int], running: set[str], msgs: NodeMessages, at: float
    ) -> None:
        held_by_node = set(msgs.all)
        candidates = running | {j for ids in msgs.all.values() for j in ids}
        rows = job_rows(stack.jobs.engine, sorted(candidates))
        client = stack.redis()
        scan = scan_twice(client) if client is not None else {}
        groups = {"worker_running": 0, "worker_reserved": 0}
        for job_id in sorted(candidates):
            row = rows.get(job_id)
            if row is None:
                continue
            if row["status"] == "STARTED" and lease_pid(row["lease_owner"]) in pids:
                group = "worker_running"
            elif row["status"] in WAITING and scan.get(job_id, set()) <= held_by_node:
                group = "worker_reserved"  # no message of it is left but the dead node's
            else:
                continue  # finished, or carried by another message (handed back, re-published)
            groups[group] += 1
            self.carried.append(Carried(job_id, group, at))
        self.fig.update(
            kills_worker=1,
            worker_kill_messages=len(msgs.reserved),
            worker_kill_bundles=msgs.bundles,
            worker_kill_running=groups["worker_running"],
            worker_kill_reserved=groups["worker_reserved"],
        )
        self.event(
            "worker node SIGKILLed",
            at_s=round(at - self.t0, 2),
            **groups,
            reserved_messages=len(msgs.reserved),
        )
        if not groups["worker_running"] or not groups["worker_reserved"]:
            self.missed.append(
                f"worker kill: it held {groups['worker_running']} running and "
                f"{groups['worker_reserved']} reserved jobs (want some of each)"
            )

    def kill_submitter(self, stack: LabStack, victim: Victim) -> None:
        """Let the submitter stream, freeze it until jobs it committed are unpublished, kill."""
        engine = stack.jobs.engine
        client = stack.redis()
        victim.go()
        if not victim.wait_accepted(self.sizes.victim_kill_after, timeout_s=30.0):
            self.missed.append("submitter kill: it did not get going")

        def unpublished() -> list[str]:
            rows = owner_rows(engine, victim.owner)
            waiting = [j for j, r in rows.items() if r["status"] in WAITING and not r["started_at"]]
            if not waiting:
                return []
            if client is None:  # RabbitMQ: its queues cannot be read; the relay marks what
                return [j for j in waiting if rows[j]["status"] == "PENDING"]  # it published
            scan = scan_twice(client, pause_s=0.1)
            left = [j for j in waiting if not scan.get(j)]
            now = job_rows(engine, left)
            return [j for j in left if now.get(j, {}).get("status") in WAITING]

        frozen_at, held, looks = victim.kill_holding(unpublished)
        self.carried += [Carried(j, "relay", frozen_at) for j in held]
        accepted = len(victim.accepted())
        self.fig.update(
            kills_submitter=1,
            submitter_accepted_at_kill=accepted,
            submitter_unpublished=len(held),
            submitter_looks=looks,
        )
        self.event(
            "submitter SIGKILLed",
            at_s=round(frozen_at - self.t0, 2),
            unpublished=len(held),
            accepted=accepted,
            looks=looks,
        )
        if not held:
            self.missed.append("submitter kill: its relay held no job when it died")

    def cancel_some(self, stack: LabStack, watch: WorkerWatch, owner: str) -> None:
        """Cancel the newest queued jobs, then running ones one by one as they run: without
        ``terminate`` (seen at their next progress()), then with it (process killed)."""
        s = self.sizes
        manager = stack.jobs
        engine = manager.engine
        avoid = {c.job_id for c in self.carried}
        for job_id in latest_waiting(engine, owner, s.cancel_queued, avoid):
            self.cancel(stack, job_id, "queued")
        terminated: list[tuple[float, str, list[str]]] = []
        wants = {"running": s.cancel_running, "terminate": s.cancel_terminate}
        tried: set[str] = set()
        deadline = time.monotonic() + self.sizes.kill_wait_s
        while any(len(self.cancels[k]) < n for k, n in wants.items()):
            if time.monotonic() > deadline:
                break
            live = {pid: node for node in watch.nodes() for pid in node.pids()}
            running = running_jobs(engine, owner)
            fresh = [j for j, pid in running.items() if pid in live and j not in avoid | tried]
            if not fresh:
                time.sleep(0.1)
                continue
            job_id = fresh[0]
            tried.add(job_id)
            if len(self.cancels["running"]) < wants["running"]:
                self.cancel(stack, job_id, "running")
                continue
            msgs = node_messages(stack, live[running[job_id]])
            message_id = str(manager.get(job_id).message_id or "")
            mates = [m for m in (msgs.active.get(message_id, []) if msgs else []) if m != job_id]
            at = time.time()
            if self.cancel(stack, job_id, "terminate", terminate=True):
                terminated.append((at, message_id, mates))
        self.event("cancels sent", **{kind: len(ids) for kind, ids in self.cancels.items()})
        time.sleep(1.0)  # the terminated processes are gone, the others saw their cancel
        self.orphans(stack, terminated)

    def cancel(self, stack: LabStack, job_id: str, kind: str, *, terminate: bool = False) -> bool:
        try:
            stack.jobs.cancel(job_id, terminate=terminate)
        except JobStateError:  # it finished first
            return False
        self.cancels[kind].append(job_id)
        return True

    def orphans(self, stack: LabStack, terminated: list[tuple[float, str, list[str]]]) -> None:
        """The other jobs of a terminated bundle whose carrier is gone: the one that ran in
        the killed process next, and the ones no other message carries."""
        from tasklab.processes import pid_alive

        client = stack.redis()
        scan = scan_twice(client) if client is not None and terminated else {}
        n = 0
        for at, message_id, mates in terminated:
            rows = job_rows(stack.jobs.engine, mates)
            for job_id in mates:
                row = rows.get(job_id)
                if row is None:
                    continue
                dead_run = row["status"] == "STARTED" and not pid_alive(
                    lease_pid(row["lease_owner"])
                )
                stranded = row["status"] in WAITING and scan.get(job_id, set()) <= {message_id}
                if dead_run or stranded:
                    self.carried.append(Carried(job_id, "terminated", at))
                    n += 1
        self.fig["terminated_orphans"] = n

    # --- 3. drain -----------------------------------------------------------------------------
    def drain(self, stack: LabStack, owners: Sequence[str]) -> bool:
        """Until every job of ``owners`` is final; False if ``drain_timeout_s`` ran out."""
        engine = stack.jobs.engine
        total = sum(len(owner_rows(engine, o)) for o in owners)
        deadline = time.monotonic() + self.sizes.drain_timeout_s
        with phase(self.progress, "soak: drain", total) as update:
            while True:
                left = not_final(engine, owners)
                update(total - left)
                if left == 0:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(1.0)

    # --- the ledger and the bound ----------------------------------------------------------------
    def outcome(
        self,
        stack: LabStack,
        loop: OpenLoop,
        owner: str,
        victim: Victim,
        victim_ids: list[str],
        drained: bool,
    ) -> None:
        engine = stack.jobs.engine
        main_rows = owner_rows(engine, owner)
        victim_rows = owner_rows(engine, victim.owner)
        main_ids = [t.id for t in loop.tickets]
        ledger = take_ledger(engine, owner=owner, submitted_ids=main_ids, settled=False)
        ledger += take_ledger(
            engine,
            owner=victim.owner,
            submitted_ids=sorted(set(victim_ids) | set(victim_rows)),
            settled=False,
        )
        rows = {**main_rows, **victim_rows}
        requested = {j for ids in self.cancels.values() for j in ids}
        applied = {
            kind: sum(1 for j in ids if rows.get(j, {}).get("status") == "CANCELLED")
            for kind, ids in self.cancels.items()
        }
        for kind, n in (
            ("queued", self.sizes.cancel_queued),
            ("running", self.sizes.cancel_running),
            ("terminate", self.sizes.cancel_terminate),
        ):
            self.fig[f"cancel_{kind}_requested"] = len(self.cancels[kind])
            self.fig[f"cancel_{kind}_applied"] = applied[kind]
            if n and not applied[kind]:
                self.missed.append(f"cancel {kind}: none of {n} wanted was applied")
        unexpected = sorted(j for j, r in rows.items() if r["status"] == "CANCELLED")
        unexpected = [j for j in unexpected if j not in requested]
        verdicts = soak_bound.judge(self.carried, rows, main_rows, recovery_s=self.recovery_s)
        self.fig.update(
            submitted=len(loop.tickets) + loop.refused + len(victim_ids),
            accepted=len(main_ids) + len(victim_ids),
            submitter_accepted=len(victim_ids),
            submitter_unacknowledged=len(set(victim_rows) - set(victim_ids)),
            succeeded=ledger.succeeded,
            dead=ledger.dead,
            cancelled=ledger.cancelled,
            lost=ledger.lost,
            stuck=ledger.in_flight,
            duplicate_effects=ledger.duplicate_effects,
            missing_effects=ledger.missing_effects,
            effects=ledger.effects,
            retried=ledger.retried,
            balanced=float(ledger.balanced),
            drained=float(drained),
            unexpected_cancelled=len(unexpected),
            via_local=sum(1 for r in main_rows.values() if r["via"] == "local"),
            recovery_bound_s=self.recovery_s,
            faults_missed=len(self.missed),
            **soak_report.timing(main_rows, loop, {c.job_id for c in self.carried}),
            **soak_report.bound_figures(verdicts),
        )
        self.result.notes += [f"soak: fault not applied as planned: {m}" for m in self.missed]
        self.result.notes += soak_report.evidence(rows, verdicts, unexpected)
        soak_report.record(self.result, self.fig, verdicts, self.events, t0=self.t0)


def middle_rate(samples: Sequence[Sample]) -> float | None:
    """Finishes per second over the middle 60 % of them (the ramp up and the tail left out)."""
    done = sorted(s.finished_at for s in samples if s.ok and s.finished_at is not None)
    lo, hi = int(0.2 * len(done)), int(0.8 * len(done)) - 1
    if hi - lo < 3 or done[hi] <= done[lo]:
        return None
    return (hi - lo) / (done[hi] - done[lo])


def run_soak(settings: Settings, sizes: SoakSizes, result: LabResult, progress: Progress) -> None:
    """The soak scenario of ``tasklab drill``: its figures go into ``result`` as ``soak.*``."""
    figures = Soak(settings, sizes, result, progress).run()
    result.add_figures(SOAK, figures)
