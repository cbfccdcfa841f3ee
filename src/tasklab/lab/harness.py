"""The stack a lab run measures: broker, schema, worker processes and the producer side.

``LabStack`` starts what the run needs and stops all of it on exit:

- tasklab's own stack: an embedded Redis when no broker is configured, the job tables (on a
  scratch SQLite under ``<home>/lab`` unless ``DATABASE_URL`` is set), and ``tasklab worker``
  children;
- a user's Celery app (``app_spec="module:attribute"``): the app's own broker, and
  ``celery -A module:attribute worker`` children — or the workers already running
  (``workers="external"``).

Worker output goes to ``<home>/lab/logs/`` (not through this process, which is busy measuring).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import psutil
import redis
from celery import Celery

from tasklab.celery_app import DEFAULT_QUEUE, broker_priority, make_celery, redis_priority
from tasklab.embedded import EmbeddedRedis
from tasklab.lab.errors import LabError, WorkersNotReady
from tasklab.lab.links import StackLinks, start_links
from tasklab.processes import die_with_parent, kill_tree
from tasklab.settings import Settings, to_env
from tasklab.supervisor import child_env, tasklab_argv

if TYPE_CHECKING:
    from tasklab.jobs import JobManager

READY_TIMEOUT_S = 60.0
KEEP_LOGS = 40
IDLE_CPU_PCT = 10.0  # worker processes below this share of one core count as idle
IDLE_WINDOW_S = 0.25
IDLE_TIMEOUT_S = 5.0  # worker logs kept under <home>/lab/logs
STOP_TIMEOUT_S = 10.0
KOMBU_DEFAULT_SEP = "\x06\x16"  # kombu's Redis transport: priority p of queue q is "q<sep>p"
PRIORITY_LEVELS = range(10)


@dataclass(frozen=True)
class WorkerConfig:
    """How the lab's worker processes run: the knobs ``tasklab tune`` sweeps."""

    pool: str = "prefork"
    concurrency: int = 2
    prefetch_multiplier: int = 4
    nodes: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            pool=settings.worker_pool,
            concurrency=settings.effective_concurrency,
            prefetch_multiplier=settings.worker_prefetch_multiplier,
        )

    def label(self) -> str:
        nodes = f"{self.nodes} x " if self.nodes > 1 else ""
        return f"{nodes}{self.pool} x{self.concurrency}, prefetch {self.prefetch_multiplier}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "concurrency": self.concurrency,
            "prefetch_multiplier": self.prefetch_multiplier,
            "nodes": self.nodes,
        }


def worker_config(
    settings: Settings,
    *,
    pool: str | None = None,
    concurrency: int | None = None,
    prefetch_multiplier: int | None = None,
    nodes: int = 1,
) -> WorkerConfig:
    """The settings' worker configuration with the CLI's overrides applied."""
    base = WorkerConfig.from_settings(settings)
    return WorkerConfig(
        pool=pool or base.pool,
        concurrency=concurrency or base.concurrency,
        prefetch_multiplier=prefetch_multiplier or base.prefetch_multiplier,
        nodes=max(1, nodes),
    )


def load_app(spec: str) -> Celery:
    """Import a user's Celery app from ``module:attribute`` (or ``module``, whose ``app`` or
    ``celery`` attribute is used), with the working directory importable, as ``celery -A``."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LabError(f"--app {spec}: cannot import {module_name!r}: {e}") from e
    candidates = [attr] if attr else ["app", "celery"]
    for name in candidates:
        value = getattr(module, name, None)
        if isinstance(value, Celery):
            return value
    raise LabError(f"--app {spec}: no Celery app at {module_name}:{'/'.join(candidates)}")


class WorkerNode:
    """One worker subprocess (its main process and pool children), logging to a file."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, config: WorkerConfig
    ) -> None:
        self.name = name  # the Celery node name is "<name>@<host>"
        self.hostname = ""  # the full node name, once it answered a ping
        self.config = config
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

    @property
    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def pids(self) -> list[int]:
        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            kill_tree(proc.pid, timeout_s=STOP_TIMEOUT_S)
            proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _prune_logs(directory: Path, keep: int = KEEP_LOGS) -> None:
    logs = sorted(directory.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-keep] if len(logs) > keep else []:
        old.unlink(missing_ok=True)


def tree_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 1e6


def tree_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


class LabStack:
    """Context manager: ``with LabStack(settings) as stack: ...`` starts, measures, stops."""

    def __init__(
        self,
        settings: Settings,
        *,
        app_spec: str | None = None,
        worker: WorkerConfig | None = None,
        workers: str = "start",
        links: bool = False,
    ) -> None:
        """``workers``: ``start`` the lab's own (per ``worker``), use the ``external`` ones
        already consuming the broker, or ``none`` (the caller spawns them). ``links``: every
        process of the stack reaches the broker and the database through a proxy of the
        lab's (``self.links``), whose modes cut the link to any server."""
        if workers not in ("start", "external", "none"):
            raise LabError(f"workers must be start, external or none, not {workers!r}")
        if links and app_spec is not None:
            raise LabError("links need tasklab's own stack: the --app's broker is its own")
        self.base_settings = settings
        self.app_spec = app_spec
        self.worker_config = worker or WorkerConfig.from_settings(settings)
        self.workers_mode = workers
        self.run_id = uuid.uuid4().hex[:8]
        self.lab_dir = settings.home_dir / "lab"
        self.settings = self._run_settings(settings)
        self.broker_server: EmbeddedRedis | None = None
        self.want_links = links
        self.links: StackLinks | None = None
        self.nodes: list[WorkerNode] = []
        self._celery: Celery | None = None
        self._jobs: JobManager | None = None
        self._redis: redis.Redis | None = None
        self._lock_file: IO[str] | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> LabStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._lock()
        _prune_logs(self.lab_dir / "logs")
        if self.own:
            self._start_own_servers()
        if self.want_links:
            self.links, self.settings = start_links(self.settings)
        if self.workers_mode == "start":
            self.start_nodes(self.worker_config)
        elif self.workers_mode == "external" and not self.ping():
            raise WorkersNotReady(
                f"no worker answered a ping on {self.broker_label}; start "
                "one, or let the lab start its own"
            )

    def stop(self) -> None:
        self.stop_nodes()
        if self._jobs is not None:
            self._jobs.close()
            self._jobs = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._celery is not None:
            self._celery.close()
            self._celery = None
        if self.links is not None:
            self.links.stop()
            self.links = None
        if self.broker_server is not None:
            self.broker_server.stop()
            self.broker_server = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def _lock(self) -> None:
        """One lab run per home directory: the scratch database and logs are shared."""
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.lab_dir / "lab.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            raise LabError(
                f"another lab run is using {self.lab_dir}; wait for it, or use another "
                "TASKLAB_HOME_DIR"
            ) from e
        self._lock_file = handle

    @property
    def idle_queue(self) -> str:
        """A queue of this run's own that no worker consumes until told to (bench execute)."""
        return f"lab-execute-{self.run_id}"

    def _run_settings(self, settings: Settings) -> Settings:
        settings = settings.model_copy(
            update={"extra_queues": [*settings.extra_queues, f"lab-*-{self.run_id}*"]}
        )
        if settings.database_url is not None:
            return settings
        # Embedded SQLite: a scratch database of the lab's own, fresh for each run.
        return settings.model_copy(update={"home_dir": self.lab_dir})

    def _start_own_servers(self) -> None:
        from tasklab.migrations import migrate

        if self.settings.broker_url is None and self.settings.redis_url is None:
            self.broker_server = EmbeddedRedis(self.lab_dir / "redis")
            url = self.broker_server.start()
            self.settings = self.settings.model_copy(update={"redis_url": url})
        if self.base_settings.database_url is None:
            for suffix in ("", "-wal", "-shm"):
                path = Path(f"{self.settings.sqlite_path}{suffix}")
                path.unlink(missing_ok=True)
        migrate(self.settings)

    # --- what the run talks to --------------------------------------------------------------
    @property
    def own(self) -> bool:
        return self.app_spec is None

    @property
    def celery(self) -> Celery:
        """The producer app: tasklab's (probes included) or the user's."""
        if self._celery is None:
            import tasklab.lab.probes  # noqa: F401  (registers the probe tasks on every app)

            self._celery = make_celery(self.settings) if self.own else load_app(str(self.app_spec))
        return self._celery

    @property
    def jobs(self) -> JobManager:
        """A ``JobManager`` on the run's database (tasklab's own stack only)."""
        if not self.own:
            raise LabError("tasklab jobs need tasklab's own stack; not available with --app")
        if self._jobs is None:
            import tasklab.lab.probe_jobs  # noqa: F401  (declares the probe jobs)
            from tasklab.jobs import JobManager

            self._jobs = JobManager(self.settings)
        return self._jobs

    @property
    def queue(self) -> str:
        """The queue the lab's work goes to (and its workers consume)."""
        if self.own:
            return DEFAULT_QUEUE
        return str(self.celery.conf.task_default_queue or "celery")

    @property
    def broker_url(self) -> str:
        if self.own:
            return self.settings.effective_broker_url
        return str(self.celery.conf.broker_url or "")

    @property
    def broker_label(self) -> str:
        from tasklab.settings import mask_url

        return str(mask_url(self.broker_url))

    @property
    def broker_is_redis(self) -> bool:
        return self.broker_url.startswith(("redis", "rediss", "unix"))

    def priority(self, tasklab_priority: int) -> int:
        """A tasklab priority (9 most urgent) as the broker wants it."""
        if self.own:
            return broker_priority(self.settings, tasklab_priority)
        return redis_priority(tasklab_priority) if self.broker_is_redis else tasklab_priority

    def redis(self) -> redis.Redis | None:
        """A client on the broker when it is Redis (memory and queue-depth figures)."""
        if not self.broker_is_redis:
            return None
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.broker_url, socket_timeout=5)
        return self._redis

    def queue_depth(self, queue: str | None = None) -> int | None:
        """Messages waiting in ``queue``, all priority sub-queues summed (Redis only)."""
        client = self.redis()
        if client is None:
            return None
        name = queue or self.queue
        options = self.celery.conf.broker_transport_options or {}
        sep = options.get("sep", KOMBU_DEFAULT_SEP)
        keys = [name, *(f"{name}{sep}{p}" for p in PRIORITY_LEVELS if p)]
        try:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            return int(sum(pipe.execute()))
        except redis.RedisError:
            return None

    def owner(self, batch: str) -> str:
        """The job owner that marks one batch of this run's jobs (ledgers filter on it)."""
        return f"lab:{self.run_id}:{batch}"

    def server_versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        client = self.redis()
        if client is not None:
            with contextlib.suppress(redis.RedisError):
                out["redis"] = str(client.info("server").get("redis_version"))
        elif self.broker_url.startswith(("amqp", "pyamqp")):
            out.update(self._amqp_version())
        if self.own:
            out.update(self._database_version())
        return out

    def _amqp_version(self) -> dict[str, str]:
        """The RabbitMQ version the broker announced when the connection opened."""
        with contextlib.suppress(Exception), self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            properties = conn.connection.server_properties
            return {str(properties.get("product", "amqp")).lower(): str(properties["version"])}
        return {}

    def _database_version(self) -> dict[str, str]:
        if self.settings.sync_database_url.startswith("sqlite"):
            return {"sqlite": sqlite3.sqlite_version}
        engine = self.jobs.engine
        with contextlib.suppress(Exception), engine.connect():
            info = engine.dialect.server_version_info or ()
            return {engine.dialect.name: ".".join(str(p) for p in info)}
        return {}

    # --- workers ----------------------------------------------------------------------------
    def start_nodes(self, config: WorkerConfig) -> None:
        self.worker_config = config
        nodes = [self.spawn(config) for _ in range(config.nodes)]
        self.wait_ready(nodes)
        self.wait_idle(nodes)

    def stop_nodes(self, nodes: list[WorkerNode] | None = None) -> None:
        """Stop ``nodes`` (default: all of them), in parallel."""
        stopping = list(self.nodes if nodes is None else nodes)
        threads = [threading.Thread(target=node.stop) for node in stopping]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.nodes = [n for n in self.nodes if n not in stopping]

    def restart_nodes(self, config: WorkerConfig) -> None:
        self.stop_nodes()
        self.start_nodes(config)

    def spawn(
        self, config: WorkerConfig, *, queue: str | None = None, settings: Settings | None = None
    ) -> WorkerNode:
        """Start one worker node (not waiting for it) consuming ``queue`` (default: the lab's).
        ``settings``: the node's own (its links through a proxy, say; tasklab's workers only)."""
        name = f"lab{len(self.nodes)}-{self.run_id}-{uuid.uuid4().hex[:4]}"
        log_path = self.lab_dir / "logs" / f"{name}.log"
        if self.own:
            argv = tasklab_argv(
                "worker",
                "--concurrency",
                str(config.concurrency),
                "--pool",
                config.pool,
                "--hostname",
                f"{name}@%h",
            )
            if queue:
                argv += ["--queues", queue]
            env = child_env(
                {
                    **to_env(settings or self.settings),
                    "TASKLAB_WORKER_PREFETCH_MULTIPLIER": str(config.prefetch_multiplier),
                }
            )
        else:
            argv = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                str(self.app_spec),
                "worker",
                "--pool",
                config.pool,
                "--concurrency",
                str(config.concurrency),
                "--prefetch-multiplier",
                str(config.prefetch_multiplier),
                "--hostname",
                f"{name}@%h",
                "--queues",
                queue or self.queue,
                "--loglevel",
                "INFO",
            ]
            path = os.pathsep.join([os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])])
            env = child_env({"PYTHONPATH": path})
        node = WorkerNode(name, argv, env, log_path, config)
        node.start()
        self.nodes.append(node)
        return node

    def ping(self, timeout_s: float = 1.0) -> list[str]:
        replies = self.celery.control.ping(timeout=timeout_s) or []
        return [name for reply in replies for name in reply]

    def wait_ready(
        self, nodes: list[WorkerNode] | None = None, timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """Until every node answers a ping (its full name is recorded); a node that exits
        fails at once, with its log tail."""
        waiting = {node.name: node for node in (self.nodes if nodes is None else nodes)}
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            for node in waiting.values():
                if node.exited:
                    raise WorkersNotReady(f"worker {node.name} exited at start:\n{node.log_tail()}")
            for full in self.ping(0.5):
                name = full.split("@", 1)[0]
                if name in waiting:
                    waiting.pop(name).hostname = full
        if waiting:
            tails = "\n".join(node.log_tail(1500) for node in waiting.values())
            raise WorkersNotReady(f"workers did not answer a ping in {timeout_s:.0f} s:\n{tails}")

    def wait_idle(
        self,
        nodes: list[WorkerNode] | None = None,
        *,
        busy_pct: float = IDLE_CPU_PCT,
        timeout_s: float = IDLE_TIMEOUT_S,
    ) -> bool:
        """Until the nodes' processes use less than ``busy_pct`` of one core (they finished
        booting), at most ``timeout_s``. True if they settled."""
        pids = [pid for node in (self.nodes if nodes is None else nodes) for pid in node.pids()]
        deadline = time.monotonic() + timeout_s
        before = tree_cpu_s(pids)
        while time.monotonic() < deadline:
            time.sleep(IDLE_WINDOW_S)
            after = tree_cpu_s(pids)
            if (after - before) / IDLE_WINDOW_S * 100 < busy_pct:
                return True
            before = after
        return False

    def worker_pids(self) -> list[int]:
        """Every worker process: the ones this stack started, else the local ones reported by
        ``inspect stats`` (main process and pool)."""
        if self.nodes:
            return [pid for node in self.nodes for pid in node.pids()]
        stats = self.celery.control.inspect(timeout=1.0).stats() or {}
        pids: list[int] = []
        for info in stats.values():
            pool = info.get("pool") or {}
            pids += [int(info.get("pid", 0)), *(int(p) for p in pool.get("processes", []))]
        return [p for p in pids if p and psutil.pid_exists(p)]

    def worker_rss_mb(self) -> float:
        return tree_rss_mb(self.worker_pids())

    def worker_cpu_s(self) -> float:
        return tree_cpu_s(self.worker_pids())

    def destinations(self) -> list[str] | None:
        """Control-command destinations: the nodes this stack started (None: all workers)."""
        return [n.hostname for n in self.nodes if n.hostname] or None


def with_config(config: WorkerConfig, **changes: Any) -> WorkerConfig:
    return replace(config, **changes)
