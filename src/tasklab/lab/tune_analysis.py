"""``tasklab tune``, step 1: the system, the running workers and the Celery config they run,
and the settings in that config that lose, duplicate or starve tasks (``config_risks``)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil
import redis
from celery import Celery

from tasklab.settings import Settings

REDIS_DEFAULT_VISIBILITY_S = 3600.0


@dataclass(frozen=True)
class Risk:
    setting: str
    where: str  # "app config" or a worker's name
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"setting": self.setting, "where": self.where, "message": self.message}


def analyse_system() -> dict[str, float]:
    mem = psutil.virtual_memory()
    load1, load5, _ = os.getloadavg()
    return {
        "cores": float(os.cpu_count() or 1),
        "memory_gb": mem.total / 1e9,
        "memory_available_gb": mem.available / 1e9,
        "load_1m": load1,
        "load_5m": load5,
    }


def config_risks(
    conf: Mapping[str, Any], *, where: str = "app config", long_task_s: float | None = None
) -> list[Risk]:
    """Settings that lose, duplicate or starve tasks, or let memory grow without bound."""
    risks: list[Risk] = []

    def add(setting: str, message: str) -> None:
        risks.append(Risk(setting, where, message))

    if conf.get("task_acks_late") and not conf.get("task_reject_on_worker_lost"):
        add(
            "task_reject_on_worker_lost",
            "late acks without reject-on-worker-lost: a task whose "
            "worker process dies is acknowledged as failed, not redelivered",
        )
    longest = _longest_task_s(conf)
    visibility = _visibility_timeout_s(conf)
    if visibility is not None and longest is not None and visibility <= longest:
        add(
            "visibility_timeout",
            f"visibility timeout {visibility:.0f} s <= the longest time "
            f"limit {longest:.0f} s: long or delayed tasks get delivered a second time",
        )
    prefetch = int(conf.get("worker_prefetch_multiplier") or 4)
    if prefetch > 1 and long_task_s is not None and long_task_s >= 1.0:
        add(
            "worker_prefetch_multiplier",
            f"prefetch {prefetch} with tasks of ~{long_task_s:.1f} "
            "s: reserved tasks wait behind a busy process while others idle; use 1",
        )
    elif prefetch >= 16:
        add(
            "worker_prefetch_multiplier",
            f"prefetch {prefetch} is high: tasks sit reserved on "
            "one worker; fine only for very short tasks",
        )
    if conf.get("result_backend") and not conf.get("result_expires"):
        add("result_expires", "results never expire: the result backend grows without bound")
    if not conf.get("worker_max_tasks_per_child") and not conf.get("worker_max_memory_per_child"):
        add(
            "worker_max_tasks_per_child",
            "no max-tasks or max-memory per child: a leaking task "
            "grows its worker process until the machine swaps or the OOM killer steps in",
        )
    return risks


def _longest_task_s(conf: Mapping[str, Any]) -> float | None:
    limits = [conf.get("task_time_limit"), conf.get("task_soft_time_limit")]
    values = [float(v) for v in limits if v]
    return max(values) if values else None


def _visibility_timeout_s(conf: Mapping[str, Any]) -> float | None:
    broker = str(conf.get("broker_url") or "")
    if not broker.startswith(("redis", "rediss", "sqs", "unix")):
        return None
    options = conf.get("broker_transport_options") or {}
    return float(options.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_S))


def app_conf(app: Celery) -> dict[str, Any]:
    keys = (
        "task_acks_late",
        "task_reject_on_worker_lost",
        "task_time_limit",
        "task_soft_time_limit",
        "broker_transport_options",
        "broker_url",
        "worker_prefetch_multiplier",
        "result_backend",
        "result_expires",
        "worker_max_tasks_per_child",
        "worker_max_memory_per_child",
        "worker_concurrency",
        "worker_pool",
    )
    return {k: app.conf.get(k) for k in keys}


def analyse_workers(
    app: Celery, *, timeout_s: float = 1.0
) -> tuple[list[dict[str, Any]], list[Risk]]:
    """One row per running worker (from ``inspect stats``), and the risks in its ``conf``."""
    inspect = app.control.inspect(timeout=timeout_s)
    stats = inspect.stats() or {}
    confs = inspect.conf(with_defaults=True) or {}
    rows, risks = [], []
    for name, info in sorted(stats.items()):
        pool = info.get("pool") or {}
        rusage = info.get("rusage") or {}
        rows.append(
            {
                "worker": name,
                "pool": _pool_name(pool.get("implementation")),
                "concurrency": pool.get("max-concurrency"),
                "prefetch_count": info.get("prefetch_count"),
                "processed": sum((info.get("total") or {}).values()),
                "maxrss_mb": round(float(rusage.get("maxrss", 0)) / 1024, 1),
                "cpu_s": round(float(rusage.get("utime", 0)) + float(rusage.get("stime", 0)), 2),
            }
        )
        if name in confs:
            risks += config_risks(confs[name], where=name)
    return rows, risks


def _pool_name(implementation: Any) -> str:
    text = str(implementation or "")
    for name in ("prefork", "threads", "solo", "eventlet", "gevent"):
        if name in text or (name == "prefork" and "prefork" in text.lower()):
            return name
    return text.rsplit(":", 1)[-1] or "?"


def running_broker_app(settings: Settings, app_spec: str | None) -> Celery | None:
    """An app on the broker the user's workers consume, if one answers: the user's app, the
    configured broker, or the embedded Redis of a running ``tasklab up``."""
    from tasklab.celery_app import make_celery
    from tasklab.lab.harness import load_app

    if app_spec is not None:
        app = load_app(app_spec)
        return app if _answers(str(app.conf.broker_url or "")) else None
    url = settings.broker_url or settings.redis_url or _running_embedded_url(settings)
    if url is None or not _answers(url):
        return None
    return make_celery(settings.model_copy(update={"broker_url": url}), include=[])


def _running_embedded_url(settings: Settings) -> str | None:
    pidfile = settings.home_dir / "redis" / "redis.pid.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(pidfile.read_text())
        if psutil.pid_exists(int(record["server_pid"])):
            return f"redis://127.0.0.1:{int(record['port'])}/0"
    return None


def _answers(url: str) -> bool:
    if not url:
        return False
    if url.startswith(("redis", "rediss", "unix")):
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
            with contextlib.closing(client):
                return bool(client.ping())
        except redis.RedisError:
            return False
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=1, timeout=2)
            return True
    except Exception:  # any transport error means "not reachable"
        return False
