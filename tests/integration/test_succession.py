"""When the record holding an activity stops holding it, the next report of it takes over.

SPEC §7 "Dedup": another source's report of the same activity is a `duplicate` linked to the
first, and is not forwarded.  If the first is then withdrawn, corrected away (another date,
person or activity) or corrected to a failed assessment, the activity was still done and two
systems say so: the earliest duplicate is accepted and forwarded, its hours join its cap group
(R10), and the others are linked to it.  Conflicts (other hours) stay held for ops.  A
withdrawn record sent again must not then count beside its successor.  SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select

from gateway import audit
from gateway.accounts import Partner
from gateway.compliance import report
from gateway.pipeline.ingest import ingest
from gateway.pipeline.withdraw import withdraw
from gateway.store.tables import natural_keys
from mock_partners import generators as gen
from mock_partners.generators import make_person
from tests.integration.test_caps_ledger import paper
from tests.integration.test_counted_versions import NOW, _failed, _queued, _ref, _row, _version
from tests.support.keys import KEYS


def _counted(engine: Engine, id_number: str) -> list[str]:
    with engine.connect() as conn:
        return [r["record_id"] for r in report(conn, id_number, 2026, keys=KEYS)["records"]]


def _holder(engine: Engine, record_id: str) -> str | None:
    key = _row(engine, record_id)["natural_key"]
    with engine.connect() as conn:
        return conn.execute(select(natural_keys.c.record_id)
                            .where(natural_keys.c.natural_key == key)).scalar()


def test_a_withdrawn_holders_earliest_duplicate_takes_over_and_is_forwarded(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a, b, c = (_ref(new_partner(engine)) for _ in range(3))
    rng = random.Random(41)
    mine = gen.canonical_submission(rng, "A-1", hours="8")
    [held] = ingest(engine, a, [mine], now=NOW)
    [same] = ingest(engine, b, [copy.deepcopy(mine) | {"source_record_id": "B-1"}], now=NOW)
    [later] = ingest(engine, c, [copy.deepcopy(mine) | {"source_record_id": "C-1"}], now=NOW)
    other = copy.deepcopy(mine) | {"source_record_id": "C-2"}
    other["claimed"] = {**other["claimed"], "quantity": "6"}
    [differing] = ingest(engine, c, [other], now=NOW)
    assert [x.status for x in (held, same, later, differing)] == [
        "accepted", "duplicate", "duplicate", "conflict"]
    assert _counted(engine, mine["person"]["id_number"]) == [held.record_id]

    answer = withdraw(engine, a, "A-1", now=NOW)
    assert answer is not None and answer.version == 2

    # B's report (the earliest) holds the activity now, counts, and is forwarded as it is.
    assert _holder(engine, same.record_id) == same.record_id
    row = _row(engine, same.record_id)
    assert (row["status"], row["duplicate_of"], row["credited_hours"]) == ("accepted", None, "8.0")
    assert _queued(engine, same.record_id) == [1]
    assert _version(engine, same.record_id, 1)["credited_hours"] == "8.0"
    assert _counted(engine, mine["person"]["id_number"]) == [same.record_id]
    # C's repeat now repeats B's; the conflict is still held for ops, linked to the holder.
    assert (_row(engine, later.record_id)["status"], _row(engine, later.record_id)["duplicate_of"]
            ) == ("duplicate", same.record_id)
    assert _row(engine, differing.record_id)["status"] == "conflict"
    assert _queued(engine, later.record_id) == _queued(engine, differing.record_id) == []
    with engine.connect() as conn:
        kinds = [e["kind"] for e in audit.events_for(conn, [same.record_id])]
        assert audit.verify(conn).ok
    assert kinds[-2:] == ["succeeded", "queued"]

    # A's partner sends its record again, unchanged from before it withdrew it: B holds the
    # activity now, so A's is a duplicate of B's and the person is not credited twice.
    [again] = ingest(engine, a, [mine], now=NOW)
    assert (again.status, again.record_id, again.version) == ("duplicate", held.record_id, 3)
    assert _row(engine, held.record_id)["duplicate_of"] == same.record_id
    assert _counted(engine, mine["person"]["id_number"]) == [same.record_id]
    assert _queued(engine, held.record_id) == [1, 2]  # its withdrawal stands downstream


def test_a_holder_corrected_to_another_day_hands_its_activity_on(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    rng = random.Random(42)
    mine = gen.canonical_submission(rng, "A-1", hours="8")
    [held] = ingest(engine, a, [mine], now=NOW)
    [same] = ingest(engine, b, [copy.deepcopy(mine) | {"source_record_id": "B-1"}], now=NOW)
    assert same.status == "duplicate"

    moved = copy.deepcopy(mine)
    moved["activity"] = {**moved["activity"], "title": "另一期高原医学研修班",
                         "completed_on": "2026-11-02", "started_on": None}
    [corrected] = ingest(engine, a, [moved], now=NOW)
    assert (corrected.status, corrected.version) == ("corrected", 2)
    # Both activities count now, each once: A's new one, and the one only B reports now.
    assert sorted(_counted(engine, mine["person"]["id_number"])) == sorted(
        [held.record_id, same.record_id])
    assert _holder(engine, same.record_id) == same.record_id
    assert _queued(engine, same.record_id) == [1]


def test_a_holder_corrected_to_failed_hands_its_activity_and_cap_share_on(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """Papers are capped at 20 h a year (R10): the successor gets the share the holder had."""
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    person = make_person(random.Random(43))
    first, second = paper("P-1", person, 1), paper("P-2", person, 2)
    held, kept = ingest(engine, a, [first, second], now=NOW)
    [same] = ingest(engine, b, [copy.deepcopy(first) | {"source_record_id": "B-1"}], now=NOW)
    assert (held.status, kept.status, same.status) == ("accepted", "accepted", "duplicate")

    failed = _failed(first)
    [refused] = ingest(engine, a, [failed], now=NOW)
    assert (refused.status, refused.record_id) == ("rejected", held.record_id)
    assert _row(engine, held.record_id)["withdrawn"] is True
    row = _row(engine, same.record_id)
    assert (row["status"], row["credited_hours"]) == ("accepted", "10.0")
    assert _queued(engine, same.record_id) == [1]
    with engine.connect() as conn:
        person_report = report(conn, person.id_number, 2026, keys=KEYS)
    assert person_report["by_type"]["paper"]["credited"] == "20.0"
    assert sorted(r["record_id"] for r in person_report["records"]) == sorted(
        [kept.record_id, same.record_id])


def test_a_newcomer_after_a_withdrawal_holds_the_activity_and_the_old_repeat_follows_it(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """A record withdrawn and sent again after another took its activity repeats that one."""
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    rng = random.Random(44)
    mine = gen.canonical_submission(rng, "A-1", hours="8")
    [held] = ingest(engine, a, [mine], now=NOW)
    assert withdraw(engine, a, "A-1", now=NOW) is not None
    [theirs] = ingest(engine, b, [copy.deepcopy(mine) | {"source_record_id": "B-1"}], now=NOW)
    assert theirs.status == "accepted"  # the activity was free: B's report holds it
    changed = copy.deepcopy(mine)
    changed["evidence"] = {**changed.get("evidence", {}), "certificate_no": "QH-CERT-9"}
    [back] = ingest(engine, a, [changed], now=NOW)
    assert (back.status, back.version) == ("duplicate", 3)
    assert _row(engine, held.record_id)["duplicate_of"] == theirs.record_id
    assert _counted(engine, mine["person"]["id_number"]) == [theirs.record_id]
    assert _queued(engine, held.record_id) == [1, 2]


def test_a_holder_corrected_back_in_the_same_request_keeps_its_activity(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    rng = random.Random(45)
    mine = gen.canonical_submission(rng, "A-1", hours="8")
    [held] = ingest(engine, a, [mine], now=NOW)
    [same] = ingest(engine, b, [copy.deepcopy(mine) | {"source_record_id": "B-1"}], now=NOW)
    moved = copy.deepcopy(mine)
    moved["activity"] = {**moved["activity"], "completed_on": "2026-11-02", "started_on": None}
    away, back = ingest(engine, a, [moved, mine], now=NOW)
    assert (away.status, back.status) == ("corrected", "corrected")
    assert _holder(engine, held.record_id) == held.record_id
    row = _row(engine, same.record_id)
    assert (row["status"], row["duplicate_of"]) == ("duplicate", held.record_id)
    assert _queued(engine, same.record_id) == []
    assert _counted(engine, mine["person"]["id_number"]) == [held.record_id]


@pytest.mark.parametrize("lets_go", ["withdrawn", "failed"])
def test_a_record_whose_successor_joins_the_cap_moves_no_share_twice(
        engine: Engine, new_partner: Callable[..., Partner], lets_go: str) -> None:
    """X and its successor S hold one share between them: M2 must not flap.

    Papers X, S (another partner's report of X), M1, M2 in that order, 10 h each, cap 20 h:
    X and M1 count, M2 is cut to 0.  When X lets the paper go — withdrawn, or corrected to a
    failed assessment (R9), which withdraws it in a chunk — S takes its place ahead of M2, so
    M2 stays at 0: sent no version that lifts it to 10 h and a second one that cuts it back.
    """
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    person = make_person(random.Random(43))
    x = paper("X", person, 1)
    [held] = ingest(engine, a, [x], now=NOW)
    [dup] = ingest(engine, b, [x | {"source_record_id": "S"}], now=NOW)
    m1, m2 = ingest(engine, a, [paper("M1", person, 2), paper("M2", person, 3)], now=NOW)
    assert [r.status for r in (held, dup, m1, m2)] == ["accepted", "duplicate", "accepted", "accepted"]
    assert _row(engine, m2.record_id)["credited_hours"] == "0.0"

    if lets_go == "withdrawn":
        withdraw(engine, a, "X", now=NOW)
    else:
        [failed] = ingest(engine, a, [_failed(x)], now=NOW)
        assert (failed.status, failed.record_id, failed.version) == ("rejected", held.record_id, 2)
    assert _holder(engine, dup.record_id) == dup.record_id
    assert [_row(engine, r)["credited_hours"] for r in (dup.record_id, m1.record_id, m2.record_id)
            ] == ["10.0", "10.0", "0.0"]
    assert _queued(engine, m2.record_id) == [1]  # no version of M2 went up and down
    assert _queued(engine, m1.record_id) == [1]
    assert _queued(engine, dup.record_id) == [1]
    assert sorted(_counted(engine, person.id_number)) == sorted([dup.record_id, m1.record_id,
                                                                 m2.record_id])
