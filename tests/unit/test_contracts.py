"""The canonical models reject what SPEC §3 says they must, and keep what they accept intact."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts import (
    Activity,
    ActivityType,
    Assessment,
    Category,
    CERecord,
    CESubmission,
    Claimed,
    Evidence,
    IdType,
    Mode,
    Note,
    Person,
    Source,
    Unit,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")


def submission_data() -> dict[str, Any]:
    return {
        "source_record_id": "JD-2026-000123",
        "person": {
            "id_type": "resident_id",
            "id_number": "630102198704139126",
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


def record_data() -> dict[str, Any]:
    data = submission_data()
    source_record_id = data.pop("source_record_id")
    data.update(
        record_id="rec_01J0000000000000000000000",
        version=1,
        source={
            "partner_id": "base-qh-001",
            "adapter": "training_base",
            "source_record_id": source_record_id,
            "batch_id": None,
            "received_at": "2026-05-14T09:30:00+08:00",
        },
        credited_hours="24",
        rule_notes=[{"code": "CONVERTED", "message": "24 hours counted as claimed."}],
        review_authority="630200",
        warnings=[],
    )
    return data


def errors_of(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[tuple[Any, ...], str]]:
    return [(tuple(e["loc"]), e["type"]) for e in exc.value.errors()]


# --- unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gateway_owned",
    ["record_id", "version", "withdrawn", "source", "credited_hours", "rule_notes",
     "review_authority", "warnings"],
)
def test_submission_rejects_gateway_owned_top_level_key(gateway_owned: str) -> None:
    data = submission_data()
    data[gateway_owned] = "anything"
    with pytest.raises(ValidationError) as exc:
        CESubmission.model_validate(data)
    assert errors_of(exc) == [((gateway_owned,), "extra_forbidden")]
    assert gateway_owned in str(exc.value)


@pytest.mark.parametrize(
    ("section", "typo"),
    [("person", "idnumber"), ("activity", "titel"), ("claimed", "qty"), ("evidence", "cert_no")],
)
def test_typo_in_nested_key_is_rejected_and_named(section: str, typo: str) -> None:
    data = submission_data()
    data[section][typo] = "x"
    with pytest.raises(ValidationError) as exc:
        CESubmission.model_validate_json(json.dumps(data))
    assert errors_of(exc) == [((section, typo), "extra_forbidden")]
    assert f"{section}.{typo}" in str(exc.value)


def test_record_rejects_unknown_key_in_source() -> None:
    data = record_data()
    data["source"]["recieved_at"] = data["source"]["received_at"]
    with pytest.raises(ValidationError) as exc:
        CERecord.model_validate(data)
    assert (("source", "recieved_at"), "extra_forbidden") in errors_of(exc)


# --- decimals -------------------------------------------------------------------------------


def test_hours_and_quantities_are_decimal() -> None:
    record = CERecord.model_validate_json(json.dumps(record_data()))
    assert type(record.credited_hours) is Decimal
    assert type(record.claimed.quantity) is Decimal
    assert record.credited_hours == Decimal("24")


@pytest.mark.parametrize("value", ["24.5", "0", "0.5", "1000.0", "24.50"])
def test_credited_hours_with_at_most_one_decimal_place_is_accepted(value: str) -> None:
    data = record_data()
    data["credited_hours"] = value
    assert CERecord.model_validate(data).credited_hours == Decimal(value)


@pytest.mark.parametrize("value", ["24.25", "0.05", "1.999"])
def test_credited_hours_with_two_decimal_places_is_rejected(value: str) -> None:
    data = record_data()
    data["credited_hours"] = value
    with pytest.raises(ValidationError) as exc:
        CERecord.model_validate(data)
    assert errors_of(exc) == [(("credited_hours",), "decimal_max_places")]


@pytest.mark.parametrize("value", ["-1", "NaN", "Infinity", "abc"])
def test_credited_hours_must_be_a_finite_non_negative_number(value: str) -> None:
    data = record_data()
    data["credited_hours"] = value
    with pytest.raises(ValidationError) as exc:
        CERecord.model_validate(data)
    assert [loc for loc, _ in errors_of(exc)] == [("credited_hours",)]


def test_claimed_quantity_allows_two_places_but_not_three() -> None:
    assert Claimed(quantity=Decimal("0.25"), unit=Unit.CREDITS).quantity == Decimal("0.25")
    with pytest.raises(ValidationError) as exc:
        Claimed(quantity=Decimal("0.125"), unit=Unit.CREDITS)
    assert errors_of(exc) == [(("quantity",), "decimal_max_places")]


@pytest.mark.parametrize("spelled, canonical", [("2", "2"), ("2.0", "2"), ("2.50", "2.5"),
                                                ("100", "100"), ("100.00", "100"), ("-0", "0"),
                                                ("-0.0", "0"), ("0.05", "0.05")])
def test_claimed_quantity_has_one_spelling_for_one_number(spelled: str, canonical: str) -> None:
    # "100".normalize() is 1E+2: the canonical form must never use an exponent.
    claimed = Claimed(quantity=Decimal(spelled), unit=Unit.CREDITS)
    assert json.loads(claimed.model_dump_json())["quantity"] == canonical


def test_decimal_serializes_as_string_never_float() -> None:
    data = record_data()
    data["credited_hours"] = "24.5"
    dumped = json.loads(CERecord.model_validate(data).model_dump_json())
    assert dumped["credited_hours"] == "24.5"
    assert dumped["claimed"]["quantity"] == "24"


# --- datetimes ------------------------------------------------------------------------------


@pytest.mark.parametrize("naive", ["2026-05-14T09:30:00", datetime(2026, 5, 14, 9, 30)])  # noqa: DTZ001 - the naive value is the point
def test_naive_received_at_is_rejected(naive: str | datetime) -> None:
    data = record_data()
    data["source"]["received_at"] = naive
    with pytest.raises(ValidationError) as exc:
        CERecord.model_validate(data)
    assert errors_of(exc) == [(("source", "received_at"), "timezone_aware")]


@pytest.mark.parametrize(
    "aware",
    ["2026-05-14T01:30:00Z", "2026-05-14T09:30:00+08:00", datetime(2026, 5, 14, 9, 30, tzinfo=SHANGHAI)],
)
def test_aware_received_at_is_accepted(aware: str | datetime) -> None:
    data = record_data()
    data["source"]["received_at"] = aware
    received = CERecord.model_validate(data).source.received_at
    assert received == datetime(2026, 5, 14, 1, 30, tzinfo=UTC)


# --- enums ----------------------------------------------------------------------------------

# The values SPEC §3 names, written out so a renamed member fails here.
SPEC_ENUM_VALUES: list[tuple[type, set[str]]] = [
    (Category, {"public", "professional"}),
    (ActivityType, {"online_course", "training", "self_study", "mentoring", "innovation",
                    "paper", "book", "lecture", "exam_setting", "competition"}),
    (Mode, {"online", "offline", "mixed"}),
    (Unit, {"hours", "credits", "papers", "books", "lecture_hours", "sessions", "award"}),
    (Assessment, {"passed", "failed", "none"}),
]


@pytest.mark.parametrize(("enum_cls", "values"), SPEC_ENUM_VALUES, ids=lambda v: getattr(v, "__name__", ""))
def test_spec_enum_values_exist(enum_cls: type, values: set[str]) -> None:
    assert values <= {m.value for m in enum_cls}  # type: ignore[attr-defined]


def test_resident_id_is_the_default_id_type() -> None:
    person = Person(id_number="630102198704139126", name="赵伟", region_code="630200")
    assert person.id_type is IdType.RESIDENT_ID


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("category",), "Public"),
        (("category",), "general"),
        (("activity_type",), "webinar"),
        (("activity", "mode"), "hybrid"),
        (("claimed", "unit"), "hour"),
        (("evidence", "assessment"), "pass"),
        (("person", "id_type"), "RESIDENT_ID"),
    ],
)
def test_unknown_enum_value_is_rejected(path: tuple[str, ...], bad: str) -> None:
    data = submission_data()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(ValidationError) as exc:
        CESubmission.model_validate(data)
    assert errors_of(exc) == [(path, "enum")]


def test_enum_fields_hold_enum_members() -> None:
    submission = CESubmission.model_validate(submission_data())
    assert submission.category is Category.PROFESSIONAL
    assert submission.activity_type is ActivityType.TRAINING
    assert submission.claimed.unit is Unit.HOURS
    assert submission.evidence.assessment is Assessment.PASSED


# --- other field rules ----------------------------------------------------------------------


@pytest.mark.parametrize("region", ["63020", "6302000", "63O200", "６３０２００"])
def test_region_code_is_six_ascii_digits(region: str) -> None:
    data = submission_data()
    data["person"]["region_code"] = region
    with pytest.raises(ValidationError) as exc:
        CESubmission.model_validate(data)
    assert errors_of(exc) == [(("person", "region_code"), "string_pattern_mismatch")]


def test_uscc_is_upper_cased_and_stripped() -> None:
    person = Person(id_number="x", name="赵伟", region_code="630200",
                    employer_uscc=" 91630100ma752xxx1k ")
    assert person.employer_uscc == "91630100MA752XXX1K"


def test_models_are_frozen() -> None:
    submission = CESubmission.model_validate(submission_data())
    with pytest.raises(ValidationError):
        submission.year = 2025  # type: ignore[misc]


def test_evidence_defaults_to_no_assessment() -> None:
    data = submission_data()
    del data["evidence"]
    assert CESubmission.model_validate(data).evidence == Evidence(assessment=Assessment.NONE)


# --- round trip -----------------------------------------------------------------------------


def test_record_round_trips_through_json() -> None:
    record = CERecord.model_validate(record_data())
    again = CERecord.model_validate_json(record.model_dump_json())
    assert again == record
    assert again.model_dump_json() == record.model_dump_json()


_offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
_names = st.text(alphabet="赵钱孙李周吴郑王伟芳娜敏静·abcXYZ", min_size=1, max_size=64)
_titles = st.text(alphabet="高原生态修复技术研修班继续教育 ABC-()（）", min_size=1, max_size=200).filter(
    lambda s: s.strip() != ""
)


@given(
    credited=st.decimals(min_value=0, max_value=99999, places=1),
    quantity=st.decimals(min_value=0, max_value=9999999, places=2),
    received_at=st.datetimes(
        min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive by design
        max_value=datetime(2100, 1, 1),  # noqa: DTZ001
        timezones=_offsets,
    ),
    completed_on=st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 12, 31)),
    name=_names,
    title=_titles,
    category=st.sampled_from(Category),
    activity_type=st.sampled_from(ActivityType),
    unit=st.sampled_from(Unit),
    details=st.dictionaries(st.sampled_from(["authorship", "tier", "award", "credit_class"]),
                            st.sampled_from(["sole", "co", "national", "first", "I", "II"])),
    version=st.integers(min_value=1, max_value=10_000),
    withdrawn=st.booleans(),
    warning_codes=st.lists(st.sampled_from(["CAP_APPLIED", "USCC_INVALID", "INTEGRITY_OVERLAP"])),
)
def test_record_round_trip_is_lossless(
    credited: Decimal,
    quantity: Decimal,
    received_at: datetime,
    completed_on: date,
    name: str,
    title: str,
    category: Category,
    activity_type: ActivityType,
    unit: Unit,
    details: dict[str, str],
    version: int,
    withdrawn: bool,
    warning_codes: list[str],
) -> None:
    base = CERecord.model_validate(record_data())
    record = base.model_copy(
        update={
            "credited_hours": credited,
            "version": version,
            "withdrawn": withdrawn,
            "category": category,
            "activity_type": activity_type,
            "person": Person(id_number="630102198704139126", name=name, region_code="630200"),
            "activity": Activity(title=title, mode=Mode.ONLINE, completed_on=completed_on),
            "claimed": Claimed(quantity=quantity, unit=unit, details=details),
            "source": Source(partner_id="p", adapter="canonical", source_record_id="s",
                             received_at=received_at),
            "warnings": [Note(code=c, message="m", message_zh="说明") for c in warning_codes],
        }
    )
    # model_copy skips validation; validating the dump proves the record is itself valid.
    dumped = record.model_dump_json()
    again = CERecord.model_validate_json(dumped)
    assert again == record
    assert again.model_dump_json() == dumped
    assert again.source.received_at.utcoffset() == received_at.utcoffset()
    assert str(again.credited_hours) == str(credited)
    # The quantity keeps its value in its one spelling ("2.50" is kept as "2.5").
    assert again.claimed.quantity == quantity
    assert str(again.claimed.quantity) == str(record.claimed.quantity)
    assert again.person.name == name.strip()


def test_validation_does_not_mutate_the_input() -> None:
    data = record_data()
    snapshot = copy.deepcopy(data)
    CERecord.model_validate(data)
    assert data == snapshot
