"""The policy rules of SPEC §4 (青人社厅函〔2022〕394号), one table row per rule R1–R14.

Pure: a :class:`~contracts.CESubmission` plus what the caller knows (adapter, arrival time,
reference data, :class:`RulesConfig`) in, a :class:`Judgement` out; no I/O, no database, and
:func:`judge` never raises for a valid submission.  Reference data comes through the
:class:`Reference` protocol, implemented over the store elsewhere.

Where each part lives: the numbers in :mod:`gateway.pipeline.rules_tables`; the conversions of
R3–R7 and the credit table in :mod:`gateway.pipeline.credit` (:func:`measure`, dispatching on
``MEASURE_OF``); who reviews a record (R13) in :mod:`gateway.pipeline.review`.  What cannot be
judged from one record is left to the caller, with pure helpers in ``credit`` re-exported here:
R1 the yearly requirement (:func:`compliance_gap`), R10 caps across records (:func:`allocate`,
:func:`cap_note`), R14 across records (:func:`overlaps`, :func:`overlapping`,
:func:`day_totals`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

from contracts import ActivityType, Assessment, Category, CESubmission, Note, Unit
from gateway.pipeline import review
from gateway.pipeline.credit import (
    MEASURE_OF,
    ZERO,
    Measure,
    allocate,
    cap_note,
    coded,
    compliance_gap,
    day_totals,
    explain,
    measure,
    overlapping,
    overlaps,
)
from gateway.pipeline.rules_tables import (
    BASE_ADAPTERS,
    CAP_TYPE_OF,
    DEFERRAL_REASONS,
    EXCLUDED_PROGRAMS,
    EXCLUDED_TITLES,
    NOT_BASE_PROVIDERS,
    NOTICE,
    PUBLIC_SOURCES,
    REQUIREMENT,
    TIME_ACTIVITIES,
    BaseInfo,
    DeferralInfo,
    EmptyReference,
    PlanInfo,
    Reference,
    RulesConfig,
    StaticReference,
    on,
)

__all__ = [
    "MEASURE_OF",
    "REQUIREMENT",
    "RULES",
    "RULE_BY_ID",
    "BaseInfo",
    "DeferralInfo",
    "EmptyReference",
    "Judgement",
    "Measure",
    "PlanInfo",
    "Reference",
    "Rule",
    "RulesConfig",
    "StaticReference",
    "allocate",
    "cap_note",
    "compliance_gap",
    "day_totals",
    "judge",
    "measure",
    "overlapping",
    "overlaps",
]


# -- the record under judgement, and the per-rule checks ----------------------------------------

# Sources the gateway pulls from rather than being sent to: their records were filed with the
# source when completed there (R11).
PULLED_ADAPTERS = frozenset({"cadre_college"})


@dataclass
class _Case:
    sub: CESubmission
    adapter: str
    received_at: datetime
    reference: Reference
    config: RulesConfig
    worth: Measure
    counts_toward_year: int
    errors: list[Note] = field(default_factory=list)
    warnings: list[Note] = field(default_factory=list)
    rule_notes: list[Note] = field(default_factory=list)
    cap_type: str | None = None
    review_authority: str = review.FALLBACK.code
    plan: PlanInfo | None = None
    on_arrival: bool = False  # judge R11 by the day it reached us, whatever the adapter


    @property
    def filed_on(self) -> date:
        """The day the record was filed, as R11 judges it (the rules' time zone).

        A partner that pushes files it when it sends it.  A pulled completion was filed at the
        college when it was completed there: the gateway fetches on its own schedule, so the
        next pull after the close (or after a college outage) must not make hours earned in
        time late.
        """
        received = self.received_at.astimezone(self.config.zone).date()
        if self.adapter in PULLED_ADAPTERS and not self.on_arrival:
            return min(received, self.sub.activity.completed_on)
        return received


Check = Callable[[_Case], None]


def _public_source(case: _Case) -> None:
    if case.sub.category is Category.PUBLIC and case.adapter not in PUBLIC_SOURCES:
        case.errors.append(coded("PUBLIC_SUBJECT_SOURCE", f"(source: {case.adapter})",
                                 f"（来源：{case.adapter}）", field="category"))


def _fold(title: str) -> str:
    return re.sub(r"[\s\"'“”‘’「」]", "", unicodedata.normalize("NFKC", title))


def _not_countable(case: _Case) -> None:
    program = case.sub.claimed.details.get("program")
    where = "claimed.details.program"
    if program not in EXCLUDED_PROGRAMS:
        title = _fold(case.sub.activity.title)
        program = next((p for p, pattern in EXCLUDED_TITLES if pattern.search(title)), None)
        where = "activity.title"
    if program is not None:
        en, zh = EXCLUDED_PROGRAMS[program]
        case.errors.append(coded("ACTIVITY_NOT_COUNTABLE", f"({en}; {NOTICE} 四(二))",
                                 f"（{zh}；{NOTICE} 四(二)）", field=where))


def _from_base(case: _Case) -> bool:
    return case.adapter in BASE_ADAPTERS or (
        case.sub.activity.provider_code is not None and case.adapter not in NOT_BASE_PROVIDERS)


def _base_plan_assessment(case: _Case) -> None:
    sub, ref = case.sub, case.reference
    if sub.evidence.assessment is Assessment.FAILED:
        case.errors.append(coded("ASSESSMENT_FAILED", field="evidence.assessment"))
    if not _from_base(case):
        return
    code = sub.activity.provider_code
    base = ref.base(code) if code else None
    if base is None or base.status != "active":
        why = ("no base code", "未提供基地代码") if not code else (
            ("not in the directory", "不在目录清单内") if base is None else ("revoked", "已取消资格"))
        case.errors.append(coded("BASE_NOT_RECOGNIZED", *_detail(code, why),
                                 field="activity.provider_code"))
    plan_id = sub.activity.plan_id
    plan = ref.plan(plan_id) if plan_id else None
    deadline = on(sub.year, case.config.plan_filing_deadline)
    if plan is None:
        why = ("no plan referenced", "未引用备案计划") if not plan_id else ("not filed", "未备案")
    elif code and plan.base_code != code:
        why = (f"filed by base {plan.base_code}", f"由基地 {plan.base_code} 备案")
    elif plan.filed_on.year != sub.year:  # "每年 7 月底前完成…备案": a plan is filed for its year
        why = (f"filed on {plan.filed_on}, a plan of {plan.filed_on.year}",
               f"备案日期 {plan.filed_on}，属 {plan.filed_on.year} 年度的计划")
    elif plan.filed_on > deadline:
        why = (f"filed on {plan.filed_on}, after {deadline}",
               f"备案日期 {plan.filed_on} 晚于 {deadline}")
    else:
        case.plan = plan
        if plan.category == Category.PUBLIC.value and case.adapter not in PUBLIC_SOURCES:
            # R2: the plan says what was taught, whatever the adapter calls it (a base's
            # results are professional by default): public-subject hours only from the college.
            case.errors.append(coded("PUBLIC_SUBJECT_SOURCE", *_detail(plan_id, (
                f"a public-subject plan, source: {case.adapter}",
                f"公需科目培训计划，来源：{case.adapter}")), field="activity.plan_id"))
        return
    case.errors.append(coded("PLAN_NOT_FILED", *_detail(plan_id, why), field="activity.plan_id"))


def _detail(value: str | None, why: tuple[str, str]) -> tuple[str, str]:
    """A note's detail in English and Chinese: the value it is about (if any) and why."""
    if not value:  # never "None: …" in a partner's message
        return f"({why[0]})", f"（{why[1]}）"
    return f"({value}: {why[0]})", f"（{value}：{why[1]}）"


def _cap_type(case: _Case) -> None:
    case.cap_type = CAP_TYPE_OF.get(case.sub.activity_type)


def _year(case: _Case) -> None:
    sub, config = case.sub, case.config
    done = sub.activity.completed_on
    if done.year != sub.year:
        case.errors.append(coded("OUTSIDE_YEAR", f"(completed on {done}, CE year {sub.year})",
                                 f"（完成日期 {done}，继续教育年度 {sub.year}）",
                                 field="activity.completed_on"))
    closes = config.closes(sub.year)
    if case.filed_on <= closes:
        return
    deferral = case.reference.deferral(sub.person.id_number, sub.year)
    if deferral is None:
        case.errors.append(coded("YEAR_CLOSED", f"(year {sub.year} closed at the end of {closes},"
                                 f" {config.timezone})", f"（{sub.year} 年度已于 {closes} 日终关闭）",
                                 field="year"))
        return
    # The deferral moves the hours into Y+1, and Y+1 closes too (七(四)4: after 30 December no
    # submission): one filed after that close is refused, unless Y+1 was deferred in turn, and
    # so on down the chain.  It counts in Y+1 all the same: the year whose merged judgement
    # takes Y+1's hours takes it with them (gateway/compliance.py).
    through = sub.year + 1
    while case.filed_on > (through_closes := config.closes(through)):
        if case.reference.deferral(sub.person.id_number, through) is None:
            case.errors.append(coded(
                "YEAR_CLOSED", f"(year {sub.year} closed at the end of {closes}, and {through}, "
                f"the year its approved deferral carries it into, at the end of {through_closes}, "
                f"{config.timezone})",
                f"（{sub.year} 年度已于 {closes} 日终关闭，顺延计入的 {through} 年度已于 "
                f"{through_closes} 日终关闭）", field="year"))
            return
        through += 1
    case.counts_toward_year = sub.year + 1
    en, zh = DEFERRAL_REASONS.get(deferral.reason, (deferral.reason, deferral.reason))
    case.rule_notes.append(explain(
        "DEFERRAL",
        f"Year {sub.year} closed on {closes}; approved deferral ({en}) — counts toward "
        f"{sub.year + 1} ({NOTICE} 七(二))",
        f"{sub.year} 年度已于 {closes} 关闭；{zh}经审核确认，学时顺延至 {sub.year + 1} 年度合并计算"
        f"（{NOTICE} 七(二)）"))


def _title_applicant(case: _Case) -> None:
    sub = case.sub
    deadline = on(sub.year, case.config.title_applicant_deadline)
    if sub.activity.completed_on > deadline and case.reference.is_title_applicant(
            sub.person.id_number, sub.year):
        case.warnings.append(coded(
            "TITLE_APPLICANT_LATE", f"(completed on {sub.activity.completed_on}, after {deadline})",
            f"（完成日期 {sub.activity.completed_on}，晚于 {deadline}）",
            field="activity.completed_on"))


def _review(case: _Case) -> None:
    case.review_authority = review.review_authority(case.sub.person, case.sub.year, case.adapter)


def _integrity(case: _Case) -> None:
    sub, config = case.sub, case.config
    act = sub.activity
    arrived = case.received_at.astimezone(config.zone).date()
    if act.completed_on > arrived:  # reported as done before it ended: cannot be true yet
        case.warnings.append(coded(
            "INTEGRITY_COMPLETED_IN_FUTURE", f"(completed on {act.completed_on}, reported on {arrived})",
            f"（完成日期 {act.completed_on}，报送日期 {arrived}）", field="activity.completed_on"))
    # Only time claims say how long a person was busy; a paper's 10 h are not 10 h of a day,
    # nor are an exam setter's granted hours.
    if sub.claimed.unit in (Unit.HOURS, Unit.LECTURE_HOURS) and sub.activity_type in TIME_ACTIVITIES:
        days = max(1, (act.completed_on - (act.started_on or act.completed_on)).days + 1)
        if sub.claimed.quantity / days > config.integrity_day_limit_hours:
            case.warnings.append(coded(
                "INTEGRITY_DAY_OVER_24H", f"({sub.claimed.quantity} h over {days} day(s))",
                f"（{days} 天申报 {sub.claimed.quantity} 学时）", field="claimed.quantity"))
    plan, hours = case.plan, case.worth.hours
    if plan is not None and hours > config.integrity_plan_factor * plan.hours:
        case.warnings.append(coded(
            "INTEGRITY_ABOVE_PLAN",
            f"({hours} h against {plan.hours} h filed in plan {plan.plan_id})",
            f"（申报 {hours} 学时，备案计划 {plan.plan_id} 为 {plan.hours} 学时）",
            field="claimed.quantity"))
    if plan is not None:
        _outside_plan(case, plan)


def _outside_plan(case: _Case, plan: PlanInfo) -> None:
    # 六(五) a plan is filed with its "培训时限" and only then "纳入当年培训学时审核范围"; a result
    # dated outside that period cannot be true of it, so 六(一) 诚信学习 flags it for review: the
    # record is still accepted and counted.  Both ends inclusive; a missing start is the end day.
    act = case.sub.activity
    start = act.started_on or act.completed_on
    if plan.starts_on <= start and act.completed_on <= plan.ends_on:
        return
    if act.started_on is not None and act.started_on < plan.starts_on:
        where, day, en, zh = "started_on", act.started_on, "started", "开始"
    else:
        where, day, en, zh = "completed_on", act.completed_on, "completed", "完成"
    case.warnings.append(coded(
        "INTEGRITY_OUTSIDE_PLAN",
        f"({en} on {day}, outside plan {plan.plan_id}'s period {plan.starts_on} to {plan.ends_on})",
        f"（{zh}日期 {day}，超出备案计划 {plan.plan_id} 的培训时限 {plan.starts_on} 至 {plan.ends_on}）",
        field=f"activity.{where}"))


# -- the rule table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule of SPEC §4 with the notice's words; ``…`` joins non-adjacent passages."""

    id: str
    clause: str
    quote: str
    codes: tuple[str, ...] = ()
    check: Check | None = None  # what judge() runs, in table order
    converts: ActivityType | None = None  # R3–R7: the type credit.MEASURE_OF converts
    elsewhere: str | None = None  # where the rest of the rule is enforced

    @property
    def citation(self) -> str:
        return f"{NOTICE} {self.clause}"


RULES: tuple[Rule, ...] = (
    Rule("R1", "四", "专业技术人员参加继续教育的学时不少于 135 学时，其中公需科目不少于 45 学时，"
         "专业科目不少于 90 学时。专业技术人员须按时在年内完成当年继续教育培训，获得的继续教育学时"
         "不得结转或顺延至下一年度。", elsewhere="credit.compliance_gap (compliance read-model)"),
    Rule("R2", "三、一", "公需科目采取线上培训方式，学员登录青海干部网络学院培训平台自主学习。…全省"
         "卫生专业技术人员、会计人员分别按照省级行业主管部门安排部署参加培训。",
         ("PUBLIC_SUBJECT_SOURCE",), _public_source),
    Rule("R3", "四(二)1", "所从事专业或与工作相关专业学术论文（独著），每篇折算 10 学时；与他人合作"
         "发表的，每人每篇折算为 5 学时，每年最多折算为 20 学时。SCI、SSCI、EI、CSSCI 论文参照执行。",
         ("CAP_APPLIED",), converts=ActivityType.PAPER,
         elsewhere="cap: credit.allocate"),
    Rule("R4", "四(二)2", "当年公开出版与工作职责相关的学术著作、译著，每部著作折算 30 学时；合著"
         "出版的，第一作者每部著作折算 20 学时，其他作者每人每部著作折算 10 学时，每年最多折算为 40 "
         "学时。", ("CAP_APPLIED",), converts=ActivityType.BOOK,
         elsewhere="cap: credit.allocate"),
    Rule("R5", "四(二)3", "担任省级及以上有关主管部门举办的培训班、学术会议、专题讲座有关课程（讲座）"
         "授课（报告）人，按当年实际授课（报告）时间的 6 倍计算学时，每年最多折算为 30 学时。",
         ("CAP_APPLIED",), converts=ActivityType.LECTURE, elsewhere="cap: credit.allocate"),
    Rule("R6", "四(二)4", "参加省级及以上有关主管部门组织的专业技术人员职业（执业）资格考试命题工作"
         "的，当年最多折算为 30 学时。", ("CAP_APPLIED",),
         converts=ActivityType.EXAM_SETTING, elsewhere="cap: credit.allocate"),
    Rule("R7", "四(二)5", "参加全国职业技能大赛获得优胜奖以上奖项的，折算为任职期间全部专业课学时。"
         "参加全国单一行业部门举办的职业技能大赛获得三等奖以上或参加青海省职业技能大赛、青海省技工"
         "院校教师职业能力大赛获得金银铜牌的人员，当年折算 90 学时；获得优胜奖的人员，当年折算 60 "
         "学时。参加由省级人社部门会同行业部门举办的职业技能大赛，获得三等奖以上的，当年折算 60 学时；"
         "获得优胜奖的，当年折算 40 学时。参加市州、省级单一行业部门举办的职业技能大赛或职业能力大赛"
         "获得三等奖以上的，当年折算 30 学时（以获奖证书为准）。", ("ACTIVITY_NOT_COUNTABLE",),
         converts=ActivityType.COMPETITION,
         elsewhere="tenure cover: records.covers_professional, compliance read-model"),
    Rule("R8", "四(二)", "参加各类考前辅导、事业单位新进人员岗前培训、“法宣在线”等不计入专业技术人员"
         "继续教育培训学时，也不计入专业学时。", ("ACTIVITY_NOT_COUNTABLE",), _not_countable),
    Rule("R9", "六(三)、六(五)、六(二)", "经评估合格的基地纳入全省继续教育基地目录清单，面向社会公布。"
         "对评估不合格的、未纳入目录清单的国家级、省级继续教育基地，按规定取消基地资格，培训结果不予"
         "认可。…于每年7月底前通过“继续教育管理端”向各级人社部门备案，经备案后，方可纳入当年培训学时"
         "审核范围。…根据考试考核结果如实出具专业技术人员参加继续教育的证明。",
         ("BASE_NOT_RECOGNIZED", "PLAN_NOT_FILED", "ASSESSMENT_FAILED"), _base_plan_assessment),
    Rule("R10", "四(二)1–4", "每年最多折算为 20 学时…每年最多折算为 40 学时…每年最多折算为 30 学时"
         "…当年最多折算为 30 学时", ("CAP_APPLIED",), _cap_type,
         elsewhere="credit.allocate + credit.cap_note, re-run by the caps ledger"),
    Rule("R11", "七(四)4、七(四)3、七(二)", "未按规定在当年 12 月 30 日前提交学时申请的，系统将无法"
         "提交并审验。…专业技术人员继续教育学习时间自当年继续教育基地、行业主管部门、所在单位印发通知"
         "之日起至 12 月底…应参加继续教育的学时可顺延至下一年度合并计算。",
         ("OUTSIDE_YEAR", "YEAR_CLOSED"), _year,
         elsewhere="七(二) merging the deferred year's requirement: compliance read-model"),
    Rule("R12", "七(四)3", "当年申报职称的专业技术人员务必于 11 月底前完成当年培训",
         ("TITLE_APPLICANT_LATE",), _title_applicant),
    Rule("R13", "七(四)4、七(一)、附件", "各级人社部门、自主审核单位（青海大学、青海师范大学、青海"
         "民族大学、青海开放大学、青海日报社）和自主培训管理行业（省卫健委、省财政厅）务必于每年 12 月 "
         "30 日前完成当年学时审验工作…按照管理权限对出版、新闻行业专业技术人员学时管理、学时审核工作的"
         "真实性、规范性和严肃性负全部责任", (), _review),
    Rule("R14", "六(一)、六(五)", "建立诚信学习制度，对线上线下培训学时及培训进修类、自学类、技术带教帮扶类、"
         "创新实践类、论文著作、专题授课等弄虚作假的人员，一经查实，列入全国、全省信用信息共享平台，"
         "记录期为 3 年。…围绕培训内容、培训时限、人员范围、授课内容、学时等培训信息制定当年培训方案及"
         "培训计划", ("INTEGRITY_DAY_OVER_24H", "INTEGRITY_ABOVE_PLAN", "INTEGRITY_OVERLAP",
                  "INTEGRITY_COMPLETED_IN_FUTURE", "INTEGRITY_OUTSIDE_PLAN"),
         _integrity, elsewhere="overlaps across records: credit.overlapping, credit.day_totals"),
)
RULE_BY_ID = {rule.id: rule for rule in RULES}


@dataclass(frozen=True)
class Judgement:
    """What the rules say about one submission; it is acceptable when ``errors`` is empty."""

    errors: list[Note]
    warnings: list[Note]
    rule_notes: list[Note]
    hours: Decimal  # before caps (R10); 0.0 when rejected
    cap_type: str | None
    counts_toward_year: int
    review_authority: str
    covers_professional_requirement: bool
    reference_version: str
    # R11 for a *change* of a stored record: judged on arrival, as a pushed one is.  Only a
    # pulled completion's first version is filed on its completion day (_Case.filed_on): a
    # correction the college makes after the close is made after the close — refused
    # (YEAR_CLOSED), or with an approved deferral counted toward the next year (DEFERRAL).
    change_errors: list[Note] = field(default_factory=list)
    change_counts_toward_year: int | None = None  # None: as counts_toward_year
    change_rule_notes: list[Note] = field(default_factory=list)  # added to rule_notes then

    @property
    def accepted(self) -> bool:
        return not self.errors


def judge(sub: CESubmission, *, adapter: str, received_at: datetime, reference: Reference,
          config: RulesConfig | None = None) -> Judgement:
    """Run every rule of :data:`RULES` on one submission.

    ``received_at`` must be timezone-aware (a naive time is a programming error and raises
    ``ValueError``); ``adapter`` is the adapter the record came through.
    """
    if received_at.tzinfo is None or received_at.utcoffset() is None:
        raise ValueError("received_at must be timezone-aware")
    config = config or RulesConfig()
    worth = measure(sub, adapter=adapter, config=config)
    case = _Case(sub, adapter, received_at, reference, config, worth,
                 counts_toward_year=sub.year, errors=list(worth.errors),
                 rule_notes=list(worth.rule_notes))
    for rule in RULES:
        if rule.check is not None:
            rule.check(case)
    change_errors: list[Note] = []
    change_year: int | None = None
    change_notes: list[Note] = []
    if not case.errors and case.adapter in PULLED_ADAPTERS:
        late = _Case(sub, adapter, received_at, reference, config, worth,
                     counts_toward_year=sub.year, on_arrival=True)
        if late.filed_on != case.filed_on:  # rare: a pull after the close met this year's work
            _year(late)
            change_errors = [e for e in late.errors if e.code == "YEAR_CLOSED"]
            if late.counts_toward_year != case.counts_toward_year:
                change_year = late.counts_toward_year
                change_notes = [n for n in late.rule_notes if n.code == "DEFERRAL"]
    return Judgement(
        errors=case.errors, warnings=case.warnings, rule_notes=case.rule_notes,
        hours=ZERO if case.errors else worth.hours, cap_type=case.cap_type,
        counts_toward_year=case.counts_toward_year, review_authority=case.review_authority,
        covers_professional_requirement=worth.covers_professional_requirement and not case.errors,
        reference_version=reference.version, change_errors=change_errors,
        change_counts_toward_year=change_year, change_rule_notes=change_notes)
