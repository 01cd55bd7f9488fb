"""Dedup keys: stable for the same facts, different for different facts."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from contracts import CESubmission
from gateway.pipeline import dedup
from mock_partners import generators as gen
from tests.support.keys import KEYS


def _sub(raw: dict[str, Any]) -> CESubmission:
    return CESubmission.model_validate(raw)


@pytest.fixture
def raw() -> dict[str, Any]:
    return gen.canonical_submission(random.Random(3), "S-1", hours="24")


def test_keys_are_stable_across_parses_and_key_order(raw: dict[str, Any]) -> None:
    reordered = dict(reversed(list(copy.deepcopy(raw).items())))
    a, b = _sub(raw), _sub(reordered)
    assert dedup.content_hash(a) == dedup.content_hash(b)
    assert dedup.natural_key(a, KEYS) == dedup.natural_key(b, KEYS)
    assert dedup.person_key(a, KEYS) == dedup.person_key(b, KEYS)
    assert len(dedup.natural_key(a, KEYS)) == 64


def test_natural_key_ignores_source_id_and_title_spacing_and_width(raw: dict[str, Any]) -> None:
    other = copy.deepcopy(raw)
    other["source_record_id"] = "SOMEONE-ELSE-9"
    other["activity"]["title"] = " " + other["activity"]["title"].replace("", " ").strip() + "  "
    assert dedup.natural_key(_sub(raw), KEYS) == dedup.natural_key(_sub(other), KEYS)
    assert dedup.normalise_title("ＡＢＣ 研修班") == dedup.normalise_title("abc研修班")


@pytest.mark.parametrize("path,value", [
    (("person", "id_number"), None),
    (("activity", "completed_on"), "2026-12-01"),
    (("activity", "title"), "完全不同的课程"),
    (("activity_type",), "online_course"),
    (("year",), 2025),
])
def test_natural_key_changes_with_who_what_when(raw: dict[str, Any], path: tuple[str, ...],
                                                value: Any) -> None:
    other = copy.deepcopy(raw)
    if path == ("person", "id_number"):
        value = gen.make_id_number(random.Random(99))
    if path == ("year",):
        other["activity"]["completed_on"] = "2025-06-01"
        other["activity"]["started_on"] = "2025-06-01"
    target = other
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert dedup.natural_key(_sub(raw), KEYS) != dedup.natural_key(_sub(other), KEYS)


def test_content_hash_changes_with_any_claim_or_evidence(raw: dict[str, Any]) -> None:
    more = copy.deepcopy(raw)
    more["claimed"]["quantity"] = "25"
    assert dedup.content_hash(_sub(raw)) != dedup.content_hash(_sub(more))
    cert = copy.deepcopy(raw)
    cert["evidence"]["certificate_no"] = "OTHER"
    assert dedup.content_hash(_sub(raw)) != dedup.content_hash(_sub(cert))


def test_person_key_does_not_contain_the_id_number(raw: dict[str, Any]) -> None:
    assert raw["person"]["id_number"] not in dedup.person_key(_sub(raw), KEYS)
