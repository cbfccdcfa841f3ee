from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tasklab.errors import StackRunning
from tasklab.settings import Settings
from tasklab.stack_record import (
    HomeLock,
    StackRecord,
    attach_running_stack,
    record_path,
    running_stack,
    write_record,
)


def record_of(pid: int, create_time: float, home: Path) -> StackRecord:
    return StackRecord(
        pid=pid,
        create_time=create_time,
        home_dir=str(home),
        started_at=time.time(),
        state="running",
        api_url="http://127.0.0.1:8123",
        redis_url="redis://127.0.0.1:40001/0",
    )


def own_record(home: Path) -> StackRecord:
    me = psutil.Process()
    return record_of(me.pid, me.create_time(), home)


def test_a_record_whose_process_is_gone_is_ignored_with_one_notice_and_removed(
    tmp_path: Path,
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    create_time = psutil.Process(gone.pid).create_time()
    gone.wait()
    write_record(record_of(gone.pid, create_time, tmp_path), tmp_path)
    notices: list[str] = []
    assert running_stack(tmp_path, notice=notices.append) is None
    assert len(notices) == 1 and f"pid {gone.pid}" in notices[0] and "gone" in notices[0]
    assert not record_path(tmp_path).exists()


def test_a_reused_pid_does_not_pass_for_the_stack(tmp_path: Path) -> None:
    me = psutil.Process()
    write_record(record_of(me.pid, me.create_time() - 3600, tmp_path), tmp_path)
    notices: list[str] = []
    assert running_stack(tmp_path, notice=notices.append) is None and notices


def test_commands_without_a_url_use_the_redis_of_the_stack_in_their_home(tmp_path: Path) -> None:
    write_record(own_record(tmp_path), tmp_path)
    attached = attach_running_stack(Settings(home_dir=tmp_path), notice=print)
    assert attached.redis_url == "redis://127.0.0.1:40001/0"
    assert attached.effective_broker_url == "redis://127.0.0.1:40001/0"
    mine = Settings(home_dir=tmp_path, redis_url="redis://127.0.0.1:6390/0")
    assert attach_running_stack(mine, notice=print).redis_url == "redis://127.0.0.1:6390/0"
    other_home = attach_running_stack(Settings(home_dir=tmp_path / "other"), notice=print)
    assert other_home.redis_url is None


def test_a_second_lock_on_one_home_folder_names_the_stack_that_holds_it(tmp_path: Path) -> None:
    first = HomeLock(tmp_path)
    first.acquire(notice=print)
    try:
        write_record(own_record(tmp_path), tmp_path)
        with pytest.raises(StackRunning, match=f"already runs in .*pid {psutil.Process().pid}"):
            HomeLock(tmp_path).acquire(notice=print)
    finally:
        first.release()
    again = HomeLock(tmp_path)
    again.acquire(notice=print)  # free once released
    again.release()
