"""Alembic migrations and the SQLAlchemy metadata describe the same schema, on both backends."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select

from gateway.store.db import make_engine, upgrade
from gateway.store.tables import audit_head, metadata


def test_migrated_schema_matches_metadata(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_migration_seeds_the_audit_chain_head(engine: Engine) -> None:
    with engine.connect() as conn:
        head = conn.execute(select(audit_head)).one()
    assert (head.id, head.last_seq, head.last_hash) == (1, 0, "0" * 64)


def test_sqlite_connections_are_durable_and_sized_for_bulk_ingest(tmp_path: Path) -> None:
    """Every SQLite connection has the store's settings.

    WAL, fsync at each commit (nothing acknowledged is lost), a 64 MiB page cache and a WAL
    checkpointed every 20,000 pages (benchmarks/RESULTS.md).
    """
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            read = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in
                    ("journal_mode", "synchronous", "cache_size", "wal_autocheckpoint")}
    finally:
        engine.dispose()
    assert read == {"journal_mode": "wal", "synchronous": 2, "cache_size": -65536,
                    "wal_autocheckpoint": 20000}
