"""A training base's results, as a roster file writes them (SPEC §8 date and number forms)."""

from __future__ import annotations

import random
from datetime import date

from adapters.training_base import result_to_row
from mock_partners.generators import make_id_number

FULL_WIDTH = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")


def _result(**cells: object) -> dict[str, object]:
    base: dict[str, object] = {
        "result_id": "R-1", "id_no": make_id_number(random.Random(3), "630102"),
        "name": "张三", "employer": "青海省人民医院", "region": "630102", "hours": "24",
        "started_on": "2026-03-02", "completed_on": "2026-03-05", "passed": True}
    return {**base, **cells}


def test_roster_dates_numbers_and_full_width_codes_are_normalised() -> None:
    id_no = str(_result()["id_no"])
    for started, completed in (("2026/3/2", "2026/3/5"), ("20260302", "20260305"),
                               ("2026年3月2日", "2026年3月5日"), ("２０２６-０３-０２", "2026.3.5"),
                               (date(2026, 3, 2), "2026-03-05 17:30:00")):
        row = result_to_row(0, "JD-01", "PLAN-1", _result(
            started_on=started, completed_on=completed, hours="２ ４",
            id_no=id_no.translate(FULL_WIDTH), region="６３０１０２"))
        assert row.errors == [], (completed, row.errors)
        assert row.submission is not None
        sub = row.submission
        assert (sub.activity.started_on, sub.activity.completed_on) == (date(2026, 3, 2), date(2026, 3, 5))
        assert (sub.year, str(sub.claimed.quantity)) == (2026, "24")
        assert (sub.person.id_number, sub.person.region_code) == (id_no, "630102")


def test_an_unreadable_roster_date_is_a_coded_row_error() -> None:
    row = result_to_row(0, "JD-01", "PLAN-1", _result(completed_on="上周五"))
    assert row.submission is None
    assert {e.code for e in row.errors} == {"SCHEMA"}
    assert any("completed_on" in (e.field or "") for e in row.errors), row.errors


def test_passed_as_spreadsheets_and_people_write_it() -> None:
    """Excel and WPS write booleans to CSV as TRUE/FALSE; cells keep stray spaces."""
    for value, outcome in ((True, "passed"), ("TRUE", "passed"), (" true ", "passed"), ("Yes", "passed"),
                           (1, "passed"), (" 合格 ", "passed"), (False, "failed"), ("FALSE", "failed"),
                           ("No", "failed"), (0, "failed"), ("不合格", "failed")):
        row = result_to_row(0, "JD-01", "PLAN-1", _result(passed=value))
        assert row.errors == [] and row.submission is not None, (value, row.errors)
        assert row.submission.evidence.assessment == outcome, value
    for value in ("maybe", "", [True], {"v": 1}):
        row = result_to_row(0, "JD-01", "PLAN-1", _result(passed=value))
        assert [e.code for e in row.errors] == ["SCHEMA"] and row.errors[0].field == "passed", value


def test_a_result_id_excel_rounded_is_refused_naming_the_column() -> None:
    """Two trainees whose long ids Excel rounded alike would share one record."""
    for result_id in ("2.02603E+16", 2.0260301000000124e16):
        row = result_to_row(0, "JD-01", "PLAN-1", _result(result_id=result_id))
        assert row.submission is None
        assert [(e.field, e.code) for e in row.errors] == [("result_id", "SCHEMA")]
        assert "as text" in row.errors[0].message


def test_a_roster_row_the_reader_broke_answers_the_readers_reason() -> None:
    from adapters.tabular import ROW_ERROR, ROW_ERROR_ZH
    from adapters.training_base import TrainingBaseRosterAdapter

    cells: dict[str, object] = {ROW_ERROR: "row 4: not valid CSV (x)", ROW_ERROR_ZH: "第 4 行：不是有效的 CSV（x）"}
    [parsed] = TrainingBaseRosterAdapter().parse((4, cells))
    assert parsed.row == 4 and parsed.submission is None
    assert [(e.field, e.code) for e in parsed.errors] == [(None, "SCHEMA")]
    assert "not valid CSV" in parsed.errors[0].message
    assert "第 4 行：不是有效的 CSV" in (parsed.errors[0].message_zh or "")
