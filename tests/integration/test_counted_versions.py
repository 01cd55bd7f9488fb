"""A counted record whose correction no longer counts: the management system must hear so.

The management system applies a record's versions in order and counts the last one (SPEC §7).
When a record it counts is corrected into something that earns nothing here — a repeat of
another source's report, a conflict held for ops (SPEC §7 "Dedup"), or a failed assessment
(R9 "A failed assessment earns no hours", 青人社厅函〔2022〕394号 六(二)) — the gateway must
forward a version that says so.  Before, nothing was forwarded: the gateway's compliance said
one thing and the management system kept counting the old hours.  On SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, select

from contracts import CERecord
from gateway import audit
from gateway.accounts import Partner
from gateway.compliance import report
from gateway.ops.records import record_view
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.tables import outbox, record_versions, records, rejections
from mock_partners import generators as gen
from mock_partners.generators import make_person
from tests.integration.test_caps_ledger import paper
from tests.support.keys import KEYS

NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)  # the year is open


def _ref(p: Partner) -> PartnerRef:
    return PartnerRef(p.partner_id, p.adapter, p.base_code)


def _version(engine: Engine, record_id: str, version: int) -> dict[str, Any]:
    with engine.connect() as conn:
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == record_id,
            record_versions.c.version == version)).scalar_one()
    record = json.loads(payload)
    CERecord.model_validate(record)
    return record


def _queued(engine: Engine, record_id: str) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox.c.version).where(outbox.c.record_id == record_id)
                                 .order_by(outbox.c.version)).scalars())


def _failed(sub: dict[str, Any]) -> dict[str, Any]:
    """The same result, corrected to a failed assessment (R9)."""
    out = copy.deepcopy(sub)
    out["evidence"] = {**out.get("evidence", {}), "assessment": "failed"}
    return out


def _row(engine: Engine, record_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(records).where(records.c.record_id == record_id))
                    .mappings().one())


@pytest.mark.parametrize("same_claim", [True, False], ids=["duplicate", "conflict"])
def test_a_counted_record_corrected_onto_another_sources_activity_is_forwarded_with_no_hours(
        engine: Engine, new_partner: Callable[..., Partner], same_claim: bool) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    rng = random.Random(31)
    mine = gen.canonical_submission(rng, "A-1", hours="8")
    theirs = copy.deepcopy(mine) | {"source_record_id": "B-1"}
    theirs["activity"] = {**theirs["activity"], "title": "高原医学前沿进展研修班",
                          "completed_on": "2026-04-20", "started_on": None}
    [first] = ingest(engine, a, [mine], now=NOW)
    [other] = ingest(engine, b, [theirs], now=NOW)
    assert (first.status, other.status) == ("accepted", "accepted")
    assert _queued(engine, first.record_id) == [1]

    # A's partner corrects its record to the activity B already reported.
    moved = copy.deepcopy(mine)
    moved["activity"] = {**theirs["activity"]}
    if not same_claim:
        moved["claimed"] = {**moved["claimed"], "quantity": "6"}
    [corrected] = ingest(engine, a, [moved], now=NOW)
    expected = "duplicate" if same_claim else "conflict"
    assert (corrected.status, corrected.record_id, corrected.version) == (
        expected, first.record_id, 2)
    assert "NOT_COUNTED" in [w.code for w in corrected.warnings]
    # The management system hears it: version 2 is queued, with no hours and the reason.
    assert _queued(engine, first.record_id) == [1, 2]
    v2 = _version(engine, first.record_id, 2)
    assert v2["credited_hours"] == "0" and v2["withdrawn"] is False
    note = next(n for n in v2["rule_notes"] if n["code"] == "NOT_COUNTED")
    assert other.record_id in note["message"] and other.record_id in note["message_zh"]
    row = _row(engine, first.record_id)
    assert (row["status"], row["credited_hours"], row["duplicate_of"]) == (
        expected, "0", other.record_id)
    # Ops' record page shows where that version's delivery stands, not just "duplicate".
    with engine.connect() as conn:
        page = record_view(conn, first.record_id)
    assert page is not None and (page["status"], page["record_status"]) == ("pending", expected)
    # And the gateway's own view agrees: the person has B's hours once.
    with engine.connect() as conn:
        person = report(conn, mine["person"]["id_number"], 2026, keys=KEYS)
    assert [r["record_id"] for r in person["records"]] == [other.record_id]

    # A further correction that still repeats B tells the management system nothing new;
    # one that moves away again counts again, and is forwarded with its hours.
    again = copy.deepcopy(moved)
    again["evidence"] = {**again.get("evidence", {}), "certificate_no": "QH-CERT-2"}
    [still] = ingest(engine, a, [again], now=NOW)
    assert (still.status, still.version) == (expected, 3)
    assert "NOT_COUNTED" not in [w.code for w in still.warnings]
    assert _queued(engine, first.record_id) == [1, 2]
    [back] = ingest(engine, a, [mine], now=NOW)
    assert (back.status, back.version) == ("corrected", 4)
    assert _queued(engine, first.record_id) == [1, 2, 4]
    assert _version(engine, first.record_id, 4)["credited_hours"] == "8.0"


def test_a_result_corrected_to_failed_withdraws_the_record_and_gives_its_cap_back(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    p = _ref(new_partner(engine))
    person = make_person(random.Random(32))
    papers = [paper(f"P-{n}", person, n) for n in (1, 2, 3)]
    answers = ingest(engine, p, papers, now=NOW)
    assert [a.status for a in answers] == ["accepted"] * 3
    assert _row(engine, answers[2].record_id)["credited_hours"] == "0.0"  # over the 20 h cap

    failed = _failed(papers[0])
    [answer] = ingest(engine, p, [failed], now=NOW)
    first = answers[0].record_id
    assert (answer.status, answer.record_id, answer.version) == ("rejected", first, 2)
    [error] = answer.errors
    assert error.code == "ASSESSMENT_FAILED" and first in error.message and first in error.message_zh
    row = _row(engine, first)
    assert (row["withdrawn"], row["current_version"], row["credited_hours"]) == (True, 2, "0")
    v2 = _version(engine, first, 2)
    assert (v2["withdrawn"], v2["credited_hours"]) == (True, "0")
    assert _queued(engine, first) == [1, 2]
    # Its 10 h go to the third paper, re-issued and forwarded (R10).
    third = answers[2].record_id
    assert _row(engine, third)["credited_hours"] == "10.0"
    assert _queued(engine, third) == [1, 2]
    with engine.connect() as conn:
        kinds = [e["kind"] for e in audit.events_for(conn, [first])]
        filed = conn.execute(select(rejections.c.source_record_id)).scalars().all()
        assert audit.verify(conn).ok
        person_report = report(conn, person.id_number, 2026, keys=KEYS)
    assert kinds[-2:] == ["withdrawn", "queued"]
    assert filed == ["P-1"]  # the refused result is kept for ops, as any rejection
    assert person_report["credited"]["total"] == "20.0"
    assert first not in [r["record_id"] for r in person_report["records"]]

    # The same failed result again is refused and changes nothing more.
    [repeat] = ingest(engine, p, [failed], now=NOW)
    assert repeat.status == "rejected"
    assert _queued(engine, first) == [1, 2]


def test_passed_then_failed_in_one_request_is_withdrawn_in_it(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    p = _ref(new_partner(engine))
    person = make_person(random.Random(33))
    passed = paper("P-1", person, 1)
    failed = _failed(passed)
    kept, refused = ingest(engine, p, [passed, failed], now=NOW)
    assert kept.status == "accepted" and (refused.status, refused.version) == ("rejected", 2)
    row = _row(engine, kept.record_id)
    assert (row["withdrawn"], row["current_version"]) == (True, 2)
    assert _version(engine, kept.record_id, 2)["withdrawn"] is True
    with engine.connect() as conn:
        assert report(conn, person.id_number, 2026, keys=KEYS)["credited"]["total"] == "0.0"


def test_a_failed_result_refused_for_more_than_its_failure_changes_nothing(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """A correction refused for anything else too (here: R2's source) is only refused."""
    p = _ref(new_partner(engine))
    person = make_person(random.Random(34))
    passed = paper("P-1", person, 1)
    [kept] = ingest(engine, p, [passed], now=NOW)
    failed = _failed(passed)
    failed["category"] = "public"  # public-subject hours only from the college (R2)
    [refused] = ingest(engine, p, [failed], now=NOW)
    assert refused.status == "rejected" and refused.record_id is None
    assert {e.code for e in refused.errors} == {"ASSESSMENT_FAILED", "PUBLIC_SUBJECT_SOURCE"}
    row = _row(engine, kept.record_id)
    assert (row["withdrawn"], row["current_version"]) == (False, 1)
    assert _queued(engine, kept.record_id) == [1]
    assert Decimal(row["credited_hours"]) == 10
