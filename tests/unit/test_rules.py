"""The policy rules of SPEC §4, each with the notice's own numbers (青人社厅函〔2022〕394号)."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import ActivityType, Assessment, Category, CESubmission, Note, Unit
from contracts.errors import CATALOGUE
from gateway.config import Settings
from gateway.pipeline import credit
from gateway.pipeline.rules import (
    MEASURE_OF,
    REQUIREMENT,
    RULES,
    BaseInfo,
    DeferralInfo,
    EmptyReference,
    Judgement,
    PlanInfo,
    RulesConfig,
    StaticReference,
    compliance_gap,
    judge,
)
from gateway.pipeline.rules_tables import AWARDS, TIERS

SEED = Path("/work/shared/seed/000_9628381a5d794783.txt")
CST = timezone(timedelta(hours=8))
ID = "630102198704139126"
ON_TIME = datetime(2026, 6, 1, 9, 0, tzinfo=CST)
D = Decimal

BASES = {
    "QHJD01": BaseInfo("QHJD01", "青海省专业技术人员继续教育基地", "provincial", "active",
                       date(2021, 12, 1)),
    "QHJD02": BaseInfo("QHJD02", "某撤销基地", "provincial", "revoked", date(2020, 1, 1)),
    "GJJD01": BaseInfo("GJJD01", "国家级继续教育基地", "national", "active", date(2021, 6, 1)),
}


def _plan(plan_id: str, filed_on: date, base: str = "QHJD01", hours: str = "40") -> PlanInfo:
    return PlanInfo(plan_id, base, "高原生态修复技术研修班", "professional", D(hours),
                    date(2026, 5, 1), date(2026, 6, 30), filed_on)


REFERENCE = StaticReference(
    bases=BASES,
    plans={
        "P-0731": _plan("P-0731", date(2026, 7, 31)),
        "P-0801": _plan("P-0801", date(2026, 8, 1)),
        "P-OTHER": _plan("P-OTHER", date(2026, 3, 1), base="GJJD01"),
        "P-2025": _plan("P-2025", date(2025, 3, 1)),  # last year's plan: filed in time, for 2025
    },
    deferrals={(ID, 2026): DeferralInfo(2026, "illness", date(2026, 11, 2))},
    title_applicants={(ID, 2026)},
    version="ref-2026-06-01",
)

BASE_RAW: dict[str, Any] = {
    "source_record_id": "JD-2026-000123",
    "person": {"id_type": "resident_id", "id_number": ID, "name": "赵伟",
               "employer_name": "海东市平安区第一中学", "region_code": "630200"},
    "year": 2026, "category": "professional", "activity_type": "training",
    "activity": {"title": "高原生态修复技术研修班", "mode": "offline",
                 "started_on": "2026-05-10", "completed_on": "2026-05-13"},
    "claimed": {"quantity": "24", "unit": "hours", "details": {}},
    "evidence": {"certificate_no": "QH2026000123", "assessment": "passed"},
}


def sub(**changes: Any) -> CESubmission:
    """SPEC §3's example with dotted-path changes; ``None`` removes a key."""
    raw = copy.deepcopy(BASE_RAW)
    for path, value in changes.items():
        *parents, last = path.split(".")
        target = raw
        for key in parents:
            target = target[key]
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return CESubmission.model_validate(raw)


def run(s: CESubmission, adapter: str = "canonical", received_at: datetime = ON_TIME,
        reference: Any = REFERENCE, config: RulesConfig | None = None) -> Judgement:
    return judge(s, adapter=adapter, received_at=received_at, reference=reference,
                 config=config or RulesConfig())


def codes(notes: list[Note]) -> list[str]:
    return [n.code for n in notes]


def claim(activity_type: str, unit: str, quantity: str, **details: str) -> CESubmission:
    return sub(activity_type=activity_type,
               claimed={"quantity": quantity, "unit": unit, "details": details})


# -- the table ----------------------------------------------------------------------------------


def test_one_row_per_rule_in_order() -> None:
    assert [r.id for r in RULES] == [f"R{i}" for i in range(1, 15)]
    for rule in RULES:
        assert rule.citation.startswith("青人社厅函〔2022〕394号 ")
        assert rule.quote and (rule.check or rule.converts or rule.elsewhere)
        assert all(code in CATALOGUE for code in rule.codes)


def test_r3_to_r7_rows_name_their_conversion() -> None:
    converted = {r.converts for r in RULES if r.converts is not None}
    assert converted == set(MEASURE_OF) == {
        ActivityType.PAPER, ActivityType.BOOK, ActivityType.LECTURE, ActivityType.EXAM_SETTING,
        ActivityType.COMPETITION}


@pytest.mark.skipif(not SEED.exists(), reason="the provincial notice is not on this machine")
def test_every_quote_is_the_notice_s_own_words() -> None:
    from gateway.pipeline.rules_tables import CAP_CLAUSE, COMPETITION

    notice = re.sub(r"\s", "", SEED.read_text(encoding="utf-8"))
    quotes = [r.quote for r in RULES] + [a.quote for a in COMPETITION.values()]
    quotes += [words for _clause, words in CAP_CLAUSE.values()]
    for quote in quotes:
        for passage in filter(None, re.sub(r"\s", "", quote).split("…")):
            assert passage in notice, passage


def test_config_defaults_are_the_notice_s() -> None:
    c = RulesConfig()
    assert (c.year_close, c.plan_filing_deadline, c.title_applicant_deadline) == (
        "12-30", "07-31", "11-30")
    assert c.timezone == "Asia/Shanghai"
    assert (c.health_hours_per_credit, c.finance_hours_per_credit) == (D("3.6"), D(1))
    assert dict(c.caps) == {"paper": 20, "book": 40, "lecture": 30, "exam_setting": 30}
    assert (c.lecture_factor, c.integrity_day_limit_hours, c.integrity_plan_factor) == (
        D(6), D(24), D("1.5"))


@pytest.mark.parametrize("change", [{"year_close": "12/30"}, {"year_close": "13-01"},
                                   {"plan_filing_deadline": "07-32"}, {"timezone": "Mars/Base"}])
def test_bad_config_fails_at_start(change: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        RulesConfig(**change)  # type: ignore[arg-type]


# -- R1 -------------------------------------------------------------------------------------------


def test_r1_requirement_and_gap() -> None:
    assert REQUIREMENT == {"total": 135, "public": 45, "professional": 90}
    assert compliance_gap({"public": D(45), "professional": D(90)}) == {
        "public": 0, "professional": 0, "total": 0}
    assert compliance_gap({}) == {"public": 45, "professional": 90, "total": 135}
    # Public hours beyond 45 never make up professional ones.
    assert compliance_gap({"public": D(100), "professional": D(0)}) == {
        "public": 0, "professional": 90, "total": 90}
    assert compliance_gap({"public": D("44.5"), "professional": D(100)}) == {
        "public": D("0.5"), "professional": 0, "total": D("0.5")}
    # A national competition award covers the professional requirement (R7).
    assert compliance_gap({"public": D(45)}, professional_covered=True)["total"] == 0


# -- R2 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("adapter", "ok"), [("cadre_college", True), ("health", True),
                                             ("finance", True), ("training_base", False),
                                             ("canonical", False)])
def test_r2_public_subject_source(adapter: str, ok: bool) -> None:
    j = run(sub(category="public", **{"activity.provider_code": None}), adapter=adapter,
            reference=EmptyReference())
    assert ("PUBLIC_SUBJECT_SOURCE" not in codes(j.errors)) is ok
    if not ok:
        assert j.errors[0].field == "category" and j.errors[0].message_zh


# -- R3–R7 conversions --------------------------------------------------------------------------


@pytest.mark.parametrize(("authorship", "papers", "hours"), [
    ("sole", "1", "10.0"), ("sole", "2", "20.0"), ("co", "1", "5.0"), ("co", "3", "15.0")])
def test_r3_papers(authorship: str, papers: str, hours: str) -> None:
    j = run(claim("paper", "papers", papers, authorship=authorship))
    assert j.accepted and j.hours == D(hours) and str(j.hours) == hours
    assert j.cap_type == "paper"
    assert codes(j.rule_notes) == ["CONVERSION"] and "四(二)1" in (j.rule_notes[0].message_zh or "")


@pytest.mark.parametrize(("authorship", "hours"), [("sole", 30), ("first", 20), ("other", 10)])
def test_r4_books(authorship: str, hours: int) -> None:
    j = run(claim("book", "books", "1", authorship=authorship))
    assert j.accepted and str(j.hours) == f"{hours}.0" and j.cap_type == "book"


@pytest.mark.parametrize("unit", ["lecture_hours", "hours"])
def test_r5_lecture_is_six_times_teaching_time(unit: str) -> None:
    j = run(claim("lecture", unit, "2.5"))
    assert j.accepted and j.hours == D("15.0") and j.cap_type == "lecture"


def test_r6_exam_setting_counts_hours_claimed() -> None:
    j = run(claim("exam_setting", "hours", "12"))
    assert j.accepted and j.hours == 12 and j.cap_type == "exam_setting"
    assert "四(二)4" in j.rule_notes[0].message


@pytest.mark.parametrize(("tier", "award", "hours", "covers"), [
    ("national", "excellence", 90, True),
    ("national", "gold", 90, True),
    ("national", "first", 90, True),
    ("national_industry", "third", 90, False),
    ("national_industry", "excellence", 60, False),
    ("provincial", "gold", 90, False),
    ("provincial", "bronze", 90, False),
    ("provincial", "excellence", 60, False),
    ("provincial_joint", "first", 60, False),
    ("provincial_joint", "third", 60, False),
    ("provincial_joint", "excellence", 40, False),
    ("prefecture", "third", 30, False),
    ("prefecture", "first", 30, False),
])
def test_r7_competitions(tier: str, award: str, hours: int, covers: bool) -> None:
    j = run(claim("competition", "award", "1", tier=tier, award=award))
    assert j.accepted and str(j.hours) == f"{hours}.0" and j.cap_type is None
    assert j.covers_professional_requirement is covers
    assert ("COVERS_PROFESSIONAL_REQUIREMENT" in codes(j.rule_notes)) is covers


@pytest.mark.parametrize("quantity", ["0", "2", "1.5"])
def test_r7_a_record_is_one_award(quantity: str) -> None:
    """The table's hours are an award's: a claim of 0 or 2 awards is refused, not credited as 1."""
    j = run(claim("competition", "award", quantity, tier="provincial", award="gold"))
    assert codes(j.errors) == ["SCHEMA"] and j.errors[0].field == "claimed.quantity"
    assert "quantity must be 1" in j.errors[0].message and "数量应为 1" in j.errors[0].message_zh


def test_r7_prefecture_excellence_earns_nothing() -> None:
    j = run(claim("competition", "award", "1", tier="prefecture", award="excellence"))
    assert codes(j.errors) == ["ACTIVITY_NOT_COUNTABLE"] and j.hours == 0


@pytest.mark.parametrize(("details", "field"), [
    ({"tier": "world", "award": "gold"}, "claimed.details.tier"),
    ({"tier": "national", "award": "participation"}, "claimed.details.award"),
    ({}, "claimed.details.tier"),
])
def test_r7_unknown_details_are_schema_errors(details: dict[str, str], field: str) -> None:
    j = run(claim("competition", "award", "1", **details))
    assert codes(j.errors) == ["SCHEMA"] and j.errors[0].field == field


@pytest.mark.parametrize(("activity_type", "unit", "details"), [
    ("paper", "hours", {"authorship": "sole"}), ("book", "papers", {"authorship": "sole"}),
    ("competition", "hours", {}), ("training", "papers", {}), ("exam_setting", "sessions", {}),
])
def test_a_unit_that_does_not_fit_the_activity_is_refused(
        activity_type: str, unit: str, details: dict[str, str]) -> None:
    j = run(claim(activity_type, unit, "1", **details))
    assert codes(j.errors) == ["SCHEMA"] and j.errors[0].field == "claimed.unit"
    assert j.hours == 0


def test_missing_authorship_is_a_schema_error() -> None:
    j = run(claim("paper", "papers", "1"))
    assert codes(j.errors) == ["SCHEMA"] and j.errors[0].field == "claimed.details.authorship"


# -- credits → hours ------------------------------------------------------------------------------


@pytest.mark.parametrize(("adapter", "industry", "credits", "hours"), [
    ("health", "health", "25", "90.0"),  # the national CME rule's 25 credits ≈ 90 学时
    ("health", None, "2.5", "9.0"),
    ("finance", "accounting", "90", "90.0"),
    ("canonical", "health", "1", "3.6"),
    ("canonical", "accounting", "1.5", "1.5"),
])
def test_credits_convert_by_the_table(adapter: str, industry: str | None, credits: str,
                                      hours: str) -> None:
    s = sub(**{"person.industry": industry, "claimed.unit": "credits",
               "claimed.quantity": credits, "claimed.details": {"credit_class": "I"}})
    j = run(s, adapter=adapter)
    assert j.accepted and str(j.hours) == hours
    assert codes(j.rule_notes) == ["CREDIT_CONVERSION"]
    assert "学分" in (j.rule_notes[0].message_zh or "")


def test_credit_rate_is_configurable_and_credits_need_a_table() -> None:
    s = sub(**{"person.industry": "health", "claimed.unit": "credits", "claimed.quantity": "10"})
    assert run(s, config=RulesConfig(health_hours_per_credit=D(3))).hours == 30
    j = run(sub(**{"claimed.unit": "credits"}))
    assert codes(j.errors) == ["SCHEMA"] and j.errors[0].field == "claimed.unit"


def test_credit_convert_is_a_wrapper_over_the_same_tables() -> None:
    s = sub(**{"person.industry": "health", "claimed.unit": "credits", "claimed.quantity": "25"})
    hours, notes = credit.convert(s)
    assert hours == run(s, adapter="health").hours == 90 and codes(notes) == ["CREDIT_CONVERSION"]
    assert credit.convert(s, {"health": D(4)})[0] == 100
    assert credit.convert(claim("paper", "papers", "2", authorship="co"))[0] == 10


# -- R8 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", ["exam_prep", "new_hire_induction", "fa_xuan_online"])
def test_r8_named_programs_do_not_count(program: str) -> None:
    j = run(sub(**{"claimed.details": {"program": program}}))
    assert codes(j.errors) == ["ACTIVITY_NOT_COUNTABLE"] and j.hours == 0
    assert j.errors[0].field == "claimed.details.program"


@pytest.mark.parametrize("title", [
    "2026年执业药师资格考试考前辅导班", "中级会计职称考前培训", "2026年事业单位新进人员岗前培训",
    "新入职教师岗前培训", "“法宣在线”学法考试", "法 宣 在 线",
])
def test_r8_recognised_from_the_title(title: str) -> None:
    j = run(sub(**{"activity.title": title}))
    assert codes(j.errors) == ["ACTIVITY_NOT_COUNTABLE"] and j.errors[0].field == "activity.title"


@pytest.mark.parametrize("title", ["企业安全生产岗前培训", "高原医学前沿进展", "考试命题技术研修"])
def test_r8_leaves_other_titles_alone(title: str) -> None:
    assert run(sub(**{"activity.title": title})).accepted


# -- R9 -------------------------------------------------------------------------------------------


def base_result(plan_id: str | None = "P-0731", base: str | None = "QHJD01") -> CESubmission:
    return sub(**{"activity.provider_code": base, "activity.plan_id": plan_id})


def test_r9_recognised_base_and_plan_filed_on_31_july() -> None:
    j = run(base_result(), adapter="training_base")
    assert j.accepted and j.hours == 24 and j.reference_version == "ref-2026-06-01"


def test_r9_plan_filed_on_1_august_is_late() -> None:
    j = run(base_result("P-0801"), adapter="training_base")
    assert codes(j.errors) == ["PLAN_NOT_FILED"] and j.errors[0].field == "activity.plan_id"
    later = RulesConfig(plan_filing_deadline="08-01")
    assert run(base_result("P-0801"), adapter="training_base", config=later).accepted


@pytest.mark.parametrize(("base", "plan_id", "expected"), [
    ("QHJD99", "P-0731", ["BASE_NOT_RECOGNIZED", "PLAN_NOT_FILED"]),  # unknown base; plan not its
    ("QHJD02", "P-0731", ["BASE_NOT_RECOGNIZED", "PLAN_NOT_FILED"]),  # revoked
    (None, "P-0731", ["BASE_NOT_RECOGNIZED"]),
    ("QHJD01", None, ["PLAN_NOT_FILED"]),
    ("QHJD01", "P-NONE", ["PLAN_NOT_FILED"]),
    ("QHJD01", "P-OTHER", ["PLAN_NOT_FILED"]),  # filed by another base
    ("QHJD01", "P-2025", ["PLAN_NOT_FILED"]),  # a plan of another year (R9: "of that year")
])
def test_r9_base_and_plan_failures(base: str | None, plan_id: str | None,
                                   expected: list[str]) -> None:
    assert codes(run(base_result(plan_id, base), adapter="training_base").errors) == expected


def test_r9_a_provider_code_means_a_base_except_the_college_s() -> None:
    s = base_result(plan_id=None, base="QHGBWY")
    assert "BASE_NOT_RECOGNIZED" in codes(run(s, adapter="canonical").errors)
    assert run(s.model_copy(update={"category": Category.PUBLIC}), adapter="cadre_college").accepted
    assert run(sub(), adapter="canonical").accepted  # no provider code: not from a base


def test_r9_failed_assessment_earns_no_hours() -> None:
    j = run(sub(**{"evidence.assessment": "failed"}))
    assert codes(j.errors) == ["ASSESSMENT_FAILED"] and j.hours == 0
    assert run(sub(**{"evidence.assessment": "none"})).accepted


# -- R11 ------------------------------------------------------------------------------------------

NO_DEFERRAL = StaticReference(bases=BASES)


@pytest.mark.parametrize(("received_at", "closed"), [
    (datetime(2026, 12, 30, 23, 59, 59, tzinfo=CST), False),
    (datetime(2026, 12, 31, 0, 0, tzinfo=CST), True),
    (datetime(2026, 12, 30, 15, 59, 59, tzinfo=UTC), False),  # the same instants in UTC
    (datetime(2026, 12, 30, 16, 0, tzinfo=UTC), True),
    (datetime(2027, 1, 2, tzinfo=UTC), True),
])
def test_r11_year_closes_at_the_end_of_30_december_beijing_time(received_at: datetime,
                                                                 closed: bool) -> None:
    j = run(sub(), received_at=received_at, reference=NO_DEFERRAL)
    assert codes(j.errors) == (["YEAR_CLOSED"] if closed else [])


def test_r11_year_close_is_configurable() -> None:
    late = datetime(2026, 12, 31, 12, 0, tzinfo=CST)
    assert run(sub(), received_at=late, reference=NO_DEFERRAL,
               config=RulesConfig(year_close="12-31")).accepted


def test_r11_deferral_moves_a_late_record_to_next_year() -> None:
    j = run(sub(), received_at=datetime(2027, 1, 15, tzinfo=CST))
    assert j.accepted and j.counts_toward_year == 2027 and j.hours == 24
    note = next(n for n in j.rule_notes if n.code == "DEFERRAL")
    assert "2027" in note.message and "七(二)" in (note.message_zh or "")
    assert run(sub()).counts_toward_year == 2026  # on time: the deferral changes nothing


def test_r11_a_deferred_record_filed_after_the_next_year_closed_too_is_refused() -> None:
    """七(二) moves 2026's hours into 2027; 2027 closes on its 30 December as well (七(四)4).

    A 2026 record filed in March 2028 was accepted into closed 2027 (review 32), where nothing
    may be filed any more and the partner could not even withdraw it.
    """
    j = run(sub(), received_at=datetime(2028, 3, 1, tzinfo=CST))
    assert codes(j.errors) == ["YEAR_CLOSED"] and j.errors[0].field == "year"
    assert "2027" in j.errors[0].message and "2027" in (j.errors[0].message_zh or "")
    assert j.hours == 0


def test_r11_a_chain_of_deferrals_keeps_a_late_record_open_until_its_end_closes() -> None:
    """2026 deferred into 2027 and 2027 into 2028: a 2026 record filed in 2028 is taken.

    It counts in 2027, whose hours 2028's merged judgement takes (gateway/compliance.py), and
    is refused once 2028, which was not deferred, has closed too.
    """
    chained = StaticReference(bases=BASES, deferrals={
        (ID, 2026): DeferralInfo(2026, "illness", date(2026, 11, 2)),
        (ID, 2027): DeferralInfo(2027, "illness", date(2027, 11, 2))})
    j = run(sub(), received_at=datetime(2028, 3, 1, tzinfo=CST), reference=chained)
    assert j.accepted and j.counts_toward_year == 2027, j.errors
    late = run(sub(), received_at=datetime(2028, 12, 31, tzinfo=CST), reference=chained)
    assert codes(late.errors) == ["YEAR_CLOSED"] and "2028" in late.errors[0].message


@pytest.mark.parametrize(("completed_on", "closed"), [("2026-12-30", False), ("2026-12-31", True)])
def test_r11_a_pulled_completion_was_filed_at_the_college_when_completed(
        completed_on: str, closed: bool) -> None:
    """Hours earned at the college by the close count however late the gateway pulls them.

    A push (here a health row) sent after the close is late whenever it was earned.
    """
    s = sub(category="public", **{"activity.provider_code": None, "activity.started_on": None,
                                  "activity.completed_on": completed_on})
    pulled = datetime(2027, 1, 4, 9, 0, tzinfo=CST)
    assert codes(run(s, adapter="cadre_college", received_at=pulled,
                     reference=NO_DEFERRAL).errors) == (["YEAR_CLOSED"] if closed else [])
    assert codes(run(s, adapter="health", received_at=pulled, reference=NO_DEFERRAL).errors) == [
        "YEAR_CLOSED"]


def test_r11_completion_outside_the_year() -> None:
    j = run(sub(**{"activity.started_on": "2025-12-20", "activity.completed_on": "2025-12-28"}))
    assert codes(j.errors) == ["OUTSIDE_YEAR"] and j.errors[0].field == "activity.completed_on"


def test_naive_received_at_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        run(sub(), received_at=datetime(2026, 6, 1))  # noqa: DTZ001 - the point of the test


# -- R12 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("completed_on", "late"), [("2026-11-30", False), ("2026-12-01", True)])
def test_r12_title_applicants_finish_by_30_november(completed_on: str, late: bool) -> None:
    s = sub(**{"activity.started_on": None, "activity.completed_on": completed_on})
    reported = datetime(2026, 12, 15, 9, 0, tzinfo=CST)  # after the completion, before the close
    j = run(s, received_at=reported)
    assert j.accepted and ("TITLE_APPLICANT_LATE" in codes(j.warnings)) is late
    assert not run(s, received_at=reported, reference=NO_DEFERRAL).warnings  # not an applicant


# -- R13 (the office table is tested in test_review.py) -------------------------------------------


def test_r13_judgement_carries_the_review_authority() -> None:
    assert run(sub()).review_authority == "HRB-630200"
    assert run(sub(**{"person.employer_name": "青海大学医学院"})).review_authority == "QHU"


# -- R14 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hours", "started", "flagged"), [
    ("24", "2026-05-13", False), ("24.5", "2026-05-13", True),
    ("48", "2026-05-12", False), ("48.1", "2026-05-12", True), ("96", "2026-05-10", False)])
def test_r14_more_than_24_hours_a_day(hours: str, started: str, flagged: bool) -> None:
    j = run(sub(**{"claimed.quantity": hours, "activity.started_on": started}))
    assert j.accepted and ("INTEGRITY_DAY_OVER_24H" in codes(j.warnings)) is flagged


@pytest.mark.parametrize(("completed", "arrived", "flagged"), [
    ("2026-05-13", ON_TIME, False),
    # Days are Xining's: 00:30 on 13 May there is still 12 May in UTC.
    ("2026-05-13", datetime(2026, 5, 13, 0, 30, tzinfo=CST), False),
    ("2026-05-13", datetime(2026, 5, 12, 23, 0, tzinfo=CST), True)])
def test_r14_a_completion_after_the_report_is_flagged(completed: str, arrived: datetime,
                                                      flagged: bool) -> None:
    s = sub(**{"activity.completed_on": completed, "activity.started_on": completed})
    j = run(s, received_at=arrived)
    assert j.accepted and ("INTEGRITY_COMPLETED_IN_FUTURE" in codes(j.warnings)) is flagged


def test_r14_converted_hours_are_not_time_spent() -> None:
    j = run(claim("competition", "award", "1", tier="national", award="gold"))
    assert "INTEGRITY_DAY_OVER_24H" not in codes(j.warnings)


@pytest.mark.parametrize(("hours", "flagged"), [("60", False), ("60.5", True)])
def test_r14_hours_far_above_the_plan(hours: str, flagged: bool) -> None:
    s = sub(**{"activity.provider_code": "QHJD01", "activity.plan_id": "P-0731",
               "activity.started_on": "2026-05-01", "claimed.quantity": hours})
    j = run(s, adapter="training_base")  # the plan files 40 h; 1.5 × 40 = 60
    assert j.accepted and ("INTEGRITY_ABOVE_PLAN" in codes(j.warnings)) is flagged


@pytest.mark.parametrize(("started", "completed", "field"), [
    ("2026-05-01", "2026-05-01", None), ("2026-06-30", "2026-06-30", None),  # both ends count
    ("2026-05-01", "2026-06-30", None), (None, "2026-05-01", None),
    ("2026-04-30", "2026-05-02", "activity.started_on"),
    ("2026-06-28", "2026-07-01", "activity.completed_on"),
    (None, "2026-04-30", "activity.completed_on"), (None, "2026-07-01", "activity.completed_on")])
def test_r14_dates_outside_the_plan_s_period(started: str | None, completed: str,
                                             field: str | None) -> None:
    """六(五): a plan is filed with its 培训时限 (P-0731 runs 1 May – 30 June 2026)."""
    s = sub(**{"activity.provider_code": "QHJD01", "activity.plan_id": "P-0731",
               "activity.started_on": started, "activity.completed_on": completed,
               "claimed.quantity": "16"})
    j = run(s, adapter="training_base")
    assert j.accepted and j.hours == D(16)  # flagged for review, still counted
    flagged = [n for n in j.warnings if n.code == "INTEGRITY_OUTSIDE_PLAN"]
    assert [n.field for n in flagged] == ([field] if field else [])
    if flagged:
        assert "2026-05-01" in flagged[0].message and "2026-06-30" in flagged[0].message_zh


def test_r14_no_plan_period_without_a_filed_plan() -> None:
    # An unknown or late plan is PLAN_NOT_FILED (R9), not a plan whose period is checked.
    for plan_id in ("P-NONE", "P-0801"):
        s = sub(**{"activity.provider_code": "QHJD01", "activity.plan_id": plan_id,
                   "activity.started_on": "2026-01-10", "activity.completed_on": "2026-01-12"})
        j = run(s, adapter="training_base")
        assert codes(j.errors) == ["PLAN_NOT_FILED"]
        assert "INTEGRITY_OUTSIDE_PLAN" not in codes(j.warnings)


# -- whole judgements -----------------------------------------------------------------------------


def test_a_judgement_reports_every_problem_at_once() -> None:
    s = sub(category="public", **{"evidence.assessment": "failed",
                                  "activity.title": "法宣在线"})
    j = run(s, adapter="training_base", received_at=datetime(2027, 1, 1, tzinfo=CST),
            reference=NO_DEFERRAL)
    assert set(codes(j.errors)) == {"PUBLIC_SUBJECT_SOURCE", "ACTIVITY_NOT_COUNTABLE",
                                    "ASSESSMENT_FAILED", "BASE_NOT_RECOGNIZED", "PLAN_NOT_FILED",
                                    "YEAR_CLOSED"}
    assert j.hours == 0 and not j.accepted
    for n in j.errors:
        en, zh = CATALOGUE[n.code].message_en, CATALOGUE[n.code].message_zh
        assert n.message.startswith(en) and (n.message_zh or "").startswith(zh) and n.field


_DETAILS = st.one_of(
    st.dictionaries(
        st.sampled_from(["authorship", "tier", "award", "program", "credit_class"]),
        st.sampled_from(["sole", "co", "first", "other", "national", "prefecture", "gold",
                         "third", "excellence", "exam_prep", "fa_xuan_online", "I", "x"])),
    st.fixed_dictionaries({"tier": st.sampled_from(TIERS), "award": st.sampled_from(AWARDS)}),
    st.fixed_dictionaries({"authorship": st.sampled_from(["sole", "co", "first", "other"])}),
)


@settings(max_examples=400, deadline=None)
@given(
    category=st.sampled_from(Category), activity_type=st.sampled_from(ActivityType),
    unit=st.sampled_from(Unit), assessment=st.sampled_from(Assessment), details=_DETAILS,
    quantity=st.decimals(min_value=0, max_value=9999999, places=2),
    adapter=st.sampled_from(["canonical", "training_base", "cadre_college", "health", "finance"]),
    industry=st.sampled_from([None, "health", "accounting", "publishing", "news", "其他"]),
    region=st.sampled_from(["630100", "632126", "632801", "630000", "110101"]),
    employer=st.sampled_from([None, "青海大学", "青海大学附属医院", "海东市第一中学"]),
    provider=st.sampled_from([None, "QHJD01", "QHJD02", "X"]),
    plan=st.sampled_from([None, "P-0731", "P-0801", "P-OTHER", "P-NONE"]),
    year=st.integers(min_value=2000, max_value=2100),
    completed=st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 12, 31)),
    span=st.integers(min_value=0, max_value=400),
    received_at=st.datetimes(min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - bounds
                             max_value=datetime(2101, 12, 31),  # noqa: DTZ001
                             timezones=st.sampled_from([UTC, CST, timezone(-timedelta(hours=11))])),
)
def test_judge_never_raises(category: Category, activity_type: ActivityType, unit: Unit,
                            assessment: Assessment, details: dict[str, str], quantity: Decimal,
                            adapter: str, industry: str | None, region: str,
                            employer: str | None, provider: str | None, plan: str | None,
                            year: int, completed: date, span: int,
                            received_at: datetime) -> None:
    s = CESubmission.model_validate({
        "source_record_id": "S1",
        "person": {"id_number": ID, "name": "赵伟", "region_code": region,
                   "employer_name": employer, "industry": industry},
        "year": year, "category": category, "activity_type": activity_type,
        "activity": {"title": "研修班", "provider_code": provider, "plan_id": plan,
                     "started_on": max(date(2000, 1, 1), completed - timedelta(days=span)),
                     "completed_on": completed},
        "claimed": {"quantity": quantity, "unit": unit, "details": details},
        "evidence": {"assessment": assessment},
    })
    j = run(s, adapter=adapter, received_at=received_at)
    assert j.hours >= 0 and j.hours.as_tuple().exponent == -1
    assert j.review_authority and j.counts_toward_year in (year, year + 1)
    if j.errors:
        assert j.hours == 0 and not j.covers_professional_requirement
    for n in [*j.errors, *j.warnings]:
        assert n.code in CATALOGUE and n.message_zh
    for n in j.rule_notes:
        assert n.message and n.message_zh


def test_config_is_frozen_hashable_and_read_from_settings() -> None:
    from gateway.config import Settings

    with pytest.raises(AttributeError):
        RulesConfig().year_close = "12-31"  # type: ignore[misc]
    assert replace(RulesConfig(), year_close="12-31").year_close == "12-31"
    assert hash(RulesConfig()) == hash(RulesConfig())
    settings = Settings(year_close="12-31", health_hours_per_credit=D(4))
    config = RulesConfig.from_settings(settings)
    assert (config.year_close, config.health_hours_per_credit) == ("12-31", D(4))


def test_r11_an_extended_year_closes_on_its_own_day() -> None:
    """七(四)4 closes the year on 30 December unless the department extends that one year."""
    extended = RulesConfig(year_close_extensions={2026: date(2027, 3, 31)})
    assert run(sub(), received_at=datetime(2027, 3, 31, 23, 0, tzinfo=CST), reference=NO_DEFERRAL,
               config=extended).accepted
    late = run(sub(), received_at=datetime(2027, 4, 1, 0, 0, tzinfo=CST), reference=NO_DEFERRAL,
               config=extended)
    assert codes(late.errors) == ["YEAR_CLOSED"]
    assert extended.closes(2025) == date(2025, 12, 30)  # other years keep the notice's day


def test_year_close_extensions_setting_parses_and_refuses_nonsense() -> None:
    settings = Settings(year_close_extensions="2026=2027-03-31, 2025=2026-01-15")
    assert RulesConfig.from_settings(settings).closes(2026) == date(2027, 3, 31)
    with pytest.raises(ValueError, match="YEAR_CLOSE_EXTENSIONS"):
        Settings(year_close_extensions="2026:2027-03-31")
    with pytest.raises(ValueError, match="cannot close"):
        Settings(year_close_extensions="2026=2025-12-01")
