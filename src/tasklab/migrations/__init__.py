"""Alembic migrations for every tasklab table; ``migrate(settings)`` runs them in code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from tasklab.settings import Settings

HERE = Path(__file__).parent


def alembic_config(settings: Settings) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", settings.sync_database_url.replace("%", "%%"))
    cfg.attributes["settings"] = settings
    return cfg


def migrate(settings: Settings, revision: str = "head") -> None:
    """Bring the database schema to ``revision`` (idempotent; safe to call on every start)."""
    if settings.database_url is None:
        settings.home_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings), revision)
