from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from tasklab.embedded import free_port
from tasklab.processes import die_with_parent, kill_tree


def test_flower_serves_its_ui_against_the_configured_broker(redis_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasklab", "flower", "--port", str(port)],
        env={**os.environ, "REDIS_URL": redis_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "flower exited"
            assert time.monotonic() < deadline, "flower never answered"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
    finally:
        kill_tree(proc.pid)
