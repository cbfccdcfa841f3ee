"""CPU time of a job's SQL lifecycle on SQLite, per job, at each schema revision given.

    .venv/bin/python scripts/job_sql_cost.py [REVISION ...]   (default: head 0007 0004)

For each revision: a fresh migrated database (downgraded to the revision), then 20,000 jobs
through the statements' shapes a job goes through (insert in batches of 16, the relay's QUEUED
mark per batch, a bundle's claim, one completion each), four trials. Process CPU time, not wall
time, so other work on the machine barely moves it: what the indexes cost each job.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tasklab.migrations import downgrade, migrate
from tasklab.settings import Settings

N, BATCH, TRIALS = 20_000, 16, 4


def fresh(revision: str) -> sqlite3.Connection:
    settings = Settings(home_dir=Path(tempfile.mkdtemp()) / ".tasklab")
    migrate(settings)
    if revision != "head":
        downgrade(settings, revision)
    conn = sqlite3.connect(settings.sync_database_url.removeprefix("sqlite:///"))
    conn.isolation_level = None
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def cpu_us_per_job(conn: sqlite3.Connection) -> float:
    marks = ",".join("?" * BATCH)
    now = time.time()
    started = time.process_time()
    for _ in range(0, N, BATCH):
        ids = [uuid.uuid4().hex for _ in range(BATCH)]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO tasklab_jobs (id, task, args, kwargs, queue, priority, owner, status,"
            " attempt, max_attempts, cancel_requested, via, publish_count, created_at)"
            " VALUES (?, 't', '[]', '{}', 'default', 0, '', 'PENDING', 0, 3, 0, 'broker', 0, ?)",
            [(i, now) for i in ids],
        )
        conn.execute("COMMIT")
        conn.execute(
            f"UPDATE tasklab_jobs SET status='QUEUED', queued_at=? WHERE id IN ({marks})",
            [now, *ids],
        )
        conn.execute(
            "UPDATE tasklab_jobs SET status='STARTED', attempt=attempt+1, lease_owner='h:1',"
            f" lease_expires_at=?, started_at=? WHERE id IN ({marks})",
            [now + 30, now, *ids],
        )
        for i in ids:
            conn.execute(
                "UPDATE tasklab_jobs SET status='SUCCEEDED', finished_at=?, lease_owner=NULL,"
                " lease_expires_at=NULL WHERE id=?",
                (now, i),
            )
    return (time.process_time() - started) * 1e6 / N


def main(revisions: list[str]) -> None:
    for revision in revisions:
        trials = [cpu_us_per_job(fresh(revision)) for _ in range(TRIALS)]
        shown = " ".join(f"{t:6.1f}" for t in trials)
        print(
            f"{revision:28s} {shown}  µs of CPU per job (median {sorted(trials)[TRIALS // 2]:.1f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["head", "0007_dead_letter_index", "0004_shop_integrity"])
