from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasklab.errors import ConfigError
from tasklab.settings import describe, load_settings, mask_url, to_env


def write_toml(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_defaults_are_embedded_sqlite_and_no_redis_url() -> None:
    s = load_settings()
    assert s.redis_url is None and s.database_url is None
    assert s.sync_database_url.startswith("sqlite:///") and s.sync_database_url.endswith(
        "tasklab.db"
    )
    assert s.async_database_url.startswith("sqlite+aiosqlite:///")


def test_env_beats_file_and_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(
        tmp_path / "tasklab.toml",
        'lease_s = 12\nworker_prefetch_multiplier = 7\nREDIS_URL = "redis://file-host:6379/1"\n',
    )
    monkeypatch.setenv("TASKLAB_LEASE_S", "42")
    s = load_settings()
    assert s.lease_s == 42  # env wins over file
    assert s.worker_prefetch_multiplier == 7  # file wins over default
    assert s.redis_url == "redis://file-host:6379/1"
    assert s.reaper_interval_s == 5.0  # default
    sources = {k: src for k, _, src in describe(s)}
    assert sources["lease_s"] == "env:TASKLAB_LEASE_S"
    assert sources["worker_prefetch_multiplier"].startswith("file:")
    assert sources["reaper_interval_s"] == "default"


def test_plain_url_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw@db:5432/app")
    monkeypatch.setenv("BROKER_URL", "amqps://u:pw@mq:5671//")
    s = load_settings()
    assert s.sync_database_url == "postgresql+psycopg://u:pw@db:5432/app"
    assert s.async_database_url == "postgresql+asyncpg://u:pw@db:5432/app"
    assert s.effective_broker_url == "amqps://u:pw@mq:5671//"
    assert not s.broker_is_redis


def test_an_unknown_tasklab_variable_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKLAB_LEASE_SECONDS", "5")
    with pytest.raises(ConfigError, match="TASKLAB_LEASE_SECONDS"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("TASKLAB_LEASE_S", "soon", "lease_s"),
        ("TASKLAB_WORKER_POOL", "forkbomb", "worker_pool"),
        ("REDIS_URL", "http://example/", "redis_url"),
        ("TASKLAB_API_PORT", "70000", "api_port"),
    ],
)
def test_an_invalid_value_is_an_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, key: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.key.lower().endswith(key)


def test_an_unknown_key_in_the_file_is_an_error(tmp_path: Path) -> None:
    write_toml(tmp_path / "tasklab.toml", "lease = 3\n")
    with pytest.raises(ConfigError, match="lease"):
        load_settings()


def test_passwords_are_masked_in_descriptions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://:hunter2@cache:6380/0")
    rows = describe(load_settings())
    shown = " ".join(v for _, v, _ in rows)
    assert "hunter2" not in shown and "rediss://:***@cache:6380/0" in shown
    assert mask_url("amqp://guest:guest@mq:5672//") == "amqp://guest:***@mq:5672//"


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    original = load_settings(lease_s=9, redis_url="redis://h:1/2")
    for k, v in to_env(original).items():
        monkeypatch.setenv(k, v)
    assert load_settings() == original


def test_time_limits_and_visibility_timeout_must_be_ordered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKLAB_TASK_SOFT_TIME_LIMIT_S", "400")
    with pytest.raises(ConfigError, match="soft_time_limit"):
        load_settings()
    monkeypatch.delenv("TASKLAB_TASK_SOFT_TIME_LIMIT_S")
    monkeypatch.setenv("TASKLAB_VISIBILITY_TIMEOUT_S", "300")
    with pytest.raises(ConfigError, match="visibility_timeout_s"):
        load_settings()


def test_one_postgres_url_with_sslmode_serves_both_drivers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db:5432/app?sslmode=require")
    s = load_settings()
    assert s.sync_database_url.endswith("?sslmode=require")
    assert s.async_database_url == "postgresql+asyncpg://u@db:5432/app?ssl=require"


def test_a_rate_limit_a_user_sets_is_checked_and_the_shipped_ones_cost_no_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every process builds settings (each worker too); `limits` (16 MB, 0.1 s to import)
    is needed only to check a value a user set, and the API that enforces them."""
    monkeypatch.setenv("TASKLAB_RATE_LIMIT_PER_TOKEN", "lots")
    with pytest.raises(ConfigError, match="rate_limit_per_token"):
        load_settings()
    code = (
        "import sys; from tasklab.settings import load_settings; load_settings(); "
        "print('limits' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLAB_RATE_LIMIT")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
