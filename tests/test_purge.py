from __future__ import annotations

import os
import subprocess
import sys

import redis

from tasklab.jobs import JobManager
from tasklab.lab import probe_jobs
from tasklab.settings import Settings


def test_purge_empties_one_queue_after_yes(settings: Settings) -> None:
    from tasklab.migrations import migrate

    migrate(settings)
    jm = JobManager(settings.model_copy(update={"bundle_max": 1}))  # a message per job
    for _ in range(3):
        jm.submit(probe_jobs.noop, queue="low")
    jm.submit(probe_jobs.noop, queue="high")
    jm.close()
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "TASKLAB_HOME_DIR": str(settings.home_dir),
    }

    def purge(queue: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tasklab", "purge", queue, "--yes"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    refused = purge("nope")
    assert refused.returncode == 2 and "unknown queue" in refused.stderr
    done = purge("low")
    assert done.returncode == 0 and "purged 3" in done.stdout
    client = redis.Redis.from_url(settings.redis_url or "")
    keys = {k.decode() for k in client.keys("*")}
    assert not {k for k in keys if k == "low" or k.startswith("low:")}
    assert any(k == "high" or k.startswith("high:") for k in keys)
    client.close()
