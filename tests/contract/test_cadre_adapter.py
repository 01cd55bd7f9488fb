"""Contract tests of the ``cadre_college`` adapter: page items → canonical submissions.

Golden items parse to valid public-subject online courses, the dedup keys are stable, and a
malformed item yields coded ``SCHEMA`` notes naming the college's own key — never an exception.
"""

from __future__ import annotations

import random
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.base import ParsedRow
from adapters.cadre_college import PROVIDER_CODE, REQUIRED_KEYS, CadreCollegeAdapter
from contracts import ActivityType, Assessment, Category, Mode, Unit
from gateway.pipeline import dedup
from mock_partners.cadre_college import CollegeState, Faults
from mock_partners.generators import corrupt_check_digit, make_id_number
from tests.support.keys import KEYS

ID_NUMBER = make_id_number(random.Random(42), "630102", date(1987, 4, 13))


def golden(**changes: Any) -> dict[str, Any]:
    item = {"xh": "GB2026000000123", "sfzh": ID_NUMBER, "xm": "才让卓玛",
            "dwmc": "青海省农林科学院", "dqdm": "630100", "kcbh": "KC004",
            "kcmc": "生态文明建设与三江源保护", "xs": "4", "wcsj": "2026-05-13 14:22:05",
            "zsbh": "QHGBWY202600000123"}
    item.update(changes)
    return item


def parse(item: Any) -> ParsedRow:
    rows = list(CadreCollegeAdapter().parse(item))
    assert len(rows) == 1
    return rows[0]


def test_golden_item_is_a_public_online_course() -> None:
    row = parse(golden())
    assert row.ok, row.errors
    sub = row.submission
    assert sub is not None
    assert sub.source_record_id == "GB2026000000123"
    assert sub.person.id_number == ID_NUMBER and sub.person.name == "才让卓玛"
    assert sub.person.employer_name == "青海省农林科学院" and sub.person.region_code == "630100"
    assert (sub.category, sub.activity_type) == (Category.PUBLIC, ActivityType.ONLINE_COURSE)
    assert sub.activity.mode is Mode.ONLINE
    assert (sub.activity.provider_code, sub.activity.plan_id) == (PROVIDER_CODE, "KC004")
    assert sub.activity.title == "生态文明建设与三江源保护"
    assert sub.activity.completed_on == date(2026, 5, 13) and sub.year == 2026
    assert (sub.claimed.quantity, sub.claimed.unit) == (Decimal(4), Unit.HOURS)
    assert sub.evidence.certificate_no == "QHGBWY202600000123"
    assert sub.evidence.assessment is Assessment.PASSED


@pytest.mark.parametrize(("wcsj", "day"), [
    # Beijing time as sent: just after midnight stays on its own day (UTC would say 4 March).
    ("2026-03-05 00:05:00", date(2026, 3, 5)),
    ("2026-03-05 23:59:59", date(2026, 3, 5)),
    ("2026-03-05T00:00:01", date(2026, 3, 5)),
    # An explicit offset is converted to Beijing: 16:30 UTC on the 4th is 00:30 on the 5th.
    ("2026-03-04T16:30:00+00:00", date(2026, 3, 5)),
    ("2027-01-01 00:00:30", date(2027, 1, 1)),
])
def test_completion_day_is_the_beijing_calendar_day(wcsj: str, day: date) -> None:
    sub = parse(golden(wcsj=wcsj)).submission
    assert sub is not None
    assert sub.activity.completed_on == day and sub.year == day.year


@pytest.mark.parametrize("xs", [2, "2", "2.0", 2.0, Decimal("2.00"), " 2 "])
def test_equal_hours_spelled_differently_hash_the_same(xs: object) -> None:
    sub, reference = parse(golden(xs=xs)).submission, parse(golden(xs=2)).submission
    assert sub is not None and reference is not None
    assert sub.claimed.quantity == Decimal(2)
    assert dedup.content_hash(sub) == dedup.content_hash(reference)


def test_fractional_hours() -> None:
    for xs, want in ((1.5, "1.5"), ("4.50", "4.5"), (Decimal("0.5"), "0.5")):
        sub = parse(golden(xs=xs)).submission
        assert sub is not None and str(sub.claimed.quantity) == want


def test_keys_are_stable_on_reparse_and_track_identity() -> None:
    first, again = parse(golden()).submission, parse(golden()).submission
    assert first is not None and again is not None
    assert dedup.content_hash(first) == dedup.content_hash(again)
    assert dedup.natural_key(first, KEYS) == dedup.natural_key(again, KEYS)
    for change in ({"kcbh": "KC005"}, {"wcsj": "2026-05-14 09:00:00"}, {"kcmc": "另一门课"}):
        other = parse(golden(**change)).submission
        assert other is not None and dedup.natural_key(other, KEYS) != dedup.natural_key(first, KEYS)
    # A new certificate number is a correction of the same activity, not a new one.
    corrected = parse(golden(zsbh="QHGBWY2026X")).submission
    assert corrected is not None
    assert dedup.natural_key(corrected, KEYS) == dedup.natural_key(first, KEYS)
    assert dedup.content_hash(corrected) != dedup.content_hash(first)


def test_optional_keys_and_unknown_extras() -> None:
    item = golden(extra_field="ignored", kssj="2026-05-01 08:00:00")
    del item["dwmc"], item["zsbh"]
    row = parse(item)
    assert row.ok, row.errors
    assert row.submission is not None
    assert row.submission.person.employer_name is None
    assert row.submission.evidence.certificate_no is None


def test_ids_sent_as_numbers_are_read() -> None:
    row = parse(golden(xh=123456, kcbh=4))
    assert row.ok, row.errors
    assert row.submission is not None
    assert row.submission.source_record_id == "123456" and row.submission.activity.plan_id == "4"


def _codes(row: ParsedRow) -> list[tuple[str, str | None]]:
    return [(e.code, e.field) for e in row.errors]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
@pytest.mark.parametrize("how", ["absent", "null", "blank"])
def test_missing_required_key_is_schema_naming_it(key: str, how: str) -> None:
    item = golden()
    if how == "absent":
        del item[key]
    else:
        item[key] = None if how == "null" else "  "
    row = parse(item)
    assert row.submission is None
    assert _codes(row) == [("SCHEMA", key)]
    assert key in row.errors[0].message and key in (row.errors[0].message_zh or "")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"xs": "两小时"}, [("SCHEMA", "xs")]),
    ({"xs": "NaN"}, [("SCHEMA", "xs")]),
    ({"xs": float("inf")}, [("SCHEMA", "xs")]),
    ({"xs": True}, [("SCHEMA", "xs")]),
    ({"xs": [4]}, [("SCHEMA", "xs")]),
    ({"xs": "-1"}, [("SCHEMA", "xs")]),
    ({"xs": "1E+400"}, [("SCHEMA", "xs")]),
    ({"wcsj": "2026/05/13"}, [("SCHEMA", "wcsj")]),
    ({"wcsj": "2026-02-30 10:00:00"}, [("SCHEMA", "wcsj")]),
    ({"wcsj": "yesterday"}, [("SCHEMA", "wcsj")]),
    ({"wcsj": 20260513}, [("SCHEMA", "wcsj")]),
    ({"sfzh": ["630102"]}, [("SCHEMA", "sfzh")]),
    ({"xm": {"name": "x"}}, [("SCHEMA", "xm")]),
    ({"xh": False}, [("SCHEMA", "xh")]),
    ({"dwmc": 3.5}, [("SCHEMA", "dwmc")]),
    ({"xs": "x", "wcsj": "x", "dqdm": []}, [("SCHEMA", "dqdm"), ("SCHEMA", "xs"), ("SCHEMA", "wcsj")]),
    ({"sfzh": corrupt_check_digit(ID_NUMBER)}, [("ID_NUMBER_INVALID", "sfzh")]),
    ({"dqdm": "990000"}, [("REGION_UNKNOWN", "dqdm")]),
    ({"dqdm": "6301"}, [("SCHEMA", "dqdm")]),
    ({"xh": "X" * 65}, [("SCHEMA", "xh")]),
    ({"kcmc": "课" * 201}, [("SCHEMA", "kcmc")]),
])
def test_malformed_values_are_coded_errors(changes: dict[str, Any],
                                           expected: list[tuple[str, str]]) -> None:
    row = parse(golden(**changes))
    assert not row.ok
    assert _codes(row) == expected
    assert all(e.message and e.message_zh for e in row.errors)


@pytest.mark.parametrize("item", [None, 7, "xh", [golden()], True])
def test_a_non_object_item_is_schema(item: object) -> None:
    row = parse(item)
    assert row.submission is None and _codes(row) == [("SCHEMA", "data")]
    assert row.raw == item


def test_identity_numbers_never_appear_in_notes() -> None:
    row = parse(golden(sfzh=corrupt_check_digit(ID_NUMBER)))
    assert row.errors
    for note in row.errors:
        assert corrupt_check_digit(ID_NUMBER) not in note.model_dump_json()


def test_every_mock_completion_parses_and_keys_are_distinct() -> None:
    state = CollegeState(seed=11, initial=0, growth_per_call=0, faults=Faults(), year=2026,
                         today=date(2026, 11, 1))
    subs = []
    for seq in range(1, 401):
        row = parse(state.completion(seq))
        assert row.ok, (seq, row.errors)
        assert row.submission is not None
        subs.append(row.submission)
        assert state.completion(seq) == state.completion(seq)  # deterministic
    assert len({dedup.natural_key(s, KEYS) for s in subs}) == len(subs)
    assert all(date(2026, 1, 1) <= s.activity.completed_on <= date(2026, 11, 1) for s in subs)
    assert {s.claimed.quantity for s in subs} <= {Decimal(h) for h in range(1, 7)}


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.decimals(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_VALUES = {
    "xh": st.text(max_size=70) | st.integers(),
    "sfzh": st.just(ID_NUMBER) | st.text(max_size=20),
    "wcsj": st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S")) | st.text(max_size=25),
    "xs": st.decimals(allow_nan=True, allow_infinity=True) | st.floats() | st.text(max_size=8),
}


@st.composite
def _items(draw: st.DrawFn) -> dict[str, Any]:
    item = golden()
    for key in draw(st.lists(st.sampled_from(sorted(item)), unique=True, max_size=4)):
        if draw(st.booleans()):
            del item[key]
        else:
            item[key] = draw(_VALUES.get(key, _JSONISH) | _JSONISH)
    return item


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_items() | _JSONISH)
def test_parse_never_raises(item: Any) -> None:
    row = parse(item)
    assert row.ok or row.errors
    assert all(e.code for e in row.errors)
    if row.errors and row.submission is None:
        assert any(e.code == "SCHEMA" for e in row.errors)
