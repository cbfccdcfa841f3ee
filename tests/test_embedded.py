from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis

from tasklab.embedded import EmbeddedRedis, PidRecord, clean_stale_pidfile, find_redis_server
from tasklab.errors import EmbeddedServerError


def wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_embedded_redis_starts_answers_and_stops_leaving_no_process(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    pid = server.pid
    assert pid is not None and server.pidfile.exists()
    client = redis.Redis.from_url(url)
    assert client.set("k", "v") and client.get("k") == b"v"
    client.close()
    server.stop()
    assert wait_gone(pid)
    assert not server.pidfile.exists()


def test_the_server_binds_loopback_on_a_free_port_not_6379(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        assert server.port != 6379
        conns = psutil.Process(server.pid).net_connections(kind="tcp")
        listening = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}


def test_a_sigkilled_owner_takes_its_redis_with_it_and_leaves_a_stale_pidfile(
    tmp_path: Path,
) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from tasklab.embedded import EmbeddedRedis
        s = EmbeddedRedis({str(tmp_path)!r})
        s.start()
        print(s.pid, flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert owner.stdout is not None
    redis_pid = int(owner.stdout.readline())
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert wait_gone(redis_pid), "redis-server outlived its SIGKILLed owner"
    pidfile = tmp_path / "redis.pid.json"
    assert pidfile.exists()
    with EmbeddedRedis(tmp_path) as server:  # the next start cleans the stale record
        record = json.loads(server.pidfile.read_text())
        assert record["server_pid"] == server.pid != redis_pid


def test_a_stale_pidfile_whose_server_survived_is_cleaned_and_the_server_killed(
    tmp_path: Path,
) -> None:
    orphan = subprocess.Popen(
        [str(find_redis_server()), "--port", "0", "--save", ""], stdout=subprocess.DEVNULL
    )
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()
    pidfile = tmp_path / "redis.pid.json"
    pidfile.write_text(PidRecord(orphan.pid, dead_owner.pid, 1).to_json())
    assert clean_stale_pidfile(pidfile)
    orphan.wait(timeout=10)
    assert not pidfile.exists()


def test_a_live_owner_keeps_its_data_dir(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        record = PidRecord(server.pid or 0, os.getppid(), server.port or 0)
        server.pidfile.write_text(record.to_json())
        with pytest.raises(EmbeddedServerError, match="in use"):
            EmbeddedRedis(tmp_path).start()


def test_a_port_taken_by_another_redis_is_refused_never_used_as_ours(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "first") as first:
        taken = first.port
        assert taken is not None
        second = EmbeddedRedis(tmp_path / "second", port=taken)
        with pytest.raises(EmbeddedServerError, match=f"port {taken} is taken"):
            second.start()
        assert second.process is None
        assert redis.Redis(port=taken).ping()  # the first one is untouched


def test_a_free_port_lost_to_another_server_before_the_bind_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasklab.embedded as embedded

    with EmbeddedRedis(tmp_path / "first") as first:
        real_free_port = embedded.free_port
        picks = iter([first.port])
        # The first "free" port is the one the other server just took.
        monkeypatch.setattr(embedded, "free_port", lambda: next(picks, None) or real_free_port())
        with EmbeddedRedis(tmp_path / "second") as second:
            assert second.port not in (None, first.port)
            info = redis.Redis(port=second.port).info("server")
            assert info["process_id"] == second.pid
