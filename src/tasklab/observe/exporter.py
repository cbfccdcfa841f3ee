"""``tasklab exporter``: queue, job and worker gauges on their own port.

For deployments that scrape the broker side separately from the API (and for ``tasklab up``):
one process per deployment, not per worker, since it measures the whole fleet. It serves only
its own registry (``registry.exporter_registry``), refreshed every ``interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from celery import Celery
from prometheus_client import start_http_server
from sqlalchemy import Engine

from tasklab.celery_app import make_celery
from tasklab.database import make_engine
from tasklab.errors import ConfigError
from tasklab.observe.events import TaskEvents
from tasklab.observe.metrics import EXPORTER_LAST_SUCCESS, EXPORTER_REFRESH_SUCCESS
from tasklab.observe.queues import (
    QueueGauges,
    QueueProbe,
    QueueSnapshot,
    jobs_by_status,
    oldest_waiting_ages,
)
from tasklab.observe.registry import exporter_registry
from tasklab.observe.workers import WorkerMonitor
from tasklab.settings import Settings

DEFAULT_PORT = 9810
DEFAULT_INTERVAL_S = 5.0

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Exporter:
    """The probes and the gauges they feed; ``refresh()`` does one round.

    With ``app`` (any Celery app, ``--app module:celery``) the events, workers and queues are
    that app's: its broker, its declared queues, no job table. Without it, tasklab's."""

    settings: Settings
    app: Celery | None = None
    queues: QueueProbe = field(init=False)
    workers: WorkerMonitor = field(init=False)
    events: TaskEvents = field(init=False)
    gauges: QueueGauges = field(init=False, default_factory=QueueGauges)

    def __post_init__(self) -> None:
        self._engine: Engine | None = None
        if self.app is None:
            self._celery = make_celery(self.settings)
            self._engine = make_engine(self.settings)
            self.queues = QueueProbe(self.settings, engine=self._engine)
        else:
            self._celery = self.app
            with self.app.connection_for_read() as conn:  # not connected: the URL only
                broker = str(conn.as_uri(include_password=True))
            settings = self.settings.model_copy(update={"broker_url": broker})
            self.queues = QueueProbe(settings, queues=app_queues(self.app))
        self.workers = WorkerMonitor(self._celery)
        self.events = TaskEvents(default_queue=str(self._celery.conf.task_default_queue))
        self.workers.listeners.append(self.events.on_event)

    def refresh(self) -> None:
        """One round, each source on its own: a source that fails is logged, its figures are
        dropped (absent, never the last values as if fresh) and its
        ``tasklab_exporter_refresh_success{source}`` reads 0; the others still update."""
        broker = self._attempt("broker", self.queues.broker_depths)
        database = None
        if self._engine is not None:
            engine = self._engine
            database = self._attempt(
                "database",
                lambda: (
                    oldest_waiting_ages(engine, strict=True),
                    jobs_by_status(engine, strict=True),
                ),
            )
        if broker is None:
            self.gauges.forget_broker()
        depths, unacked = broker if broker is not None else ({}, None)
        ages, statuses = database if database is not None else ({}, {})
        self.gauges.record(QueueSnapshot(depths, unacked, ages, statuses))
        if database is None and self._engine is not None:
            self.gauges.forget_database()  # record() set 0s for queues it knew
        try:
            self.workers.snapshot().record()
            # without the events receiver, heartbeats and task counts are not arriving
            _mark("workers", ok=self.workers.receiving)
        except Exception as e:
            log.warning("workers refresh failed: %s: %s", type(e).__name__, e)
            _mark("workers", ok=False)
        self.events.expire_workers()

    def _attempt(self, source: str, read: Callable[[], T]) -> T | None:
        try:
            value = read()
        except Exception as e:  # broker or database down: this source has no data this round
            log.warning("%s refresh failed: %s: %s", source, type(e).__name__, e)
            _mark(source, ok=False)
            return None
        _mark(source, ok=True)
        return value

    def close(self) -> None:
        self.workers.stop()
        self.queues.close()
        if self._engine is not None:
            self._engine.dispose()
        if self.app is None:  # the caller's app is the caller's to close
            self._celery.close()


def _mark(source: str, *, ok: bool) -> None:
    EXPORTER_REFRESH_SUCCESS.labels(source).set(1 if ok else 0)
    if ok:
        EXPORTER_LAST_SUCCESS.labels(source).set(time.time())


def app_queues(app: Celery) -> tuple[str, ...]:
    """The queues an app declares (``task_queues``), else its default queue."""
    names = tuple(str(name) for name in app.amqp.queues)
    return names or (str(app.conf.task_default_queue),)


def load_app(spec: str) -> Celery:
    """``module:attribute`` (or ``module``, Celery's own lookup) → the Celery app; ConfigError
    naming the option when it cannot be imported."""
    from celery.app.utils import find_app

    try:
        app = find_app(spec)
    except (ImportError, AttributeError) as e:
        raise ConfigError("--app", f"cannot load Celery app {spec!r}: {e}") from e
    if not isinstance(app, Celery):
        raise ConfigError("--app", f"{spec!r} is a {type(app).__name__}, not a Celery app")
    return app


def run_exporter(
    settings: Settings,
    port: int = DEFAULT_PORT,
    *,
    host: str | None = None,
    interval_s: float = DEFAULT_INTERVAL_S,
    stop: threading.Event | None = None,
    app: Celery | None = None,
) -> None:
    """Serve the exporter's metrics on ``host:port`` until ``stop`` is set (or SIGTERM/SIGINT
    raises SystemExit/KeyboardInterrupt in the caller's thread)."""
    stop = stop or threading.Event()
    address = host or settings.api_host
    exporter = Exporter(settings, app=app)
    try:
        server, thread = start_http_server(port, addr=address, registry=exporter_registry())
    except OSError:
        exporter.close()
        raise
    log.info("tasklab exporter on http://%s:%d/metrics", address, port)
    exporter.workers.start()
    try:
        while True:
            exporter.refresh()
            if stop.wait(interval_s):
                return
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        exporter.close()
