"""The supervisor on real child processes: restarts, start limit, requested restarts."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasklab.processes import pid_alive
from tasklab.supervisor import Component, PartLogs, Supervisor


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def running(supervisor: Supervisor) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=supervisor.run)
    thread.start()
    try:
        yield thread
    finally:
        supervisor.request_stop()
        thread.join(30)


def test_a_part_that_keeps_failing_at_its_start_stops_the_stack_saying_why_once(
    tmp_path: Path,
) -> None:
    bad = Component("bad", python("import sys; print('port 1234 is taken'); sys.exit(3)"))
    good = Component("good", python("import time; time.sleep(60)"))
    logs = PartLogs(tmp_path, ["bad", "good"], combined=True)
    supervisor = Supervisor([bad, good], env={}, logs=logs, start_limit=3, start_window_s=5)
    supervisor.run()  # returns by itself: the supervisor gave up
    logs.close()
    assert supervisor.gave_up is not None
    assert "bad exited 3 times within 5 s" in supervisor.gave_up
    assert "last exit code 3: port 1234 is taken" in supervisor.gave_up
    assert bad.state == "gave up" and bad.restarts == 2
    assert good.process is None and good.state == "stopped"
    assert (tmp_path / "stack.log").read_text().count("exited 3 times") == 1
    own_lines = (tmp_path / "bad.log").read_text().splitlines()
    assert own_lines.count("port 1234 is taken") == 3  # the part's own output, each start


@pytest.mark.slow
def test_a_part_that_dies_after_running_a_while_is_restarted_every_time(tmp_path: Path) -> None:
    flaky = Component("flaky", python("import time; time.sleep(0.6); raise SystemExit(1)"))
    supervisor = Supervisor([flaky], env={}, start_limit=2, start_window_s=0.3)
    with running(supervisor):
        wait_for(lambda: flaky.restarts >= 2 and flaky.process is not None, "two restarts")
        assert supervisor.gave_up is None and flaky.early_failures == 0


def test_a_requested_restart_runs_the_part_again_under_a_new_pid(tmp_path: Path) -> None:
    sleeper = Component("sleeper", python("import time; time.sleep(60)"))
    other = Component("other", python("import time; time.sleep(60)"))
    supervisor = Supervisor([sleeper, other], env={})
    with running(supervisor):
        wait_for(lambda: sleeper.process and other.process, "the parts' start")
        assert sleeper.process is not None and other.process is not None
        first, other_pid = sleeper.process.pid, other.process.pid
        supervisor.request_restart(["sleeper"])
        wait_for(lambda: sleeper.process and sleeper.process.pid != first, "a new pid")
        assert not pid_alive(first)
        assert other.process.pid == other_pid  # the other part was left alone
        assert sleeper.restarts == 0  # asked for, not a failure
