"""Resident ids, credit codes and region codes (SPEC §3 ``person``)."""

from __future__ import annotations

from datetime import date

import pytest
from stdnum.cn import ric, uscc

from gateway.pipeline.identity import (
    QINGHAI_PREFECTURES,
    check_resident_id,
    check_uscc,
    region_known,
    resident_id_findings,
)

TODAY = date(2026, 6, 1)


def with_check_digit(first17: str) -> str:
    """The full id, check digit computed by stdnum (it expects a placeholder last char)."""
    return first17 + ric.calc_check_digit(first17 + "0")


def test_valid_id_computed_with_stdnum() -> None:
    number = with_check_digit("63012119900101003")  # 大通回族土族自治县
    assert check_resident_id(number, today=TODAY) == ([], [])


def test_spec_example_is_valid() -> None:
    # SPEC §3's example; GB 11643 gives check digit 6, so it is a real-looking number.
    assert with_check_digit("63010219870413912") == "630102198704139126"
    assert check_resident_id("630102198704139126", today=TODAY) == ([], [])


def test_lowercase_x_is_accepted() -> None:
    number = with_check_digit("63212319870413912")
    assert number.endswith("X")  # chosen so the check digit is X
    upper_result = check_resident_id(number, today=TODAY)
    assert check_resident_id(number.lower(), today=TODAY) == upper_result
    assert upper_result[0] == []


@pytest.mark.parametrize("prefix", ["632123", "632121", "632101"])
def test_haidong_pre_2013_prefix_is_only_a_warning(prefix: str) -> None:
    # 632123 乐都县 and 632121 平安县 were abolished in 2013 (now 630202, 630203); stdnum
    # knows them for their period, 632101 it does not know at all.
    number = with_check_digit(prefix + "19870413912")
    assert check_resident_id(number, today=TODAY) == ([], ["ID_REGION_UNKNOWN"])


def test_current_haidong_district_needs_no_warning() -> None:
    # 630203 平安区: a person born in 1987 may hold an id issued under today's code.
    number = with_check_digit("63020319870413912")
    assert check_resident_id(number, today=TODAY) == ([], [])


def test_bad_check_digit() -> None:
    good = "630102198704139126"
    bad = good[:-1] + ("7" if good[-1] != "7" else "8")
    assert check_resident_id(bad, today=TODAY) == (["ID_NUMBER_INVALID"], [])


def test_impossible_birth_date_19870231() -> None:
    number = with_check_digit("63010219870231912")
    errors, warnings = check_resident_id(number, today=TODAY)
    assert errors == ["ID_NUMBER_INVALID"]
    assert warnings == []
    (finding,) = resident_id_findings(number, today=TODAY)
    assert "birth date" in finding.detail


def test_birth_date_in_the_future() -> None:
    number = with_check_digit("63010220270101912")
    assert check_resident_id(number, today=TODAY) == (["ID_NUMBER_INVALID"], [])
    assert check_resident_id(number, today=date(2027, 1, 1)) == ([], [])


@pytest.mark.parametrize(
    "number",
    ["", "63010219870413912", "6301021987041391260", "63010219870413912A", "6301O2198704139126"],
)
def test_malformed_ids(number: str) -> None:
    assert check_resident_id(number, today=TODAY) == (["ID_NUMBER_INVALID"], [])


def test_findings_never_show_the_full_number() -> None:
    bad = "630102198704139127"
    (finding,) = resident_id_findings(bad, today=TODAY)
    assert bad not in finding.detail and bad not in finding.detail_zh
    assert "630102********9127" in finding.detail


def test_uscc() -> None:
    first17 = "91630100MA752XYW1"
    valid = first17 + uscc.calc_check_digit(first17 + "0")
    assert check_uscc(valid) == []
    wrong = valid[:-1] + ("1" if valid[-1] != "1" else "2")
    assert check_uscc(wrong) == ["USCC_INVALID"]
    assert check_uscc("short") == ["USCC_INVALID"]


def test_prefectures() -> None:
    assert set(QINGHAI_PREFECTURES) == {
        "630100",
        "630200",
        "632200",
        "632300",
        "632500",
        "632600",
        "632700",
        "632800",
    }
    assert QINGHAI_PREFECTURES["630200"] == "海东市"
    assert QINGHAI_PREFECTURES["632800"] == "海西蒙古族藏族自治州"


@pytest.mark.parametrize(
    ("code", "known"),
    [
        ("630200", True),  # 海东市 — stdnum's data alone would judge it by birth year
        ("630203", True),  # 平安区, county under a prefecture
        ("632825", True),  # under 海西, missing from stdnum's data
        ("632123", True),  # abolished, but stdnum knows it
        ("110101", True),  # 北京 东城区: other provinces are fine
        ("632101", False),  # stdnum knows only the province
        ("999999", False),
        ("63020", False),
        ("63020a", False),
    ],
)
def test_region_known(code: str, known: bool) -> None:
    assert region_known(code) is known
