"""Operating real stacks from the CLI: detached, found, listed, restarted, stopped; two stacks
on one machine; a chosen port that is taken; a part that cannot start; a killed stack."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tasklab.processes import pid_alive
from tasklab.stack_control import follow, log_file, tail


def tasklab(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with ``home`` as its home folder and no broker URL set."""
    return subprocess.run(
        [sys.executable, "-m", "tasklab", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TASKLAB_HOME_DIR": str(home), **env},
        cwd=home.parent,
        timeout=150,
    )


def record(home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((home / "stack.json").read_text())
    return data


def tree(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def all_gone(procs: list[psutil.Process], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not [p for p in procs if pid_alive(p.pid)]:
            return True
        time.sleep(0.1)
    return False


# `up --detach` returns once every part has run for the supervisor's start window (10 s by
# default). These stacks' parts all keep running (a part that exits within the window is
# test_a_part_that_cannot_start's), so a few seconds prove the same.
START_WINDOW_S = "4"


def up_detached(home: Path, *args: str) -> dict[str, Any]:
    out = tasklab(
        home,
        "up",
        "--detach",
        "--concurrency",
        "1",
        "--no-beat",
        *args,
        TASKLAB_SUPERVISOR_START_WINDOW_S=START_WINDOW_S,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "runs in the background" in out.stdout
    return record(home)


def answers(url: str) -> bool:
    return httpx.get(url, timeout=5).status_code == 200


@pytest.mark.slow
def test_a_detached_stack_is_found_listed_restarted_and_stopped_by_the_cli(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    rec = up_detached(home)
    procs = tree(rec["pid"])
    try:
        assert rec["detached"] and answers(f"{rec['api_url']}/health")
        # No URL set: the commands find the stack's embedded Redis through its record.
        status = tasklab(home, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["broker"] == rec["redis_url"]
        assert '"broker_reachable": true' in status.stdout
        purged = tasklab(home, "purge", "default", "--yes")
        assert purged.returncode == 0 and "purged 0 message(s)" in purged.stdout
        ps = json.loads(tasklab(home, "ps", "--json").stdout)
        rows = {row["part"]: row for row in ps["rows"]}
        assert set(rows) == {"redis", "worker", "api", "exporter"}
        assert all(row["state"] == "running" and pid_alive(row["pid"]) for row in rows.values())
        assert rows["api"]["port"] == rec["ports"]["api"]
        assert (home / "logs" / "worker.log").stat().st_size > 0
        assert tasklab(home, "logs", "api").returncode == 0
        nope = tasklab(home, "logs", "nope")
        assert nope.returncode == 2 and "worker" in nope.stderr

        again = tasklab(home, "up")
        assert again.returncode == 2
        assert again.stderr.strip().splitlines() == [again.stderr.strip()]
        assert f"already runs in {home}" in again.stderr and f"pid {rec['pid']}" in again.stderr

        old_worker = rows["worker"]["pid"]
        restarted = tasklab(home, "restart", "worker")
        assert restarted.returncode == 0, restarted.stderr
        new_worker = record(home)["parts"]["worker"]["pid"]
        assert new_worker != old_worker and pid_alive(new_worker)
        assert f"restarted worker (pid {old_worker} -> {new_worker})" in restarted.stdout
        assert all_gone([p for p in procs if p.pid == old_worker])
        procs += tree(new_worker)

        stopped = tasklab(home, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert all_gone(procs, timeout_s=5), "a process of the stack outlived `tasklab stop`"
        assert not (home / "stack.json").exists()
        assert tasklab(home, "stop").returncode == 2  # nothing left to stop
        assert tasklab(home, "logs", "-n", "3").returncode == 0  # logs stay after a stop
    finally:
        for p in procs:
            if pid_alive(p.pid):
                p.kill()


@pytest.mark.slow
@pytest.mark.long  # ports' choice is tested in tests/test_ports.py; this runs two whole stacks
def test_two_stacks_share_a_machine_and_a_chosen_port_that_is_taken_fails_at_once(
    tmp_path: Path,
) -> None:
    first_home, second_home = tmp_path / "first", tmp_path / "second"
    first = up_detached(first_home)
    procs = tree(first["pid"])
    try:
        second = up_detached(second_home)  # same defaults: what is taken gives way
        procs += tree(second["pid"])
        for name in ("api", "exporter", "redis"):
            assert first["ports"][name] != second["ports"][name]
        for rec in (first, second):
            assert answers(f"{rec['api_url']}/health")
            assert answers(f"http://127.0.0.1:{rec['ports']['exporter']}/metrics")

        taken = str(first["ports"]["api"])
        third_home = tmp_path / "third"
        chosen = tasklab(third_home, "up", "--port", taken)
        assert chosen.returncode == 2
        lines = chosen.stderr.strip().splitlines()
        assert len(lines) == 1 and f"port {taken}" in lines[0] and "--port" in lines[0]
        from_env = tasklab(
            third_home, "up", "--detach", TASKLAB_EXPORTER_PORT=str(first["ports"]["exporter"])
        )
        assert from_env.returncode == 2 and "exporter_port" in from_env.stderr
        assert not (third_home / "stack.json").exists() and not (third_home / "redis").exists()
    finally:
        for home in (first_home, second_home):
            tasklab(home, "stop")
        assert all_gone(procs)


@pytest.mark.slow
def test_a_killed_stack_takes_its_parts_along_and_its_record_is_ignored_with_a_notice(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    rec = up_detached(home, "--exporter-port", "0")
    procs = tree(rec["pid"])
    os.kill(rec["pid"], signal.SIGKILL)
    assert all_gone(procs), "a part outlived its SIGKILLed supervisor"
    ps = tasklab(home, "ps")
    assert ps.returncode == 0 and f"no stack runs in {home}" in ps.stdout
    notice = ps.stderr.strip().splitlines()
    assert len(notice) == 1 and f"pid {rec['pid']}" in notice[0] and "gone" in notice[0]
    assert not (home / "stack.json").exists()


@pytest.mark.slow
def test_a_part_that_cannot_start_stops_the_stack_saying_why_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    try:
        out = tasklab(
            home,
            "up",
            "--detach",
            "--no-beat",
            "--exporter-port",
            "0",
            "--concurrency",
            "1",
            TASKLAB_IMPORTS='["no_such_module"]',
            # Wider than the default 10 s: a worker's imports may take that long on a busy machine.
            TASKLAB_SUPERVISOR_START_WINDOW_S="40",
        )
        assert out.returncode == 1, out.stdout + out.stderr
        reasons = out.stderr.strip().splitlines()
        assert len(reasons) == 1, out.stderr
        assert "exited 3 times within 40 s" in reasons[0] and "no_such_module" in reasons[0]
        assert (home / "logs" / "stack.log").read_text().count("not restarting it") == 1
        assert not (home / "stack.json").exists()
        assert not (home / "redis" / "redis.pid.json").exists()  # Redis was stopped too
    finally:
        tasklab(home, "stop")  # when a failed assertion left it running


def test_up_detach_in_a_busy_port_says_so_before_starting_anything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = tasklab(home, "up", "--detach", "--port", str(port))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 (--port, for the API) is in use; "
        "choose another, or leave it out to take a free one"
    ]
    assert not (home / "redis").exists()


def test_logs_show_the_last_lines_then_follow_new_ones_as_they_are_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "logs" / "worker.log"
    path.parent.mkdir()
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_file(tmp_path, "worker") == path
    last, offset = tail(path, 3)
    assert last == ["line 97", "line 98", "line 99"]
    lines = follow(path, offset, poll_s=0.01)
    with path.open("a") as f:
        f.write("line 100\nline 1")  # the second line is not complete yet
    assert next(lines) == "line 100"
    with path.open("a") as f:
        f.write("01\n")
    assert next(lines) == "line 101"
    path.write_text("after a rotation\n")
    assert next(lines) == "after a rotation"


def test_logs_of_an_unknown_part_name_the_parts_that_have_logs(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "api.log").write_text("x\n")
    (tmp_path / "logs" / "worker.log").write_text("x\n")
    out = tasklab(tmp_path, "logs", "nope")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: no log {tmp_path}/logs/nope.log; parts with logs: api, worker"
    ]


@pytest.mark.slow
def test_up_with_nodes_runs_separate_worker_nodes_that_share_the_work(tmp_path: Path) -> None:
    import importlib

    import sqlalchemy as sa

    from tasklab.celery_app import make_celery
    from tasklab.jobs.manager import JobManager
    from tasklab.jobs.records import jobs
    from tasklab.lab.faults import lease_pid
    from tasklab.settings import Settings

    importlib.import_module("tasklab.lab.probe_jobs")  # registers the probe jobs
    home = tmp_path / "home"
    rec = up_detached(home, "--nodes", "2", "--exporter-port", "0")
    try:
        parts = rec["parts"]
        assert {"worker1", "worker2"} <= parts.keys() and "worker" not in parts
        # each node: its own home folder (its metrics folder) and its own /metrics port
        for name in ("worker1", "worker2"):
            assert (home / "nodes" / name / "prometheus-multiproc").is_dir()
            metrics = httpx.get(f"http://127.0.0.1:{parts[name]['port']}/metrics", timeout=5)
            assert "tasklab_worker_node_processes" in metrics.text
        settings = Settings(home_dir=home, redis_url=rec["redis_url"])
        control = make_celery(settings).control
        names: set[str] = set()
        deadline = time.monotonic() + 30
        while not {"worker1", "worker2"} <= names and time.monotonic() < deadline:
            replies = control.ping(timeout=2, limit=2) or []  # back once both answered
            names |= {n.split("@")[0] for reply in replies for n in reply}
        assert {"worker1", "worker2"} <= names
        jm = JobManager(settings)  # the stack's database: the nodes share it
        try:
            ids = [jm.submit("tasklab.probe_job.effect", hold_s=0.3).id for _ in range(16)]
            jm.flush()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with jm.engine.connect() as conn:
                    rows = conn.execute(
                        sa.select(jobs.c.status, jobs.c.result).where(jobs.c.id.in_(ids))
                    ).all()
                if all(status == "SUCCEEDED" for status, _ in rows):
                    break
                time.sleep(0.3)
        finally:
            jm.close()
        assert [status for status, _ in rows] == ["SUCCEEDED"] * len(ids)
        ran_on = {lease_pid(result["ran_on"]) for _, result in rows}
        by_node = {
            name: {c.pid for c in psutil.Process(parts[name]["pid"]).children(recursive=True)}
            for name in ("worker1", "worker2")
        }
        assert ran_on & by_node["worker1"] and ran_on & by_node["worker2"]
    finally:
        stopped = tasklab(home, "stop")
        assert stopped.returncode == 0, stopped.stderr
