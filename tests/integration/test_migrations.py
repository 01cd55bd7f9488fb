"""Alembic migrations and the SQLAlchemy metadata describe the same schema, on both backends."""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, insert, inspect, select, text, update

from contracts import CESubmission
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.pipeline import dedup
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.db import code_revisions, make_engine, upgrade
from gateway.store.tables import audit_head, metadata, record_versions, records, rejections
from mock_partners import generators as gen
from tests.support.keys import unsafe_downgrade_config
from tests.support.servers import uvicorn_thread


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


def test_0013_rewrites_a_stored_dedup_key_to_the_quantitys_one_spelling(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """A record stored when "24.00" hashed as written: after 0013 a resend of it is a duplicate.

    The legacy state is made by hand: the stored payload says "24.00" and the record's content
    hash is that of the old serialisation (pydantic's JSON of the submission with "24.00").  A
    record whose hash the rebuild does not reproduce is left alone.
    """
    p = new_partner(engine)
    ref = PartnerRef(p.partner_id, p.adapter, p.base_code)
    subs = [gen.canonical_submission(random.Random(n), f"SRC-{n}", hours="24") for n in (1, 2)]
    answers = ingest(engine, ref, subs)
    legacy: dict[str, str] = {}
    with engine.begin() as conn:
        for answer, sub in zip(answers, subs, strict=True):
            canonical_json = CESubmission.model_validate(sub).model_dump_json()
            assert '"quantity":"24"' in canonical_json
            old_json = canonical_json.replace('"quantity":"24"', '"quantity":"24.00"')
            legacy[answer.record_id] = hashlib.sha256(old_json.encode()).hexdigest()
            payload = conn.execute(select(record_versions.c.payload).where(
                record_versions.c.record_id == answer.record_id)).scalar_one()
            conn.execute(update(record_versions).where(
                record_versions.c.record_id == answer.record_id).values(
                payload=payload.replace('"quantity":"24"', '"quantity":"24.00"')))
        # The second record's hash is not what its payload rebuilds to: it must stay.
        legacy[answers[1].record_id] = "f" * 64
        for rid, chash in legacy.items():
            conn.execute(update(records).where(records.c.record_id == rid)
                         .values(content_hash=chash))
    command.downgrade(unsafe_downgrade_config(db_url), "0012")
    upgrade(db_url)
    with engine.connect() as conn:
        stored = dict(conn.execute(select(records.c.record_id, records.c.content_hash)).all())
    assert stored[answers[1].record_id] == "f" * 64
    assert stored[answers[0].record_id] == dedup.hash_json(
        CESubmission.model_validate(subs[0]).model_dump_json())
    resend = copy.deepcopy(subs[0])
    resend["claimed"]["quantity"] = "24.00"
    [again] = ingest(engine, ref, [resend])
    assert (again.status, again.record_id, again.version) == ("duplicate", answers[0].record_id, 1)


def test_readyz_serves_a_store_ahead_of_the_code_but_not_one_behind(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings]) -> None:
    """A store a newer release migrated is served; one behind this code is not ready.

    In a rolling upgrade the old replicas answer until replaced; a replica started before
    ``ce-gateway db upgrade`` takes no traffic.
    """
    head, known = code_revisions()
    older = next(r for r in sorted(known) if r != head)

    def ready_at(revision: str) -> httpx.Response:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
        app = create_app(make_settings(db_url), run_worker=False, migrate=False)
        with uvicorn_thread(app) as url:
            return httpx.get(f"{url}/readyz")

    assert ready_at(head).status_code == 200
    assert ready_at("9999_a_newer_release").status_code == 200
    behind = ready_at(older)
    assert behind.status_code == 503 and f"code needs {head}" in behind.json()["reason"], behind.text


def _index_columns(engine: Engine, table: str) -> dict[str, list[str]]:
    with engine.connect() as conn:
        return {i["name"]: list(i["column_names"]) for i in inspect(conn).get_indexes(table)}


def _columns_of(engine: Engine, table: str) -> list[str]:
    with engine.connect() as conn:
        return [c["name"] for c in inspect(conn).get_columns(table)]


def test_0028_goes_down_to_0027_and_up_again_keeping_the_rejections(db_url: str, engine: Engine) -> None:
    """Row numbers and the new indexes go; the old row-errors index comes back; nothing is lost."""
    now = datetime(2026, 10, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(insert(rejections), [
            {"partner_id": "p", "adapter": "health", "source_record_id": "s", "batch_id": "B1",
             "row_no": 7, "payload": "{}", "errors": "[]", "status": "open", "received_at": now},
            {"partner_id": "p", "adapter": "health", "source_record_id": "t", "batch_id": None,
             "row_no": None, "payload": "{}", "errors": "[]", "status": "open", "received_at": now}])
    before_rej, before_be = _index_columns(engine, "rejections"), _index_columns(engine, "batch_errors")
    assert before_rej["ix_rejections_batch_id_status_row_no"] == ["batch_id", "status", "row_no"]
    assert before_be == {"ix_batch_errors_batch_id_id": ["batch_id", "id"]}
    command.downgrade(unsafe_downgrade_config(db_url), "0027")
    engine.dispose()
    assert "row_no" not in _columns_of(engine, "rejections")
    assert _index_columns(engine, "batch_errors") == {"ix_batch_errors_batch_row": ["batch_id", "row_no"]}
    rej = _index_columns(engine, "rejections")
    assert "ix_rejections_batch_id_status_row_no" not in rej
    assert set(rej) == set(before_rej) - {"ix_rejections_batch_id_status_row_no"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM rejections")).scalar() == 2
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0027"
    upgrade(db_url)
    engine.dispose()
    assert _index_columns(engine, "rejections") == before_rej
    assert _index_columns(engine, "batch_errors") == before_be
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert conn.execute(select(rejections.c.row_no)).scalars().all() == [None, None]
