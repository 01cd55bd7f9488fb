"""Hours arithmetic of SPEC §4: claim → hours (R3–R7, credit table) and a person-year's totals.

Pure, no I/O.  One record: :func:`measure` turns a claimed quantity into hours before caps,
dispatching on :data:`MEASURE_OF` (activity type → conversion) over the numbers of
:mod:`gateway.pipeline.rules_tables`; :func:`convert` is the older ``(hours, rule_notes)``
entry point over it.  Many records of one person-year, for the caller that holds them (the caps
ledger, the compliance read-model, the integrity checks): :func:`allocate` and
:func:`cap_note` (R10), :func:`compliance_gap` (R1), :func:`overlaps`, :func:`overlapping` and
:func:`day_totals` (R14).  :mod:`gateway.pipeline.rules` judges a record and re-exports these.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import TypeVar

from contracts import ActivityType, CESubmission, Note, Unit
from contracts.errors import message
from gateway.pipeline.rules_tables import (
    ALLOWED_UNITS,
    AWARDS,
    BOOK_HOURS,
    CAP_CLAUSE,
    CAP_LABEL_ZH,
    COMPETITION,
    CREDIT_BASIS,
    CREDIT_SOURCE_OF_ADAPTER,
    CREDIT_SOURCE_OF_INDUSTRY,
    NOTICE,
    PAPER_HOURS,
    REQUIREMENT,
    TIERS,
    Rate,
    RulesConfig,
)

__all__ = [
    "MEASURE_OF",
    "Measure",
    "allocate",
    "cap_note",
    "compliance_gap",
    "convert",
    "day_totals",
    "measure",
    "overlapping",
    "overlaps",
]

ONE_PLACE = Decimal("0.1")
ZERO = Decimal("0.0")


def hours_of(value: Decimal) -> Decimal:
    """Hours carry one decimal place, rounded half up (SPEC §3)."""
    return value.quantize(ONE_PLACE, rounding=ROUND_HALF_UP)


def coded(code: str, detail: str = "", detail_zh: str | None = None, *,
          field: str | None = None) -> Note:
    """An error or warning from the catalogue, with a detail in both languages."""
    en, zh = message(code)
    zh_detail = detail if detail_zh is None else detail_zh
    return Note(code=code, field=field, message=f"{en} {detail}".rstrip(),
                message_zh=f"{zh}{zh_detail}".rstrip())


def explain(code: str, en: str, zh: str) -> Note:
    """A rule note: why the hours are what they are."""
    return Note(code=code, message=en, message_zh=zh)


# -- one claim → hours before caps ---------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """What one claim is worth before caps, and why (or why it cannot be measured)."""

    hours: Decimal = ZERO
    rule_notes: list[Note] = field(default_factory=list)
    errors: list[Note] = field(default_factory=list)
    covers_professional_requirement: bool = False


MeasureFn = Callable[[CESubmission, str, RulesConfig], Measure]


def _bad_detail(key: str, allowed: Sequence[str], got: str | None) -> Note:
    return coded("SCHEMA", f"(claimed.details.{key} must be one of {', '.join(allowed)}; got {got!r})",
                 f"（claimed.details.{key} 应为 {'、'.join(allowed)} 之一，实为 {got!r}）",
                 field=f"claimed.details.{key}")


def _per_item(rule: str, rates: Mapping[str, Rate], unit_zh: str) -> MeasureFn:
    def per_item(sub: CESubmission, adapter: str, config: RulesConfig) -> Measure:
        authorship = sub.claimed.details.get("authorship")
        rate = rates.get(authorship or "")
        if rate is None:
            return Measure(errors=[_bad_detail("authorship", list(rates), authorship)])
        qty = sub.claimed.quantity
        hours = hours_of(qty * rate.hours)
        return Measure(hours, [explain(
            "CONVERSION",
            f"{rule} {rate.label_en}: {qty} × {rate.hours} h = {hours} h ({NOTICE} {rate.clause})",
            f"{rate.label_zh}：{qty} {unit_zh} × {rate.hours} 学时 = {hours} 学时"
            f"（{NOTICE} {rate.clause}）")])
    return per_item


def _lecture(sub: CESubmission, adapter: str, config: RulesConfig) -> Measure:
    qty, factor = sub.claimed.quantity, config.lecture_factor
    hours = hours_of(qty * factor)
    return Measure(hours, [explain(
        "CONVERSION", f"R5 lecture: {qty} teaching hours × {factor} = {hours} h ({NOTICE} 四(二)3)",
        f"专题授课：实际授课 {qty} 小时 × {factor} 倍 = {hours} 学时（{NOTICE} 四(二)3）")])


def _exam_setting(sub: CESubmission, adapter: str, config: RulesConfig) -> Measure:
    hours, cap = hours_of(sub.claimed.quantity), config.caps.get("exam_setting")
    return Measure(hours, [explain(
        "CONVERSION",
        f"R6 exam setting: {hours} h as claimed, at most {cap} h a year ({NOTICE} 四(二)4)",
        f"考试命题：按申报 {hours} 学时计，当年最多折算为 {cap} 学时（{NOTICE} 四(二)4）")])


def _competition(sub: CESubmission, adapter: str, config: RulesConfig) -> Measure:
    # 四(二)5 gives hours for an award ("获得…奖项的…折算…学时"): a record is one award, so a
    # claim of 0 or 2 would be credited the table's hours for one — refused, not guessed at.
    if sub.claimed.quantity != 1:
        return Measure(errors=[coded(
            "SCHEMA", f"(a competition record is one award: claimed.quantity must be 1, not "
                      f"{sub.claimed.quantity}; send each award as its own record)",
            f"（一条技能大赛记录即一个奖项：数量应为 1，而不是 {sub.claimed.quantity}；"
            f"多个奖项请分别报送）", field="claimed.quantity")])
    tier, award = sub.claimed.details.get("tier"), sub.claimed.details.get("award")
    if tier not in TIERS:
        return Measure(errors=[_bad_detail("tier", TIERS, tier)])
    if award not in AWARDS:
        return Measure(errors=[_bad_detail("award", AWARDS, award)])
    row = COMPETITION.get((tier, award))
    if row is None:  # a prefecture-level excellence award: the notice gives it nothing
        return Measure(errors=[coded(
            "ACTIVITY_NOT_COUNTABLE", f"(competition {tier}/{award} earns no hours, {NOTICE} 四(二)5)",
            f"（{tier} 级竞赛 {award} 奖项不折算学时，{NOTICE} 四(二)5）",
            field="claimed.details.award")])
    notes = [explain("CONVERSION", f"R7 competition {tier}/{award}: {row.hours} h ({NOTICE} 四(二)5)",
                     f"技能大赛：{row.quote}，计 {row.hours} 学时（{NOTICE} 四(二)5）")]
    if row.covers_professional_requirement:
        notes.append(explain(
            "COVERS_PROFESSIONAL_REQUIREMENT",
            f"Counts as all professional-subject hours of the tenure ({NOTICE} 四(二)5)",
            f"折算为任职期间全部专业课学时（{NOTICE} 四(二)5）"))
    return Measure(hours_of(row.hours), notes,
                   covers_professional_requirement=row.covers_professional_requirement)


def _time(sub: CESubmission, adapter: str, config: RulesConfig) -> Measure:
    """Hours as claimed, or credits by the credit table (health and accounting)."""
    qty = sub.claimed.quantity
    if sub.claimed.unit is Unit.HOURS:
        return Measure(hours_of(qty))
    industry = (sub.person.industry or "").strip().lower()
    source = CREDIT_SOURCE_OF_ADAPTER.get(adapter) or CREDIT_SOURCE_OF_INDUSTRY.get(industry)
    if source is None:
        return Measure(errors=[coded(
            "SCHEMA", "(credits convert to hours only for health and accounting records)",
            "（仅卫生、会计人员的学分可折算学时）", field="claimed.unit")])
    rate = config.credit_rate(source)
    hours = hours_of(qty * rate)
    basis_en, basis_zh = CREDIT_BASIS[source]
    return Measure(hours, [explain(
        "CREDIT_CONVERSION", f"{qty} credits × {rate} h per credit = {hours} h ({basis_en})",
        f"{qty} 学分 × 每学分 {rate} 学时 = {hours} 学时（{basis_zh}）")])


# Activity type → conversion (rules R3–R7); every other type counts hours or credits (_time).
MEASURE_OF: Mapping[ActivityType, MeasureFn] = {
    ActivityType.PAPER: _per_item("R3", PAPER_HOURS, "篇"),
    ActivityType.BOOK: _per_item("R4", BOOK_HOURS, "部"),
    ActivityType.LECTURE: _lecture,
    ActivityType.EXAM_SETTING: _exam_setting,
    ActivityType.COMPETITION: _competition,
}


def measure(sub: CESubmission, *, adapter: str = "canonical",
            config: RulesConfig | None = None) -> Measure:
    """Hours this claim is worth before caps, with the rule notes that explain them.

    A unit that does not fit the activity (a paper claimed in hours, say) is a ``SCHEMA``
    error: the gateway, not the partner, converts.
    """
    config = config or RulesConfig()
    kind, unit = sub.activity_type, sub.claimed.unit
    allowed = ALLOWED_UNITS[kind]
    if unit not in allowed:
        names = sorted(str(u) for u in allowed)
        return Measure(errors=[coded(
            "SCHEMA", f"(unit '{unit}' does not fit activity_type '{kind}'; use {', '.join(names)})",
            f"（计量单位 {unit} 不适用于活动类型 {kind}，应为 {'、'.join(names)}）",
            field="claimed.unit")])
    return MEASURE_OF.get(kind, _time)(sub, adapter, config)


def convert(sub: CESubmission, credit_hours: Mapping[str, Decimal] | None = None,
            ) -> tuple[Decimal, list[Note]]:
    """``(hours before caps, rule notes)`` of :func:`measure`, for callers that do not judge.

    ``credit_hours`` may override the credit rates by ``"health"`` / ``"accounting"``.  A claim
    that cannot be measured is worth 0 h here; :func:`gateway.pipeline.rules.judge` says why.
    """
    config = RulesConfig()
    if credit_hours:
        config = RulesConfig(
            health_hours_per_credit=credit_hours.get("health", config.health_hours_per_credit),
            finance_hours_per_credit=credit_hours.get("accounting",
                                                      config.finance_hours_per_credit))
    result = measure(sub, config=config)
    return result.hours, list(result.rule_notes)


# -- R10 caps across a person-year's records -----------------------------------------------------


def allocate(claims: Sequence[tuple[str, Decimal]], cap: Decimal) -> dict[str, Decimal]:
    """Credited hours under one cap, first come first served.

    ``claims`` are ``(record id, hours before cap)`` in arrival order; each gets what is left
    of the cap, so the total is ``min(cap, sum of hours)``.  Re-run it over the current claims
    after any submission, correction or withdrawal, and re-issue the records whose share moved.
    """
    left = max(cap, ZERO)
    credited: dict[str, Decimal] = {}
    for record_id, hours in claims:
        if record_id in credited:
            raise ValueError(f"record {record_id!r} claims twice under one cap")
        share = min(max(hours, ZERO), left)
        credited[record_id] = share
        left -= share
    return credited


def cap_note(hours: Decimal, credited: Decimal, cap: Decimal, type: str,
             ) -> tuple[Note, Note] | None:
    """The ``CAP_APPLIED`` warning and rule note when a record was cut; ``None`` when not."""
    if credited >= hours:
        return None
    clause, words = CAP_CLAUSE.get(type, ("四(二)", f"每年最多折算为 {cap} 学时"))
    label = CAP_LABEL_ZH.get(type, type)
    en = f"({type}: {hours} h claimed, {credited} h credited; cap {cap} h a person-year)"
    zh = f"（{label}：折算 {hours} 学时，计入 {credited} 学时；每人每年上限 {cap} 学时）"
    warning = coded("CAP_APPLIED", en, zh, field="claimed.quantity")
    rule_note = explain(
        "CAP_APPLIED", f"{type} cap {cap} h a person-year: {hours} h → {credited} h "
        f"({NOTICE} {clause})",
        f"{label}：{hours} 学时核减为 {credited} 学时（{NOTICE} {clause}“{words}”）")
    return warning, rule_note


# -- R1 the requirement ---------------------------------------------------------------------------


def compliance_gap(credited_by_category: Mapping[str, Decimal], *,
                   professional_covered: bool = False,
                   requirement: Mapping[str, int] = REQUIREMENT) -> dict[str, Decimal]:
    """Hours still missing per category and in total (R1: 135 = public ≥ 45 + professional ≥ 90).

    ``professional_covered`` is set when a national competition award covers the tenure (R7).
    ``requirement`` is R1's by default; a year that merges a deferred one (七(二)) owes both
    years' (the compliance read-model passes it).  Hours above a category's minimum count
    toward the total, never toward the other minimum.
    """
    public = max(Decimal(credited_by_category.get("public", ZERO)), ZERO)
    professional = max(Decimal(credited_by_category.get("professional", ZERO)), ZERO)
    if professional_covered:
        professional = max(professional, Decimal(requirement["professional"]))
    gap = {
        "public": max(Decimal(requirement["public"]) - public, ZERO),
        "professional": max(Decimal(requirement["professional"]) - professional, ZERO),
    }
    total = max(Decimal(requirement["total"]) - public - professional, ZERO)
    gap["total"] = max(total, gap["public"] + gap["professional"])
    return gap


# -- R14 integrity across records -----------------------------------------------------------------

K = TypeVar("K", bound=Hashable)


def overlapping(intervals: Iterable[tuple[K, date, date]]) -> set[K]:
    """Keys of the ``(key, first day, last day)`` intervals that share a day with another."""
    spans = sorted(((min(a, b), max(a, b), key) for key, a, b in intervals),
                   key=lambda span: (span[0], span[1]))
    hit: set[K] = set()
    for i, (_start, end, key) in enumerate(spans):
        for other_start, _other_end, other in spans[i + 1:]:
            if other_start > end:
                break
            hit.update((key, other))
    return hit


def overlaps(intervals: Iterable[tuple[date, date]]) -> bool:
    """Whether any two inclusive ``(first day, last day)`` intervals share a day."""
    return bool(overlapping((i, a, b) for i, (a, b) in enumerate(intervals)))


def day_totals(entries: Iterable[tuple[date | None, date, Decimal]]) -> dict[date, Decimal]:
    """Hours per day for ``(started_on, completed_on, hours)``, each spread evenly over its days.

    Unrounded, so a day over ``RulesConfig.integrity_day_limit_hours`` is seen exactly.
    """
    totals: dict[date, Decimal] = {}
    for started, completed, hours in entries:
        first = min(started or completed, completed)
        days = (completed - first).days + 1
        share = Decimal(hours) / days
        for offset in range(days):
            day = first + timedelta(days=offset)
            totals[day] = totals.get(day, ZERO) + share
    return totals
