"""Throughput of the reference service's hot endpoints, next to a bare FastAPI app, in one run.

    .venv/bin/python scripts/api_speed.py [--workers 2] [--database-url postgresql://...]

Seeds a shop in a scratch home, runs ``tasklab up`` (API, workers, embedded Redis) and a bare
FastAPI app (``GET /health`` only) on the same uvicorn settings, then fires keep-alive requests
from an asyncio client (tests/service/loadgen.py: ~0.1 ms of CPU per request, far lighter than
Locust) on the same machine. Prints requests/s and the server-side time (``X-Process-Time``)
P50/P99 per endpoint. Take it as ±30 % on a shared 2-core VM; compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.service.loadgen import Call, Reply, run_calls  # noqa: E402

TASKLAB = str(Path(sys.executable).with_name("tasklab"))
BARE_APP = textwrap.dedent(
    """
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"{url} did not answer in {timeout_s:.0f} s")


def report(name: str, replies: list[Reply], elapsed_s: float) -> None:
    ok = sum(1 for r in replies if r.status < 300)
    times = sorted(float(r.headers.get("x-process-time", 0)) * 1e3 for r in replies)
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    print(
        f"{name:<28} {len(replies) / elapsed_s:>8,.0f} req/s   ok {ok}/{len(replies)}   "
        f"server time p50 {p50:.1f} ms  p99 {p99:.1f} ms",
        flush=True,
    )


async def fire(base: str, name: str, calls: list[Call], connections: int) -> None:
    await run_calls(base, calls[: min(200, len(calls))], connections=connections)  # warm-up
    started = time.perf_counter()
    replies = await run_calls(base, calls, connections=connections)
    report(name, replies, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers (both apps)")
    parser.add_argument("--database-url", default=None, help="default: SQLite")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tasklab-api-speed-"))
    ours_port, bare_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL")}
    env.pop("DATABASE_URL", None)
    env.update(
        TASKLAB_HOME_DIR=str(home),
        TASKLAB_API_PORT=str(ours_port),
        TASKLAB_API_WORKERS=str(args.workers),
        TASKLAB_LOG_LEVEL="WARNING",
    )
    if args.database_url:
        env["DATABASE_URL"] = args.database_url
    tokens_file = home / "tokens.jsonl"
    seed = ["seed", "--users", "200", "--products", "50", "--stock", "1000000"]
    seed += ["--points", "100000000", "--tokens-out", str(tokens_file), "--reset"]
    subprocess.run(
        [TASKLAB, *seed],
        env=env,
        check=True,
        capture_output=True,
    )
    users = [json.loads(line) for line in tokens_file.read_text().splitlines()]
    users = [u for u in users if not u.get("admin")]
    (home / "bare_app.py").write_text(BARE_APP)
    uvicorn = ["uvicorn", "bare_app:app", "--port", str(bare_port), "--workers", str(args.workers)]
    uvicorn += ["--loop", "uvloop", "--http", "httptools", "--log-level", "warning"]
    bare = subprocess.Popen(
        [sys.executable, "-m", *uvicorn],
        cwd=home,
        env=env,
    )
    stack = subprocess.Popen(
        [TASKLAB, "up", "--no-beat", "--exporter-port", "0"],
        env=env,
        stdout=(home / "up.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    ours, bare_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{bare_port}"
    try:
        wait_up(bare_url + "/health")
        wait_up(ours + "/health")
        time.sleep(3)  # workers connecting
        asyncio.run(run(ours, bare_url, users, args))
    finally:
        stack.send_signal(signal.SIGINT)
        bare.send_signal(signal.SIGINT)
        stack.wait(30)
        bare.wait(30)
        shutil.rmtree(home, ignore_errors=True)


async def run(ours: str, bare: str, users: list[dict[str, str]], args: argparse.Namespace) -> None:
    def auth(i: int) -> dict[str, str]:
        user = users[i % len(users)]
        return {"Authorization": f"Bearer {user['token']}", "Content-Type": "application/json"}

    n, conns = args.requests, args.connections
    listing = await run_calls(ours, [Call("GET", "/api/v1/products?page_size=50", auth(0))])
    product_ids = [p["id"] for p in listing[0].json()["items"]]
    db = "PostgreSQL" if args.database_url else "SQLite"
    print(f"{args.workers} uvicorn worker(s), {db}, {conns} connections", flush=True)
    await fire(bare, "bare FastAPI GET /health", [Call("GET", "/health", {})] * n, conns)
    await fire(ours, "GET /health", [Call("GET", "/health", {})] * n, conns)
    await fire(
        ours,
        "GET /api/v1/points",
        [Call("GET", "/api/v1/points", auth(i)) for i in range(n)],
        conns,
    )
    await fire(
        ours,
        "GET /api/v1/points (8 conns)",
        [Call("GET", "/api/v1/points", auth(i)) for i in range(n // 2)],
        8,
    )
    orders = [
        Call(
            "POST",
            "/api/v1/orders",
            auth(i),
            {
                "items": [{"product_id": product_ids[i % len(product_ids)], "quantity": 1}],
                "use_points": 1,
            },
        )
        for i in range(args.orders)
    ]
    await fire(ours, "POST /api/v1/orders", orders, 32)


if __name__ == "__main__":
    main()
