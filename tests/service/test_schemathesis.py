"""Property-based run over the whole OpenAPI schema against a real server, authenticated:
no 5xx, responses conform to the schema (status codes, content types, headers, bodies). Once
as the admin (who may call everything) and once as a plain user, who must get 403 from every
administrators' operation however the request is made."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tasklab.embedded import EmbeddedRedis
from tasklab.service.app import create_app
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.service.conftest import ApiServer, make_settings, read_tokens

MAX_EXAMPLES = 15
Api = tuple[str, dict[str, str], dict[str, str]]  # base URL, admin's headers, a user's


def _openapi() -> dict[str, Any]:
    """The schema the server serves. Building the app opens no connection (its lifespan
    does), so this runs at collection; a test checks the server serves the same."""
    unused = Settings(home_dir=Path("unused"), redis_url="redis://127.0.0.1:1/0")
    return create_app(unused).openapi()


# Checked: no 5xx; status codes, content types, headers and bodies as documented; input that
# violates the schema refused. Two settings, both by design: unknown query parameters are
# ignored (so none are sent), and a schema-valid request may still get a 422 for a business
# rule (an unknown product, more points than the order costs).
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"allow-extra-parameters": False},
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "409", "422"]}
        },
    }
)
OPENAPI = _openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)
# A plain user meets 403 on the administrators' operations: a documented answer there.
USER_CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"allow-extra-parameters": False},
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
            }
        },
    }
)
user_schema = schemathesis.openapi.from_dict(OPENAPI, config=USER_CONFIG)
ADMIN_ONLY = re.compile(r"^/api/v1/(metrics/|data-sync/sync-)")
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


@pytest.fixture(scope="module")
def live_api(
    tmp_path_factory: pytest.TempPathFactory, embedded_redis: EmbeddedRedis
) -> Iterator[tuple[str, dict[str, str], dict[str, str]]]:
    """A seeded API served by uvicorn; (base URL, the admin's Authorization header, a plain
    user's)."""
    home: Path = tmp_path_factory.mktemp("schemathesis")
    api_settings = make_settings(home, embedded_redis.url)
    seed(api_settings, users=2, products=5, stock=10_000, points=1000)
    accounts = read_tokens(api_settings.home_dir / "tokens.jsonl")
    admin = next(a for a in accounts if a.admin)
    user = next(a for a in accounts if not a.admin)
    server = ApiServer(api_settings).start()
    yield server.url, admin.headers, user.headers
    server.stop()


def test_the_server_serves_the_schema_under_test(live_api: Api) -> None:
    url, _, _ = live_api
    assert httpx.get(f"{url}/openapi.json").json() == OPENAPI


def _positive(case: schemathesis.Case) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


@schema.parametrize()
@HYPOTHESIS
def test_every_operation_conforms_to_the_schema_and_never_answers_5xx(
    case: schemathesis.Case, live_api: Api
) -> None:
    url, headers, _ = live_api
    response = case.call_and_validate(base_url=url, headers=headers)
    if _positive(case) and "security" in case.operation.definition.raw:
        # negative cases may drop the token on purpose; valid ones always carry it
        assert response.status_code != 401, response.text


@user_schema.parametrize()
@HYPOTHESIS
def test_as_a_plain_user_every_operation_conforms_and_admin_ones_answer_403(
    case: schemathesis.Case, live_api: Api
) -> None:
    url, _, headers = live_api
    response = case.call_and_validate(base_url=url, headers=headers)
    if _positive(case) and ADMIN_ONLY.match(case.operation.path):
        assert response.status_code == 403, response.text
    elif _positive(case) and "security" in case.operation.definition.raw:
        assert response.status_code not in (401, 403), response.text
