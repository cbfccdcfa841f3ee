"""Task metrics from Celery's events, for a plain Celery app (no tasklab in it) on real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tasklab.errors import ConfigError
from tasklab.observe.events import OTHER, BoundedLabel, TaskEvents
from tasklab.observe.exporter import Exporter, load_app
from tasklab.observe.registry import exporter_registry
from tasklab.settings import Settings
from tests.observe.conftest import wait_until

PLAIN_APP = textwrap.dedent("""
    import os
    from celery import Celery

    app = Celery("plain", broker=os.environ["PLAIN_BROKER_URL"])
    app.conf.task_send_sent_event = True  # the producer side: task-sent events

    @app.task(name="{prefix}.add")
    def add(x, y):
        return x + y

    @app.task(name="{prefix}.boom")
    def boom():
        raise KeyError("no such thing")
""")


@pytest.fixture
def plain_app(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module ``plain_<hex>`` with a plain Celery app and a ``-E`` worker running it."""
    module = f"plain_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(PLAIN_APP.format(prefix=module))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PLAIN_BROKER_URL", redis_url)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    argv = [sys.executable, "-m", "celery", "-A", module, "worker", "-E", "-P", "solo"]
    argv += ["-n", f"{module}@%h", "--without-mingle", "--without-gossip", "-l", "WARNING"]
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield module
    worker.terminate()
    worker.wait(20)
    log.close()


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.slow
def test_a_plain_celery_apps_tasks_show_up_per_task_name_and_state(
    plain_app: str, settings: Settings
) -> None:
    app = load_app(f"{plain_app}:app")
    exporter = Exporter(settings, app=app)
    exporter.workers.start()
    registry = exporter_registry()
    host = f"{plain_app}@{os.uname().nodename}"
    try:
        wait_until(
            lambda: sample(registry, "celery_worker_up", {"hostname": host}),
            lambda up: up == 1,
            timeout_s=30,
            what="the worker's heartbeat",
        )
        results = [app.tasks[f"{plain_app}.add"].delay(i, 1) for i in range(3)]
        app.tasks[f"{plain_app}.boom"].delay()
        add = {"name": f"{plain_app}.add", "hostname": host, "queue_name": "celery"}
        wait_until(
            lambda: sample(registry, "celery_task_succeeded_total", add),
            lambda n: n == 3,
            timeout_s=30,
            what="3 succeeded adds",
        )
        boom = {"name": f"{plain_app}.boom", "hostname": host, "queue_name": "celery"}
        failed = {**boom, "exception": "KeyError"}
        wait_until(
            lambda: sample(registry, "celery_task_failed_total", failed),
            lambda n: n == 1,
            timeout_s=30,
            what="the failed boom",
        )
        exporter.refresh()
    finally:
        exporter.close()

    assert sample(registry, "celery_task_received_total", add) == 3
    assert sample(registry, "celery_task_started_total", add) == 3
    assert sample(registry, "celery_task_runtime_seconds_count", add) == 3
    assert sample(registry, "celery_task_queue_wait_time_seconds_count", add) == 3
    assert all(r.id for r in results)
    # producers are many processes: their sends are counted under one hostname
    assert sample(registry, "celery_task_sent_total", {**add, "hostname": "generic"}) == 3
    assert sample(registry, "celery_task_succeeded_total", boom) == 0
    # the plain app's own queue, by its broker
    assert registry.get_sample_value("tasklab_queue_depth", {"queue": "celery"}) == 0


def test_label_values_past_the_limit_read_other() -> None:
    bound = BoundedLabel(2)

    assert [bound("a"), bound("b"), bound("c"), bound("a"), bound(None)] == [
        "a",
        "b",
        OTHER,
        "a",
        OTHER,
    ]


def test_task_names_past_the_limit_are_counted_as_other() -> None:
    registry = exporter_registry()
    events = TaskEvents(max_label_values=1)
    prefix = uuid.uuid4().hex
    for i, name in enumerate([f"{prefix}.first", f"{prefix}.second", f"{prefix}.third"]):
        events.on_event(
            {
                "type": "task-received",
                "uuid": f"{prefix}-{i}",
                "name": name,
                "hostname": "w@h",
                "timestamp": 1.0,
                "local_received": 1.0,
                "clock": i,
            }
        )

    first = {"name": f"{prefix}.first", "hostname": "w@h", "queue_name": "celery"}
    other = {"name": OTHER, "hostname": "w@h", "queue_name": "celery"}
    assert sample(registry, "celery_task_received_total", first) == 1
    assert sample(registry, "celery_task_received_total", other) == 2


def test_an_app_that_cannot_be_imported_is_a_config_error_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="--app"):
        load_app("no_such_module_here:app")


def test_the_exporter_command_refuses_an_app_it_cannot_load_with_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tasklab", "exporter", "--app", "no_such_module_here:app"],
        env={**os.environ, "TASKLAB_HOME_DIR": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: --app: cannot load Celery app")
    assert len(done.stderr.strip().splitlines()) == 1
