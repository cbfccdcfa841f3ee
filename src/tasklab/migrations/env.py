"""Alembic environment: the engine comes from tasklab's settings, never from alembic.ini."""

from __future__ import annotations

from alembic import context

from tasklab.database import make_engine

config = context.config
settings = config.attributes["settings"]

engine = make_engine(settings)
with engine.connect() as connection:
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
