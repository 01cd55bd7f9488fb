"""The ``finance`` adapter: one row of the provincial finance department's batch file (省财政厅).

Input: ``(row_number, cells)`` as :mod:`adapters.tabular` yields it (a bare ``cells`` dict is
accepted too, row ``None``).  Output: exactly one :class:`~adapters.base.ParsedRow`; never
raises.

Columns (SPEC §8) and where they go — unknown extra columns are ignored:

================  ============================  ========  =====================================
column            canonical field               required  notes
================  ============================  ========  =====================================
流水号            source_record_id              yes       refused when Excel lost its digits
                                                          (exponent form, 16+ digit number)
证件号码          person.id_number              yes       a resident id; full-width folded
姓名              person.name                   yes
单位名称          person.employer_name          no
统一社会信用代码  person.employer_uscc          no        a failing check digit only warns;
                                                          see "Employer codes" below
地区代码          person.region_code            yes
学习方式          activity.mode, activity_type  yes       面授 → offline/training, 网络 →
                                                          online/online_course, 其他 →
                                                          mixed/training
课程名称          activity.title                yes
科目类别          category                      yes       专业科目 → professional,
                                                          公需科目 → public
学分              claimed.quantity              yes       unit ``credits``; "2.5学分", "2.5分" too
完成日期          activity.completed_on, year   yes       year = the completion date's year
================  ============================  ========  =====================================

Fixed: ``person.industry="accounting"``, ``evidence.assessment="passed"``.  Public-subject rows
are accepted from this partner (SPEC §4 R2: accountants train under their department).

Employer codes: SPEC §3 makes ``employer_uscc`` optional and a failing code a warning, so the
code never decides whether an accountant's hours are taken.  A cell that says "none" (无, 暂无,
/, -, N/A …) is read as empty.  Any other value that is not 18 letters and digits — a pre-2015
组织机构代码 ``12345678-9``, a 15-digit 工商注册号, a code one character short — is kept out of
``employer_uscc`` (whose contract shape stays the 18-character GB 32100 code the management
system can rely on) and answered with a ``USCC_INVALID`` warning naming the column and quoting
the value; the row stays acceptable.  An 18-character code failing its check digit is kept and
warned about by validation, as before.

Credits become hours by ``hours_per_credit`` (default 1: 财会〔2018〕10号 asks 90 学分 a year
against the 90 professional hours), rounded half-up to 0.1 h, with a ``CREDIT_CONVERSION`` note.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import ClassVar

from adapters.base import AdapterConfig, ParsedRow
from adapters.normalize import show_value
from adapters.rows import CREDIT_UNITS, RowBuilder, TabularAdapter
from contracts import Note
from gateway.pipeline.validate import note

__all__ = ["CATEGORIES", "COLUMNS_OF", "MODES", "FinanceAdapter", "FinanceConfig"]

COLUMNS_OF: Mapping[str, str] = {
    "source_record_id": "流水号",
    "person.id_number": "证件号码",
    "person.id_type": "证件号码",
    "person.name": "姓名",
    "person.employer_name": "单位名称",
    "person.employer_uscc": "统一社会信用代码",
    "person.region_code": "地区代码",
    "activity.mode": "学习方式",
    "activity_type": "学习方式",
    "activity.title": "课程名称",
    "category": "科目类别",
    "claimed.quantity": "学分",
    "activity.completed_on": "完成日期",
    "year": "完成日期",
}

# 学习方式 → (mode, activity_type); the common synonyms of each value are accepted too.
MODES: Mapping[str, tuple[str, str]] = {
    **dict.fromkeys(("面授", "线下", "现场", "集中面授"), ("offline", "training")),
    **dict.fromkeys(("网络", "线上", "在线", "网络学习", "网络培训"), ("online", "online_course")),
    **dict.fromkeys(("其他", "其它", "混合", "线上线下"), ("mixed", "training")),
}
CATEGORIES: Mapping[str, str] = {
    **dict.fromkeys(("专业科目", "专业"), "professional"),
    **dict.fromkeys(("公需科目", "公需"), "public"),
}
_MODE_KEYS = {key: key for key in MODES}

_USCC_COLUMN = "统一社会信用代码"
# What exports write in the column for "no code", folded as RowBuilder.text(code=True) folds
# (NFKC, no spaces) and upper-cased.
_NO_USCC = frozenset({"无", "暂无", "没有", "空", "-", "--", "—", "——", "/", "//", "\\", "N/A", "NA",
                      "NULL", "NONE"})

DEFAULT_RATE = Decimal("1")
_WHAT = ("accounting CE credits → hours", "会计人员继续教育学分折算学时")
_BASIS_DEFAULT = (
    "1 h per credit, 财会〔2018〕10号: 90 学分 a year",
    "每学分1学时，依据财会〔2018〕10号：每年不少于90学分",
)
_BASIS_CONFIGURED = ("rate configured for this gateway", "本网关配置的折算标准")


class FinanceConfig(AdapterConfig):
    hours_per_credit: Decimal = DEFAULT_RATE


class FinanceAdapter(TabularAdapter):
    name: ClassVar[str] = "finance"
    config_model: ClassVar[type[AdapterConfig]] = FinanceConfig

    def parse_cells(self, row: int | None, cells: Mapping[str, object]) -> ParsedRow:
        b = RowBuilder(cells)
        completed = b.day("完成日期")
        credits = b.number("学分", units=CREDIT_UNITS)
        way = b.choice("学习方式", _MODE_KEYS, "面授/网络/其他")
        mode, activity_type = MODES.get(way or "", ("offline", "training"))
        uscc, uscc_warning = _employer_code(b.text(_USCC_COLUMN, required=False, code=True))
        draft: dict[str, object] = {
            "source_record_id": b.record_id("流水号"),
            "person": {
                "id_type": "resident_id",
                "id_number": (b.text("证件号码", code=True) or "").upper(),
                "name": b.text("姓名"),
                "employer_name": b.text("单位名称", required=False),
                "employer_uscc": uscc,
                "region_code": b.text("地区代码", code=True, placeholder="630100"),
                "industry": "accounting",
            },
            "year": completed.year if completed else None,
            "category": b.choice("科目类别", CATEGORIES, "专业科目/公需科目"),
            "activity_type": activity_type,
            "activity": {"title": b.text("课程名称"), "mode": mode, "completed_on": completed},
            "claimed": {"quantity": credits, "unit": "credits", "details": {}},
            "evidence": {"assessment": "passed"},
        }
        submission, errors, warnings = b.finish(draft, COLUMNS_OF)
        if uscc_warning is not None:
            warnings.insert(0, uscc_warning)
        parsed = ParsedRow(row=row, raw=dict(cells), submission=submission, errors=errors,
                           warnings=warnings)
        config = self.config
        rate = config.hours_per_credit if isinstance(config, FinanceConfig) else DEFAULT_RATE
        basis = _BASIS_DEFAULT if rate == DEFAULT_RATE else _BASIS_CONFIGURED
        return self.converted(parsed, None if "学分" in b.bad else credits, rate,
                              what=_WHAT, basis=basis)


def _employer_code(text: str | None) -> tuple[str | None, Note | None]:
    """The cell's code for ``employer_uscc``, and the warning when it cannot be one (module docs)."""
    if text is None:
        return None, None
    if len(text) == 18 and text.isascii() and text.isalnum():  # the contract's shape
        return text.upper(), None
    if text.upper() in _NO_USCC:
        return None, None
    shown = show_value(text)
    return None, note(
        "USCC_INVALID",
        f"{_USCC_COLUMN}: {shown} is not an 18-character unified social credit code; "
        "left out of the record",
        field=_USCC_COLUMN,
        detail_zh=f"{_USCC_COLUMN}：{shown} 不是18位统一社会信用代码，未写入记录")
