"""The compliance read-model's deferral (七(二)) and tenure award (R7, 四(二)5) judgements.

The two strict findings of tests/integration/test_rules_review.py, and what the report says
beside them: the deferred year names the year it moved to and is judged there, the merged
year names what it merged, a withdrawn award stops covering, and an award written before
migration 0023 (``records.covers_professional`` null) is read from its payload.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from gateway import compliance
from gateway.accounts import Partner
from gateway.delivery.worker import DeliveryWorker
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.withdraw import withdraw
from gateway.reference import StoreReference
from gateway.store.tables import records
from mock_partners.ce_system import Faults
from mock_partners.generators import make_person
from tests.conftest import SECRET_KEY
from tests.support.delivery import drain
from tests.support.keys import KEYS
from tests.support.reference import store_deferral
from tests.support.servers import cli
from tests.support.years import fixture_rules_config

IN_2025 = datetime(2025, 10, 1, 2, 0, tzinfo=UTC)
IN_2026 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
RULES = RulesContext(StoreReference.of(KEYS), fixture_rules_config())
COLLEGE = PartnerRef("cadre-college", "cadre_college")


def _person(seed: int) -> dict[str, Any]:
    p = make_person(random.Random(seed))
    return {"id_type": "resident_id", "id_number": p.id_number, "name": p.name,
            "region_code": p.region}


def _hours(person: dict[str, Any], sid: str, year: int, category: str, hours: int,
           ) -> dict[str, Any]:
    kind = "online_course" if category == "public" else "training"
    return {"source_record_id": sid, "person": person, "year": year, "category": category,
            "activity_type": kind, "claimed": {"quantity": str(hours), "unit": "hours",
                                               "details": {}},
            "activity": {"title": f"用例 {sid}", "started_on": f"{year}-02-01",
                         "completed_on": f"{year}-02-{10 + int(sid[-1])}"}}


def _award(person: dict[str, Any], sid: str = "C-1") -> dict[str, Any]:
    return {"source_record_id": sid, "person": person, "year": 2025, "category": "professional",
            "activity_type": "competition", "activity": {"title": "全国职业技能大赛",
                                                          "completed_on": "2025-09-20"},
            "claimed": {"quantity": "1", "unit": "award",
                        "details": {"tier": "national", "award": "excellence"}}}


def _defer(engine: Engine, person: dict[str, Any], year: int) -> None:
    store_deferral(engine, person["id_number"], year, "pregnancy", date(year, 11, 20))


def _report(engine: Engine, person: dict[str, Any], year: int) -> dict[str, Any]:
    with engine.connect() as conn:
        answer = compliance.report(conn, person["id_number"], year, keys=KEYS)
    # the HTTP answer's schema holds it as it is
    assert compliance.ComplianceReport.model_validate(answer).model_dump(mode="json") == answer
    return answer


def _push(engine: Engine, partner: PartnerRef, subs: list[dict[str, Any]],
          now: datetime) -> None:
    answers = ingest(engine, partner, subs, now=now, rules=RULES)
    assert [a.status.value for a in answers] == ["accepted"] * len(subs), answers


def test_a_deferred_year_is_judged_with_the_next(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    person = _person(9201)
    canonical = PartnerRef(new_partner(engine).partner_id, "canonical")
    _defer(engine, person, 2025)
    _push(engine, COLLEGE, [_hours(person, "GB-1", 2025, "public", 20)], IN_2025)
    _push(engine, canonical, [_hours(person, "T-1", 2025, "professional", 30)], IN_2025)
    before = _report(engine, person, 2025)
    assert before["deferred_to"] == 2026 and before["merged_from"] is None
    assert before["requirement"] == {"total": 135, "public": 45, "professional": 90}
    assert before["missing"]["total"] == "85.0" and before["compliant"] is False
    assert [n["code"] for n in before["notes"]] == ["DEFERRAL"]
    assert "七(二)" in before["notes"][0]["message_zh"]
    assert before["deferrals"] == [{"from_year": 2025, "to_year": 2026, "reason": "pregnancy",
                                    "approved_on": "2025-11-20"}]
    # 2026: 50 h of 2025 plus 220 h of its own make the 270 = 90 public + 180 professional.
    _push(engine, COLLEGE, [_hours(person, "GB-2", 2026, "public", 70)], IN_2026)
    _push(engine, canonical, [_hours(person, "T-2", 2026, "professional", 150)], IN_2026)
    merged = _report(engine, person, 2026)
    assert merged["merged_from"] == 2025 and merged["deferred_to"] is None
    assert merged["requirement"] == {"total": 270, "public": 90, "professional": 180}
    assert merged["merged_credited"] == {"total": "50.0", "public": "20.0",
                                         "professional": "30.0"}
    assert merged["credited"] == {"total": "270.0", "public": "90.0", "professional": "180.0"}
    assert [r["source_record_id"] for r in merged["records"]] == ["GB-2", "T-2"]
    assert merged["compliant"] is True
    assert _report(engine, person, 2025)["compliant"] is True  # judged in 2026
    # Someone without a deferral reads as before.
    other = _person(9202)
    plain = _report(engine, other, 2026)
    assert (plain["deferred_to"], plain["merged_from"], plain["merged_credited"],
            plain["deferrals"], plain["notes"]) == (None, None, None, [], [])
    assert plain["requirement"] == {"total": 135, "public": 45, "professional": 90}


def test_a_withdrawn_award_stops_covering(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    person = _person(9203)
    canonical = PartnerRef(new_partner(engine).partner_id, "canonical")
    _push(engine, canonical, [_award(person)], IN_2025)
    _push(engine, COLLEGE, [_hours(person, "GB-1", 2026, "public", 45)], IN_2026)
    assert _report(engine, person, 2024)["professional_covered_by"] is None  # before the award
    covered = _report(engine, person, 2026)
    cover = covered["professional_covered_by"]
    assert (cover["source_record_id"], cover["year"]) == ("C-1", 2025)
    assert "任职期间" in cover["note_zh"] and "reviewing authority" in cover["note"]
    assert "COVERS_PROFESSIONAL_REQUIREMENT" in [n["code"] for n in covered["notes"]]
    assert covered["compliant"] is True
    # Withdrawn while 2025 is open (after its close the award stands: YEAR_CLOSED, R11).
    assert withdraw(engine, canonical, "C-1", now=IN_2025 + timedelta(days=30)) is not None
    after = _report(engine, person, 2026)
    assert after["professional_covered_by"] is None
    assert after["missing"]["professional"] == "90.0" and after["compliant"] is False


@pytest.mark.parametrize("refused", ["correction", "withdrawal"])
def test_an_award_whose_change_was_refused_still_covers(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: Callable[..., DeliveryWorker], refused: str) -> None:
    """The management system refused the award's title fix (or withdrawal) for good.

    It goes on counting version 1, the award, and the report counts its hours in 2025 too:
    2026 must stay covered (review 36: the cover was dropped, 2026 said 90 h missing).
    """
    _, faults = mock_ce
    person = _person(9206)
    canonical = PartnerRef(new_partner(engine).partner_id, "canonical")
    [award] = ingest(engine, canonical, [_award(person)], now=IN_2025, rules=RULES)
    worker = make_worker()
    drain(worker)  # version 1 applied there
    _push(engine, COLLEGE, [_hours(person, "GB-1", 2026, "public", 45)], IN_2026)
    assert _report(engine, person, 2026)["compliant"] is True
    faults.reject_ids = {str(award.record_id)}
    later = IN_2025 + timedelta(days=30)
    if refused == "correction":
        fixed = _award(person)
        fixed["activity"]["title"] = "第二届全国职业技能大赛"
        assert ingest(engine, canonical, [fixed], now=later, rules=RULES)[0].status.value == "corrected"
    else:
        assert withdraw(engine, canonical, "C-1", now=later) is not None
    drain(worker)  # version 2 refused for good: DOWNSTREAM_REJECTED
    after = _report(engine, person, 2026)
    assert after["professional_covered_by"] is not None, after
    assert after["professional_covered_by"]["source_record_id"] == "C-1"
    assert after["missing"]["professional"] == "0.0" and after["compliant"] is True


def test_an_award_stored_before_the_column_is_read_from_its_payload(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    person = _person(9204)
    canonical = PartnerRef(new_partner(engine).partner_id, "canonical")
    regional = {**_award(person, "C-2"), "claimed": {"quantity": "1", "unit": "award", "details": {
        "tier": "provincial", "award": "gold"}}, "activity": {
        "title": "青海省职业技能大赛", "completed_on": "2025-08-01"}}
    _push(engine, canonical, [_award(person), regional], IN_2025)
    with engine.begin() as conn:  # as a replica before migration 0023 left them
        conn.execute(update(records).values(covers_professional=None))
    cover = _report(engine, person, 2026)["professional_covered_by"]
    assert cover is not None and cover["source_record_id"] == "C-1"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_says_what_was_merged_and_what_covers(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner]) -> None:
    person = _person(9205)
    canonical = PartnerRef(new_partner(engine).partner_id, "canonical")
    _defer(engine, person, 2025)
    _push(engine, canonical, [_award(person)], IN_2025)
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "COLUMNS": "250"}
    as_json = cli(env, "compliance", person["id_number"], "2026", "--json")
    assert as_json.returncode == 0, as_json.stderr[-800:]
    assert json.loads(as_json.stdout) == _report(engine, person, 2026)
    table = cli(env, "compliance", person["id_number"], "2026")
    assert table.returncode == 0, table.stderr[-800:]
    assert "merged from 2025 (合并计算)" in table.stdout, table.stdout
    assert "professional requirement covered by C-1 (2025" in table.stdout, table.stdout
    assert "七(二)" in table.stdout and "任职期间" in table.stdout
    assert person["id_number"] not in table.stdout + table.stderr
    deferred = cli(env, "compliance", person["id_number"], "2025")
    assert "deferred to 2026 (顺延)" in deferred.stdout, deferred.stdout
