"""The console on RabbitMQ (a virtual host of each test's own, no Redis at all): the overview's
queue figures for jobs waiting with nobody consuming, the figures a passive declare cannot
tell shown as unknown, the unacked ones the management API tells, and pausing and resuming a
queue with a real worker. The app runs in-process (ASGI, its lifespan and polling threads
running); the worker is a subprocess. Needs TEST_RABBITMQ_URL."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest

import tasklab.lab.probe_jobs  # noqa: F401  (declares the probe jobs submitted here)
from tasklab.jobs import JobManager
from tasklab.jobs.records import JobStatus
from tasklab.service.app import create_app
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings, mask_url
from tests.conftest import required_url
from tests.observe.test_queues_rabbitmq import Managed, managed  # noqa: F401  (a fixture)
from tests.service.conftest import SEED, TEST_LIMITS, Account, read_tokens
from tests.service.console.conftest import csrf_of, log_in, queue_cells, total_unacked
from tests.support.rabbitmq import own_vhost
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.rabbitmq
DASH = "\u2013"
WAITING_JOBS = 12
SEEN_WAIT_S = 30.0  # the backlog is taken every 1 s and the fleet polled every 2 s


def default_cells(html: str, *names: str) -> tuple[str, ...]:
    """Some of the overview's cells of the default queue, in the order named."""
    cells = queue_cells(html, "default")
    return tuple(cells[n] for n in names)


@dataclass(frozen=True)
class Broker:
    url: str
    management_url: str  # "off": the console reads the queues by passive declare


@pytest.fixture(params=["passive"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """The shared RabbitMQ on a vhost of the test's own, read by passive declare; or
    (``managed``, by indirect parametrization) a RabbitMQ whose management API answers, on
    a vhost of the test's own made through that API."""
    if request.param == "managed":
        node: Managed = request.getfixturevalue("managed")
        with api_vhost(node) as url:
            yield Broker(url, node.management_url)
        return
    with own_vhost(required_url("TEST_RABBITMQ_URL")) as url:
        yield Broker(url, "off")


@contextlib.contextmanager
def api_vhost(node: Managed) -> Iterator[str]:
    vhost = f"tasklab-test-{uuid.uuid4().hex[:8]}"
    path = quote(vhost, safe="")
    with httpx.Client(base_url=node.management_url, auth=("guest", "guest"), timeout=10) as api:
        api.put(f"/api/vhosts/{path}").raise_for_status()
        every = {"configure": ".*", "write": ".*", "read": ".*"}
        api.put(f"/api/permissions/{path}/guest", json=every).raise_for_status()
        try:
            yield urlunsplit(urlsplit(node.broker_url)._replace(path=f"/{vhost}"))
        finally:
            api.delete(f"/api/vhosts/{path}")


@pytest.fixture
def settings(tmp_path: Path, broker: Broker) -> Settings:
    """Seeded settings on RabbitMQ and SQLite; also the ones ``worker_factory`` starts its
    workers with. One job per message (``bundle_max=1``), so that the broker's depth counts
    jobs, and a worker holds no more messages than it runs (prefetch 1 per process)."""
    settings = Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=None,
        broker_url=broker.url,
        amqp_management_url=broker.management_url,
        bundle_max=1,
        worker_concurrency=2,
        worker_prefetch_multiplier=1,
        lease_s=5,
        reaper_interval_s=0.5,
        requeue_after_s=3,
        **TEST_LIMITS,
    )
    seed(settings, **SEED)
    return settings


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    token = _admin(settings).token
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        yield await log_in(client, token)


@pytest.fixture
def jobs(settings: Settings) -> Iterator[JobManager]:
    jm = JobManager(settings, local_fallback=False)
    yield jm
    jm.close()


def _admin(settings: Settings) -> Account:
    return next(a for a in read_tokens(settings.home_dir / "tokens.jsonl") if a.admin)


async def overview_until(client: httpx.AsyncClient, ok: Callable[[str], bool], what: str) -> str:
    """The overview's live part once ``ok`` holds of it (it is re-read as the page would)."""
    deadline = time.monotonic() + SEEN_WAIT_S
    while True:
        response = await client.get("/console/fragments/overview")
        assert response.status_code == 200, response.text
        if ok(response.text):
            return response.text
        if time.monotonic() > deadline:
            raise AssertionError(f"the overview never showed {what}:\n{response.text}")
        await asyncio.sleep(0.3)


async def test_on_rabbitmq_the_overview_counts_jobs_waiting_with_nobody_consuming(
    admin: httpx.AsyncClient, jobs: JobManager, settings: Settings
) -> None:
    ids = [
        jobs.submit("tasklab.probe_job.noop", queue="default", priority=i % 10).id
        for i in range(WAITING_JOBS)
    ]
    assert jobs.flush(timeout_s=30)
    html = await overview_until(
        admin,
        lambda h: queue_cells(h, "default")["depth"] == str(WAITING_JOBS),
        f"{WAITING_JOBS} messages in default",
    )

    default = queue_cells(html, "default")
    assert default["waiting"] == str(WAITING_JOBS)  # the job records agree with the broker
    assert default["consumers"] == "0"
    assert default["consumed"] == DASH and default["paused"] == DASH
    # A passive declare tells ready messages and consumers, not unacked ones nor how the
    # ready ones spread over priorities (RabbitMQ orders them itself): unknown, not 0.
    assert default["unacked"] == DASH
    assert default["by-priority"] == DASH
    assert total_unacked(html) == DASH
    high = queue_cells(html, "high")  # never declared in this vhost: nothing in it
    assert (high["waiting"], high["depth"], high["consumers"]) == ("0", "0", "0")
    assert str(mask_url(settings.effective_broker_url)) in html
    assert "amqp://" in html and ":***@" in html
    assert {jobs.get(i).status for i in ids} == {JobStatus.QUEUED}


async def test_on_rabbitmq_a_queue_paused_from_the_console_fills_then_drains_when_resumed(
    admin: httpx.AsyncClient,
    jobs: JobManager,
    settings: Settings,
    worker_factory: type[WorkerProcess],
) -> None:
    worker_factory(settings, concurrency=2, name="w1").start()
    html = await overview_until(
        admin,
        lambda h: (
            "w1@" in queue_cells(h, "default")["consumed"]
            and queue_cells(h, "default")["consumers"] == "1"
        ),
        "the worker consuming default",
    )
    csrf = csrf_of(html)

    pause = await admin.post("/console/queues/default/pause", data={"csrf": csrf, "confirm": "yes"})
    assert pause.status_code == 303 and "count=1" in pause.headers["location"]
    html = await overview_until(
        admin,
        lambda h: queue_cells(h, "default")["consumers"] == "0",
        "default without consumers",
    )
    default = queue_cells(html, "default")
    assert "w1@" in default["paused"] and default["consumed"] == DASH
    assert queue_cells(html, "high")["consumers"] == "1"  # only default was paused

    ids = [
        jobs.submit("tasklab.probe_job.sleep", 0.05, queue="default").id
        for _ in range(WAITING_JOBS)
    ]
    assert jobs.flush(timeout_s=30)
    html = await overview_until(
        admin,
        lambda h: queue_cells(h, "default")["depth"] == str(WAITING_JOBS),
        f"{WAITING_JOBS} messages waiting in the paused queue",
    )
    assert queue_cells(html, "default")["waiting"] == str(WAITING_JOBS)
    assert {jobs.get(i).status for i in ids} == {JobStatus.QUEUED}  # nobody took one

    resume = await admin.post(
        "/console/queues/default/resume", data={"csrf": csrf, "confirm": "yes"}
    )
    assert resume.status_code == 303 and "count=1" in resume.headers["location"]
    html = await overview_until(
        admin,
        lambda h: default_cells(h, "waiting", "depth", "consumers") == ("0", "0", "1"),
        "default drained and consumed again",
    )
    default = queue_cells(html, "default")
    assert "w1@" in default["consumed"] and default["paused"] == DASH
    assert {jobs.get(i).status for i in ids} == {JobStatus.SUCCEEDED}

    log = (await admin.get("/console/actions")).text
    assert "queue.pause" in log and "queue.resume" in log


@pytest.mark.parametrize("broker", ["managed"], indirect=True)
async def test_on_rabbitmq_with_the_management_api_the_overview_shows_unacked_messages(
    admin: httpx.AsyncClient,
    jobs: JobManager,
    settings: Settings,
    worker_factory: type[WorkerProcess],
) -> None:
    # One process taking one message at a time: while it runs the first job, that message
    # is unacked (acks late) and the other two wait ready.
    worker_factory(settings, concurrency=1, name="w1").start()
    ids = [
        jobs.submit("tasklab.probe_job.sleep", 6.0, steps=6, queue="default").id for _ in range(3)
    ]
    assert jobs.flush(timeout_s=30)
    html = await overview_until(
        admin,
        lambda h: default_cells(h, "waiting", "depth", "unacked") == ("2", "2", "1"),
        "2 jobs ready and 1 unacked in default",
    )
    default = queue_cells(html, "default")
    assert default["consumers"] == "1" and "w1@" in default["consumed"]
    assert default["by-priority"] == DASH  # the API does not split a queue by priority
    high = queue_cells(html, "high")  # told by the API: known to be 0, not unknown
    assert (high["depth"], high["unacked"], high["consumers"]) == ("0", "0", "1")
    assert total_unacked(html) == "1"
    assert {jobs.get(i).status for i in ids} >= {JobStatus.STARTED, JobStatus.QUEUED}
