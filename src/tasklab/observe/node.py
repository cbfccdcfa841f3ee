"""A worker node's own ``/metrics``: what its processes record, served from the node itself.

Worker-side metrics (jobs finished, durations, queue wait, retries, recoveries, dead letters)
are written by the pool children into the node's multiprocess folder. On a host that runs no
API nothing else would serve that folder, so ``tasklab worker`` serves it on
``worker_metrics_port`` from its main process, plus the RSS of its whole process tree (pool
children included: a leak in a child shows there, not only in the main process).

Import this module only after ``multiproc.prepare_node_env``: it imports prometheus_client.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import CollectorRegistry, Metric, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tasklab.observe import metrics
from tasklab.observe.registry import (
    EXPORTER_METRICS,
    ExcludingCollector,
    LiveMultiProcessCollector,
    family_names,
)
from tasklab.ports import PortWish, take_port

BIND_TRIES = 5

log = logging.getLogger(__name__)


class ProcessTreeCollector(Collector):
    """RSS and process count of a worker's main process and all its descendants, now."""

    def __init__(self, root_pid: int) -> None:
        self._root_pid = root_pid

    def collect(self) -> Iterable[Metric]:
        rss, count = tree_rss(self._root_pid)
        return [
            GaugeMetricFamily(metrics.NODE_RSS_NAME, metrics.NODE_RSS_HELP, value=rss),
            GaugeMetricFamily(
                metrics.NODE_PROCESSES_NAME, metrics.NODE_PROCESSES_HELP, value=count
            ),
        ]

    def describe(self) -> Iterable[Metric]:
        return []


def tree_rss(root_pid: int) -> tuple[int, int]:
    """(summed RSS in bytes, processes) of ``root_pid`` and its descendants; a process that
    exits while being read is left out."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = count = 0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
        except psutil.Error:
            continue
        count += 1
    return rss, count


def node_registry(path: Path, root_pid: int) -> CollectorRegistry:
    """The node's folder (dead processes reaped and compacted) and its process tree; the
    exporter's fleet-wide gauges are left out, as on the API."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        ExcludingCollector(LiveMultiProcessCollector(path), family_names(EXPORTER_METRICS))
    )
    registry.register(ProcessTreeCollector(root_pid))
    return registry


@dataclass
class NodeMetricsServer:
    """The running server; ``close()`` stops it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _listen(
    host: str, wish: PortWish, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread, int]:
    for tries_left in reversed(range(BIND_TRIES)):
        notes: list[str] = []
        port = take_port(host, "worker metrics", wish, notes)
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            # Taken between the check and the bind (nodes starting together): a default
            # gives way again; a chosen port is the user's to change (PortTaken).
            if e.errno != errno.EADDRINUSE:
                raise
            if wish.chosen_by is not None:
                take_port(host, "worker metrics", wish, notes)
                raise
            if not tries_left:
                raise
            log.warning("worker metrics port %d was taken meanwhile, taking another", port)
            wish = PortWish(0)
            continue
        for note in notes:
            log.warning("%s: scrape this node there, or set worker_metrics_port", note)
        return server, thread, port
    raise AssertionError("unreachable")


def serve_node_metrics(
    path: Path, root_pid: int, *, host: str, wish: PortWish
) -> NodeMetricsServer:
    """Listen on ``wish`` (a default that is taken gives way to a free port, logged; a chosen
    one raises PortTaken) in a daemon thread."""
    registry = node_registry(path, root_pid)
    server, thread, port = _listen(host, wish, registry)
    # Pool children are forked later: they must not keep the port open after the main process
    # is gone (a restarted node could not listen again).
    os.register_at_fork(after_in_child=server.socket.close)
    log.info("worker metrics on http://%s:%d/metrics", host, port)
    return NodeMetricsServer(host, port, server, thread)
