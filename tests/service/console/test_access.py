"""Nothing of the console without a session or a token; roles; CSRF on every change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tasklab.embedded import EmbeddedRedis
from tasklab.service.app import create_app
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.service.conftest import SEED, Account, make_settings, read_tokens
from tests.service.console.conftest import VIEWER, csrf_of, insert_jobs, log_in, status_of

# The module's tests share one seeded database and one running app (each test its own client,
# so its own cookies): an app's stop waits about a second for the console's first poll. The
# failed-login test starts an app of its own (its own budget).
pytestmark = pytest.mark.asyncio(loop_scope="module")
PAGES = ["/console", "/console/jobs", "/console/dead", "/console/actions", "/console/lab"]


@pytest.fixture(scope="module")
def console_settings(
    tmp_path_factory: pytest.TempPathFactory, embedded_redis: EmbeddedRedis
) -> Settings:
    home = tmp_path_factory.mktemp("console-access")
    settings = make_settings(home, embedded_redis.url, console_viewers=[VIEWER])
    seed(settings, **SEED)
    return settings


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running_app(console_settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(console_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture(loop_scope="module")
async def anonymous(running_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=running_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def admin(anonymous: httpx.AsyncClient, people: dict[str, Account]) -> httpx.AsyncClient:
    return await log_in(anonymous, people["admin"].token)


@pytest.mark.parametrize("path", [*PAGES, "/console/static/htmx-2.0.11.min.js"])
async def test_a_page_asked_for_without_a_session_sends_to_the_login_form_and_back(
    anonymous: httpx.AsyncClient, path: str
) -> None:
    response = await anonymous.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == f"/console/login?next={quote(path)}"


async def test_a_live_fragment_and_an_action_without_a_session_are_refused(
    anonymous: httpx.AsyncClient,
) -> None:
    assert (await anonymous.get("/console/fragments/overview")).status_code == 401
    response = await anonymous.post("/console/dead/retry", data={"job_id": "x", "confirm": "yes"})
    assert response.status_code == 401


async def test_a_wrong_token_and_a_user_who_is_neither_admin_nor_viewer_cannot_log_in(
    anonymous: httpx.AsyncClient, people: dict[str, Account]
) -> None:
    wrong = await anonymous.post("/console/login", data={"token": "1.nope"})
    assert wrong.status_code == 401 and "not valid" in wrong.text
    stranger = await anonymous.post("/console/login", data={"token": people["stranger"].token})
    assert stranger.status_code == 403 and "no access" in stranger.text
    assert "tasklab_console" not in anonymous.cookies


async def test_logging_in_sets_a_strict_http_only_session_cookie_and_returns_to_next(
    anonymous: httpx.AsyncClient, people: dict[str, Account]
) -> None:
    response = await anonymous.post(
        "/console/login", data={"token": people["admin"].token, "next": "/console/dead"}
    )
    assert response.status_code == 303 and response.headers["location"] == "/console/dead"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert (await anonymous.get("/console/dead")).status_code == 200


async def test_next_never_leads_out_of_the_console(
    anonymous: httpx.AsyncClient, people: dict[str, Account]
) -> None:
    response = await anonymous.post(
        "/console/login", data={"token": people["admin"].token, "next": "//evil.example/x"}
    )
    assert response.headers["location"] == "/console"


async def test_a_bearer_admin_token_reads_pages_without_a_session(
    anonymous: httpx.AsyncClient, people: dict[str, Account]
) -> None:
    response = await anonymous.get("/console/jobs", headers=people["admin"].headers)
    assert response.status_code == 200 and "<h1>Jobs</h1>" in response.text


async def test_a_forged_post_without_or_with_a_wrong_csrf_token_is_refused_and_changes_nothing(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    (job_id,) = insert_jobs(console_settings, [{"status": "DEAD", "error": "boom"}])
    for form in ({"confirm": "yes"}, {"confirm": "yes", "csrf": "0" * 64}):
        response = await admin.post(f"/console/jobs/{job_id}/retry", data=form)
        assert response.status_code == 403 and "CSRF" in response.text
    assert status_of(console_settings, job_id) == "DEAD"


async def test_a_viewer_reads_every_page_but_is_offered_no_action_and_refused_one(
    anonymous: httpx.AsyncClient, people: dict[str, Account], console_settings: Settings
) -> None:
    (job_id,) = insert_jobs(console_settings, [{"status": "DEAD", "error": "boom"}])
    viewer = await log_in(anonymous, people["viewer"].token)
    for path in PAGES:
        assert (await viewer.get(path)).status_code == 200, path
    job_page = (await viewer.get(f"/console/jobs/{job_id}")).text
    assert "(viewer)" in job_page and 'id="retry"' not in job_page
    csrf = csrf_of(job_page)  # the logout form's: a valid token of this session
    response = await viewer.post(
        f"/console/jobs/{job_id}/retry", data={"csrf": csrf, "confirm": "yes"}
    )
    assert response.status_code == 403 and "not act" in response.text
    assert status_of(console_settings, job_id) == "DEAD"


async def test_failed_logins_use_up_the_budget_of_their_own_address_only(
    tmp_path: Path, redis_url: str
) -> None:
    settings = make_settings(
        tmp_path,
        redis_url,
        console_viewers=[VIEWER],
        rate_limit_failed_auth_per_address="3/minute",
    )
    seed(settings, **SEED)
    admin_token = read_tokens(settings.home_dir / "tokens.jsonl")[-1].token
    app = create_app(settings)
    # The address is the connection's (scope["client"]): X-Forwarded-For is not trusted.
    guesser = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("10.0.0.1", 5000)), base_url="http://t"
    )
    other = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("10.0.0.2", 5000)), base_url="http://t"
    )
    async with app.router.lifespan_context(app), guesser, other:
        for i in range(3):
            wrong = await guesser.post("/console/login", data={"token": f"1.wrong-{i}"})
            assert wrong.status_code == 401 and "not valid" in wrong.text
        refused = await guesser.post("/console/login", data={"token": "1.wrong-again"})
        assert refused.status_code == 429 and "too many failed" in refused.text
        assert int(refused.headers["retry-after"]) >= 1
        # a good token is not looked up from that address now, nor as a bearer
        assert (
            await guesser.post("/console/login", data={"token": admin_token})
        ).status_code == 429
        bearer = await guesser.get("/console/jobs", headers={"Authorization": "Bearer 1.x"})
        assert bearer.status_code == 429
        spoofed = await guesser.post(
            "/console/login", data={"token": admin_token}, headers={"X-Forwarded-For": "10.0.0.9"}
        )
        assert spoofed.status_code == 429
        # another address still logs in
        await log_in(other, admin_token)
        assert (await other.get("/console/jobs")).status_code == 200
