"""The ``health`` adapter: one row of the provincial health commission's batch file (省卫健委).

Input: ``(row_number, cells)`` as :mod:`adapters.tabular` yields it (a bare ``cells`` dict is
accepted too, row ``None``, for revalidating a stored row).  Output: exactly one
:class:`~adapters.base.ParsedRow`; never raises.

Columns (SPEC §8) and where they go — unknown extra columns are ignored:

========  ============================  ========  ===========================================
column    canonical field               required  notes
========  ============================  ========  ===========================================
记录编号  source_record_id              yes       refused when Excel lost its digits
                                                  (exponent form, 16+ digit number)
身份证号  person.id_number              yes       full-width digits and spaces folded
姓名      person.name                   yes
工作单位  person.employer_name          no
地区代码  person.region_code            yes
项目编号  activity.plan_id              no        the CME project number
项目名称  activity.title                yes
学分类别  claimed.details.credit_class  yes       Ⅰ类/Ⅱ类, I/II, 一类/二类, 1类/2类 → I/II
学分      claimed.quantity              yes       unit ``credits``; "2.5学分", "2.5分" too
开始日期  activity.started_on           no
完成日期  activity.completed_on, year   yes       year = the completion date's year
证书编号  evidence.certificate_no       no
========  ============================  ========  ===========================================

Fixed: ``person.industry="health"``, ``category="professional"``, ``activity_type="training"``,
``mode="offline"``, ``evidence.assessment="passed"`` (the commission reports earned credits).

Credits become hours here, by the configurable rate ``hours_per_credit`` (default 3.6: the
national 2024 CME rule asks ≥ 25 credits ≈ ≥ 90 学时 a year, SPEC §4), rounded half-up to
0.1 h and explained in a ``CREDIT_CONVERSION`` rule note.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import ClassVar

from adapters.base import AdapterConfig, ParsedRow
from adapters.rows import CREDIT_UNITS, RowBuilder, TabularAdapter

__all__ = ["COLUMNS_OF", "CREDIT_CLASSES", "HealthAdapter", "HealthConfig"]

# Canonical path (or its prefix) → the Chinese column it came from, for mapping the
# validator's findings back to what the partner sees.
COLUMNS_OF: Mapping[str, str] = {
    "source_record_id": "记录编号",
    "person.id_number": "身份证号",
    "person.id_type": "身份证号",
    "person.name": "姓名",
    "person.employer_name": "工作单位",
    "person.region_code": "地区代码",
    "activity.plan_id": "项目编号",
    "activity.title": "项目名称",
    "claimed.details": "学分类别",
    "claimed.quantity": "学分",
    "activity.started_on": "开始日期",
    "activity.completed_on": "完成日期",
    "year": "完成日期",
    "evidence.certificate_no": "证书编号",
}

# Folded spellings (NFKC, upper case, spaces removed) → credit class.  NFKC turns the roman
# numeral signs Ⅰ/Ⅱ and full-width Ｉ into I.
CREDIT_CLASSES: Mapping[str, str] = {
    f"{spelling}{suffix}": value
    for spelling, value in (("I", "I"), ("II", "II"), ("一", "I"), ("二", "II"), ("1", "I"),
                            ("2", "II"))
    for suffix in ("", "类", "类学分")
}

DEFAULT_RATE = Decimal("3.6")
_WHAT = ("CME credits → hours", "继续医学教育学分折算学时")
_BASIS_DEFAULT = (
    "3.6 h per CME credit, national 2024 CME rule: ≥25 credits ≈ ≥90 学时 a year",
    "每学分3.6学时，依据2024年全国继续医学教育规定：每年≥25学分≈≥90学时",
)
_BASIS_CONFIGURED = ("rate configured for this gateway", "本网关配置的折算标准")


class HealthConfig(AdapterConfig):
    hours_per_credit: Decimal = DEFAULT_RATE


class HealthAdapter(TabularAdapter):
    name: ClassVar[str] = "health"
    config_model: ClassVar[type[AdapterConfig]] = HealthConfig

    def parse_cells(self, row: int | None, cells: Mapping[str, object]) -> ParsedRow:
        b = RowBuilder(cells)
        completed = b.day("完成日期")
        started = b.day("开始日期", required=False)
        credits = b.number("学分", units=CREDIT_UNITS)
        draft: dict[str, object] = {
            "source_record_id": b.record_id("记录编号"),
            "person": {
                "id_type": "resident_id",
                "id_number": (b.text("身份证号", code=True) or "").upper(),
                "name": b.text("姓名"),
                "employer_name": b.text("工作单位", required=False),
                "region_code": b.text("地区代码", code=True, placeholder="630100"),
                "industry": "health",
            },
            "year": completed.year if completed else None,
            "category": "professional",
            "activity_type": "training",
            "activity": {
                "title": b.text("项目名称"),
                "plan_id": b.text("项目编号", required=False, code=True),
                "mode": "offline",
                # Without a real completion date the start cannot be judged against it.
                "started_on": started if "完成日期" not in b.bad else None,
                "completed_on": completed,
            },
            "claimed": {
                "quantity": credits,
                "unit": "credits",
                "details": {"credit_class": b.choice("学分类别", CREDIT_CLASSES, "Ⅰ类/Ⅱ类")},
            },
            "evidence": {
                "certificate_no": b.text("证书编号", required=False, code=True),
                "assessment": "passed",
            },
        }
        submission, errors, warnings = b.finish(draft, COLUMNS_OF)
        parsed = ParsedRow(row=row, raw=dict(cells), submission=submission, errors=errors,
                           warnings=warnings)
        config = self.config
        rate = config.hours_per_credit if isinstance(config, HealthConfig) else DEFAULT_RATE
        basis = _BASIS_DEFAULT if rate == DEFAULT_RATE else _BASIS_CONFIGURED
        return self.converted(parsed, None if "学分" in b.bad else credits, rate,
                              what=_WHAT, basis=basis)
