"""The first pipeline step: raw submission → CESubmission + coded notes (SPEC §3, §6)."""

from __future__ import annotations

import copy
import re
from datetime import date
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stdnum.cn import ric

from contracts.errors import CATALOGUE, message
from contracts.records import CESubmission, Note
from gateway.masking import mask_text
from gateway.pipeline.validate import Validated, validate_submission

TODAY = date(2026, 6, 1)
ID = "630102198704139126"

# SPEC §3's example, verbatim.
EXAMPLE: dict[str, Any] = {
    "source_record_id": "JD-2026-000123",
    "person": {
        "id_type": "resident_id",
        "id_number": ID,
        "name": "赵伟",
        "employer_name": "海东市平安区第一中学",
        "region_code": "630200",
    },
    "year": 2026,
    "category": "professional",
    "activity_type": "training",
    "activity": {
        "title": "高原生态修复技术研修班",
        "mode": "offline",
        "started_on": "2026-05-10",
        "completed_on": "2026-05-13",
    },
    "claimed": {"quantity": "24", "unit": "hours", "details": {}},
    "evidence": {"certificate_no": "QH2026000123", "assessment": "passed"},
}


def example(**changes: Any) -> dict[str, Any]:
    """The example with dotted-path changes, e.g. ``example(**{"person.region_code": "1"})``."""
    raw = copy.deepcopy(EXAMPLE)
    for path, value in changes.items():
        *parents, last = path.split(".")
        target = raw
        for key in parents:
            target = target[key] if isinstance(target, dict) else None
        if isinstance(target, dict):  # a parent replaced by a non-object takes no children
            target[last] = value
    return raw


def codes(notes: list[Note]) -> list[str]:
    return [n.code for n in notes]


def text_of(result: Validated) -> str:
    return " ".join(
        f"{n.field} {n.message} {n.message_zh}" for n in (*result.errors, *result.warnings)
    )


def test_spec_example_is_accepted() -> None:
    result = validate_submission(EXAMPLE, today=TODAY)
    assert result.errors == [] and result.warnings == []
    assert result.ok
    assert isinstance(result.submission, CESubmission)
    assert result.submission.person.region_code == "630200"
    assert str(result.submission.claimed.quantity) == "24"


def test_unknown_key_is_named() -> None:
    result = validate_submission(example(**{"person.nmae": "赵伟", "credited_hours": "24"}))
    assert result.submission is None
    assert codes(result.errors) == ["SCHEMA", "SCHEMA"]
    by_field = {n.field: n for n in result.errors}
    assert set(by_field) == {"person.nmae", "credited_hours"}
    assert "unknown field 'nmae'" in by_field["person.nmae"].message
    assert by_field["person.nmae"].message.startswith(message("SCHEMA")[0])
    assert by_field["person.nmae"].message_zh.startswith(message("SCHEMA")[1])  # type: ignore[union-attr]


def test_missing_and_mistyped_fields_give_dotted_paths() -> None:
    raw = example(**{"activity.completed_on": "not a date"})
    del raw["person"]["name"]
    result = validate_submission(raw)
    assert {n.field for n in result.errors} == {"person.name", "activity.completed_on"}
    assert all(n.code == "SCHEMA" for n in result.errors)


def test_non_object_gives_one_schema_note() -> None:
    for raw in ([EXAMPLE], "x", 3, None):
        result = validate_submission(raw)
        assert result.submission is None
        assert codes(result.errors) == ["SCHEMA"]


# English that pydantic writes; a Chinese message must not carry it (SPEC §6).
_ENGLISH = re.compile(r"Input should|should have|valid |unable to|[A-Za-z]{4,} [A-Za-z]{3,} [A-Za-z]{3,}")


@pytest.mark.parametrize("changes", [
    {"claimed.quantity": "-1"}, {"claimed.quantity": "abc"}, {"claimed.quantity": "1e10"},
    {"claimed.quantity": "1.234"}, {"claimed.quantity": "NaN"}, {"claimed.quantity": True},
    {"year": "abc"}, {"year": 2101}, {"year": 1.5}, {"activity.completed_on": "2026-02-30"},
    {"activity.completed_on": "garbage"}, {"activity.completed_on": "2026-02-03T10:00:00"},
    {"source_record_id": 5}, {"activity.title": 5}, {"person.name": ["x"]},
    {"claimed.details": []}, {"category": "bogus"}, {"activity.title": ""},
])
def test_every_schema_error_has_a_chinese_message(changes: dict[str, Any]) -> None:
    result = validate_submission(example(**changes), today=TODAY)
    assert codes(result.errors) == ["SCHEMA"]
    [error] = result.errors
    assert error.message_zh and not _ENGLISH.search(error.message_zh), error.message_zh
    assert error.field and error.field in error.message_zh  # still says where


def test_bad_id_is_masked() -> None:
    bad = ID[:-1] + "7"
    result = validate_submission(example(**{"person.id_number": bad}), today=TODAY)
    assert codes(result.errors) == ["ID_NUMBER_INVALID"]
    (err,) = result.errors
    assert err.field == "person.id_number"
    assert "630102********9127" in err.message
    assert err.message.startswith(message("ID_NUMBER_INVALID")[0])
    assert bad not in text_of(result)
    assert bad not in repr(result.errors)


def test_impossible_birth_date_rejected() -> None:
    result = validate_submission(example(**{"person.id_number": "630102198702319120"}))
    assert codes(result.errors) == ["ID_NUMBER_INVALID"]


def test_lowercase_x_is_normalised() -> None:
    first17 = "63012119900101008"
    number = (first17 + ric.calc_check_digit(first17 + "0")).lower()
    assert number.endswith("x")
    result = validate_submission(example(**{"person.id_number": number}), today=TODAY)
    assert result.errors == []
    assert result.submission is not None
    assert result.submission.person.id_number == number.upper()


def test_abolished_haidong_prefix_is_a_warning_only() -> None:
    number = "63212319870413912X"  # 乐都县, abolished 2013; check digit X
    result = validate_submission(example(**{"person.id_number": number}), today=TODAY)
    assert result.errors == []
    assert codes(result.warnings) == ["ID_REGION_UNKNOWN"]
    assert result.warnings[0].field == "person.id_number"
    assert number not in text_of(result)


def test_other_id_types_are_not_checked_as_resident_ids() -> None:
    raw = example(**{"person.id_type": "passport", "person.id_number": "E12345678"})
    assert validate_submission(raw).errors == []


def test_unknown_region() -> None:
    result = validate_submission(example(**{"person.region_code": "639900"}), today=TODAY)
    assert codes(result.errors) == ["REGION_UNKNOWN"]
    assert result.errors[0].field == "person.region_code"
    assert result.submission is not None  # parsed, but rejected by the rule


def test_region_pattern_is_schema() -> None:
    result = validate_submission(example(**{"person.region_code": "6302"}))
    assert codes(result.errors) == ["SCHEMA"]
    assert result.errors[0].field == "person.region_code"


def test_uscc_failure_is_a_warning() -> None:
    result = validate_submission(
        example(**{"person.employer_uscc": "91630100MA752XYW1A"}), today=TODAY
    )
    assert result.errors == []
    assert codes(result.warnings) == ["USCC_INVALID"]
    assert result.warnings[0].field == "person.employer_uscc"


def test_completion_outside_the_year() -> None:
    result = validate_submission(example(year=2025), today=TODAY)
    assert codes(result.errors) == ["OUTSIDE_YEAR"]
    assert result.errors[0].field == "activity.completed_on"
    assert "2026-05-13" in result.errors[0].message


def test_started_after_completed() -> None:
    result = validate_submission(example(**{"activity.started_on": "2026-05-14"}), today=TODAY)
    assert codes(result.errors) == ["SCHEMA"]
    assert result.errors[0].field == "activity.started_on"


def test_several_rule_errors_are_all_reported() -> None:
    raw = example(
        year=2025,
        **{"person.region_code": "999999", "person.id_number": ID[:-1] + "0"},
    )
    result = validate_submission(raw, today=TODAY)
    assert sorted(codes(result.errors)) == ["ID_NUMBER_INVALID", "OUTSIDE_YEAR", "REGION_UNKNOWN"]


def test_id_in_an_unknown_key_is_masked() -> None:
    result = validate_submission(example(**{f"person.{ID}": "x"}))
    assert codes(result.errors) == ["SCHEMA"]
    assert ID not in text_of(result)


# --- never raises -------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from([ID, "630200", "2026-05-13", "24", "hours", "resident_id", "x" * 300])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _mutations() -> st.SearchStrategy[dict[str, Any]]:
    """The example with some leaves or sections replaced by random JSON values."""
    paths = [
        "source_record_id", "person", "year", "category", "activity_type", "activity",
        "claimed", "evidence", "person.id_type", "person.id_number", "person.name",
        "person.employer_uscc", "person.region_code", "person.industry", "activity.title",
        "activity.mode", "activity.started_on", "activity.completed_on", "claimed.quantity",
        "claimed.unit", "claimed.details", "evidence.assessment", "person.extra", "extra",
    ]  # fmt: skip
    return st.dictionaries(st.sampled_from(paths), json_values, max_size=4).map(
        lambda changes: example(**changes)
    )


def _check_invariants(result: Validated) -> None:
    assert isinstance(result, Validated)
    for n in (*result.errors, *result.warnings):
        assert n.code in CATALOGUE
        for text in (n.message, n.message_zh or "", n.field or ""):
            assert mask_text(text) == text  # no full identity number in any note
    if result.submission is None:
        assert result.errors


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_never_raises_on_random_json(raw: object) -> None:
    _check_invariants(validate_submission(raw))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_never_raises_on_mutated_example(raw: dict[str, Any]) -> None:
    _check_invariants(validate_submission(raw))
