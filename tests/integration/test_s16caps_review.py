"""Review of f2fe42e, 16c0d49 (R10 pins of refused records) and 83e3bd2 (reconciliation).

Real ingest and the real delivery worker against the mock management system on uvicorn
(127.0.0.1), on SQLite and PostgreSQL.  The management system keeps a record's last applied
version when it refuses a later one; what it counts of a person's capped type must stay within
the cap, and the compliance report of a person must count only what is counted for that person.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, select

from gateway import compliance
from gateway.accounts import Partner
from gateway.config import Settings
from gateway.ops.edits import edit_and_requeue
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.rules_tables import DeferralInfo, RulesConfig
from gateway.pipeline.withdraw import withdraw
from gateway.reference import StoreReference
from gateway.store.tables import records
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, make_person
from tests.integration.test_refused_caps_review import NOW, _applied, _item, _put, _reprocess
from tests.support.delivery import MakeWorker, drain
from tests.support.keys import KEYS

CAPS = RulesConfig().caps


def _downstream(url: str, ids: dict[str, str], kind: str, person: GenPerson,
                year: int | None = None) -> Decimal:
    """What the management system counts of ``kind`` for ``person``: last applied versions.

    With ``year``, only those counting in that CE year (a deferred record in the next).
    """
    total = Decimal(0)
    for rid in ids.values():
        versions = _applied(url, rid)
        if not versions:
            continue
        last = versions[-1]["record"]
        deferred = any(n.get("code") == "DEFERRAL" for n in last.get("rule_notes", ()))
        if (not last["withdrawn"] and last["activity_type"] == kind
                and last["person"]["id_number"] == person.id_number
                and (year is None or int(last["year"]) + deferred == year)):
            total += Decimal(last["credited_hours"])
    return total


def _moved(sub: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**sub, **changes}



def test_a_paper_corrected_into_a_refused_book_keeps_its_paper_share(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q = make_person(random.Random(1601))
    ids = _put(engine, partner, _item(q, "A", "盐湖", 3), _item(q, "B", "湿地", 4),
               _item(q, "C", "草甸", 5))
    worker = make_worker()
    drain(worker)
    assert _downstream(url, ids, "paper", q) == CAPS["paper"]
    _put(engine, partner, _item(q, "A", "[REJECT] 盐湖", 3, "book", "first"))
    drain(worker)
    assert [v["version"] for v in _applied(url, ids["A"])] == [1]  # still a 10 h paper there
    assert _downstream(url, ids, "paper", q) <= CAPS["paper"]


def test_a_refused_correction_to_another_person_counts_nothing_for_that_person(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(1602)), make_person(random.Random(1603))
    ids = _put(engine, partner, _item(q, "A", "盐湖", 3))
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3))
    drain(worker)
    last = _applied(url, ids["A"])[-1]["record"]
    assert last["person"]["id_number"] == q.id_number and last["credited_hours"] == "10.0"
    with engine.connect() as conn:
        for_p = compliance.report(conn, p.id_number, 2026, keys=KEYS)
    assert [n["source_record_id"] for n in for_p["not_counted"]] == ["A"]
    assert for_p["credited"]["total"] == "0.0", for_p["credited"]


def test_a_refused_correction_to_another_person_keeps_its_share_of_the_first(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(1604)), make_person(random.Random(1605))
    ids = _put(engine, partner, _item(q, "A", "盐湖", 3), _item(q, "B", "湿地", 4),
               _item(q, "C", "草甸", 5))
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3))
    drain(worker)
    assert _applied(url, ids["A"])[-1]["record"]["person"]["id_number"] == q.id_number
    with engine.connect() as conn:
        for_q = compliance.report(conn, q.id_number, 2026, keys=KEYS)
    there = _downstream(url, ids, "paper", q)
    assert (there, Decimal(for_q["by_type"]["paper"]["credited"])) == (CAPS["paper"],) * 2



def _credited(engine: Engine, ids: dict[str, str]) -> dict[str, str]:
    with engine.connect() as conn:
        got = {sid: conn.execute(select(records.c.credited_hours).where(
            records.c.record_id == rid)).scalar_one() for sid, rid in ids.items()}
    return {sid: f"{Decimal(h or '0'):.1f}" for sid, h in got.items()}


def test_a_pinned_record_reprocessed_takes_the_hours_freed_while_it_was_pinned(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    partner = new_partner(engine)
    q = make_person(random.Random(1620))
    ids = _put(engine, partner, _item(q, "E1", "一", 1), _item(q, "E2", "二", 2, authorship="co"),
               _item(q, "X", "三", 3))
    worker = make_worker()
    drain(worker)
    assert _credited(engine, ids) == {"E1": "10.0", "E2": "5.0", "X": "5.0"}
    _put(engine, partner, _item(q, "X", "[REJECT] 三", 3))  # refused: pinned at its applied 5 h
    drain(worker)
    withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "E2", now=NOW)
    drain(worker)  # the 5 h E2 freed: X is pinned at 5 h, nobody else claims them
    assert _credited(engine, ids) == {"E1": "10.0", "E2": "0.0", "X": "5.0"}
    faults.reject_title_marker = "[NEVER]"
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 1
    drain(worker)
    assert _credited(engine, ids) == {"E1": "10.0", "E2": "0.0", "X": "10.0"}
    assert _downstream(url, ids, "paper", q) == CAPS["paper"]

IN_2025 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
LATER = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)  # 2025 closed


def _in_2025(person: GenPerson, sid: str, title: str, month: int) -> dict[str, Any]:
    sub = _item(person, sid, title, month) | {"year": 2025}
    sub["activity"] = {**sub["activity"], "completed_on": f"2025-{month:02d}-15"}
    return sub


def test_a_refused_deferred_correction_counts_nothing_in_the_next_year(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    q = make_person(random.Random(1610))
    [a] = ingest(engine, partner, [_in_2025(q, "A", "盐湖", 3)], now=IN_2025)
    drain(make_worker())
    deferred = RulesContext(StoreReference.of(KEYS, deferrals=[(q.id_number, DeferralInfo(
        2025, "illness", date(2025, 12, 1)))]), RulesConfig(person_keys=KEYS))
    [again] = ingest(engine, partner, [_in_2025(q, "A", "[REJECT] 盐湖", 3)], now=LATER,
                     rules=deferred)
    assert again.status.value == "corrected"
    drain(make_worker())
    last = _applied(url, str(a.record_id))[-1]["record"]
    assert (last["version"], last["credited_hours"]) == (1, "10.0")  # counted in 2025 there
    with engine.connect() as conn:
        in_2026 = compliance.report(conn, q.id_number, 2026, keys=KEYS)
    assert [n["source_record_id"] for n in in_2026["not_counted"]] == ["A"]
    assert in_2026["credited"]["total"] == "0.0", in_2026["credited"]


# -- probes that held ---------------------------------------------------------------------------

def _counts(engine: Engine, url: str, ids: dict[str, str], person: GenPerson,
            ) -> dict[str, tuple[str, str]]:
    """Per capped type: (what the management system counts, what the compliance report says)."""
    with engine.connect() as conn:
        report = compliance.report(conn, person.id_number, 2026, keys=KEYS)
    return {kind: (f"{_downstream(url, ids, kind, person):.1f}",
                   report["by_type"].get(kind, {}).get("credited", "0.0"))
            for kind in ("book", "lecture")}


def test_pinned_books_and_lectures_edited_corrected_withdrawn_and_reprocessed(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker, make_settings: Callable[..., Settings], db_url: str) -> None:
    """Pins (refused versions of applied records) in the book and lecture groups, two at once."""
    url, faults = mock_ce
    partner = new_partner(engine)
    q = make_person(random.Random(1630))
    ids = _put(engine, partner, _item(q, "B1", "书一", 1, "book", "first"),
               _item(q, "B2", "书二", 2, "book", "first"), _item(q, "B3", "书三", 3, "book", "other"),
               _item(q, "L1", "讲一", 1, "lecture", quantity="3"),
               _item(q, "L2", "讲二", 2, "lecture", quantity="3"))
    worker = make_worker()
    drain(worker)
    full = {"book": ("40.0", "40.0"), "lecture": ("30.0", "30.0")}
    assert _counts(engine, url, ids, q) == full
    # Refused corrections to fewer hours: pinned at the applied 20 h and 18 h; nothing moves.
    _put(engine, partner, _item(q, "B1", "[REJECT] 书一", 1, "book", "other"),
         _item(q, "L1", "[REJECT] 讲一", 1, "lecture", quantity="1"))
    drain(worker)
    assert _credited(engine, ids) == {"B1": "10.0", "B2": "20.0", "B3": "0.0", "L1": "6.0",
                                      "L2": "12.0"}
    assert _counts(engine, url, ids, q) == full
    # Ops fix B1's title: its 10 h version counts, B3 takes the 10 h freed.
    edit_and_requeue(engine, make_settings(db_url, url), ids["B1"], {"activity.title": "书一"},
                     reason="title fixed", actor="op-review")
    drain(worker)
    assert _credited(engine, ids)["B3"] == "10.0"
    assert _counts(engine, url, ids, q) == full
    # L1 corrected again (accepted), then withdrawn: L2 takes what it claims.
    _put(engine, partner, _item(q, "L1", "讲一", 1, "lecture", quantity="2"))
    drain(worker)
    assert (_credited(engine, ids)["L1"], _credited(engine, ids)["L2"]) == ("12.0", "18.0")
    withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "L1", now=NOW)
    drain(worker)
    assert _counts(engine, url, ids, q)["lecture"] == ("18.0", "18.0")
    # Two pins at once in the book group (20 h and 10 h applied), then both reprocessed.
    _put(engine, partner, _item(q, "B2", "[REJECT] 书二", 2, "book", "other"),
         _item(q, "B3", "[REJECT] 书三", 3, "book", "first"))
    drain(worker)
    assert _counts(engine, url, ids, q)["book"] == ("40.0", "40.0")
    faults.reject_title_marker = "[NEVER]"
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 2
    drain(worker)
    assert _credited(engine, ids) == {"B1": "10.0", "B2": "10.0", "B3": "20.0", "L1": "0.0",
                                      "L2": "18.0"}
    assert _counts(engine, url, ids, q)["book"] == ("40.0", "40.0")


def test_two_pins_in_one_group_squeeze_the_unpinned_record(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """A pinned at 10 h, then C's re-issue to 0 h refused (pinned at its applied 5 h): B gives way."""
    url, faults = mock_ce
    partner = new_partner(engine)
    q = make_person(random.Random(1640))
    ids = _put(engine, partner, _item(q, "A", "一", 1), _item(q, "B", "二", 2),
               _item(q, "C", "三", 3))
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(q, "A", "[REJECT] 一", 1, authorship="co"))  # C takes 5 h
    worker.run_once()  # A's 5 h version refused (pinned at 10 h), C's 5 h applied, C → 0 h
    assert _credited(engine, ids) == {"A": "5.0", "B": "10.0", "C": "0.0"}
    faults.reject_ids = {ids["C"]}
    drain(worker)  # C's 0 h version refused: the management system still counts its 5 h
    assert [(v["version"], v["record"]["credited_hours"]) for v in _applied(url, ids["C"])] == [
        (1, "0.0"), (2, "5.0")]
    assert _credited(engine, ids)["B"] == "5.0"
    assert _downstream(url, ids, "paper", q) == CAPS["paper"]
