"""``tasklab exporter``: queue, job and worker gauges on their own port.

For deployments that scrape the broker side separately from the API (and for ``tasklab up``):
one process per deployment, not per worker, since it measures the whole fleet. It serves only
its own registry (``registry.exporter_registry``), refreshed every ``interval_s``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from prometheus_client import start_http_server

from tasklab.celery_app import make_celery
from tasklab.database import make_engine
from tasklab.observe.queues import QueueGauges, QueueProbe
from tasklab.observe.registry import exporter_registry
from tasklab.observe.workers import WorkerMonitor
from tasklab.settings import Settings

DEFAULT_PORT = 9810
DEFAULT_INTERVAL_S = 5.0

log = logging.getLogger(__name__)


@dataclass
class Exporter:
    """The probes and the gauges they feed; ``refresh()`` does one round."""

    settings: Settings
    queues: QueueProbe = field(init=False)
    workers: WorkerMonitor = field(init=False)
    gauges: QueueGauges = field(init=False, default_factory=QueueGauges)

    def __post_init__(self) -> None:
        self._celery = make_celery(self.settings)
        self._engine = make_engine(self.settings)
        self.queues = QueueProbe(self.settings, engine=self._engine)
        self.workers = WorkerMonitor(self._celery)

    def refresh(self) -> None:
        """One round; a failing source is logged and the other gauges still update."""
        try:
            self.gauges.record(self.queues.snapshot())
        except Exception as e:  # broker or database down: keep serving the last values
            log.warning("queue refresh failed: %s: %s", type(e).__name__, e)
        try:
            self.workers.snapshot().record()
        except Exception as e:
            log.warning("worker refresh failed: %s: %s", type(e).__name__, e)

    def close(self) -> None:
        self.workers.stop()
        self.queues.close()
        self._engine.dispose()
        self._celery.close()


def run_exporter(
    settings: Settings,
    port: int = DEFAULT_PORT,
    *,
    host: str | None = None,
    interval_s: float = DEFAULT_INTERVAL_S,
    stop: threading.Event | None = None,
) -> None:
    """Serve the exporter's metrics on ``host:port`` until ``stop`` is set (or SIGTERM/SIGINT
    raises SystemExit/KeyboardInterrupt in the caller's thread)."""
    stop = stop or threading.Event()
    address = host or settings.api_host
    exporter = Exporter(settings)
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
