"""``tasklab tokens issue|revoke``: a new token replaces the old one, may expire, and a
revoked one is refused; an unknown user is one line and exit code 2."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import typer
from typer.testing import CliRunner

from tasklab.service import commands
from tasklab.service.app import create_app
from tasklab.service.domain.token_admin import issue
from tasklab.settings import Settings
from tests.service.conftest import read_tokens


@pytest.fixture
def cli() -> typer.Typer:
    """The tokens commands registered the way tasklab.cli registers them."""
    app = typer.Typer()
    app.command("seed")(commands.seed)  # a second command keeps `tokens` a group
    tokens = typer.Typer()
    tokens.command("issue")(commands.tokens_issue)
    tokens.command("revoke")(commands.tokens_revoke)
    app.add_typer(tokens, name="tokens")
    return app


async def _status(settings: Settings, token: str) -> tuple[int, str]:
    """A fresh API (no auth cache) answering ``GET /api/v1/points`` with ``token``."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        reply = await c.get("/api/v1/points", headers={"Authorization": f"Bearer {token}"})
    return reply.status_code, reply.json().get("detail", "")


async def test_an_issued_token_replaces_the_old_one_until_it_is_revoked(
    cli: typer.Typer, shop_settings: Settings
) -> None:
    alice = read_tokens(shop_settings.home_dir / "tokens.jsonl")[0]
    runner = CliRunner()
    issued = runner.invoke(
        cli, ["tokens", "issue", alice.name, "--ttl-days", "1"], obj=shop_settings
    )
    assert issued.exit_code == 0, issued.output
    line = json.loads(issued.stdout)
    assert line["user_id"] == alice.user_id
    assert time.time() < line["expires_at"] <= time.time() + 86_400
    assert (await _status(shop_settings, line["token"]))[0] == 200
    assert (await _status(shop_settings, alice.token))[0] == 401

    revoked = runner.invoke(cli, ["tokens", "revoke", str(alice.user_id)], obj=shop_settings)
    assert revoked.exit_code == 0, revoked.output
    assert (await _status(shop_settings, line["token"]))[0] == 401


async def test_a_token_past_its_expiry_is_refused_saying_so(shop_settings: Settings) -> None:
    alice = read_tokens(shop_settings.home_dir / "tokens.jsonl")[0]
    expired = issue(shop_settings, alice.name, ttl_s=60, now=time.time() - 120)
    status, detail = await _status(shop_settings, expired.token)
    assert status == 401 and "expired" in detail


def test_an_unknown_user_is_one_line_and_exit_code_2(
    cli: typer.Typer, shop_settings: Settings
) -> None:
    for argv in (["tokens", "issue", "nobody"], ["tokens", "revoke", "99999"]):
        result = CliRunner().invoke(cli, argv, obj=shop_settings)
        assert result.exit_code == 2
        assert len(result.output.strip().splitlines()) == 1 and "no user" in result.output
