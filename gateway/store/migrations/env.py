"""Alembic environment: runs the gateway's migrations against the configured URL."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context

from gateway.store.db import make_engine
from gateway.store.tables import metadata

config = context.config
target_metadata = metadata


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Render our aware-datetime type as plain ``sa.DateTime(timezone=True)`` in migrations."""
    if type_ == "type" and type(obj).__name__ == "UTCDateTime":
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                render_item=render_item,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:  # a migration that refuses (0020's downgrade) leaves no connection behind
        engine.dispose()


run_migrations_online()
