"""Cell normalization: every date form of SPEC §8, full-width text, Excel values, bad values."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.normalize import (
    cell_text,
    mangled_number,
    parse_date,
    parse_decimal,
    to_ascii_digits,
)

MARCH_5 = date(2026, 3, 5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("６３０１０２", "630102"),
        ("\u3000ＡＢ１２\u3000", "AB12"),
        ("  630102 ", "630102"),
        ("Ⅱ类", "II类"),
        ("西宁市", "西宁市"),
        ("", ""),
    ],
)
def test_to_ascii_digits(raw: str, expected: str) -> None:
    assert to_ascii_digits(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "2026-03-05", "2026-3-5", "2026/3/5", "2026/03/05", "2026.3.5", "20260305",
        "2026年3月5日", "2026年03月05日", "2026年3月5", "2026 年 3 月 5 日",
        " 2026-03-05 ", "2026-03-05 00:00:00", "2026-03-05T08:30", "2026/3/5 8:30",
        # a time after any form: the date part counts
        "2026年3月5日 08:30", "2026年3月5日08:30:00", "2026年3月5 08:30", "2026 年 3 月 5 日 8:30",
        "20260305 08:30", "２０２６年３月５日\u3000０８：３０",
        # full-width variants
        "２０２６－０３－０５", "２０２６／３／５", "２０２６．３．５", "２０２６０３０５",
        "２０２６年３月５日", "\u30002026年3月5日\u3000",
    ],
)
def test_parse_date_text_forms(raw: str) -> None:
    assert parse_date(raw) == MARCH_5


def test_parse_date_excel_cells_and_serials() -> None:
    assert parse_date(MARCH_5) == MARCH_5
    assert parse_date(datetime(2026, 3, 5, 0, 0)) == MARCH_5  # noqa: DTZ001 - openpyxl's are naive
    assert parse_date(46086) == MARCH_5
    assert parse_date(46086.75) == MARCH_5  # the fraction is the time of day
    assert parse_date(1) == date(1900, 1, 1)
    assert parse_date(59) == date(1900, 2, 28)
    assert parse_date(61) == date(1900, 3, 1)  # after Lotus's phantom 1900-02-29
    assert parse_date(45658) == date(2025, 1, 1)
    assert parse_date(2958465) == date(9999, 12, 31)


def test_parse_date_eight_digit_numbers_are_yyyymmdd() -> None:
    # NDJSON's 20260305 is a date typed as a number, never a serial (those stop at 7 digits)
    assert parse_date(20260305) == MARCH_5
    assert parse_date(20260305.0) == MARCH_5
    assert parse_date(10000101) == date(1000, 1, 1)
    assert parse_date(99991231) == date(9999, 12, 31)
    with pytest.raises(ValueError, match="no such date: 20261301"):
        parse_date(20261301)
    with pytest.raises(ValueError, match="not a date"):
        parse_date(20260305.5)


@pytest.mark.parametrize(
    "raw",
    [
        "2026-02-30", "2026/2/29", "20261301", "2026年13月1日", "2026-00-10",  # no such day
        "2026-03/05",  # mixed separators
        "", "   ", "下月补报", "N/A", "2026-03", "26-3-5", "46086", "3/5/2026",
        "2026-03-05 25", "2026-03-05x",
        "2026年3月508:30",  # day 50 at 8:30, or day 5 at 08:30? neither
        "2026年3月5日 25", "2026年3月5日 日",
        0, -1, 60, 2958466, float("nan"), float("inf"), True, None, [2026, 3, 5], {"y": 2026},
        Decimal("46086"),
    ],
)
def test_parse_date_refuses(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_date(raw)


def test_parse_date_message_names_the_forms() -> None:
    with pytest.raises(ValueError, match="2026年3月5日"):
        parse_date("下月补报")
    with pytest.raises(ValueError, match="no such date"):
        parse_date("2026-02-30")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2", Decimal("2")),
        ("2.50", Decimal("2.50")),
        (" 1.5 ", Decimal("1.5")),
        ("２．５", Decimal("2.5")),
        ("１０", Decimal("10")),
        ("1,234.5", Decimal("1234.5")),
        ("1，234", Decimal("1234")),  # full-width comma
        ("1 234", Decimal("1234")),
        (".5", Decimal("0.5")),
        ("-3", Decimal("-3")),
        (3, Decimal(3)),
        (2.5, Decimal("2.5")),
        (3.0, Decimal("3")),
        (0.1 + 0.2, Decimal("0.3")),  # Excel float noise rounded away
        (1.0000000001, Decimal("1")),
        (Decimal("1.25"), Decimal("1.25")),
        # a zero has no sign (a "-0" passed "not negative" and became "-0.0" hours)
        ("-0", Decimal("0")),
        ("-0.0", Decimal("0.0")),
        ("－０．００", Decimal("0.00")),
        ("-0,000.0", Decimal("0.0")),
        (Decimal("-0.0"), Decimal("0.0")),
        (-0.0, Decimal("0")),
        (-1e-9, Decimal("0")),  # Excel noise rounded away
    ],
)
def test_parse_decimal(raw: object, expected: Decimal) -> None:
    got = parse_decimal(raw)
    assert got == expected
    assert str(got) == str(expected)  # no exponent forms, the text's own precision kept


@pytest.mark.parametrize(
    "raw",
    ["", " ", "abc", "两学分", "1,5", "1,23", "1e3", "NaN", "inf", "1.2.3", "--1", "1-",
     float("nan"), float("inf"), Decimal("NaN"), Decimal("Infinity"), True, None, [1], {"a": 1}],
)
def test_parse_decimal_refuses(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_decimal(raw)


def test_cell_text() -> None:
    assert cell_text(None) == ""
    assert cell_text("  王伟 ") == "王伟"
    assert cell_text(630102) == "630102"
    assert cell_text(630102.0) == "630102"  # a region code typed as a number in Excel
    assert cell_text(Decimal("1.5")) == "1.5"
    assert cell_text(MARCH_5) == "2026-03-05"
    for bad in (True, [1], {"a": 1}, float("nan"), "a\x00b", "王\udcff"):
        with pytest.raises(ValueError):
            cell_text(bad)


@pytest.mark.parametrize(
    ("value", "text"),
    [("2.02603E+16", "2.02603E+16"), ("2.02603e+16", "2.02603e+16"), ("2E+16", "2E+16"),
     ("1.23457E-05", "1.23457E-05"), (2.0260301000000124e16, "2.0260301000000124e+16"),
     (1234567890123450.0, "1234567890123450"), (-1e15, "-1000000000000000")],
)
def test_mangled_number_refuses_what_excel_rounded(value: object, text: str) -> None:
    reason = mangled_number(value, text)
    assert reason is not None
    assert "as text" in reason[0] and "文本格式" in reason[1]


@pytest.mark.parametrize(
    ("value", "text"),
    [("KJ-2026-000456", "KJ-2026-000456"), ("2026E01", "2026E01"), ("WJE+1", "WJE+1"),
     (20261127000000000001, "20261127000000000001"), (999999999999999.0, "999999999999999"),
     ("20260301000000123", "20260301000000123"), (12.5, "12.5")],
)
def test_mangled_number_keeps_exact_ids(value: object, text: str) -> None:
    assert mangled_number(value, text) is None


@given(st.one_of(st.text(), st.integers(), st.floats(), st.decimals(), st.none(), st.booleans(),
                 st.dates(), st.lists(st.integers(), max_size=2)))
def test_parsers_raise_only_value_error(value: object) -> None:
    for parse in (parse_date, parse_decimal, cell_text):
        try:
            parse(value)
        except ValueError:
            pass
