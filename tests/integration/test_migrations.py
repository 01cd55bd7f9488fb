"""Alembic migrations and the SQLAlchemy metadata describe the same schema, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select

from gateway.store.tables import audit_head, metadata


def test_migrated_schema_matches_metadata(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_migration_seeds_the_audit_chain_head(engine: Engine) -> None:
    with engine.connect() as conn:
        head = conn.execute(select(audit_head)).one()
    assert (head.id, head.last_seq, head.last_hash) == (1, 0, "0" * 64)
