"""Person-year review: one professional worker's CE year, end to end, against the notice.

Each year below is worked out by hand from 青人社厅函〔2022〕394号 四 (135 h = public ≥ 45 +
professional ≥ 90; 四(二)1–5 papers, books, lectures, exam setting, competitions) and 七(二)
(deferral), with SPEC §4's credit table (health 3.6 h a CME credit, accounting 1 h a credit) and
§7 (dedup).  The hours come through the real ingest paths — the Cadre Network College's adapter,
a training base's signed push, canonical POSTs, the health commission's signed batch upload, the
finance department's rows — and the compliance read-model is read over HTTP
(``GET /v1/compliance/…``), by ``ce-gateway compliance`` and by :func:`gateway.compliance.report`,
on SQLite and PostgreSQL.  Divergences from the notice are strict xfails naming the clause.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from adapters.base import Adapter
from adapters.cadre_college import CadreCollegeAdapter
from adapters.finance import FinanceAdapter
from adapters.training_base import TrainingBaseAdapter
from gateway import compliance
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.pipeline.ingest import ingest, ingest_items
from gateway.pipeline.items import Item, PartnerRef, RulesContext
from gateway.pipeline.rules_tables import BaseInfo, PlanInfo, StaticReference
from gateway.reference import StoreReference
from gateway.signing import SigningClient
from mock_partners.ce_system import Faults
from mock_partners.files import HEALTH_HEADERS, write_csv
from mock_partners.generators import GenPerson, make_person
from tests.conftest import SECRET_KEY
from tests.integration.test_batches_api import finished
from tests.support.keys import KEYS
from tests.support.reference import load_base_and_plan, store_deferral
from tests.support.servers import cli, uvicorn_thread
from tests.support.years import fixture_rules_config

NOW = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)
IN_2025 = datetime(2025, 10, 1, 2, 0, tzinfo=UTC)
AFTER_2025_CLOSE = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
CADRE = PartnerRef("cadre-college", "cadre_college")
RULES = RulesContext(StoreReference.of(KEYS), fixture_rules_config())
BASE, PLAN = "JD-TB-0601", "P-2026-0601"


# -- building a year ---------------------------------------------------------------------------

def _loaded(engine: Engine) -> RulesContext:
    """The rules with the store's reference data as it stands (bases, plans, deferrals)."""
    with engine.connect() as conn:
        return RulesContext(StoreReference.load(conn, KEYS), fixture_rules_config())


def _who(person: GenPerson) -> dict[str, Any]:
    return {"id_type": "resident_id", "id_number": person.id_number, "name": person.name,
            "region_code": person.region}


def _cadre(person: GenPerson, xh: str, hours: int, when: str) -> dict[str, Any]:
    return {"xh": xh, "sfzh": person.id_number, "xm": person.name, "dqdm": person.region,
            "kcbh": f"KC-{xh}", "kcmc": f"公需科目 {xh}", "xs": hours, "wcsj": when}


def _through(engine: Engine, adapter: Adapter, partner: PartnerRef, raws: list[Any],
             now: datetime = NOW) -> list[str]:
    """Native records parsed by ``adapter`` and ingested, as a pull or a batch does."""
    items = [Item(raw=r.raw, submission=r.submission, errors=r.errors, warnings=r.warnings)
             for raw in raws for r in adapter.parse(raw)]
    return [a.status.value for a in ingest_items(engine, partner, items, now=now, rules=RULES)]


def _public(engine: Engine, person: GenPerson, *hours: int, year: int = 2026,
            now: datetime = NOW) -> None:
    raws = [_cadre(person, f"GB-{year}-{i}", h, f"{year}-0{i + 3}-02 09:30:00")
            for i, h in enumerate(hours)]
    assert _through(engine, CadreCollegeAdapter(), CADRE, raws, now) == ["accepted"] * len(hours)


def _sub(person: GenPerson, sid: str, kind: str, qty: str, unit: str, *, year: int = 2026,
         day: str = "06-15", title: str | None = None, category: str = "professional",
         **details: str) -> dict[str, Any]:
    return {"source_record_id": sid, "person": _who(person), "year": year, "category": category,
            "activity_type": kind,
            "activity": {"title": title or f"用例 {sid}", "completed_on": f"{year}-{day}"},
            "claimed": {"quantity": qty, "unit": unit, "details": details}}


def _paper(person: GenPerson, sid: str, authorship: str, day: str) -> dict[str, Any]:
    return _sub(person, sid, "paper", "1", "papers", day=day, title=f"三江源论文 {sid}",
                authorship=authorship)


def _health_row(person: GenPerson, sid: str, credits: str) -> dict[str, Any]:
    return {"记录编号": sid, "身份证号": person.id_number, "姓名": person.name,
            "工作单位": "西宁市第一人民医院", "地区代码": person.region, "项目编号": "CME-2026-18",
            "项目名称": "高原医学新进展", "学分类别": "Ⅱ类", "学分": credits,
            "开始日期": "2026-05-06", "完成日期": "2026-05-08", "证书编号": f"CME{sid}"}


def _finance_row(person: GenPerson, sid: str, subject: str, credits: str,
                 title: str = "政府会计准则制度解读") -> dict[str, Any]:
    return {"流水号": sid, "证件号码": person.id_number, "姓名": person.name,
            "单位名称": "海东市财政局", "统一社会信用代码": "", "地区代码": person.region,
            "学习方式": "网络", "课程名称": title, "科目类别": subject, "学分": credits,
            "完成日期": "2026-04-20"}


def _report(engine: Engine, person: GenPerson, year: int = 2026) -> dict[str, Any]:
    with engine.connect() as conn:
        answer = compliance.report(conn, person.id_number, year, keys=KEYS)
    assert compliance.ComplianceReport.model_validate(answer).model_dump(mode="json") == answer
    return answer


def _totals(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report[k] for k in ("requirement", "credited", "missing", "compliant")}


def _hours(total: str, public: str, professional: str) -> dict[str, str]:
    return {"total": total, "public": public, "professional": professional}


def _missing(public: str, professional: str, total: str) -> dict[str, str]:
    return {"public": public, "professional": professional, "total": total}


ONE_YEAR = {"total": 135, "public": 45, "professional": 90}


# -- 1. a whole year over the real HTTP paths ---------------------------------------------------

# Hand computation (四; 四(二)1–3; SPEC §4 credit table; §7 dedup):
#   public        Cadre Network College 20 + 15 + 10                                  = 45.0
#   professional  base training 23 h
#                 papers sole 10 + sole 10 + co 5 = 25 claimed, capped at 20 (四(二)1)
#                 book, first author 20 h (四(二)2; a second partner's report of it: duplicate)
#                 lecture 3 teaching hours × 6 = 18 h (四(二)3)
#                 health 2.5 CME credits × 3.6 = 9.0 h                               = 90.0
#   total 135.0 → met.  Then the unit withdraws the book (the duplicate takes over: still
#   20 h) and withdraws a sole paper: papers 10 + 5 = 15 → professional
#   85.0, short 5.0.
MET = {"requirement": ONE_YEAR, "credited": _hours("135.0", "45.0", "90.0"),
       "missing": _missing("0.0", "0.0", "0.0"), "compliant": True}
MET_BY_TYPE = {"book": {"claimed": "20.0", "credited": "20.0"},
               "lecture": {"claimed": "18.0", "credited": "18.0"},
               "online_course": {"claimed": "45.0", "credited": "45.0"},
               "paper": {"claimed": "25.0", "credited": "20.0"},
               "training": {"claimed": "32.0", "credited": "32.0"}}
SHORT = {"requirement": ONE_YEAR, "credited": _hours("130.0", "45.0", "85.0"),
         "missing": _missing("0.0", "5.0", "5.0"), "compliant": False}


def _training(person: GenPerson) -> dict[str, Any]:
    return {"result_id": "TB-2026-0001", "id_no": person.id_number, "name": person.name,
            "region": person.region, "hours": "23", "title": "高原生态修复技术研修班",
            "started_on": "2026-05-10", "completed_on": "2026-05-13", "passed": True,
            "certificate_no": "JD2026000001"}


def _statuses(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [r["status"] for r in resp.json()["results"]]


def test_a_worker_s_year_through_every_source_is_credited_as_the_notice_says(
        db_url: str, store: Engine, tmp_path: Path, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], new_operator: Callable[..., str],
        mock_ce: tuple[str, Faults]) -> None:
    base = new_partner(store, adapter="training_base", base_code=BASE)
    unit, dept = new_partner(store), new_partner(store)
    health = new_partner(store, adapter="health")
    load_base_and_plan(store, BASE, PLAN, hours="40")
    person = make_person(random.Random(601))
    _public(store, person, 20, 15, 10)
    token = new_operator(store, role="viewer")
    ops = {"Authorization": f"Bearer {token}"}

    settings = make_settings(db_url, mock_ce[0])
    with (uvicorn_thread(create_app(settings, run_worker=True)) as url,
          SigningClient(url, base.app_key, base.secret, timeout=30) as as_base,
          SigningClient(url, unit.app_key, unit.secret, timeout=30) as as_unit,
          SigningClient(url, dept.app_key, dept.secret, timeout=30) as as_dept,
          SigningClient(url, health.app_key, health.secret, timeout=30) as as_health):
        pushed = as_base.post("/v1/partners/training_base/records", json={
            "base_code": BASE, "plan_id": PLAN, "results": [_training(person)]})
        assert _statuses(pushed) == ["accepted"], pushed.text

        book = _sub(person, "U-BK-1", "book", "1", "books", day="07-01", title="高原湿地生态学",
                    authorship="first")
        mine = [_paper(person, "U-PA-1", "sole", "03-15"), _paper(person, "U-PA-2", "sole", "04-15"),
                _paper(person, "U-PA-3", "co", "05-15"), book,
                _sub(person, "U-LE-1", "lecture", "3", "lecture_hours", day="08-01")]
        answers = as_unit.submit(mine)
        assert _statuses(answers) == ["accepted"] * 5, answers.text
        capped = answers.json()["results"][2]
        assert [w["code"] for w in capped["warnings"]] == ["CAP_APPLIED"]
        # The industry department reports the same book: a duplicate, not counted again (§7).
        again = as_dept.submit([{**book, "source_record_id": "D-BK-1"}])
        assert _statuses(again) == ["duplicate"], again.text

        csv_path = tmp_path / "health-2026-05.csv"
        write_csv(csv_path, [_health_row(person, "WJ-1", "2.5")], HEALTH_HEADERS,
                  encoding="gb18030")
        upload = as_health.upload_batch(csv_path, adapter="health", kind="monthly", period="2026-05")
        assert upload.status_code == 202, upload.text
        batch = finished(as_health, upload.json()["batch_id"])
        assert batch["counts"]["accepted"] == 1, batch

        met = httpx.get(f"{url}/v1/compliance/{person.id_number}/2026", headers=ops)
        assert met.status_code == 200, met.text
        assert _totals(met.json()) == MET
        assert met.json()["by_type"] == MET_BY_TYPE
        assert met.json()["by_partner"] == {CADRE.partner_id: "45.0", base.partner_id: "23.0",
                                            unit.partner_id: "58.0", health.partner_id: "9.0"}

        # The cut paper's rule notes say why, in both languages, citing 四(二)1.
        page = httpx.get(f"{url}/v1/records/{capped['record_id']}", headers=ops).json()
        notes = {n["code"]: n for n in page["record"]["rule_notes"]}
        assert page["record"]["credited_hours"] in ("0.0", "0")
        assert "四(二)1" in notes["CAP_APPLIED"]["message"]
        assert "每年最多折算为 20 学时" in notes["CAP_APPLIED"]["message_zh"]
        health_page = [r for r in met.json()["records"] if r["adapter"] == "health"]
        assert [r["hours"] for r in health_page] == ["9.0"]

        # The unit withdraws its report of the book: the department's report takes over.
        gone = as_unit.delete("/v1/records/U-BK-1")
        assert gone.status_code == 200, gone.text
        still = httpx.get(f"{url}/v1/compliance/{person.id_number}/2026", headers=ops).json()
        assert _totals(still) == MET
        assert {p: still["by_partner"][p] for p in (unit.partner_id, dept.partner_id)} == {
            unit.partner_id: "38.0", dept.partner_id: "20.0"}

        # A sole paper withdrawn: the co-authored one is credited its 5 h again (R10).
        assert as_unit.delete("/v1/records/U-PA-1").status_code == 200
        short = httpx.get(f"{url}/v1/compliance/{person.id_number}/2026", headers=ops).json()
    assert _totals(short) == SHORT
    assert short["by_type"]["paper"] == {"claimed": "15.0", "credited": "15.0"}

    run = cli({"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY},
              "compliance", person.id_number, "2026", "--json")
    assert run.returncode == 0, run.stderr
    by_cli = json.loads(run.stdout)
    keep = ("requirement", "credited", "missing", "compliant", "by_type", "by_partner")
    assert {k: by_cli[k] for k in keep} == {k: short[k] for k in keep}
    assert [r["source_record_id"] for r in by_cli["records"]] == [
        r["source_record_id"] for r in short["records"]]
    assert person.id_number not in run.stdout


# -- 2. every capped type at, under and over its cap --------------------------------------------

def test_each_capped_type_at_under_and_over_its_cap(db_url: str, store: Engine,
                                                    new_partner: Callable[..., Partner]) -> None:
    """四(二)1–4: papers ≤ 20, books ≤ 40, lectures ≤ 30 (6 × teaching time), exam setting ≤ 30.

    papers   two co-authored: 5 + 5 = 10                        under the cap   → 10
    books    sole 30 + other author 10                          at the cap      → 40
             and first author 20 more                           over            → 40
    lectures 4 h × 6 = 24 + 1 h × 6 = 6                         at the cap      → 30
    exam     20 h + 15 h                                        over            → 30
    public   45 (college).  Professional 10 + 40 + 30 + 30 = 110 ≥ 90 → met, total 155.
    """
    unit = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(602))
    _public(store, person, 25, 20)
    subs = [_paper(person, "PA-1", "co", "02-01"), _paper(person, "PA-2", "co", "02-02"),
            _sub(person, "BK-1", "book", "1", "books", day="03-01", authorship="sole"),
            _sub(person, "BK-2", "book", "1", "books", day="03-02", authorship="other"),
            _sub(person, "BK-3", "book", "1", "books", day="03-03", authorship="first"),
            _sub(person, "LE-1", "lecture", "4", "lecture_hours", day="04-01"),
            _sub(person, "LE-2", "lecture", "1", "lecture_hours", day="04-02"),
            _sub(person, "EX-1", "exam_setting", "20", "hours", day="05-01"),
            _sub(person, "EX-2", "exam_setting", "15", "hours", day="05-02")]
    answers = {sub["source_record_id"]: ingest(store, unit, [sub], now=NOW, rules=RULES)[0]
               for sub in subs}
    assert {k: a.status.value for k, a in answers.items()} == dict.fromkeys(answers, "accepted")
    assert sorted(k for k, a in answers.items() if any(w.code == "CAP_APPLIED" for w in a.warnings)
                  ) == ["BK-3", "EX-2"]
    cut = next(w for w in answers["EX-2"].warnings if w.code == "CAP_APPLIED")
    assert "30" in cut.message and "上限 30 学时" in cut.message_zh

    report = _report(store, person)
    assert report["by_type"] == {
        "book": {"claimed": "60.0", "credited": "40.0"},
        "exam_setting": {"claimed": "35.0", "credited": "30.0"},
        "lecture": {"claimed": "30.0", "credited": "30.0"},
        "online_course": {"claimed": "45.0", "credited": "45.0"},
        "paper": {"claimed": "10.0", "credited": "10.0"}}
    assert _totals(report) == {"requirement": ONE_YEAR, "credited": _hours("155.0", "45.0", "110.0"),
                               "missing": _missing("0.0", "0.0", "0.0"), "compliant": True}


def test_public_hours_above_45_do_not_make_up_professional_hours(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    """四: 135 h, 其中公需科目不少于 45、专业科目不少于 90 — 140 h with 60 public is still short."""
    unit = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(603))
    _public(store, person, 30, 30)
    assert ingest(store, unit, [_sub(person, "T-1", "training", "80", "hours",
                                     day="06-01")], now=NOW, rules=RULES)[0].status.value == "accepted"
    assert _totals(_report(store, person)) == {
        "requirement": ONE_YEAR, "credited": _hours("140.0", "60.0", "80.0"),
        "missing": _missing("0.0", "10.0", "10.0"), "compliant": False}


# -- 3. competitions --------------------------------------------------------------------------

def test_a_national_award_covers_the_professional_requirement(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    """四(二)5: a national skills competition 优胜奖 or above → all professional hours of the tenure.

    Public 45 from the college and the award: met, professional missing 0, the judgement's note
    in English and Chinese.  Lower tiers convert by the table: provincial-joint excellence 40 h,
    a prefecture excellence award nothing (the notice names only 三等奖以上 there).
    """
    unit = PartnerRef(new_partner(store).partner_id, "canonical")
    person, other = make_person(random.Random(604)), make_person(random.Random(605))
    _public(store, person, 45)
    award = _sub(person, "C-1", "competition", "1", "award", day="09-20", title="全国职业技能大赛",
                 tier="national", award="excellence")
    joint = _sub(other, "C-2", "competition", "1", "award", day="09-21", title="省人社厅行业技能大赛",
                 tier="provincial_joint", award="excellence")
    prefecture = _sub(other, "C-3", "competition", "1", "award", day="09-22",
                      title="西宁市技能大赛", tier="prefecture", award="excellence")
    answers = ingest(store, unit, [award, joint, prefecture], now=NOW, rules=RULES)
    assert [a.status.value for a in answers] == ["accepted", "accepted", "rejected"]
    assert [e.code for e in answers[2].errors] == ["ACTIVITY_NOT_COUNTABLE"]

    report = _report(store, person)
    assert report["missing"] == _missing("0.0", "0.0", "0.0") and report["compliant"] is True
    assert report["professional_covered_by"]["source_record_id"] == "C-1"
    [note] = report["notes"]
    assert note["code"] == "COVERS_PROFESSIONAL_REQUIREMENT"
    assert "四(二)5" in note["message"] and "任职期间全部专业课学时" in note["message_zh"]

    theirs = _report(store, other)
    assert theirs["credited"] == _hours("40.0", "0.0", "40.0")
    assert theirs["missing"] == _missing("45.0", "50.0", "95.0")


# -- 4. finance: a correction that moves hours between categories; excluded kinds -----------------

def test_a_finance_correction_moves_hours_between_categories(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    """SPEC §7: same partner and 流水号, new content → corrected; the hours move with it.

    Accounting credits at 1 h a credit (财会〔2018〕10号).  Row F-1 first says 专业科目 30 学分,
    then 公需科目: public 30, professional 0.  F-2, a 考前辅导 course, is not countable (四(二)).
    The finance department may carry public subjects (一; SPEC §4 R2).
    """
    finance = PartnerRef(new_partner(store, adapter="finance").partner_id, "finance")
    person = make_person(random.Random(606))
    adapter = FinanceAdapter()
    assert _through(store, adapter, finance, [(2, _finance_row(person, "F-1", "专业科目", "30")),
                                              (3, _finance_row(person, "F-2", "专业科目", "12",
                                                               "初级会计职称考前辅导"))]
                    ) == ["accepted", "rejected"]
    assert _report(store, person)["credited"] == _hours("30.0", "0.0", "30.0")

    assert _through(store, adapter, finance, [(2, _finance_row(person, "F-1", "公需科目", "30"))]
                    ) == ["corrected"]
    report = _report(store, person)
    assert report["credited"] == _hours("30.0", "30.0", "0.0")
    assert report["missing"] == _missing("15.0", "90.0", "105.0")
    assert [r["source_record_id"] for r in report["records"]] == ["F-1"]


# -- 5. public-subject source (R2) ------------------------------------------------------------

def test_a_public_hour_from_a_canonical_partner_is_refused_and_not_counted(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    """三 / SPEC §4 R2: public-subject hours only from the college (and the health, finance pushes)."""
    unit = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(607))
    [answer] = ingest(store, unit, [_sub(person, "P-1", "online_course", "45", "hours",
                                         category="public")], now=NOW, rules=RULES)
    assert answer.status.value == "rejected"
    [error] = answer.errors
    assert error.code == "PUBLIC_SUBJECT_SOURCE" and error.message and error.message_zh
    assert _report(store, person)["credited"] == _hours("0.0", "0.0", "0.0")


def _public_plan_reference() -> RulesContext:
    starts, ends = date(2026, 3, 1), date(2026, 12, 15)
    return RulesContext(StaticReference(
        bases={BASE: BaseInfo(BASE, "测试基地", "provincial", "active", date(2025, 6, 1))},
        plans={"P-PUB": PlanInfo("P-PUB", BASE, "公需科目专题培训", "public", Decimal(20),
                                 starts, ends, date(2026, 3, 1))}), fixture_rules_config())


def test_a_base_s_public_subject_plan_earns_no_professional_hours(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    base = PartnerRef(new_partner(store, adapter="training_base", base_code=BASE).partner_id,
                      "training_base", BASE)
    person = make_person(random.Random(608))
    raw = {"base_code": BASE, "plan_id": "P-PUB", "results": [
        {"result_id": "TB-PUB-1", "id_no": person.id_number, "name": person.name,
         "region": person.region, "hours": "20", "started_on": "2026-05-10",
         "completed_on": "2026-05-12", "passed": True}]}
    items = [Item(raw=r.raw, submission=r.submission, errors=r.errors, warnings=r.warnings)
             for r in TrainingBaseAdapter().parse(raw)]
    [answer] = ingest_items(store, base, items, now=NOW, rules=_public_plan_reference())
    assert _report(store, person)["credited"]["professional"] == "0.0"
    assert answer.status.value == "rejected"
    assert [e.code for e in answer.errors] == ["PUBLIC_SUBJECT_SOURCE"]


# -- 6. the same activity from two sources ------------------------------------------------------

@pytest.mark.xfail(strict=True, reason=(
    "KNOWN LIMIT (README, Dedup): the same training (same person, CE year, type, title, completion date and hours) "
    "reported by a training base and by the employer's canonical report is counted twice. "
    "A canonical partner may not name the base (a provider_code is rejected SCOPE_VIOLATION), "
    "and the natural key includes provider_code and plan_id (gateway/pipeline/dedup.py "
    "natural_key), so the employer's copy can never match the base's. SPEC §7: other source, "
    "same natural key (id number, year, activity identity, completion date) → duplicate; "
    "notice 四: one activity's hours are credited once"))
def test_the_same_training_reported_without_its_plan_is_not_counted_twice(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    load_base_and_plan(store, BASE, PLAN, hours="40")
    base = PartnerRef(new_partner(store, adapter="training_base", base_code=BASE).partner_id,
                      "training_base", BASE)
    unit = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(609))
    raw = {"base_code": BASE, "plan_id": PLAN, "results": [_training(person)]}
    items = [Item(raw=r.raw, submission=r.submission, errors=r.errors, warnings=r.warnings)
             for r in TrainingBaseAdapter().parse(raw)]
    assert [a.status.value for a in ingest_items(store, base, items, now=NOW,
                                                 rules=_loaded(store))] == ["accepted"]
    same = _sub(person, "U-T-1", "training", "23", "hours", day="05-13", title="高原生态修复技术研修班")
    same["activity"]["started_on"] = "2026-05-10"
    ingest(store, unit, [same], now=NOW, rules=RULES)
    assert _report(store, person)["credited"]["professional"] == "23.0"


# -- 7. a deferral into Y+1 -------------------------------------------------------------------

def test_a_deferred_year_counts_with_the_next_and_a_late_record_moves_there(
        db_url: str, store: Engine, new_partner: Callable[..., Partner]) -> None:
    """七(二): an approved deferral (illness) of 2025 → 2025's hours computed together in 2026.

    2025 on time: college 30 public.  After 2025 closed (30 Dec, R11), a 2025 training of 40 h
    arrives: accepted, counting toward 2026 with a DEFERRAL rule note.  2026: college 60 public,
    training 140 professional.  2026 owes 270 (90 + 180) and has 30 + 60 = 90 public and
    40 + 140 = 180 professional → met; 2025 is deferred to 2026 and judged there (met).
    """
    unit = PartnerRef(new_partner(store).partner_id, "canonical")
    person = make_person(random.Random(610))
    store_deferral(store, person.id_number, 2025, "illness", date(2025, 11, 20))
    _public(store, person, 30, year=2025, now=IN_2025)
    [late] = ingest(store, unit, [_sub(person, "T-2025", "training", "40", "hours", year=2025,
                                       day="11-10")], now=AFTER_2025_CLOSE,
                                rules=_loaded(store))
    assert late.status.value == "accepted", late.errors
    _public(store, person, 30, 30)
    assert ingest(store, unit, [_sub(person, "T-2026", "training", "140", "hours",
                                     day="06-01")], now=NOW, rules=RULES)[0].status.value == "accepted"

    merged = _report(store, person, 2026)
    assert _totals(merged) == {
        "requirement": {"total": 270, "public": 90, "professional": 180},
        "credited": _hours("270.0", "90.0", "180.0"),
        "missing": _missing("0.0", "0.0", "0.0"), "compliant": True}
    assert merged["merged_from"] == 2025
    assert [n["code"] for n in merged["notes"]] == ["DEFERRAL"]
    assert "七(二)" in merged["notes"][0]["message"] and "合并计算" in merged["notes"][0]["message_zh"]
    deferred = _report(store, person, 2025)
    assert deferred["deferred_to"] == 2026 and deferred["compliant"] is True
    assert deferred["credited"] == _hours("30.0", "30.0", "0.0")
