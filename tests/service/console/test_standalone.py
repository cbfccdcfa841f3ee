"""The console alone (``tasklab console``): the same pages and access, nothing of the API."""

from __future__ import annotations

import httpx

from tasklab.service.console import create_console_app
from tasklab.settings import Settings
from tests.service.conftest import Account
from tests.service.console.conftest import csrf_of


async def test_the_console_alone_serves_its_pages_behind_the_login_and_no_api_route(
    console_settings: Settings, people: dict[str, Account]
) -> None:
    app = create_console_app(console_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as client,
    ):
        assert (await client.get("/")).headers["location"] == "/console"
        assert (await client.get("/console")).headers["location"].startswith("/console/login")
        assert (
            await client.get("/api/v1/jobs", headers=people["admin"].headers)
        ).status_code == 404
        await client.post("/console/login", data={"token": people["admin"].token})
        overview = await client.get("/console")
        assert overview.status_code == 200 and "<h1>Overview</h1>" in overview.text
        # logging out ends the session: the next page asks for the login again
        out = await client.post("/console/logout", data={"csrf": csrf_of(overview.text)})
        assert out.status_code == 303
        assert (await client.get("/console")).status_code == 303
