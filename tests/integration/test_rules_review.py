"""Review of the policy rules (SPEC §4) against the notice 青人社厅函〔2022〕394号 itself.

Real ingest, the real caps ledger and the real compliance read-model, on SQLite and PostgreSQL.
Three of these were written (session 21) as strict xfails on the code of 4973661, each asserting
what a provincial HR officer reads in the notice and failing on the bug its docstring names: a
deferral forgave its year instead of merging it into the next (七(二)), a deferred year's papers
shared the next year's cap (四(二)1), a national award covered only its own year (四(二)5).  All
are fixed; the other tests pin subtle rules the code gets right.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Engine

from gateway import compliance
from gateway.accounts import Partner
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.rules_tables import DeferralInfo
from gateway.reference import StoreReference
from mock_partners.generators import GenPerson, make_person
from tests.support.keys import KEYS
from tests.support.reference import store_deferral
from tests.support.years import fixture_rules_config

IN_2025 = datetime(2025, 10, 1, 2, 0, tzinfo=UTC)
IN_2026 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def _person(seed: int) -> dict[str, Any]:
    p: GenPerson = make_person(random.Random(seed))
    return {"id_type": "resident_id", "id_number": p.id_number, "name": p.name,
            "region_code": p.region}


def _sub(person: dict[str, Any], sid: str, year: int, kind: str, completed: str,
         claimed: dict[str, Any], category: str = "professional",
         started: str | None = None) -> dict[str, Any]:
    activity: dict[str, Any] = {"title": f"审查用例 {sid}", "completed_on": completed}
    if started:
        activity["started_on"] = started
    return {"source_record_id": sid, "person": person, "year": year, "category": category,
            "activity_type": kind, "activity": activity, "claimed": claimed}


def _paper(person: dict[str, Any], sid: str, year: int, month: int) -> dict[str, Any]:
    return _sub(person, sid, year, "paper", f"{year}-{month:02d}-15",
                {"quantity": "1", "unit": "papers", "details": {"authorship": "sole"}})


def _deferred(person: dict[str, Any], year: int = 2025) -> RulesContext:
    """An approved illness deferral of ``year`` (七(二)), the suite's 2026 kept open."""
    return RulesContext(StoreReference.of(KEYS, deferrals=[(person["id_number"], DeferralInfo(
        year, "illness", date(year, 12, 1)))]), fixture_rules_config())


def _store_deferral(engine: Engine, person: dict[str, Any], year: int = 2025) -> None:
    """The deferral of :func:`_deferred` as the reference sync stores it: the report reads it."""
    store_deferral(engine, person["id_number"], year, "illness", date(year, 12, 1))


def _report(engine: Engine, person: dict[str, Any], year: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return compliance.report(conn, person["id_number"], year, keys=KEYS)


# -- findings ----------------------------------------------------------------------------------


def test_deferred_papers_keep_their_own_years_cap(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    person = _person(9101)
    rules = _deferred(person)
    on_time = ingest(engine, partner, [_paper(person, "P26-1", 2026, 1),
                                       _paper(person, "P26-2", 2026, 2)], now=IN_2026, rules=rules)
    assert [a.status.value for a in on_time] == ["accepted", "accepted"]
    late = ingest(engine, partner, [_paper(person, "P25-1", 2025, 5),
                                    _paper(person, "P25-2", 2025, 6)], now=IN_2026, rules=rules)
    assert [a.status.value for a in late] == ["accepted", "accepted"]  # 2025 closed; deferred
    credited = {r["source_record_id"]: r["credited_hours"]
                for r in _report(engine, person, 2026)["records"]}
    # 2025's two sole papers are 20 h of 2025's own cap, which nothing else used.
    assert credited == {"P26-1": "10.0", "P26-2": "10.0", "P25-1": "10.0", "P25-2": "10.0"}


def test_a_deferred_year_is_owed_on_top_of_the_next(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    person = _person(9102)
    rules = _deferred(person)
    _store_deferral(engine, person)
    college = PartnerRef("cadre-college", "cadre_college")
    canonical = PartnerRef(new_partner(engine).partner_id, "canonical")
    public = _sub(person, "GB-1", 2026, "online_course", "2026-02-20",
                  {"quantity": "45", "unit": "hours", "details": {}}, category="public",
                  started="2026-02-10")
    training = _sub(person, "T-1", 2026, "training", "2026-02-25",
                    {"quantity": "90", "unit": "hours", "details": {}}, started="2026-02-11")
    assert [a.status.value for a in ingest(engine, college, [public], now=IN_2026,
                                           rules=rules)] == ["accepted"]
    assert [a.status.value for a in ingest(engine, canonical, [training], now=IN_2026,
                                           rules=rules)] == ["accepted"]
    report = _report(engine, person, 2026)
    assert report["credited"]["total"] == "135.0"
    assert report["compliant"] is False  # 2025's deferred 135 h are still owed
    assert report["missing"]["total"] == "135.0"


def test_a_national_award_covers_the_professional_hours_of_the_tenure(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    person = _person(9103)
    rules = RulesContext(StoreReference.of(KEYS), fixture_rules_config())
    college = PartnerRef("cadre-college", "cadre_college")
    canonical = PartnerRef(new_partner(engine).partner_id, "canonical")
    award = _sub(person, "C-1", 2025, "competition", "2025-09-20",
                 {"quantity": "1", "unit": "award",
                  "details": {"tier": "national", "award": "excellence"}})
    [won] = ingest(engine, canonical, [award], now=IN_2025, rules=rules)
    assert won.status.value == "accepted"
    assert _report(engine, person, 2025)["missing"]["professional"] == "0.0"
    public = _sub(person, "GB-1", 2026, "online_course", "2026-02-20",
                  {"quantity": "45", "unit": "hours", "details": {}}, category="public",
                  started="2026-02-10")
    assert [a.status.value for a in ingest(engine, college, [public], now=IN_2026,
                                           rules=rules)] == ["accepted"]
    report = _report(engine, person, 2026)
    assert report["missing"]["professional"] == "0.0", report["missing"]
    assert report["compliant"] is True


# -- pins of subtle rules the code gets right ----------------------------------------------------


def test_pulled_completion_on_the_closing_day_counts_and_the_31st_does_not(
        engine: Engine) -> None:
    """R11: 七(四)4 closes submissions at the end of 30 December (Asia/Shanghai).

    A college completion of 30 December fetched after midnight was filed in time (the college
    filed it when it was done); one of 31 December lies in the CE year (七(四)3 '至 12 月底')
    but after the close, so it is YEAR_CLOSED, not OUTSIDE_YEAR.
    """
    person = _person(9104)
    rules = RulesContext(StoreReference.of(KEYS), fixture_rules_config())
    college = PartnerRef("cadre-college", "cadre_college")
    fetched = datetime(2025, 12, 31, 1, 0, tzinfo=UTC)  # 09:00 on the 31st in Xining
    on_30 = _sub(person, "GB-30", 2025, "online_course", "2025-12-30",
                 {"quantity": "2", "unit": "hours", "details": {}}, category="public")
    on_31 = _sub(person, "GB-31", 2025, "online_course", "2025-12-31",
                 {"quantity": "2", "unit": "hours", "details": {}}, category="public")
    a30, a31 = ingest(engine, college, [on_30, on_31], now=fetched, rules=rules)
    assert a30.status.value == "accepted", a30.errors
    assert a31.status.value == "rejected"
    assert [e.code for e in a31.errors] == ["YEAR_CLOSED"]


def test_papers_at_exactly_the_cap_are_not_cut_and_the_next_one_is_kept_at_zero(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """R3/R10: two sole papers are exactly 20 h (no CAP_APPLIED); a third is accepted at 0 h."""
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    person = _person(9105)
    rules = RulesContext(StoreReference.of(KEYS), fixture_rules_config())
    answers = [ingest(engine, partner, [_paper(person, f"P-{n}", 2026, n)], now=IN_2026,
                      rules=rules)[0] for n in (1, 2, 3)]
    assert [a.status.value for a in answers] == ["accepted"] * 3
    assert [[w.code for w in a.warnings if w.code == "CAP_APPLIED"] for a in answers] == [
        [], [], ["CAP_APPLIED"]]
    report = _report(engine, person, 2026)
    assert {r["source_record_id"]: r["credited_hours"] for r in report["records"]} == {
        "P-1": "10.0", "P-2": "10.0", "P-3": "0.0"}
    assert report["by_type"]["paper"] == {"claimed": "30.0", "credited": "20.0"}
