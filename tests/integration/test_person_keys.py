"""Person keys under PERSON_KEY_SECRET (gateway/person_keys.py, migration 0020).

A store written before 0020 holds plain SHA-256 digests; 0020 re-keys every one of them (the
``person_key`` columns, the reference history, retention stubs) so that the records, caps,
deferrals and compliance of a person still meet under the new key.  A process with another
secret than the store's is refused: ``serve``/``worker`` exit 2, the app does not start, and
``/readyz`` answers 503.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import Engine, insert, select, text, update

from gateway import compliance
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.person_keys import PersonKeys, WrongPersonKey, plain_digest
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.rules_tables import EmptyReference
from gateway.reference import StoreReference, import_csv
from gateway.retention import stub
from gateway.store.db import alembic_config, make_engine, upgrade
from gateway.store.tables import (
    caps_ledger,
    natural_keys,
    person_key_check,
    record_versions,
    records,
    reference_deferrals,
    reference_history,
    reference_title_applicants,
    refused_pins,
)
from mock_partners.generators import GenPerson, make_person
from tests.integration.test_api_security import engine_for, gateway
from tests.integration.test_caps_ledger import paper
from tests.support.keys import KEYS
from tests.support.servers import cli
from tests.support.years import fixture_rules_config

SECRET = "this-deployments-own-person-key-secret-0123456789"
KEYED = PersonKeys(SECRET)
NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)


class PlainKeys(PersonKeys):
    """What the gateway stored before migration 0020: the plain digest, unkeyed."""

    __slots__ = ()

    def rekey(self, plain: str) -> str:
        return plain


PLAIN = PlainKeys("unused")


def _rules(keys: PersonKeys) -> RulesContext:
    return RulesContext(EmptyReference(), fixture_rules_config(person_keys=keys))


def _column(engine: Engine, column: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(column)).scalars())


ME, OTHER = make_person(random.Random(1)), make_person(random.Random(2))


def _store_at_0019(tmp_path: Path, partner: Partner, engine: Engine, person: GenPerson,
                   other: str) -> list[str]:
    """What code before 0020 left: two papers (at the cap), reference rows, a pin, a stub."""
    deferrals, applicants = tmp_path / "deferrals.csv", tmp_path / "applicants.csv"
    deferrals.write_text(f"id_number,from_year,reason,approved_on\n{person.id_number},2025,illness,"
                         "2026-01-06\n", encoding="utf-8")
    applicants.write_text(f"id_number,year\n{person.id_number},2026\n", encoding="utf-8")
    assert import_csv(engine, "deferrals", deferrals, actor="t", keys=PLAIN).ok
    assert import_csv(engine, "title-applicants", applicants, actor="t", keys=PLAIN).ok
    # Today's ingest uses the columns later migrations added (0023, 0026); they go again below.
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE records ADD COLUMN covers_professional BOOLEAN")
        conn.exec_driver_sql("ALTER TABLE records ADD COLUMN version_floor INTEGER")
    answers = ingest(engine, PartnerRef(partner.partner_id, partner.adapter),
                     [paper("PK-1", person, 1), paper("PK-2", person, 2)], now=NOW,
                     rules=_rules(PLAIN))
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE records DROP COLUMN covers_professional")
        conn.exec_driver_sql("ALTER TABLE records DROP COLUMN version_floor")
    assert [a.status for a in answers] == ["accepted", "accepted"], answers
    rids = [str(a.record_id) for a in answers]
    with engine.begin() as conn:
        # The management system still counts another person's record (a refused correction).
        conn.execute(insert(refused_pins).values(
            record_id="R-PINNED", version=1, person_key=plain_digest("resident_id", other),
            year=2026, cap_type="paper", hours="10", created_at=NOW))
        # Retention pruned the first paper's version: the stub keeps what it counts.
        v = conn.execute(select(record_versions).where(
            record_versions.c.record_id == rids[0])).one()
        conn.execute(update(record_versions).where(record_versions.c.record_id == rids[0]).values(
            payload=stub(v.record_id, v.version, v.content_hash, NOW, v.payload, PLAIN),
            pruned_at=NOW))
    return rids


@pytest.fixture
def store_0019(db_url: str) -> str:
    """``db_url`` taken back to 0019 (empty: nothing keyed yet, so the downgrade may)."""
    command.downgrade(alembic_config(db_url), "0019")
    return db_url


def test_0020_rekeys_every_stored_person_key_and_the_person_still_meets_herself(
        store_0019: str, tmp_path: Path, new_partner: Callable[..., Partner]) -> None:
    db_url = store_0019
    with engine_for(db_url) as engine:
        me, other = ME.id_number, OTHER.id_number
        partner = new_partner(engine)
        rids = _store_at_0019(tmp_path, partner, engine, ME, other)
        plain = plain_digest("resident_id", me)
        assert set(_column(engine, records.c.person_key)) == {plain}
        assert _column(engine, caps_ledger.c.person_key) == [plain]
        naturals = sorted(_column(engine, records.c.natural_key))
        assert sorted(_column(engine, natural_keys.c.natural_key)) == naturals

        upgrade(db_url, person_key_secret=SECRET)

        # The natural keys (they hold the number too) are keyed, the holders' index with them.
        keyed_naturals = sorted(KEYED.rekey(n) for n in naturals)
        assert sorted(_column(engine, records.c.natural_key)) == keyed_naturals
        assert sorted(_column(engine, natural_keys.c.natural_key)) == keyed_naturals

        mine = KEYED.of("resident_id", me)
        assert mine == KEYED.rekey(plain) != plain
        assert set(_column(engine, records.c.person_key)) == {mine}
        assert _column(engine, caps_ledger.c.person_key) == [mine]
        assert _column(engine, reference_deferrals.c.person_key) == [mine]
        assert _column(engine, reference_title_applicants.c.person_key) == [mine]
        assert _column(engine, refused_pins.c.person_key) == [KEYED.of("resident_id", other)]
        assert _column(engine, person_key_check.c.check_value) == [KEYED.check()]
        with engine.connect() as conn:
            history = conn.execute(select(reference_history.c.key, reference_history.c.payload)
                                   .where(reference_history.c.kind.in_(
                                       ("deferrals", "title-applicants")))).all()
            stubbed = conn.execute(select(record_versions.c.payload).where(
                record_versions.c.pruned_at.is_not(None))).scalar_one()
        assert sorted(h.key for h in history) == [f"{mine}/2025", f"{mine}/2026"]
        assert {json.loads(h.payload)["person_key"] for h in history} == {mine}
        assert json.loads(stubbed)["counts"]["person_key"] == mine
        assert json.loads(stubbed)["counts"]["credited_hours"] == "10.0"

        # Under the new key the person still meets her records, cap group and reference rows.
        with engine.connect() as conn:
            report = compliance.report(conn, me, 2026, keys=KEYED)
            reference = StoreReference.load(conn, KEYED)
        assert sorted(r["record_id"] for r in report["records"]) == sorted(rids)
        assert Decimal(report["credited"]["total"]) == 20
        assert reference.deferral(me, 2025) is not None and reference.is_title_applicant(me, 2026)
        [answer] = ingest(engine, PartnerRef(partner.partner_id, partner.adapter),
                          [paper("PK-3", ME, 3)], now=NOW, rules=_rules(KEYED))
        assert answer.status == "accepted"
        assert "CAP_APPLIED" in [w.code for w in answer.warnings], answer
        # Another source reporting the first paper again meets it by its (re-keyed) natural key.
        [again] = ingest(engine, PartnerRef(partner.partner_id, partner.adapter),
                         [paper("PK-1-AGAIN", ME, 1)], now=NOW, rules=_rules(KEYED))
        assert again.status == "duplicate", again
        with engine.connect() as conn:
            assert conn.execute(select(records.c.duplicate_of).where(
                records.c.record_id == again.record_id)).scalar_one() == rids[0]
        with engine.connect() as conn:
            assert conn.execute(select(records.c.credited_hours).where(
                records.c.record_id == answer.record_id)).scalar_one() in ("0", "0.0")
            assert conn.execute(select(caps_ledger.c.credited)).scalar_one() in ("20", "20.0")

        # The keyed values cannot be turned back into plain digests: the downgrade refuses.
        with pytest.raises(RuntimeError, match="cannot be undone"):
            command.downgrade(alembic_config(db_url), "0019")
        assert _column(engine, person_key_check.c.check_value) == [KEYED.check()]
        assert set(_column(engine, records.c.person_key)) == {mine}


def test_0020_without_the_secret_refuses_to_run(store_0019: str) -> None:
    with pytest.raises(RuntimeError, match="PERSON_KEY_SECRET"):
        command.upgrade(alembic_config(store_0019), "head")


def test_a_store_keyed_before_is_not_keyed_twice(
        store_0019: str, tmp_path: Path, new_partner: Callable[..., Partner]) -> None:
    """The unsafe downgrade of tests of older migrations keeps the values and the check."""
    with engine_for(store_0019) as engine:
        _store_at_0019(tmp_path, new_partner(engine), engine, ME, OTHER.id_number)
        upgrade(store_0019, person_key_secret=SECRET)
        keyed = sorted(_column(engine, records.c.person_key))
        cfg = alembic_config(store_0019)
        cfg.attributes["person_keys_downgrade_unsafe"] = True
        command.downgrade(cfg, "0019")
        upgrade(store_0019, person_key_secret=SECRET)
        assert sorted(_column(engine, records.c.person_key)) == keyed
        command.downgrade(cfg, "0019")
        with pytest.raises(RuntimeError, match="PERSON_KEY_SECRET"):
            upgrade(store_0019, person_key_secret="yet-another-secret")


def test_the_app_does_not_start_with_another_person_key_secret(
        db_url: str, make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(db_url, person_key_secret="another-secret"), run_worker=False)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(WrongPersonKey):
        asyncio.run(start())


def test_readyz_is_not_ready_once_the_store_was_keyed_with_another_secret(
        db_url: str, make_settings: Callable[..., Settings]) -> None:
    with engine_for(db_url) as engine, gateway(make_settings(db_url)) as url:
        assert httpx.get(url + "/readyz", timeout=30).status_code == 200
        with engine.begin() as conn:
            conn.execute(update(person_key_check).values(check_value=KEYED.check()))
        try:
            resp = httpx.get(url + "/readyz", timeout=30)
            assert resp.status_code == 503, resp.text
            assert "PERSON_KEY_SECRET" in resp.json()["reason"]
        finally:
            with engine.begin() as conn:
                conn.execute(update(person_key_check).values(check_value=KEYS.check()))
        assert httpx.get(url + "/readyz", timeout=30).status_code == 200


@pytest.mark.parametrize("command_args", [("worker",), ("serve", "--port", "-1")])
def test_serve_and_worker_refuse_another_person_key_secret(
        tmp_path: Path, command_args: tuple[str, ...]) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
           "CE_GATEWAY_PERSON_KEY_SECRET": SECRET}
    migrated = cli(env, "db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    refused = cli({**env, "CE_GATEWAY_PERSON_KEY_SECRET": "another-secret"}, *command_args)
    assert refused.returncode == 2, refused.stderr
    assert "CONFIG_INVALID (CE_GATEWAY_PERSON_KEY_SECRET)" in refused.stderr
    assert "Traceback" not in refused.stderr and SECRET not in refused.stderr
    engine = make_engine(env["CE_GATEWAY_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT check_value FROM person_key_check")).scalar() \
                == KEYED.check()
    finally:
        engine.dispose()


def test_the_dev_person_key_secret_is_named_when_it_is_used(tmp_path: Path) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}"}
    done = cli(env, "db", "upgrade")
    assert done.returncode == 0 and "CE_GATEWAY_PERSON_KEY_SECRET" in done.stderr, done.stderr
    own = cli({**env, "CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'own.sqlite3'}",
               "CE_GATEWAY_PERSON_KEY_SECRET": SECRET}, "db", "upgrade")
    assert own.returncode == 0 and "PERSON_KEY_SECRET" not in own.stderr, own.stderr
