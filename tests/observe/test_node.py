"""A worker node serves its own /metrics: its jobs' metrics and its whole process tree's RSS."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasklab.jobs import JobManager, JobStatus
from tasklab.lab import probe_jobs
from tasklab.migrations import migrate
from tasklab.observe import multiproc
from tasklab.ports import free_port_on
from tasklab.settings import Settings
from tests.observe.conftest import wait_until
from tests.support.worker import WorkerProcess


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.mark.slow
def test_a_worker_node_serves_its_jobs_metrics_and_its_process_trees_rss(
    settings: Settings, worker_factory: type[WorkerProcess]
) -> None:
    migrate(settings)
    port = free_port_on("127.0.0.1")
    worker = worker_factory(settings, concurrency=2, name="node1")
    worker.argv += ["--metrics-port", str(port)]
    worker.start()
    jm = JobManager(settings)
    try:
        ids = [jm.submit(probe_jobs.noop).id for _ in range(3)]
        assert all(jm.wait(i, timeout_s=30).status is JobStatus.SUCCEEDED for i in ids)
        finished = ("tasklab_jobs_finished_total", "tasklab.probe_job.noop")
        samples = wait_until(
            lambda: scrape(port),
            lambda s: (
                value(s, finished[0], task=finished[1], queue="default", status="succeeded") == 3
            ),
            timeout_s=20,
            what="3 finished jobs on the node's /metrics",
        )
    finally:
        jm.close()

    tree = [worker.process.pid, *worker.child_pids()] if worker.process else []
    main_rss = psutil.Process(tree[0]).memory_info().rss
    assert value(samples, "tasklab_worker_node_processes") == len(tree) >= 3
    assert (value(samples, "tasklab_worker_node_rss_bytes") or 0) > main_rss
    assert (
        value(samples, "tasklab_job_duration_seconds_count", task=finished[1], queue="default") == 3
    )
    # the exporter's fleet-wide gauges are not the node's to report
    assert not any(name == "tasklab_workers_up" for name, _ in samples)


def test_a_worker_refuses_a_metrics_port_that_is_taken_with_one_line_and_exit_2(
    settings: Settings, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "tasklab", "worker", "--metrics-port", str(port)],
            env={
                **{k: v for k, v in os.environ.items() if k != multiproc.ENV_VAR},
                "TASKLAB_HOME_DIR": str(tmp_path / "home"),
                "REDIS_URL": settings.redis_url or "",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert f"port {port}" in done.stderr and "--metrics-port" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_node_gets_a_fresh_folder_of_its_own_unless_its_parent_prepared_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(home_dir=tmp_path / "home")
    # recorded first, so undone last: prepare_node_env sets the variable in os.environ
    monkeypatch.setenv(multiproc.ENV_VAR, "")
    monkeypatch.delenv(multiproc.ENV_VAR)
    first = multiproc.prepare_node_env(settings, "a@host")
    (first / "counter_1.db").write_bytes(b"left by a previous run")
    monkeypatch.delenv(multiproc.ENV_VAR)

    again = multiproc.prepare_node_env(settings, "a@host")
    other = multiproc.node_dir_for(settings, "b@host")

    assert again == first != other
    assert list(again.glob("*.db")) == []
    monkeypatch.setenv(multiproc.ENV_VAR, str(tmp_path / "stack"))
    assert multiproc.prepare_node_env(settings, "a@host") == tmp_path / "stack"


@pytest.mark.slow
def test_recycled_pool_childrens_files_are_compacted_and_their_counts_kept(
    settings: Settings, worker_factory: type[WorkerProcess]
) -> None:
    # one job per message, so each job runs in a child of its own that is then replaced
    recycling = settings.model_copy(update={"worker_max_tasks_per_child": 1, "bundle_max": 1})
    migrate(recycling)
    port = free_port_on("127.0.0.1")
    worker = worker_factory(recycling, concurrency=1, name="recycler")
    worker.argv += ["--metrics-port", str(port)]
    worker.start()
    jm = JobManager(recycling)
    try:
        # three children in turn: two that exited and the one that runs now
        for _ in range(3):
            job = jm.submit(probe_jobs.noop)
            assert jm.wait(job.id, timeout_s=60).status is JobStatus.SUCCEEDED
        labels = {"task": "tasklab.probe_job.noop", "queue": "default", "status": "succeeded"}
        wait_until(
            lambda: scrape(port),
            lambda s: value(s, "tasklab_jobs_finished_total", **labels) == 3,
            timeout_s=30,
            what="3 finished jobs on the node's /metrics",
        )
    finally:
        jm.close()

    folder = multiproc.node_dir_for(recycling, f"recycler@{socket.gethostname()}")
    assert worker.process is not None
    assert (folder / "counter_archive.db").exists()
    # once a scrape has run after a child's exit, only live processes keep files of their own
    again = scrape(port)
    live = {worker.process.pid, *worker.child_pids()}
    left = multiproc.pids_in(folder)
    assert left <= live, f"files of dead children left: {sorted(left - live)}"
    assert value(again, "tasklab_jobs_finished_total", **labels) == 3


RACE = """
import socket, sys
from pathlib import Path
from tasklab.observe import multiproc
from tasklab.ports import PortWish, free_port_on
from tasklab.settings import Settings
from tasklab.errors import PortTaken
path = multiproc.prepare_node_env(Settings(home_dir=Path(sys.argv[1])), "race@host")
from tasklab.observe import node
wanted = free_port_on("127.0.0.1")
other = socket.socket()
real_take_port = node.take_port
def take_port_then_lose_it(host, name, wish, notes):
    port = real_take_port(host, name, wish, notes)
    if port == wanted:  # another node binds it between the check and the bind
        other.bind((host, port)); other.listen()
    return port
node.take_port = take_port_then_lose_it
chosen_by = sys.argv[2] or None
try:
    server = node.serve_node_metrics(path, 1, host="127.0.0.1", wish=PortWish(wanted, chosen_by))
except PortTaken as e:
    print("taken", e)
else:
    print("listening", server.port != wanted)
"""


@pytest.mark.parametrize("chosen_by", ["", "--metrics-port"], ids=["default", "chosen"])
def test_a_metrics_port_taken_between_check_and_bind(tmp_path: Path, chosen_by: str) -> None:
    """Nodes starting together see the same default free: the one that loses the bind takes
    another port instead of exiting; a port the user chose is refused with PortTaken."""
    out = subprocess.run(
        [sys.executable, "-c", RACE, str(tmp_path), chosen_by],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != multiproc.ENV_VAR},
    )
    assert out.returncode == 0, out.stderr
    if chosen_by:
        assert out.stdout.startswith("taken") and "--metrics-port" in out.stdout, out.stdout
    else:
        assert out.stdout.strip() == "listening True", out.stdout
