"""The canonical continuing-education record, version 1 (SPEC §3).

Pure types: no I/O, no imports from ``gateway`` or ``adapters``.  A partner sends a
:class:`CESubmission`; the gateway turns it into a :class:`CERecord` by adding what only the
gateway knows (ids, versions, source, credited hours, notes, review authority, warnings).

Hours are :class:`~decimal.Decimal` with at most one decimal place; times are timezone-aware.
Changes within v1 are additive only; ``tests/contract/test_schema.py`` fails when these models
and the committed JSON Schema under ``contracts/schema/`` drift apart.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator

CONTRACT_VERSION = 1

Hours = Annotated[Decimal, Field(ge=0, max_digits=7, decimal_places=1)]
Quantity = Annotated[Decimal, Field(ge=0, max_digits=9, decimal_places=2)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Code = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


def canonical_decimal(value: Decimal) -> Decimal:
    """``value`` without trailing zeros, never in exponent form, and 0 for -0 (2.50 → 2.5)."""
    if not value:
        return Decimal(0)
    value = value.normalize()
    exponent = value.as_tuple().exponent
    return value.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else value


class IdType(StrEnum):
    RESIDENT_ID = "resident_id"
    PASSPORT = "passport"
    HK_MACAO_PERMIT = "hk_macao_permit"
    TAIWAN_PERMIT = "taiwan_permit"
    FOREIGN_PERMANENT = "foreign_permanent"
    OTHER = "other"


class Category(StrEnum):
    PUBLIC = "public"
    PROFESSIONAL = "professional"


class ActivityType(StrEnum):
    ONLINE_COURSE = "online_course"
    TRAINING = "training"
    SELF_STUDY = "self_study"
    MENTORING = "mentoring"
    INNOVATION = "innovation"
    PAPER = "paper"
    BOOK = "book"
    LECTURE = "lecture"
    EXAM_SETTING = "exam_setting"
    COMPETITION = "competition"


class Mode(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    MIXED = "mixed"


class Unit(StrEnum):
    HOURS = "hours"
    CREDITS = "credits"
    PAPERS = "papers"
    BOOKS = "books"
    LECTURE_HOURS = "lecture_hours"
    SESSIONS = "sessions"
    AWARD = "award"


class Assessment(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    NONE = "none"


class _Strict(BaseModel):
    """Unknown keys are a ``SCHEMA`` error naming the key (SPEC §3): a typo never passes."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Person(_Strict):
    id_type: IdType = IdType.RESIDENT_ID
    id_number: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)
    ]
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    employer_name: Text | None = None
    employer_uscc: Annotated[
        # pydantic checks the pattern before upper-casing, so lower case must pass the pattern.
        str,
        StringConstraints(strip_whitespace=True, to_upper=True, pattern=r"^[0-9A-Za-z]{18}$"),
    ] | None = None
    # [0-9], not \d: the Rust regex engine lets \d match full-width digits (６３０２００).
    region_code: Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")]
    industry: Code | None = None


class Activity(_Strict):
    title: Text
    provider_code: Code | None = Field(default=None, description=(
        "Who ran the activity: a training base's code (R9); the Cadre Network College's "
        "(QHGBWY) on its courses."))
    plan_id: Code | None = Field(default=None, description=(
        "The activity's number at its provider, read with source.adapter: training_base — "
        "the plan the base filed (备案, R9); cadre_college — the college's course id (kcbh); "
        "health — the CME project number (项目编号); canonical — the partner's own number, "
        "if it sends one; finance — none."))
    mode: Mode = Mode.OFFLINE
    started_on: date | None = None
    completed_on: date


class Claimed(_Strict):
    quantity: Quantity
    unit: Unit
    details: dict[str, str] = Field(default_factory=dict)

    @field_validator("quantity")
    @classmethod
    def _canonical(cls, value: Decimal) -> Decimal:
        # One spelling for one number: "2", "2.0" and "2.00" are the same claim, and a resend
        # that writes it otherwise must hash (SPEC §7 "Dedup") as the duplicate it is, not as a
        # correction forwarded again.  -0 is 0.
        return canonical_decimal(value)

    @field_validator("details")
    @classmethod
    def _sorted(cls, value: dict[str, str]) -> dict[str, str]:
        # One order for the same facts, so a record serialises (and hashes) one way.
        return dict(sorted(value.items()))


class Evidence(_Strict):
    certificate_no: Code | None = None
    assessment: Assessment = Assessment.NONE


class Note(_Strict):
    """A coded explanation: a rule note, a warning or an error."""

    code: str
    message: str
    message_zh: str | None = None
    field: str | None = None


class Source(_Strict):
    partner_id: Code
    adapter: Code
    source_record_id: Code
    batch_id: str | None = None
    received_at: AwareDatetime


class CESubmission(_Strict):
    """What a partner knows and sends (``POST /v1/records``)."""

    source_record_id: Code
    person: Person
    year: Annotated[int, Field(ge=2000, le=2100)]
    category: Category
    activity_type: ActivityType
    activity: Activity
    claimed: Claimed
    evidence: Evidence = Field(default_factory=Evidence)


class CERecord(_Strict):
    """A record as the gateway stores it and forwards it to the management system."""

    contract_version: int = CONTRACT_VERSION
    record_id: Code
    version: Annotated[int, Field(ge=1)]
    withdrawn: bool = False
    source: Source
    person: Person
    year: Annotated[int, Field(ge=2000, le=2100)]
    category: Category
    activity_type: ActivityType
    activity: Activity
    claimed: Claimed
    credited_hours: Hours
    rule_notes: list[Note] = Field(default_factory=list)
    evidence: Evidence = Field(default_factory=Evidence)
    review_authority: Code | None = None
    warnings: list[Note] = Field(default_factory=list)


class SubmissionBatch(BaseModel):
    """The body of ``POST /v1/records``: 1–1,000 submissions, each judged on its own."""

    model_config = ConfigDict(extra="forbid")

    records: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=1000)]


class RecordStatus(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CORRECTED = "corrected"
    REJECTED = "rejected"
    CONFLICT = "conflict"


class RecordAnswer(BaseModel):
    """The per-record answer of every partner submission (SPEC §5)."""

    index: int
    source_record_id: str | None
    status: RecordStatus
    record_id: str | None = None
    version: int | None = None
    errors: list[Note] = Field(default_factory=list)
    warnings: list[Note] = Field(default_factory=list)


class SubmissionResult(BaseModel):
    results: list[RecordAnswer]
    counts: dict[str, int]


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "CERecord": CERecord,
    "CESubmission": CESubmission,
    "RecordAnswer": RecordAnswer,
}
