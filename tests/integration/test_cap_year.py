"""R10 caps are per year of the activity, also for records a deferral counts toward the next year.

青人社厅函〔2022〕394号 四(二)1–4 caps papers, books, lectures and exam setting per year of the
activity ("当年…发表", "每年最多折算为 20 学时"); 七(二) defers the *required* hours to the next
year, it does not merge two years' caps.  So a 2025 paper accepted late under a deferral counts
toward 2026 (``counts_year``) but shares 2025's cap with the 2025 papers filed in time, and none
of 2026's.  Real ingest and the real caps ledger, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.pipeline import caps
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.store.tables import caps_ledger, record_versions, records
from tests.integration.test_rules_review import IN_2025, IN_2026, _deferred, _paper, _person
from tests.support.keys import KEYS


def _rows(engine: Engine, person: dict[str, Any]) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.source_record_id: r for r in conn.execute(select(records).where(
            records.c.person_key == KEYS.of("resident_id", person["id_number"])))}


def _ledger(engine: Engine, person: dict[str, Any]) -> dict[tuple[int, str], Decimal]:
    with engine.connect() as conn:
        return {(int(r.year), r.cap_type): Decimal(r.credited) for r in conn.execute(
            select(caps_ledger).where(
                caps_ledger.c.person_key == KEYS.of("resident_id", person["id_number"])))}


def test_deferred_papers_share_their_own_years_cap_with_the_papers_filed_in_time(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    person = _person(9201)
    rules = _deferred(person)
    [in_time] = ingest(engine, partner, [_paper(person, "P25-1", 2025, 3)], now=IN_2025,
                       rules=rules)
    assert in_time.status.value == "accepted"
    late = ingest(engine, partner, [_paper(person, "P25-2", 2025, 5),
                                    _paper(person, "P25-3", 2025, 6),
                                    _paper(person, "P26-1", 2026, 1)], now=IN_2026, rules=rules)
    assert [a.status.value for a in late] == ["accepted"] * 3
    rows = _rows(engine, person)
    assert {sid: (int(r.counts_year), r.credited_hours) for sid, r in rows.items()} == {
        "P25-1": (2025, "10.0"), "P25-2": (2026, "10.0"), "P25-3": (2026, "0.0"),
        "P26-1": (2026, "10.0")}
    assert _ledger(engine, person) == {(2025, "paper"): Decimal(20), (2026, "paper"): Decimal(10)}
    # A deferred paper withdrawn gives its share of 2025's cap to 2025's next paper, not 2026's.
    assert withdraw(engine, partner, "P25-2", now=IN_2026, config=rules.config) is not None
    rows = _rows(engine, person)
    assert {sid: r.credited_hours for sid, r in rows.items()} == {
        "P25-1": "10.0", "P25-2": "0", "P25-3": "10.0", "P26-1": "10.0"}
    assert _ledger(engine, person) == {(2025, "paper"): Decimal(20), (2026, "paper"): Decimal(10)}


def test_a_deferred_versions_pin_is_in_its_activity_years_group(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """A refused correction's pin keeps the CE year it counts toward; its group is 2025's."""
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    person = _person(9202)
    [late] = ingest(engine, partner, [_paper(person, "P25-1", 2025, 5)], now=IN_2026,
                    rules=_deferred(person))
    key = KEYS.of("resident_id", person["id_number"])
    pin = {"record_id": late.record_id, "version": 1, "person_key": key, "year": 2026,
           "cap_type": "paper"}
    with engine.connect() as conn:
        assert caps.pin_groups(conn, [pin]) == {late.record_id: (key, 2025, "paper")}
        payload = orjson.loads(conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == late.record_id)).scalar_one())
    counts = caps.counts_of(payload, KEYS)
    assert counts is not None and (counts["year"], counts["cap_year"]) == (2026, 2025)
    assert caps.cap_year_of(counts) == 2025
    # A stub written before stubs kept cap_year: taken to be capped in the year it counts toward.
    assert caps.cap_year_of({k: v for k, v in counts.items() if k != "cap_year"}) == 2026
