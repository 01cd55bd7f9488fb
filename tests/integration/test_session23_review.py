"""Review of session 23's changes (e2a93f8..main): year close for withdrawals and ops, revisions.

The year close for a partner's withdrawal and for ops' keep=this, and STORE_NOT_MIGRATED
(R2 on a base's plan, the settings validators and the httpx URL filter were read and probed:
no finding worth a test here).  Real stores (SQLite and PostgreSQL), real ``ce-gateway``
processes where the command line is what changed.  Clocks are moved as
tests/integration/test_yearlife_review.py moves them (``now=`` on ingest and withdrawal); ops
conflict resolution reads the wall clock, so its test is dated in CE year 2025, closed on every
day this suite runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update

from adapters.training_base import TrainingBaseAdapter
from gateway import compliance
from gateway.accounts import Partner
from gateway.config import Settings
from gateway.errors import PayloadRejected
from gateway.ops.common import OpsConflict
from gateway.ops.records import resolve_conflict
from gateway.pipeline.ingest import ingest, ingest_items
from gateway.pipeline.items import Item, PartnerRef, RulesContext
from gateway.pipeline.rules_tables import (
    BaseInfo,
    DeferralInfo,
    EmptyReference,
    PlanInfo,
    RulesConfig,
    StaticReference,
)
from gateway.pipeline.withdraw import withdraw
from gateway.store.db import make_engine
from gateway.store.tables import records
from mock_partners.generators import GenPerson, make_person
from tests.support.keys import KEYS
from tests.support.servers import cli

MakeSettings = Callable[..., Settings]
YEAR = 2026
IN_YEAR = datetime(2026, 6, 1, 8, tzinfo=UTC)
BEFORE_CLOSE = datetime(2026, 9, 1, 8, tzinfo=UTC)
AFTER_CLOSE = datetime(2027, 1, 10, 8, tzinfo=UTC)  # 30 Dec 2026 has passed in Asia/Shanghai
CLOSED = RulesConfig(person_keys=KEYS)  # the notice's close, 30 December, no extension
BASE, PLAN = "JD-TB-2301", "P-2026-2301"


def _canonical(person: GenPerson, sid: str, hours: str = "12", *, year: int = YEAR,
               title: str = "高原生态修复技术研修班") -> dict[str, Any]:
    return {"source_record_id": sid,
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region},
            "year": year, "category": "professional", "activity_type": "training",
            "activity": {"title": title, "mode": "offline", "started_on": f"{year}-05-10",
                         "completed_on": f"{year}-05-13"},
            "claimed": {"quantity": hours, "unit": "hours", "details": {}},
            "evidence": {"assessment": "passed"}}


def _professional(engine: Engine, person: GenPerson, year: int = YEAR) -> str:
    with engine.connect() as conn:
        return str(compliance.report(conn, person.id_number, year, keys=KEYS)[
            "credited"]["professional"])


def _withdrawn(engine: Engine, record_id: object) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(select(records.c.withdrawn).where(
            records.c.record_id == str(record_id))).scalar_one())


# -- (a) a partner's withdrawal once the year it counts in has closed -------------------------

def test_a_withdrawal_follows_the_close_of_the_year_it_counts_in(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    """A DELETE is taken until the end of the close day in Beijing time, in the year it counts in.

    README (Dedup): DELETE withdraws "until the CE year the record counts in closes, then 422
    YEAR_CLOSED"; SPEC §4 R11: the close is the end of 30 December in Asia/Shanghai (Xining keeps
    Beijing time), configurable (YEAR_CLOSE_EXTENSIONS), and a deferred record counts in Y+1.

    A second before midnight in Beijing (15:59:59 UTC) a withdrawal is taken; at midnight
    (16:00 UTC on 30 December, already 31 December there) it is refused.  Under an extension
    the year is still open in January; a record deferred to 2027 may still be withdrawn then.
    """
    ref = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(2301))
    plain = RulesContext(EmptyReference(), CLOSED)
    subs = [_canonical(person, sid, title=f"研修班 {sid}") for sid in ("W-IN", "W-OUT", "W-EXT")]
    assert [a.status.value for a in ingest(store, ref, subs, now=IN_YEAR, rules=plain)] == [
        "accepted"] * 3
    last_second = datetime(2026, 12, 30, 15, 59, 59, tzinfo=UTC)
    assert withdraw(store, ref, "W-IN", now=last_second, config=CLOSED) is not None
    with pytest.raises(PayloadRejected) as refused:
        withdraw(store, ref, "W-OUT", now=datetime(2026, 12, 30, 16, 0, tzinfo=UTC), config=CLOSED)
    assert (refused.value.code, refused.value.field) == ("YEAR_CLOSED", "year")
    assert refused.value.message_zh and "2026" in refused.value.message_zh
    extended = RulesConfig(person_keys=KEYS, year_close_extensions={YEAR: date(2027, 3, 31)})
    assert withdraw(store, ref, "W-EXT", now=AFTER_CLOSE, config=extended) is not None

    # Deferred (七(二)): arrives after 2026's close, counts in 2027, withdrawn in January 2027.
    deferred = RulesContext(StaticReference(deferrals={(person.id_number, YEAR): DeferralInfo(
        YEAR, "illness", date(2026, 12, 1))}), CLOSED)
    [late] = ingest(store, ref, [_canonical(person, "W-DEF", title="研修班 W-DEF")],
                    now=AFTER_CLOSE, rules=deferred)
    assert late.status.value == "accepted", late
    assert withdraw(store, ref, "W-DEF", now=datetime(2027, 2, 1, tzinfo=UTC),
                    config=CLOSED) is not None
    assert _professional(store, person) == "12.0"  # W-OUT stands in the closed year
    assert _professional(store, person, YEAR + 1) == "0.0"


def _reference(person: GenPerson, *, deferral: bool) -> RulesContext:
    return RulesContext(StaticReference(
        bases={BASE: BaseInfo(BASE, "测试基地", "provincial", "active", date(2025, 6, 1))},
        plans={PLAN: PlanInfo(PLAN, BASE, "专业技术人员能力提升研修班", "professional",
                              Decimal(40), date(2026, 3, 1), date(2026, 12, 15), date(2026, 3, 1))},
        deferrals={(person.id_number, YEAR): DeferralInfo(YEAR, "illness", date(2026, 12, 1))}
        if deferral else {}), CLOSED)


def _base_result(person: GenPerson, *, passed: bool) -> dict[str, Any]:
    return {"base_code": BASE, "plan_id": PLAN, "results": [
        {"result_id": "TB-2301", "id_no": person.id_number, "name": person.name,
         "region": person.region, "hours": "23", "title": "高原生态修复技术研修班",
         "started_on": "2026-05-10", "completed_on": "2026-05-13", "passed": passed,
         "certificate_no": "JD2026002301"}]}


def _pushed(engine: Engine, base: PartnerRef, raw: dict[str, Any], now: datetime,
            rules: RulesContext) -> Any:
    items = [Item(raw=r.raw, submission=r.submission, errors=r.errors, warnings=r.warnings)
             for r in TrainingBaseAdapter().parse(raw)]
    [answer] = ingest_items(engine, base, items, now=now, rules=rules)
    return answer


@pytest.mark.parametrize("deferral", [
    pytest.param(False, id="no-deferral"),
    pytest.param(True, id="deferral"),
])
def test_a_failed_result_after_the_close_does_not_withdraw_the_closed_year_s_record(
        db_url: str, store: Engine, new_partner: Callable[..., Partner], deferral: bool) -> None:
    """A correction to a failed result after the close leaves the closed year's hours.

    SPEC §4 R9 ("a failed assessment earns no hours": a base's correction to failed takes the
    hours back) meets R11: after 30 December the closed year's hours stand, whether the partner
    DELETEs the record (withdraw._withdraw, refused YEAR_CLOSED) or corrects it to failed.
    """
    base = PartnerRef(new_partner(store, adapter="training_base", base_code=BASE).partner_id,
                      "training_base", BASE)
    person = make_person(random.Random(2302))
    rules = _reference(person, deferral=deferral)
    first = _pushed(store, base, _base_result(person, passed=True), IN_YEAR, rules)
    assert first.status.value == "accepted", first
    assert _professional(store, person) == "23.0"
    late = _pushed(store, base, _base_result(person, passed=False), AFTER_CLOSE, rules)
    assert late.status.value == "rejected"
    assert not _withdrawn(store, first.record_id)
    assert _professional(store, person) == "23.0"


def test_a_record_stored_before_counts_year_existed_can_still_be_withdrawn(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    ref = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(2303))
    [old] = ingest(store, ref, [_canonical(person, "OLD-1")], now=IN_YEAR,
                   rules=RulesContext(EmptyReference(), CLOSED))
    with store.begin() as conn:  # as migration 0005 left every older row
        conn.execute(update(records).where(records.c.record_id == str(old.record_id))
                     .values(counts_year=None))
    answer = withdraw(store, ref, "OLD-1", now=BEFORE_CLOSE, config=CLOSED)
    assert answer is not None and answer.status.value == "accepted"
    assert _withdrawn(store, old.record_id)


# -- (b) ops keep=this against a closed year's record -------------------------------------------

def test_keep_this_does_not_withdraw_a_counted_record_of_a_closed_year(
        db_url: str, store: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    """Keeping a conflicting report must not withdraw a closed year's counted record.

    Two partners report one 2025 activity with other hours in 2025: a conflict held for ops.
    Resolved today (2025 closed, its holder not pruned), keep=this must not change 2025.
    """
    settings = make_settings(db_url, year_close_extensions={})
    rules = RulesContext(EmptyReference(), RulesConfig.from_settings(settings))
    one = PartnerRef(new_partner(store).partner_id, "canonical")
    two = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(2304))
    in_2025 = datetime(2025, 6, 1, 8, tzinfo=UTC)
    [held] = ingest(store, one, [_canonical(person, "K-1", "12", year=2025)], now=in_2025,
                    rules=rules)
    [other] = ingest(store, two, [_canonical(person, "K-2", "16", year=2025)], now=in_2025,
                     rules=rules)
    assert (held.status.value, other.status.value) == ("accepted", "conflict")
    with pytest.raises(OpsConflict) as refused:
        resolve_conflict(store, settings, str(other.record_id), keep="this",
                         reason="the certificate shows 16 h", actor="ops-review")
    assert (refused.value.code, refused.value.status_code) == ("YEAR_CLOSED", 409)
    assert not _withdrawn(store, held.record_id)
    assert _professional(store, person, 2025) == "12.0"


# -- (e) STORE_NOT_MIGRATED: a store ahead of the code still runs --------------------------------

def _set_revision(url: str, revision: str) -> str:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            before = str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()
    return before


def _runs_ahead(url: str, tmp_path: Path) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": url, "CE_GATEWAY_BATCH_DIR": str(tmp_path / "batches")}
    for args in (("audit", "verify", "--json"), ("reconcile", "health", "2025", "--json")):
        done = cli(env, *args)
        assert done.returncode == 0, (args, done.stderr[-1500:])
        assert "STORE_NOT_MIGRATED" not in done.stderr


@pytest.mark.postgres
def test_a_postgresql_store_a_newer_release_migrated_still_runs_this_release_s_commands(
        postgres_url: str, tmp_path: Path) -> None:
    """A store ahead of the code is served (db.revision_behind; operations.md, rolling releases)."""
    before = _set_revision(postgres_url, "9999_newer_release")
    try:
        _runs_ahead(postgres_url, tmp_path)
    finally:
        _set_revision(postgres_url, before)


def test_an_sqlite_store_a_newer_release_migrated_still_runs_this_release_s_commands(
        sqlite_url: str, tmp_path: Path) -> None:
    _set_revision(sqlite_url, "9999_newer_release")
    _runs_ahead(sqlite_url, tmp_path)
