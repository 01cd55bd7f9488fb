"""Adversarial review of 8ebe989 ("A counted record that stops counting is told to the MS").

Two changes to gateway/pipeline/ingest.py are probed here, on SQLite and PostgreSQL:
(a) a correction turning a counted record into a duplicate or conflict forwards a version with
credited_hours "0" and a NOT_COUNTED warning; (b) a correction to a failed assessment (refused
for ASSESSMENT_FAILED alone) withdraws the record.

The first six were findings (they failed on 8ebe989, fixed since); the others check paths
that behaved as they should.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.compliance import report
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.ops.records import resolve_conflict
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.withdraw import withdraw
from gateway.revalidate import RevalidationFilter, revalidate
from gateway.store.db import make_engine
from gateway.store.tables import outbox, record_versions
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from mock_partners.generators import make_person
from tests.integration.test_caps_ledger import paper
from tests.integration.test_counted_versions import NOW, _failed, _queued, _ref, _row, _version
from tests.support.keys import KEYS

# -- helpers ------------------------------------------------------------------------------------

def _versions(engine: Engine, record_id: str) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(select(record_versions.c.version)
                                 .where(record_versions.c.record_id == record_id)
                                 .order_by(record_versions.c.version)).scalars())


def _total(engine: Engine, id_number: str) -> str:
    with engine.connect() as conn:
        return str(report(conn, id_number, 2026, keys=KEYS)["credited"]["total"])


def _codes(notes: list[Any]) -> list[str]:
    return [n["code"] if isinstance(n, dict) else n.code for n in notes]


def _two_trainings(engine: Engine, new_partner: Callable[..., Partner], seed: int
                   ) -> tuple[PartnerRef, PartnerRef, dict[str, Any], dict[str, Any]]:
    """A's A-1 (8 h) and B's B-1 (8 h), same person, distinct activities; both accepted."""
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = gen.canonical_submission(random.Random(seed), "A-1", hours="8")
    theirs = copy.deepcopy(mine) | {"source_record_id": "B-1"}
    theirs["activity"] = {**theirs["activity"], "title": "高原医学前沿进展研修班",
                          "completed_on": "2026-04-20", "started_on": None}
    [first] = ingest(engine, a, [mine], now=NOW)
    [other] = ingest(engine, b, [theirs], now=NOW)
    assert (first.status, other.status) == ("accepted", "accepted")
    return a, b, mine, theirs


def _onto(mine: dict[str, Any], theirs: dict[str, Any], quantity: str | None = None
          ) -> dict[str, Any]:
    """A's record corrected to B's activity (same claim: duplicate; other quantity: conflict)."""
    moved = copy.deepcopy(mine)
    moved["activity"] = {**theirs["activity"]}
    if quantity is not None:
        moved["claimed"] = {**moved["claimed"], "quantity": quantity}
    return moved


# -- findings, fixed ------------------------------------------------------------------------------

def test_failed_then_passed_in_one_request_leaves_the_record_counting(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    p = _ref(new_partner(engine))
    person = make_person(random.Random(41))
    passed = paper("P-1", person, 1)
    [kept] = ingest(engine, p, [passed], now=NOW)
    assert kept.status == "accepted"

    refused, again = ingest(engine, p, [_failed(passed), passed], now=NOW)
    assert (refused.status, refused.version) == ("rejected", 2)
    assert (again.status, again.version) == ("corrected", 3)
    row = _row(engine, kept.record_id)
    # The last word of the request is "passed": the record counts, at version 3.
    assert (row["withdrawn"], row["current_version"], row["status"]) == (False, 3, "accepted")
    assert row["credited_hours"] == "10.0"
    assert _queued(engine, kept.record_id) == [1, 2, 3]
    assert _version(engine, kept.record_id, 3)["credited_hours"] == "10.0"
    assert _total(engine, person.id_number) == "10.0"


def test_failed_then_passed_in_one_request_is_capped(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    p = _ref(new_partner(engine))
    person = make_person(random.Random(42))
    papers = [paper(f"P-{n}", person, n) for n in (1, 2, 3)]
    answers = ingest(engine, p, papers, now=NOW)  # P-3 is over the 20 h cap: 0 h
    third = answers[2].record_id
    assert _row(engine, third)["credited_hours"] == "0.0"
    ingest(engine, p, [_failed(papers[2]), papers[2]], now=NOW)
    assert _version(engine, third, 3)["credited_hours"] == "0.0"  # still over the cap


@pytest.mark.parametrize("history", ["failed_then_passed", "passed_failed_passed"])
def test_revalidating_a_stale_failed_result_does_not_withdraw_the_later_pass(
        engine: Engine, new_partner: Callable[..., Partner], history: str) -> None:
    p = _ref(new_partner(engine))
    person = make_person(random.Random(43))
    passed = paper("P-1", person, 1)
    if history == "failed_then_passed":  # an exam retaken: failed first, then passed
        [refused] = ingest(engine, p, [_failed(passed)], now=NOW)
        assert refused.status == "rejected" and refused.record_id is None
        [kept] = ingest(engine, p, [passed], now=NOW)
        expected_version = 1
    else:
        [kept] = ingest(engine, p, [passed], now=NOW)
        ingest(engine, p, [_failed(passed)], now=NOW)  # withdrawn: v2
        [back] = ingest(engine, p, [passed], now=NOW)  # passed on a re-check: v3
        assert (back.status, back.version) == ("corrected", 3)
        expected_version = 3
    queued_before = _queued(engine, kept.record_id)

    # Ops re-run the open rejections (e.g. after a reference sync), a broad filter.
    revalidate(engine, RevalidationFilter(partner_id=p.partner_id), actor="op",
               reason="reference data synced", rules=RulesContext.empty())
    row = _row(engine, kept.record_id)
    assert (row["withdrawn"], row["current_version"]) == (False, expected_version)
    assert _queued(engine, kept.record_id) == queued_before
    assert _total(engine, person.id_number) == "10.0"


@pytest.mark.parametrize("kind", ["training", "paper"])
def test_keep_this_on_a_not_counted_conflict_forwards_its_hours(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings], kind: str) -> None:
    if kind == "training":
        a, _, mine, theirs = _two_trainings(engine, new_partner, 44)
        moved, expected = _onto(mine, theirs, "6"), "6.0"
    else:
        a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
        person = make_person(random.Random(44))
        mine, theirs = paper("A-1", person, 1), paper("B-1", person, 2)
        ingest(engine, a, [mine], now=NOW)
        ingest(engine, b, [theirs], now=NOW)
        moved = copy.deepcopy(theirs) | {"source_record_id": "A-1"}
        moved["claimed"] = {**moved["claimed"], "quantity": "2"}  # two papers: 20 h
        expected = "20.0"
    [held] = ingest(engine, a, [moved], now=NOW)
    assert held.status == "conflict" and "NOT_COUNTED" in _codes(held.warnings)
    assert _queued(engine, held.record_id) == [1, 2]

    result = resolve_conflict(engine, make_settings(db_url), held.record_id, keep="this",
                              reason="经核实以本单位数据为准", actor="op")
    assert result["status"] == "accepted" and result["version"] == 3
    assert _queued(engine, held.record_id) == [1, 2, 3]
    v3 = _version(engine, held.record_id, 3)
    assert v3["credited_hours"] == expected
    assert "NOT_COUNTED" not in _codes(v3["warnings"])
    assert "NOT_COUNTED" not in _codes(v3["rule_notes"])


def test_new_then_not_counted_then_failed_in_one_request_forwards_nothing(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    b = _ref(new_partner(engine))
    a = _ref(new_partner(engine))
    mine = gen.canonical_submission(random.Random(45), "A-1", hours="8")
    theirs = copy.deepcopy(mine) | {"source_record_id": "B-1"}
    theirs["activity"] = {**theirs["activity"], "title": "高原医学前沿进展研修班",
                          "completed_on": "2026-04-20", "started_on": None}
    ingest(engine, b, [theirs], now=NOW)
    moved = _onto(mine, theirs)
    first, dup, failed = ingest(engine, a, [mine, moved, _failed(moved)], now=NOW)
    assert (first.status, dup.status, failed.status) == ("accepted", "duplicate", "rejected")
    assert _versions(engine, first.record_id) == [1, 2, 3]
    # First seen and withdrawn in one request: the management system hears none of it (it
    # would have counted v1's 8 h first); the versions are kept here.
    assert _queued(engine, first.record_id) == []
    assert _row(engine, first.record_id)["withdrawn"] is True


def test_passed_then_failed_in_one_request_forwards_no_hours_over_the_cap(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    p = _ref(new_partner(engine))
    person = make_person(random.Random(46))
    ingest(engine, p, [paper(f"P-{n}", person, n) for n in (1, 2)], now=NOW)  # 20 h: cap full
    third = paper("P-3", person, 3)
    kept, refused = ingest(engine, p, [third, _failed(third)], now=NOW)
    assert (kept.status, refused.status) == ("accepted", "rejected")
    assert _queued(engine, kept.record_id) == []  # born and withdrawn here: never sent


# -- checked, fine -------------------------------------------------------------------------------

def test_a_not_counted_paper_corrected_back_rejoins_its_cap_group_and_counts_once(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    person = make_person(random.Random(47))
    p1, p2 = paper("P-1", person, 1), paper("P-2", person, 2)
    r1, r2 = (x.record_id for x in ingest(engine, a, [p1, p2], now=NOW))
    theirs = paper("B-9", person, 9)
    [b9] = ingest(engine, b, [theirs], now=NOW)
    assert _row(engine, b9.record_id)["credited_hours"] == "0.0"  # third paper: over the cap
    assert _total(engine, person.id_number) == "20.0"

    moved = copy.deepcopy(theirs) | {"source_record_id": "P-1"}
    [dup] = ingest(engine, a, [moved], now=NOW)
    assert (dup.status, dup.version) == ("duplicate", 2)
    assert _queued(engine, r1) == [1, 2]
    assert _version(engine, r1, 2)["credited_hours"] == "0"
    # P-1 left the group: B-9 gets its 10 h, re-issued and queued.
    assert _row(engine, b9.record_id)["credited_hours"] == "10.0"
    assert _queued(engine, b9.record_id) == [1, 2]
    assert _total(engine, person.id_number) == "20.0"

    [back] = ingest(engine, a, [p1], now=NOW)
    assert (back.status, back.version) == ("corrected", 3)
    v3 = _version(engine, r1, 3)
    assert v3["credited_hours"] == "10.0" and "NOT_COUNTED" not in _codes(v3["warnings"])
    assert _queued(engine, r1) == [1, 2, 3]
    # First come, first served again: B-9 back to 0 h, re-issued.
    assert _row(engine, b9.record_id)["credited_hours"] == "0.0"
    assert _queued(engine, b9.record_id) == [1, 2, 3]
    with engine.connect() as conn:
        rep = report(conn, person.id_number, 2026, keys=KEYS)
    assert rep["credited"]["total"] == "20.0"
    assert sorted(r["record_id"] for r in rep["records"]) == sorted([r1, r2, b9.record_id])
    assert _row(engine, r2)["credited_hours"] == "10.0"


@pytest.mark.parametrize("quantity", [None, "6"], ids=["duplicate", "conflict"])
def test_a_failed_result_for_a_never_counted_record_queues_nothing(
        engine: Engine, new_partner: Callable[..., Partner], quantity: str | None) -> None:
    b = _ref(new_partner(engine))
    a = _ref(new_partner(engine))
    mine = gen.canonical_submission(random.Random(48), "B-1", hours="8")
    [held] = ingest(engine, b, [mine], now=NOW)
    twin = copy.deepcopy(mine) | {"source_record_id": "A-1"}
    if quantity:
        twin["claimed"] = {**twin["claimed"], "quantity": quantity}
    [never] = ingest(engine, a, [twin], now=NOW)
    assert never.status == ("conflict" if quantity else "duplicate")
    [refused] = ingest(engine, a, [_failed(twin)], now=NOW)
    assert (refused.status, refused.version) == ("rejected", 2)
    assert _queued(engine, never.record_id) == []
    assert _row(engine, never.record_id)["withdrawn"] is True
    assert _queued(engine, held.record_id) == [1]  # the holder is untouched
    assert _row(engine, held.record_id)["withdrawn"] is False


def test_a_failed_result_for_a_withdrawn_record_changes_nothing(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    p = _ref(new_partner(engine))
    person = make_person(random.Random(49))
    passed = paper("P-1", person, 1)
    [kept] = ingest(engine, p, [passed], now=NOW)
    assert withdraw(engine, p, "P-1", now=NOW) is not None
    [refused] = ingest(engine, p, [_failed(passed)], now=NOW)
    assert refused.status == "rejected" and refused.record_id is None
    assert _versions(engine, kept.record_id) == [1, 2] and _queued(engine, kept.record_id) == [1, 2]


def test_a_not_counted_record_withdrawn_explicitly_is_told(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a, _, mine, theirs = _two_trainings(engine, new_partner, 50)
    [dup] = ingest(engine, a, [_onto(mine, theirs)], now=NOW)
    assert dup.status == "duplicate"
    answer = withdraw(engine, a, "A-1", now=NOW)
    assert answer is not None and answer.version == 3
    assert _queued(engine, dup.record_id) == [1, 2, 3]


def test_failed_results_in_a_cap_group_give_hours_back_and_requeue_the_others(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    p = _ref(new_partner(engine))
    person = make_person(random.Random(51))
    papers = [paper(f"P-{n}", person, n) for n in (1, 2, 3, 4)]
    answers = ingest(engine, p, papers, now=NOW)
    ids = [x.record_id for x in answers]
    assert [_row(engine, r)["credited_hours"] for r in ids] == ["10.0", "10.0", "0.0", "0.0"]
    ingest(engine, p, [_failed(papers[0]), _failed(papers[1])], now=NOW)
    assert [_row(engine, r)["credited_hours"] for r in ids] == ["0", "0", "10.0", "10.0"]
    assert [_queued(engine, r) for r in ids] == [[1, 2], [1, 2], [1, 2], [1, 2]]
    assert _total(engine, person.id_number) == "20.0"


@pytest.fixture
def worker(db_url: str, mock_ce: tuple[str, Faults],
           make_settings: Callable[..., Settings]) -> Iterator[DeliveryWorker]:
    w = DeliveryWorker(make_engine(db_url), make_settings(db_url, mock_ce[0]))
    yield w
    w.close()
    w.engine.dispose()


def test_the_worker_delivers_not_counted_and_withdrawn_versions_to_the_mock_in_order(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        worker: DeliveryWorker) -> None:
    url, _ = mock_ce
    a, _, mine, theirs = _two_trainings(engine, new_partner, 52)
    [dup] = ingest(engine, a, [_onto(mine, theirs)], now=NOW)
    for _ in range(20):
        if worker.run_once() == 0:
            break
    [refused] = ingest(engine, a, [_failed(_onto(mine, theirs))], now=NOW)
    assert (refused.status, refused.version) == ("rejected", 3)
    for _ in range(20):
        if worker.run_once() == 0:
            break
    with engine.connect() as conn:
        states = conn.execute(select(outbox.c.version, outbox.c.status, outbox.c.receipt_status)
                              .where(outbox.c.record_id == dup.record_id)
                              .order_by(outbox.c.version)).all()
    assert [tuple(s) for s in states] == [(1, "delivered", "accepted"), (2, "delivered", "accepted"),
                                          (3, "delivered", "accepted")]
    applied = httpx.get(f"{url}/_mock/applied/{dup.record_id}").json()["versions"]
    assert [(v["version"], v["record"]["credited_hours"], v["record"]["withdrawn"])
            for v in applied] == [(1, "8.0", False), (2, "0", False), (3, "0", True)]
    assert "NOT_COUNTED" in _codes(applied[1]["record"]["warnings"])
    snap = httpx.get(f"{url}/_mock/applied").json()
    assert snap["out_of_order"] == [] and snap["double_applied"] == []
    assert Decimal(_row(engine, dup.record_id)["credited_hours"]) == 0
