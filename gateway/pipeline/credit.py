"""Claimed quantity → credited hours, before caps (SPEC §4 R3–R7 and the credit tables).

Each conversion is a table row with the notice's clause quoted beside it
(青人社厅函〔2022〕394号 四(二)).  The per-person-year caps that follow these conversions
(R3–R6, R10) are applied by the caps ledger, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from contracts import ActivityType, CESubmission, Note, Unit

ONE_PLACE = Decimal("0.1")


@dataclass(frozen=True)
class Conversion:
    hours: Decimal
    clause: str


# R3 学术论文: "独立完成的每篇计10学时；合作完成的每人每篇计5学时"
PAPER = {
    "sole": Conversion(Decimal(10), "四(二)1 学术论文：独立完成每篇计10学时"),
    "co": Conversion(Decimal(5), "四(二)1 学术论文：合作完成每人每篇计5学时"),
}
# R4 学术著作: "独著计30学时；合著第一作者计20学时，其他作者计10学时"
BOOK = {
    "sole": Conversion(Decimal(30), "四(二)2 学术著作：独著计30学时"),
    "first": Conversion(Decimal(20), "四(二)2 学术著作：合著第一作者计20学时"),
    "other": Conversion(Decimal(10), "四(二)2 学术著作：合著其他作者计10学时"),
}
# R5 专题授课: "按实际授课学时的6倍计算"
LECTURE_FACTOR = Conversion(Decimal(6), "四(二)3 专题授课：按实际授课学时的6倍计算")
# R7 技能大赛 (tier, award) → hours
_GRAND = ("first", "second", "third")
COMPETITION: dict[tuple[str, str], Conversion] = {}
for _award in (*_GRAND, "excellence"):
    COMPETITION[("national", _award)] = Conversion(
        Decimal(90), "四(二)5 全国职业技能大赛优胜奖及以上：视同完成专业科目学时"
    )
for _award in _GRAND:
    COMPETITION[("national_industry", _award)] = Conversion(
        Decimal(90), "四(二)5 国家级一类行业大赛三等奖及以上：计90学时"
    )
for _award in ("gold", "silver", "bronze"):
    COMPETITION[("provincial", _award)] = Conversion(
        Decimal(90), "四(二)5 青海省职业技能大赛/技工院校教师大赛金银铜奖：计90学时"
    )
COMPETITION[("provincial", "excellence")] = Conversion(
    Decimal(60), "四(二)5 青海省职业技能大赛/技工院校教师大赛优胜奖：计60学时"
)
for _award in _GRAND:
    COMPETITION[("provincial_joint", _award)] = Conversion(
        Decimal(60), "四(二)5 省人社厅与行业部门联合举办竞赛三等奖及以上：计60学时"
    )
    COMPETITION[("prefecture", _award)] = Conversion(
        Decimal(30), "四(二)5 市州级或省级单一行业竞赛三等奖及以上：计30学时"
    )
COMPETITION[("provincial_joint", "excellence")] = Conversion(
    Decimal(40), "四(二)5 省人社厅与行业部门联合举办竞赛优胜奖：计40学时"
)

# Credits → hours; SPEC §4 defaults (configurable by the caller).
DEFAULT_CREDIT_HOURS = {"health": Decimal("3.6"), "accounting": Decimal("1")}


def _round(value: Decimal) -> Decimal:
    return value.quantize(ONE_PLACE, rounding=ROUND_HALF_UP)


def _note(code: str, message: str) -> Note:
    return Note(code=code, message=message)


def convert(
    sub: CESubmission,
    credit_hours: dict[str, Decimal] | None = None,
) -> tuple[Decimal, list[Note]]:
    """Hours this claim is worth before caps, with the rule notes that explain them."""
    qty, unit, details = sub.claimed.quantity, sub.claimed.unit, sub.claimed.details
    kind = sub.activity_type
    if unit is Unit.HOURS and kind not in (ActivityType.LECTURE,):
        return _round(qty), []
    if unit is Unit.PAPERS or kind is ActivityType.PAPER:
        conv = PAPER.get(details.get("authorship", ""), PAPER["co"])
        return _round(conv.hours * (qty if unit is Unit.PAPERS else 1)), [
            _note("CONVERSION", conv.clause)
        ]
    if unit is Unit.BOOKS or kind is ActivityType.BOOK:
        conv = BOOK.get(details.get("authorship", ""), BOOK["other"])
        return _round(conv.hours * (qty if unit is Unit.BOOKS else 1)), [
            _note("CONVERSION", conv.clause)
        ]
    if unit is Unit.LECTURE_HOURS or kind is ActivityType.LECTURE:
        return _round(qty * LECTURE_FACTOR.hours), [_note("CONVERSION", LECTURE_FACTOR.clause)]
    if unit is Unit.AWARD or kind is ActivityType.COMPETITION:
        award = COMPETITION.get((details.get("tier", ""), details.get("award", "")))
        if award is None:
            return Decimal(0), [_note("CONVERSION", "竞赛级别/奖项不在认定范围内，计0学时")]
        return award.hours, [_note("CONVERSION", award.clause)]
    if unit is Unit.CREDITS:
        table = credit_hours or DEFAULT_CREDIT_HOURS
        industry = sub.person.industry or "health"
        rate = table.get(industry, table.get("health", Decimal("1")))
        return _round(qty * rate), [
            _note("CONVERSION", f"学分折算：每学分计{rate}学时（{industry}）")
        ]
    # sessions (exam setting) and anything else count as claimed hours.
    return _round(qty), []
