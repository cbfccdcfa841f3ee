from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tasklab.embedded import free_port


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasklab", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_config_prints_masked_settings_and_their_sources() -> None:
    out = run_cli("config", env={"REDIS_URL": "redis://:s3cret@h:6379/0", "TASKLAB_LEASE_S": "12"})
    assert out.returncode == 0
    assert "s3cret" not in out.stdout and "***" in out.stdout
    assert "env:TASKLAB_LEASE_S" in out.stdout and "default" in out.stdout


def test_a_bad_setting_is_one_line_on_stderr_and_exit_code_2() -> None:
    out = run_cli("config", env={"TASKLAB_WORKER_POOL": "fibers"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "worker_pool" in lines[0]


def test_an_unknown_job_id_is_a_one_line_error() -> None:
    out = run_cli("jobs", "show", "nope")
    assert out.returncode == 1 and "tasklab db upgrade" in out.stderr  # no schema yet
    assert run_cli("db", "upgrade").returncode == 0
    out = run_cli("jobs", "show", "nope")
    assert out.returncode == 2 and out.stderr.strip() == "error: no job with id 'nope'"


def _redis_url_of(tree: list[psutil.Process]) -> str:
    server = next(p for p in tree if "redis-server" in p.name())
    port = next(c.laddr.port for c in server.net_connections() if c.status == "LISTEN")
    return f"redis://127.0.0.1:{port}/0"


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def test_up_serves_health_and_stops_everything_within_10_s_on_sigint(tmp_path: Path) -> None:
    port, exporter_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tasklab",
            "up",
            "--port",
            str(port),
            "--concurrency",
            "1",
            "--exporter-port",
            str(exporter_port),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "tasklab up exited early"
            assert time.monotonic() < deadline, "/health never answered"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        tree = descendants(proc.pid)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "redis-server" in names and "worker" in names and "beat" in names
        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
        assert ready.status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert "tasklab_http_requests_total" in metrics.text
        status = run_cli("status", "--json", env={"REDIS_URL": _redis_url_of(tree)})
        assert status.returncode == 0 and '"broker_reachable": true' in status.stdout
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        proc.wait(timeout=15)
        assert time.monotonic() - t0 < 10
        _, alive = psutil.wait_procs(tree, timeout=1)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_cli_imports_no_web_stack_so_a_worker_starts_light() -> None:
    """Every `tasklab worker` runs through the CLI: FastAPI, httpx (and rich's pygments
    through it) would cost its start time and every pool process's memory."""
    import subprocess
    import sys

    code = (
        "import sys, tasklab.cli; "
        "print(sorted(m for m in ('fastapi', 'httpx', 'starlette', 'uvicorn', 'jinja2') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
