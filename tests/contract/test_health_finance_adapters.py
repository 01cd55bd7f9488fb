"""Contract of the health and finance adapters (STYLE.md "Adapters").

Golden rows parse to valid submissions with the expected hours and notes; the dedup keys are
stable; a malformed row yields coded errors naming the Chinese column and never an exception;
and the committed golden files under ``tests/fixtures/`` give exactly the answers listed here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import Adapter, ParsedRow
from adapters.finance import FinanceAdapter, FinanceConfig
from adapters.health import HealthAdapter, HealthConfig
from adapters.tabular import ROW_ERROR, iter_rows, parse_file
from contracts import CESubmission
from contracts.errors import CATALOGUE
from gateway.pipeline import dedup
from mock_partners.files import (
    BAD_KEY,
    FINANCE_HEADERS,
    HEALTH_HEADERS,
    finance_rows,
    health_rows,
    year_dataset,
)
from mock_partners.generators import corrupt_check_digit, make_id_number
from tests.fixtures import make_golden
from tests.support.keys import KEYS

ID_NUMBER = make_id_number(random.Random(42), "630102", date(1987, 4, 13))

HEALTH_ROW: dict[str, object] = {
    "记录编号": "WJ-2026-000123",
    "身份证号": ID_NUMBER,
    "姓名": "赵伟",
    "工作单位": "青海省人民医院",
    "地区代码": "630100",
    "项目编号": "2026-04-05-123(国)",
    "项目名称": "高原病防治新进展",
    "学分类别": "Ⅰ类",
    "学分": "2.5",
    "开始日期": "2026/3/3",
    "完成日期": "2026年3月5日",
    "证书编号": "CME2026000123",
    "备注": "an extra column the adapter ignores",
}
FINANCE_ROW: dict[str, object] = {
    "流水号": "KJ-2026-000456",
    "证件号码": ID_NUMBER,
    "姓名": "赵伟",
    "单位名称": "青海省财政厅",
    "统一社会信用代码": "",
    "地区代码": "630100",
    "学习方式": "网络",
    "课程名称": "政府会计制度专题",
    "科目类别": "专业科目",
    "学分": "24",
    "完成日期": "20260305",
}


@dataclass(frozen=True)
class Partner:
    adapter: Callable[[], Adapter]
    row: dict[str, object]
    rows: Callable[..., Iterator[dict[str, Any]]]
    headers: tuple[str, ...]
    id_column: str
    id_number_column: str
    hours: Decimal  # what ``row`` is worth


PARTNERS = {
    "health": Partner(HealthAdapter, HEALTH_ROW, health_rows, HEALTH_HEADERS, "记录编号", "身份证号",
                      Decimal("9.0")),
    "finance": Partner(FinanceAdapter, FINANCE_ROW, finance_rows, FINANCE_HEADERS, "流水号",
                       "证件号码", Decimal("24.0")),
}


@pytest.fixture(params=sorted(PARTNERS))
def partner(request: pytest.FixtureRequest) -> Partner:
    return PARTNERS[request.param]


def parse_one(adapter: Adapter, raw: object) -> ParsedRow:
    parsed = list(adapter.parse(raw))
    assert len(parsed) == 1
    return parsed[0]


def answer(p: ParsedRow) -> list[tuple[str | None, str]]:
    return [(e.field, e.code) for e in p.errors]


# -- golden rows ------------------------------------------------------------------------------


def test_health_golden_row() -> None:
    p = parse_one(HealthAdapter(), (2, HEALTH_ROW))
    assert p.ok and p.row == 2 and p.errors == [] and p.warnings == []
    sub = p.submission
    assert sub is not None
    assert sub.model_dump(mode="json") == {
        "source_record_id": "WJ-2026-000123",
        "person": {"id_type": "resident_id", "id_number": ID_NUMBER, "name": "赵伟",
                   "employer_name": "青海省人民医院", "employer_uscc": None,
                   "region_code": "630100", "industry": "health"},
        "year": 2026, "category": "professional", "activity_type": "training",
        "activity": {"title": "高原病防治新进展", "provider_code": None,
                     "plan_id": "2026-04-05-123(国)", "mode": "offline",
                     "started_on": "2026-03-03", "completed_on": "2026-03-05"},
        "claimed": {"quantity": "2.5", "unit": "credits", "details": {"credit_class": "I"}},
        "evidence": {"certificate_no": "CME2026000123", "assessment": "passed"},
    }
    assert p.credits == Decimal("2.5")
    assert p.credited_hours == Decimal("9.0")  # 2.5 × 3.6
    [rule] = p.rule_notes
    assert rule.code == "CREDIT_CONVERSION"
    assert "2.5 credits × 3.6 h per credit = 9.0 h" in rule.message
    assert "3.6 h per CME credit" in rule.message and "≥25 credits ≈ ≥90 学时" in rule.message
    assert rule.message_zh is not None and "每学分3.6学时" in rule.message_zh
    assert p.raw == HEALTH_ROW  # the native row, kept for revalidation


def test_finance_golden_row() -> None:
    p = parse_one(FinanceAdapter(), (7, FINANCE_ROW))
    assert p.ok and p.row == 7
    sub = p.submission
    assert sub is not None
    assert (sub.person.industry, sub.category.value, sub.activity_type.value,
            sub.activity.mode.value) == ("accounting", "professional", "online_course", "online")
    assert sub.activity.completed_on == date(2026, 3, 5) and sub.year == 2026
    assert sub.claimed.quantity == Decimal(24) and sub.claimed.unit.value == "credits"
    assert sub.person.employer_uscc is None
    assert p.credited_hours == Decimal("24.0") and p.credits == Decimal(24)
    [rule] = p.rule_notes
    assert rule.code == "CREDIT_CONVERSION" and "财会〔2018〕10号" in rule.message


@pytest.mark.parametrize(
    ("credits", "hours"),
    [("1", "3.6"), ("0.5", "1.8"), ("25", "90.0"), ("1.25", "4.5"), ("0.75", "2.7"),
     ("0.13", "0.5"), ("0.12", "0.4"), ("１０", "36.0"), (3, "10.8"), (2.5, "9.0")],
)
def test_health_credits_to_hours_round_half_up(credits: object, hours: str) -> None:
    p = parse_one(HealthAdapter(), {**HEALTH_ROW, "学分": credits})
    assert p.ok and p.credited_hours == Decimal(hours)


@pytest.mark.parametrize("credits", ["-0", "-0.0", Decimal("-0"), -0.0])
def test_negative_zero_credits_are_zero_hours(partner: Partner, credits: object) -> None:
    p = parse_one(partner.adapter(), {**partner.row, "学分": credits})
    assert p.ok and p.submission is not None
    assert str(p.credited_hours) == "0.0"
    assert p.credits is not None and not p.credits.is_signed()
    assert not p.submission.claimed.quantity.is_signed()
    assert "-0" not in p.rule_notes[0].message


def test_conversion_rate_is_configurable() -> None:
    p = parse_one(HealthAdapter(HealthConfig(hours_per_credit=Decimal("4"))), HEALTH_ROW)
    assert p.credited_hours == Decimal("10.0")
    assert "rate configured" in p.rule_notes[0].message
    f = parse_one(FinanceAdapter(FinanceConfig(hours_per_credit=Decimal("1.5"))), FINANCE_ROW)
    assert f.credited_hours == Decimal("36.0")


@pytest.mark.parametrize(
    ("spelling", "credit_class"),
    [("Ⅰ类", "I"), ("Ⅱ类", "II"), ("I", "I"), ("II", "II"), ("i类", "I"), ("一类", "I"),
     ("二类", "II"), ("Ｉ类", "I"), ("ＩＩ类", "II"), (" Ⅱ 类 ", "II"), ("Ⅰ类学分", "I"),
     ("1类", "I"), ("2类", "II")],
)
def test_health_credit_class_spellings(spelling: str, credit_class: str) -> None:
    p = parse_one(HealthAdapter(), {**HEALTH_ROW, "学分类别": spelling})
    assert p.ok
    assert p.submission is not None
    assert p.submission.claimed.details == {"credit_class": credit_class}


@pytest.mark.parametrize(
    ("way", "mode", "activity_type"),
    [("面授", "offline", "training"), ("网络", "online", "online_course"),
     ("其他", "mixed", "training"), (" 线上 ", "online", "online_course")],
)
def test_finance_study_modes(way: str, mode: str, activity_type: str) -> None:
    p = parse_one(FinanceAdapter(), {**FINANCE_ROW, "学习方式": way})
    assert p.submission is not None
    assert (p.submission.activity.mode.value, p.submission.activity_type.value) == (
        mode, activity_type)


def test_finance_public_subject_and_uscc() -> None:
    p = parse_one(FinanceAdapter(), {**FINANCE_ROW, "科目类别": "公需科目",
                                     "统一社会信用代码": "91630100ma752k3x1k"})
    assert p.ok and p.submission is not None
    assert p.submission.category.value == "public"
    assert p.submission.person.employer_uscc == "91630100MA752K3X1K"
    bad = parse_one(FinanceAdapter(), {**FINANCE_ROW, "统一社会信用代码": "91630100MA752K3X1A"})
    assert bad.ok  # a failing check digit only warns
    assert [(w.field, w.code) for w in bad.warnings] == [("统一社会信用代码", "USCC_INVALID")]


@pytest.mark.parametrize("value", ["无", " 暂无 ", "／", "-", "n/a", "——"])
def test_finance_employer_code_written_as_none_is_empty(value: str) -> None:
    p = parse_one(FinanceAdapter(), {**FINANCE_ROW, "统一社会信用代码": value})
    assert p.ok and p.submission is not None
    assert p.submission.person.employer_uscc is None and p.warnings == []


@pytest.mark.parametrize("value", ["123", "12345678-9", "630100400001234", "91630100MA752K3X1",
                                   "91630100MA752K3X1KK", "９１６３０１００ＭＡ７５２Ｋ３Ｘ１"])
def test_finance_employer_code_of_another_shape_only_warns(value: str) -> None:
    """SPEC §3: the code is optional and a failing one a warning, never the row's refusal.

    It is left out of ``employer_uscc`` (the contract keeps the GB 32100 shape) and the
    warning names the column and quotes what was there.
    """
    p = parse_one(FinanceAdapter(), {**FINANCE_ROW, "统一社会信用代码": value})
    assert p.ok and p.submission is not None and p.credited_hours is not None
    assert p.submission.person.employer_uscc is None
    assert [(w.field, w.code) for w in p.warnings] == [("统一社会信用代码", "USCC_INVALID")]
    assert "统一社会信用代码" in p.warnings[0].message and p.warnings[0].message_zh


def test_full_width_and_spaced_values(partner: Partner) -> None:
    full = ID_NUMBER.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    row = {**partner.row, partner.id_number_column: f" {full[:6]} {full[6:]}",
           "地区代码": "６３０１００", "学分": " ２ "}
    p = parse_one(partner.adapter(), row)
    assert p.ok and p.submission is not None
    assert p.submission.person.id_number == ID_NUMBER
    assert p.submission.person.region_code == "630100"
    assert p.credits == Decimal(2)


def test_excel_typed_cells(partner: Partner) -> None:
    """What openpyxl hands over: datetimes, ints, floats, serial numbers."""
    from datetime import datetime

    excel_date = datetime(2026, 3, 5)  # noqa: DTZ001 - openpyxl's date cells are naive
    row = {**partner.row, "完成日期": excel_date, "学分": 2.0, "地区代码": 630100}
    p = parse_one(partner.adapter(), row)
    assert p.ok and p.submission is not None
    assert p.submission.activity.completed_on == date(2026, 3, 5)
    serial = parse_one(partner.adapter(), {**partner.row, "完成日期": 46086})
    assert serial.submission is not None
    assert serial.submission.activity.completed_on == date(2026, 3, 5)


def test_dates_with_a_time_and_yyyymmdd_numbers(partner: Partner) -> None:
    """SPEC §8 date forms as they arrive: a time after a Chinese date, NDJSON's 20260305."""
    for value in ("2026年3月5日 08:30", "2026-03-05 08:30:00", 20260305):
        p = parse_one(partner.adapter(), {**partner.row, "完成日期": value})
        assert p.ok and p.submission is not None, (value, answer(p))
        assert p.submission.activity.completed_on == date(2026, 3, 5)


# -- dedup stability --------------------------------------------------------------------------


def test_parsing_twice_gives_equal_submissions_and_keys(partner: Partner) -> None:
    adapter = partner.adapter()
    a = parse_one(adapter, (2, dict(partner.row)))
    b = parse_one(partner.adapter(), (9, dict(partner.row)))
    assert a.submission is not None and a.submission == b.submission
    assert b.submission is not None
    assert dedup.content_hash(a.submission) == dedup.content_hash(b.submission)
    assert dedup.natural_key(a.submission, KEYS) == dedup.natural_key(b.submission, KEYS)
    # spelling the same facts differently (date form, full width) changes nothing
    respelled = {**partner.row, "完成日期": "2026-03-05", "学分": "２" + str(partner.row["学分"])[1:]}
    c = parse_one(adapter, respelled)
    assert c.submission == a.submission


def test_generated_rows_never_share_a_natural_key(partner: Partner) -> None:
    adapter = partner.adapter()
    keys = set()
    for row in partner.rows(3, 3000, 2026, 2):
        p = parse_one(adapter, row)
        assert p.ok and p.submission is not None, answer(p)
        keys.add(dedup.natural_key(p.submission, KEYS))
    assert len(keys) == 3000


# -- malformed rows ---------------------------------------------------------------------------


def _without(row: dict[str, object], column: str) -> dict[str, object]:
    return {k: v for k, v in row.items() if k != column}


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("missing id column", lambda p, r: _without(r, p.id_number_column),
         lambda p: [(p.id_number_column, "SCHEMA")]),
        ("missing record id column", lambda p, r: _without(r, p.id_column),
         lambda p: [(p.id_column, "SCHEMA")]),
        ("missing completion date column", lambda p, r: _without(r, "完成日期"),
         lambda p: [("完成日期", "SCHEMA")]),
        ("empty name", lambda p, r: {**r, "姓名": "  "}, lambda p: [("姓名", "SCHEMA")]),
        ("bad id check digit",
         lambda p, r: {**r, p.id_number_column: corrupt_check_digit(ID_NUMBER)},
         lambda p: [(p.id_number_column, "ID_NUMBER_INVALID")]),
        ("id too short", lambda p, r: {**r, p.id_number_column: "63010219870413"},
         lambda p: [(p.id_number_column, "ID_NUMBER_INVALID")]),
        ("impossible date", lambda p, r: {**r, "完成日期": "2026-02-30"},
         lambda p: [("完成日期", "SCHEMA")]),
        ("junk date", lambda p, r: {**r, "完成日期": "下月补报"}, lambda p: [("完成日期", "SCHEMA")]),
        ("non-numeric credits", lambda p, r: {**r, "学分": "两学分"}, lambda p: [("学分", "SCHEMA")]),
        ("negative credits", lambda p, r: {**r, "学分": "-2"}, lambda p: [("学分", "SCHEMA")]),
        ("too many decimals", lambda p, r: {**r, "学分": "1.255"}, lambda p: [("学分", "SCHEMA")]),
        ("credits as a list", lambda p, r: {**r, "学分": [1, 2]}, lambda p: [("学分", "SCHEMA")]),
        ("unknown region", lambda p, r: {**r, "地区代码": "639999"},
         lambda p: [("地区代码", "REGION_UNKNOWN")]),
        ("region not 6 digits", lambda p, r: {**r, "地区代码": "6301"},
         lambda p: [("地区代码", "SCHEMA")]),
        ("record id too long", lambda p, r: {**r, p.id_column: "X" * 65},
         lambda p: [(p.id_column, "SCHEMA")]),
        ("several faults at once",
         lambda p, r: {**_without(r, "姓名"), p.id_number_column: corrupt_check_digit(ID_NUMBER),
                       "完成日期": "2026-13-01"},
         lambda p: [("完成日期", "SCHEMA"), ("姓名", "SCHEMA"),
                    (p.id_number_column, "ID_NUMBER_INVALID")]),
    ],
)
def test_malformed_rows_are_coded_row_errors(partner: Partner, name: str,
                                             change: Callable[..., dict[str, object]],
                                             expected: Callable[[Partner], list[Any]]) -> None:
    p = parse_one(partner.adapter(), (5, change(partner, dict(partner.row))))
    assert p.row == 5
    assert sorted(answer(p), key=str) == sorted(expected(partner), key=str), name
    assert not p.ok and p.credited_hours is None and p.rule_notes == []
    for e in p.errors:
        assert e.code in CATALOGUE and e.message and e.message_zh
        assert ID_NUMBER not in e.message and ID_NUMBER not in (e.message_zh or "")


@pytest.mark.parametrize(
    ("column", "value"),
    [("学分类别", "Ⅲ类"), ("学分类别", ""), ("开始日期", "N/A"), ("项目名称", "")],
)
def test_health_specific_faults(column: str, value: str) -> None:
    p = parse_one(HealthAdapter(), {**HEALTH_ROW, column: value})
    assert answer(p) == [(column, "SCHEMA")]


@pytest.mark.parametrize(
    ("column", "value"),
    [("学习方式", "函授"), ("科目类别", "继续科目"), ("课程名称", "")],
)
def test_finance_specific_faults(column: str, value: str) -> None:
    p = parse_one(FinanceAdapter(), {**FINANCE_ROW, column: value})
    assert answer(p) == [(column, "SCHEMA")]


@pytest.mark.parametrize("value", ["2.02603E+16", "２.０２６０３Ｅ＋１６", 2.0260301000000124e16,
                                   1234567890123450.0])
def test_record_number_excel_rounded_is_refused(partner: Partner, value: object) -> None:
    """Rows whose long record numbers Excel rounded alike would merge into one record."""
    p = parse_one(partner.adapter(), {**partner.row, partner.id_column: value})
    assert answer(p) == [(partner.id_column, "SCHEMA")] and p.submission is None
    assert "format the column as text" in p.errors[0].message and p.errors[0].message_zh


def test_record_number_from_an_exact_number_cell_is_kept(partner: Partner) -> None:
    p = parse_one(partner.adapter(), {**partner.row, partner.id_column: 202603010000123.0})
    assert p.ok and p.submission is not None
    assert p.submission.source_record_id == "202603010000123"


@pytest.mark.parametrize("value", ["2.5学分", " 2.5 学分 ", "2.5分", "２.５学分"])
def test_credits_may_carry_the_columns_unit(partner: Partner, value: str) -> None:
    p = parse_one(partner.adapter(), {**partner.row, "学分": value})
    assert p.ok and p.credits == Decimal("2.5")


@pytest.mark.parametrize("value", ["学分", "2.5学时", "2.5学分学分", "2.5小时"])
def test_credits_with_another_or_a_doubled_unit_are_refused(partner: Partner, value: str) -> None:
    p = parse_one(partner.adapter(), {**partner.row, "学分": value})
    assert answer(p) == [("学分", "SCHEMA")]


def test_start_after_completion_names_the_start_column() -> None:
    p = parse_one(HealthAdapter(), {**HEALTH_ROW, "开始日期": "2026-03-09"})
    assert answer(p) == [("开始日期", "SCHEMA")]
    assert p.submission is not None  # validation errors keep the submission, as validate does


def test_optional_columns_may_be_missing_or_empty() -> None:
    row = {k: v for k, v in HEALTH_ROW.items() if k not in ("工作单位", "项目编号", "开始日期")}
    p = parse_one(HealthAdapter(), {**row, "证书编号": ""})
    assert p.ok and p.submission is not None
    assert p.submission.activity.plan_id is None and p.submission.evidence.certificate_no is None


@pytest.mark.parametrize(
    "raw",
    ["junk", None, 42, [1, 2], (1, 2, 3), ("2", {}), (True, {}), b"\xff", {1: "x"},
     (3, {ROW_ERROR: "row 3: bytes that are not valid gb18030"}), {}],
)
def test_junk_input_is_a_row_error(partner: Partner, raw: object) -> None:
    p = parse_one(partner.adapter(), raw)
    assert p.errors and all(e.code == "SCHEMA" for e in p.errors)
    assert p.submission is None


def test_reader_row_error_keeps_its_row_number(partner: Partner) -> None:
    p = parse_one(partner.adapter(), (3, {ROW_ERROR: "row 3: bytes that are not valid gb18030"}))
    assert p.row == 3 and answer(p) == [(None, "SCHEMA")]
    assert "not valid gb18030" in p.errors[0].message


_cell = st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.none(), st.booleans(),
                  st.decimals(), st.dates(), st.lists(st.integers(), max_size=2),
                  st.sampled_from(["2026-03-05", "Ⅰ类", "面授", "专业科目", "630100", ID_NUMBER,
                                   "２.５", "20260230", "", " "]))
_columns = st.sampled_from(sorted({*HEALTH_HEADERS, *FINANCE_HEADERS}))


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(
    st.dictionaries(st.one_of(_columns, st.text(max_size=8)), _cell, max_size=14),
    st.builds(lambda row, cells: (row, cells), st.integers(), st.dictionaries(_columns, _cell)),
    st.fixed_dictionaries({}, optional={k: _cell for k in HEALTH_HEADERS}).map(
        lambda d: {**HEALTH_ROW, **d}),
    st.fixed_dictionaries({}, optional={k: _cell for k in FINANCE_HEADERS}).map(
        lambda d: {**FINANCE_ROW, **d}),
    _cell,
))
def test_parse_never_raises(raw: object) -> None:
    for adapter in (HealthAdapter(), FinanceAdapter()):
        p = parse_one(adapter, raw)
        assert all(e.code in CATALOGUE for e in [*p.errors, *p.warnings])
        if p.ok:
            assert isinstance(p.submission, CESubmission)
            assert p.credited_hours is not None and p.credited_hours >= 0
            assert p.rule_notes and p.rule_notes[0].code == "CREDIT_CONVERSION"
        else:
            assert p.errors


# -- golden files -----------------------------------------------------------------------------

OK = "ok"
HEALTH_GOLDEN: list[tuple[int, str | list[tuple[str | None, str]]]] = [
    (2, [("姓名", "SCHEMA")]),
    (3, "14.4"),  # ４ credits (full-width) × 3.6
    (4, "7.2"),
    (5, [("身份证号", "ID_NUMBER_INVALID")]),
    (6, [("完成日期", "SCHEMA")]),  # 2026-02-30
    # row 7 is blank: skipped
    (8, "28.8"),
    (9, "7.2"),
    (10, [("学分类别", "SCHEMA")]),  # Ⅲ类
    (11, "3.6"),
    (12, [("开始日期", "SCHEMA")]),  # N/A
    (13, "5.4"),
    (14, [("项目名称", "SCHEMA")]),
    (15, [("学分", "SCHEMA")]),  # 两学分
]
FINANCE_GOLDEN: list[tuple[int, str | list[tuple[str | None, str]]]] = [
    (2, [("课程名称", "SCHEMA")]),
    (3, [("学习方式", "SCHEMA")]),  # 函授
    (4, "4.0"),
    (5, "6.0"),
    (6, "4.0"),
    (7, [("姓名", "SCHEMA")]),
    (8, [("完成日期", "SCHEMA")]),
    (9, "12.0"),
    (10, [("科目类别", "SCHEMA")]),  # 继续科目
    (11, "8.0"),  # ６３０２００ region in full width
]


def _answers(path: Path, adapter: Adapter) -> list[tuple[int | None, object]]:
    out: list[tuple[int | None, object]] = []
    for p in parse_file(adapter, path):
        out.append((p.row, str(p.credited_hours) if p.ok else answer(p)))
    return out


@pytest.mark.parametrize("path", [make_golden.HEALTH_CSV, make_golden.HEALTH_XLSX])
def test_health_golden_files(path: Path) -> None:
    assert _answers(path, HealthAdapter()) == HEALTH_GOLDEN


def test_health_golden_csv_and_xlsx_give_the_same_submissions() -> None:
    from_csv = [p.submission for p in parse_file(HealthAdapter(), make_golden.HEALTH_CSV)]
    from_xlsx = [p.submission for p in parse_file(HealthAdapter(), make_golden.HEALTH_XLSX)]
    assert from_csv == from_xlsx
    assert sum(s is not None for s in from_csv) == 7  # 6 accepted + 1 with an id error


def test_health_golden_file_without_a_required_column() -> None:
    assert _answers(make_golden.HEALTH_MISSING_COLUMN, HealthAdapter()) == [
        (2, [("学分类别", "SCHEMA")]), (3, [("学分类别", "SCHEMA")]), (4, [("学分类别", "SCHEMA")])]


def test_finance_golden_files() -> None:
    assert _answers(make_golden.FINANCE_CSV, FinanceAdapter()) == FINANCE_GOLDEN
    # NDJSON: row number = line; the first four rows, a blank line, then two broken lines
    ndjson = [(row - 1, result) for row, result in FINANCE_GOLDEN[:4]] + [
        (6, [(None, "SCHEMA")]), (7, [(None, "SCHEMA")])]
    assert _answers(make_golden.FINANCE_NDJSON, FinanceAdapter()) == ndjson


def test_golden_files_match_the_generators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed CSV and NDJSON files are what the generators make today, byte for byte."""
    for name in ("HEALTH_CSV", "HEALTH_XLSX", "HEALTH_MISSING_COLUMN", "FINANCE_CSV",
                 "FINANCE_NDJSON"):
        monkeypatch.setattr(make_golden, name, tmp_path / getattr(make_golden, name).name)
    make_golden.write_all()
    for name in ("HEALTH_CSV", "HEALTH_MISSING_COLUMN", "FINANCE_CSV", "FINANCE_NDJSON"):
        fresh: Path = getattr(make_golden, name)
        committed = Path(make_golden.__file__).parent / fresh.name
        assert fresh.read_bytes() == committed.read_bytes(), f"rerun make_golden for {fresh.name}"
    assert list(iter_rows(make_golden.HEALTH_XLSX)) == list(
        iter_rows(Path(make_golden.__file__).parent / make_golden.HEALTH_XLSX.name))


def test_generated_bad_rows_give_the_promised_answer(partner: Partner) -> None:
    adapter = partner.adapter()
    bad = 0
    for row in partner.rows(8, 800, 2026, 6, bad_ratio=0.3):
        p = parse_one(adapter, row)
        if BAD_KEY in row:
            bad += 1
            assert answer(p) == [row[BAD_KEY]]
        else:
            assert p.ok, answer(p)
    assert 150 < bad < 330


# -- a year of pushes -------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_name", ["health", "finance"])
def test_year_dataset_manifest(adapter_name: str) -> None:
    monthly, annual, manifest = year_dataset(17, 2026, people=120, per_month=30,
                                             adapter=adapter_name)  # type: ignore[arg-type]
    partner = PARTNERS[adapter_name]
    adapter = partner.adapter()
    id_col = manifest["id_column"]
    assert id_col == partner.id_column and len(monthly) == 12
    assert 1 <= len(manifest["empty_months"]) <= 2
    for m in range(1, 13):
        assert (monthly[m - 1] == []) == (m in manifest["empty_months"])

    def parsed(rows: list[dict[str, Any]]) -> dict[str, CESubmission]:
        out = {}
        for row in rows:
            p = parse_one(adapter, row)
            assert p.ok and p.submission is not None, answer(p)
            out[p.submission.source_record_id] = p.submission
        return out

    months = parsed([row for rows in monthly for row in rows])
    year = parsed(annual)
    assert len(year) == len(annual) == manifest["annual_count"]
    unchanged, changed = set(manifest["unchanged"]), set(manifest["changed"])
    missing, added, conflict = set(manifest["missing"]), set(manifest["added"]), set(
        manifest["conflict"])
    assert changed and missing and added and conflict
    assert unchanged | changed | missing == set(months)  # every pushed row has one fate
    assert not (unchanged & changed or unchanged & missing or changed & missing)
    assert set(year) == unchanged | changed | added | conflict
    assert not (set(months) & (added | conflict))
    for rid in unchanged:
        assert year[rid] == months[rid]
    for rid in changed:
        assert year[rid].claimed.quantity != months[rid].claimed.quantity
        assert dedup.natural_key(year[rid], KEYS) == dedup.natural_key(months[rid], KEYS)
    for new, original in manifest["conflict_with"].items():
        assert original in unchanged
        assert dedup.natural_key(year[new], KEYS) == dedup.natural_key(months[original], KEYS)
        assert year[new].claimed.quantity != months[original].claimed.quantity
    # apart from the planned conflicts, no two rows of the year share a natural key
    keys = [dedup.natural_key(s, KEYS) for rid, s in year.items() if rid not in conflict]
    assert len(keys) == len(set(keys))
    empty_month_rows = [s for rid, s in year.items() if s.activity.completed_on.month in
                        manifest["empty_months"]]
    assert empty_month_rows and all(s.source_record_id in added for s in empty_month_rows)
    assert year_dataset(17, 2026, people=120, per_month=30, adapter=adapter_name) == (  # type: ignore[arg-type]
        monthly, annual, manifest)
