"""The soak drill's submitting process, the one it SIGKILLs while its relay holds jobs.

``python -m tasklab.lab.soak_submitter --owner O --ids FILE --jobs N --hold-s S``, with the
run's settings in its environment, builds its own ``JobManager`` and submits one effect probe
(published: its relay's thread and broker connection are warm), then creates ``FILE.ready``
and waits for a line on stdin. Then it submits the rest of the ``N`` probes one after the
other as fast as it can (a dense stream: its relay gathers them for ``relay_linger_ms``),
writing each id ``submit()`` returned to ``FILE`` as one line, flushed: what the caller was
told is durable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EFFECT_TASK = "tasklab.probe_job.effect"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tasklab.lab.soak_submitter")
    parser.add_argument("--owner", required=True)
    parser.add_argument("--ids", required=True, type=Path)
    parser.add_argument("--jobs", required=True, type=int)
    parser.add_argument("--hold-s", type=float, default=0.0)
    args = parser.parse_args(argv)

    import tasklab.lab.probe_jobs  # noqa: F401  (declares the effect probe)
    from tasklab.jobs import JobManager
    from tasklab.settings import load_settings

    manager = JobManager(load_settings())
    with args.ids.open("a", buffering=1) as out:

        def submit() -> None:
            job = manager.submit(EFFECT_TASK, owner=args.owner, hold_s=args.hold_s)
            out.write(f"{job.id}\n")
            out.flush()

        submit()  # warm: the relay's thread runs and its broker connection is open
        manager.flush(timeout_s=30)
        Path(f"{args.ids}.ready").touch()
        if not sys.stdin.readline():
            return 1  # the drill went away before saying go
        for _ in range(args.jobs - 1):
            submit()
    manager.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
