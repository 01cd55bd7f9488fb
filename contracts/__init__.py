"""Canonical contract v1 of CE Gateway: the record models and nothing else (see ``__all__``)."""

from __future__ import annotations

from contracts.records import (
    CONTRACT_VERSION,
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
    RecordAnswer,
    RecordStatus,
    Source,
    SubmissionBatch,
    SubmissionResult,
    Unit,
)

__all__ = [
    "CONTRACT_VERSION",
    "Activity",
    "ActivityType",
    "Assessment",
    "CERecord",
    "CESubmission",
    "Category",
    "Claimed",
    "Evidence",
    "IdType",
    "Mode",
    "Note",
    "Person",
    "RecordAnswer",
    "RecordStatus",
    "Source",
    "SubmissionBatch",
    "SubmissionResult",
    "Unit",
]
