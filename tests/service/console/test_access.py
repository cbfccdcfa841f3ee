"""Nothing of the console without a session or a token; roles; CSRF on every change."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from tasklab.settings import Settings
from tests.service.conftest import Account
from tests.service.console.conftest import csrf_of, insert_jobs, log_in, status_of

PAGES = ["/console", "/console/jobs", "/console/dead", "/console/actions", "/console/lab"]


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
