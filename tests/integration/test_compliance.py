"""The compliance read-model (SPEC §4 R1) against a person-year worked out by hand.

One person's 2026 comes from four sources: the Cadre Network College (public subjects, R2),
a canonical partner (professional training and three sole papers, capped at 20 h by R3/R10),
the health commission (CME credits at 3.6 h a credit) and a second canonical partner whose
report of the same training is a duplicate.  A withdrawn record, a rejected public-subject
record from a canonical partner and another person's record must not count.  The HTTP answer
(operator token, real uvicorn) and :func:`gateway.compliance.report` must both equal the table
below, and neither may carry the full identity number.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import Engine

from adapters.base import Adapter
from adapters.cadre_college import CadreCollegeAdapter
from adapters.health import HealthAdapter
from gateway import compliance
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.masking import mask_id
from gateway.pipeline.ingest import ingest, ingest_items
from gateway.pipeline.items import Item, PartnerRef
from gateway.pipeline.withdraw import withdraw
from mock_partners.generators import GenPerson, canonical_submission, make_person
from tests.support.keys import KEYS
from tests.support.servers import uvicorn_thread

NOW = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)
CADRE = PartnerRef("cadre-college", "cadre_college")

# The hand-computed year (青人社厅函〔2022〕394号 四: 135 h = public ≥ 45 + professional ≥ 90).
#   public        cadre college 24 h + 12 h                                  = 36.0
#   professional  training 24 h (its duplicate from partner B not again)
#                 + papers 3 × 10 h claimed, capped at 20 h (四(二)1)
#                 + health 5 CME credits × 3.6 h                             = 62.0
#   not counted   a withdrawn 8 h training; a canonical public course (rejected, R2);
#                 another person's 40 h
#   total 98.0; missing public 45 − 36 = 9, professional 90 − 62 = 28, total 135 − 98 = 37
EXPECTED: dict[str, Any] = {
    "year": 2026,
    "requirement": {"total": 135, "public": 45, "professional": 90},
    "credited": {"total": "98.0", "public": "36.0", "professional": "62.0"},
    "claimed": {"public": "36.0", "professional": "72.0"},
    "by_type": {
        "online_course": {"claimed": "36.0", "credited": "36.0"},
        "paper": {"claimed": "30.0", "credited": "20.0"},
        "training": {"claimed": "42.0", "credited": "42.0"},
    },
    "missing": {"public": "9.0", "professional": "28.0", "total": "37.0"},
    "compliant": False,
}
COUNTED = {"GB-1", "GB-2", "T-1", "PA-1", "PA-2", "PA-3", "WJ-1"}


def _cadre_item(person: GenPerson, xh: str, title: str, hours: int, when: str) -> dict[str, Any]:
    return {"xh": xh, "sfzh": person.id_number, "xm": person.name, "dqdm": person.region,
            "kcbh": f"KC-{xh}", "kcmc": title, "xs": hours, "wcsj": when}


def _health_row(person: GenPerson) -> dict[str, Any]:
    return {"记录编号": "WJ-1", "身份证号": person.id_number, "姓名": person.name,
            "工作单位": "西宁市第一人民医院", "地区代码": person.region, "项目编号": "CME-2026-18",
            "项目名称": "高原医学新进展", "学分类别": "Ⅰ类", "学分": "5", "开始日期": "2026-05-06",
            "完成日期": "2026-05-08"}


def _paper(person: GenPerson, n: int) -> dict[str, Any]:
    return {"source_record_id": f"PA-{n}",
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region},
            "year": 2026, "category": "professional", "activity_type": "paper",
            "activity": {"title": f"三江源湿地碳汇研究（{n}）", "completed_on": f"2026-0{n + 2}-15"},
            "claimed": {"quantity": "1", "unit": "papers", "details": {"authorship": "sole"}}}


def _through(engine: Engine, adapter: Adapter, partner: PartnerRef, raws: list[Any]) -> list[str]:
    """Parse native records with ``adapter`` and ingest them, as a pull or a batch would."""
    items = [Item(raw=r.raw, submission=r.submission, errors=r.errors, warnings=r.warnings)
             for raw in raws for r in adapter.parse(raw)]
    return [a.status.value for a in ingest_items(engine, partner, items, now=NOW)]


def _build_year(engine: Engine, a: PartnerRef, b: PartnerRef, health: PartnerRef,
                person: GenPerson) -> None:
    rng = random.Random(3)
    assert _through(engine, CadreCollegeAdapter(), CADRE, [
        _cadre_item(person, "GB-1", "习近平新时代中国特色社会主义思想专题", 24, "2026-03-02 09:30:00"),
        _cadre_item(person, "GB-2", "数字经济与数字政府", 12, "2026-04-11 20:05:00"),
    ]) == ["accepted", "accepted"]

    training = canonical_submission(rng, "T-1", person, hours="24", title="高原生态修复技术研修班")
    withdrawn = canonical_submission(rng, "T-2", person, hours="8", title="工程项目管理实务")
    public = canonical_submission(rng, "T-3", person, hours="10", title="公需科目自学")
    public["category"] = "public"
    other = canonical_submission(rng, "T-4", make_person(rng), hours="40")
    statuses = [x.status for x in ingest(engine, a, [training, withdrawn, public, other], now=NOW)]
    assert statuses == ["accepted", "accepted", "rejected", "accepted"]
    assert withdraw(engine, a, "T-2", now=NOW) is not None

    for n in (1, 2, 3):  # one call each: the third arrives last and is the one cut to 0 h
        [answer] = ingest(engine, a, [_paper(person, n)], now=NOW)
        assert answer.status == "accepted"
    assert [w.code for w in answer.warnings] == ["CAP_APPLIED"]

    again = copy.deepcopy(training) | {"source_record_id": "B-T-1"}
    assert [x.status for x in ingest(engine, b, [again], now=NOW)] == ["duplicate"]

    assert _through(engine, HealthAdapter(), health, [_health_row(person)]) == ["accepted"]


def _check(report: dict[str, Any], person: GenPerson) -> None:
    assert {k: report[k] for k in EXPECTED} == EXPECTED
    assert report["person"] == mask_id(person.id_number)
    assert {r["source_record_id"] for r in report["records"]} == COUNTED
    capped = [r["source_record_id"] for r in report["records"] if r["capped"]]
    assert capped == ["PA-3"]


def test_compliance_matches_the_hand_computed_year(
    db_url: str, store: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], new_operator: Callable[..., str],
) -> None:
    a, b = new_partner(store), new_partner(store)
    health = new_partner(store, adapter="health")
    ref_a, ref_b, ref_health = (PartnerRef(p.partner_id, p.adapter) for p in (a, b, health))
    person = make_person(random.Random(42))
    _build_year(store, ref_a, ref_b, ref_health, person)
    token = new_operator(store, role="viewer")

    with store.connect() as conn:
        direct = compliance.report(conn, person.id_number, 2026, keys=KEYS)
    _check(direct, person)
    assert direct["by_partner"] == {CADRE.partner_id: "36.0", a.partner_id: "44.0",
                                    health.partner_id: "18.0"}

    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        resp = httpx.get(f"{url}/v1/compliance/{person.id_number}/2026",
                         headers={"Authorization": f"Bearer {token}"})
        unauthenticated = httpx.get(f"{url}/v1/compliance/{person.id_number}/2026")
        other_year = httpx.get(f"{url}/v1/compliance/{person.id_number}/2025",
                               headers={"Authorization": f"Bearer {token}"})
        typo = person.id_number[:16] + str((int(person.id_number[16]) + 1) % 10) + person.id_number[17]
        mistyped = httpx.get(f"{url}/v1/compliance/{typo}/2026",
                             headers={"Authorization": f"Bearer {token}"})
        too_long = httpx.get(f"{url}/v1/compliance/{'1' * 5000}/2026",
                             headers={"Authorization": f"Bearer {token}"})
    # A mistyped id is said to be one, not answered as a person without hours.
    assert mistyped.status_code == 422 and mistyped.json()["error"]["code"] == "ID_NUMBER_INVALID"
    assert typo not in mistyped.text and mistyped.json()["error"]["message_zh"]
    assert too_long.status_code == 422 and too_long.json()["error"]["code"] == "SCHEMA"
    assert resp.status_code == 200, resp.text
    assert person.id_number not in resp.text and person.id_number[6:14] not in resp.text
    assert resp.json() == direct
    _check(resp.json(), person)
    assert unauthenticated.status_code == 401
    assert other_year.status_code == 200 and person.id_number not in other_year.text
    empty = other_year.json()
    assert {k: Decimal(v) for k, v in empty["credited"].items()} == {
        "total": 0, "public": 0, "professional": 0}
    assert {k: Decimal(v) for k, v in empty["missing"].items()} == {
        "public": 45, "professional": 90, "total": 135}
    assert empty["records"] == [] and empty["compliant"] is False


def test_a_source_id_holding_the_identity_number_is_masked_in_the_report(
    db_url: str, store: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], new_operator: Callable[..., str],
) -> None:
    """A partner's id that holds an identity number is masked, as every ops answer masks it.

    Review 36: ``records[].source_record_id`` came back whole (``JD-<id number>-1``), where
    ``GET /v1/records/{id}`` and every ops list mask it.
    """
    ref = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(43))
    sub = canonical_submission(random.Random(43), f"JD-{person.id_number}-1", person=person)
    assert ingest(store, ref, [sub], now=NOW)[0].status.value == "accepted"
    token = new_operator(store, role="viewer")
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        answer = httpx.get(f"{url}/v1/compliance/{person.id_number}/2026",
                           headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    [listed] = answer.json()["records"]
    assert listed["source_record_id"] == f"JD-{mask_id(person.id_number)}-1"
    assert person.id_number not in answer.text
