"""Review of 401620b: refused pins (R10/R1) and a pulled completion's change judged on arrival (R11).

Real ingest and the real delivery worker against the mock management system on uvicorn
(127.0.0.1), on SQLite and PostgreSQL.  The invariant attacked: after a full drain, what the
management system counts of a person's capped type (the last applied version of every record,
where its type and person match) stays within the cap, and the compliance report's ``by_type``
credited equals it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from gateway.accounts import Partner
from gateway.config import Settings
from gateway.ops.edits import edit_and_requeue
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.rules_tables import DeferralInfo, RulesConfig
from gateway.pipeline.withdraw import withdraw
from gateway.pull.cadre_college import pull_once
from gateway.reference import ReferenceCache, StoreReference
from gateway.revalidate import RevalidationFilter, revalidate
from gateway.store.tables import outbox, records
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, make_person
from tests.integration.test_batch_resume_review import BEIJING
from tests.integration.test_cadre_pull_review import Scripted, completions, page, pull_settings
from tests.integration.test_refused_caps_review import (
    CAPS,
    NOW,
    _applied,
    _Gate,
    _in_thread,
    _item,
    _pg_only,
    _put,
    _reprocess,
    _until,
    _waiting_on_a_lock,
)
from tests.integration.test_refused_pins import _pins, _report
from tests.integration.test_s16caps_review import _credited, _downstream
from tests.support.delivery import MakeWorker, drain
from tests.support.keys import KEYS
from tests.support.servers import uvicorn_thread

PAPER = CAPS["paper"]


@pytest.fixture
def serve_app() -> Iterator[Callable[[Any], str]]:
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(uvicorn_thread(app))


# -- harness ------------------------------------------------------------------------------------

def _drained(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox).where(
            outbox.c.status == "pending")).scalar_one() == 0, "outbox not drained"


def _holds(engine: Engine, url: str, ids: dict[str, str], person: GenPerson,
           kind: str = "paper") -> Decimal:
    """The invariant for ``person``'s ``kind``; returns what the management system counts."""
    _drained(engine)
    there = _downstream(url, ids, kind, person)
    assert there <= CAPS[kind], f"the management system counts {there} h of {kind} (cap {CAPS[kind]})"
    report = _report(engine, person)
    assert Decimal(report["by_type"].get(kind, {}).get("credited", "0")) == there, (
        report["by_type"], there)
    return there


def _three_papers(engine: Engine, partner: Partner, q: GenPerson) -> dict[str, str]:
    return _put(engine, partner, _item(q, "A", "盐湖", 3), _item(q, "B", "湿地", 4),
                _item(q, "C", "草甸", 5))


# -- findings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("move", ["to_another_person", "same_group"])
def test_a_refused_withdrawal_of_a_pinned_record_leaves_the_old_group_over_the_cap(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker, move: str) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(2101)), make_person(random.Random(2102))
    ids = _three_papers(engine, partner, q)
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(p if move == "to_another_person" else q, "A", "[REJECT] 盐湖", 3))
    drain(worker)
    assert _credited(engine, ids) == {"A": "10.0", "B": "10.0", "C": "0.0"}
    _holds(engine, url, ids, q)
    # The withdrawal is built from the current (refused) version: the mock refuses it too.
    withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "A", now=NOW)
    drain(worker)
    assert _applied(url, ids["A"])[-1]["version"] == 1  # still counted there, 10 h for q
    _holds(engine, url, ids, q)


def test_a_refused_move_into_a_duplicate_leaves_the_old_group_over_the_cap(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    partner, theirs = new_partner(engine), new_partner(engine)
    q, p = make_person(random.Random(2111)), make_person(random.Random(2112))
    ids = _three_papers(engine, partner, q)
    ids |= _put(engine, theirs, _item(p, "X", "冻土", 6))
    worker = make_worker()
    drain(worker)
    faults.reject_ids = {ids["A"]}
    answers = ingest(engine, PartnerRef(partner.partner_id, "canonical"),
                     [_item(p, "A", "冻土", 6)], now=NOW)
    assert answers[0].status.value == "duplicate", answers
    drain(worker)
    assert [v["version"] for v in _applied(url, ids["A"])] == [1]
    _holds(engine, url, ids, q)


# -- probes that held ---------------------------------------------------------------------------

def test_a_refused_move_then_a_second_refused_move_to_a_third_group_then_reprocess(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    partner = new_partner(engine)
    q, p, r = (make_person(random.Random(s)) for s in (2121, 2122, 2123))
    ids = _three_papers(engine, partner, q)
    ids |= _put(engine, partner, _item(r, "R1", "雪山", 7), _item(r, "R2", "河谷", 8))
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3))
    drain(worker)
    assert _holds(engine, url, ids, q) == PAPER
    # Moved on to r (a third person), refused again: still q's 10 h there.
    _put(engine, partner, _item(r, "A", "[REJECT] 盐湖 2", 3))
    drain(worker)
    assert [v["version"] for v in _applied(url, ids["A"])] == [1]
    assert _credited(engine, ids)["C"] == "0.0"
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, r) == PAPER
    assert _holds(engine, url, ids, p) == 0
    assert list(_pins(engine)) == [ids["A"]]
    # Then into a book of q, refused: the paper is still counted.
    _put(engine, partner, _item(q, "A", "[REJECT] 盐湖 3", 3, "book", "first"))
    drain(worker)
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, q, "book") == 0
    # Reprocessed and accepted: A is r's third paper (0 h), C takes q's freed 10 h.
    faults.reject_title_marker = "[NEVER]"
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 3  # its three dead versions
    drain(worker)
    assert _pins(engine) == {}
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, q, "book") == 20
    assert _credited(engine, ids)["C"] == "10.0"


def test_a_resend_of_the_refused_content_is_a_duplicate_and_keeps_the_pin(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(2131)), make_person(random.Random(2132))
    ids = _three_papers(engine, partner, q)
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3))
    drain(worker)
    pins = _pins(engine)
    assert list(pins) == [ids["A"]]
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3), expect=("duplicate",))
    assert _pins(engine) == pins
    assert _credited(engine, ids) == {"A": "10.0", "B": "10.0", "C": "0.0"}
    drain(worker)
    assert _holds(engine, url, ids, q) == PAPER


def test_a_pinned_group_changed_by_others_new_paper_and_withdrawal(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(2141)), make_person(random.Random(2142))
    ids = _three_papers(engine, partner, q)
    worker = make_worker()
    drain(worker)
    # Two pinned records in one group: A moved to p, B moved to a book; both refused.
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3),
         _item(q, "B", "[REJECT] 湿地", 4, "book", "first"))
    drain(worker)
    assert len(_pins(engine)) == 2
    ids |= _put(engine, partner, _item(q, "D", "冻土", 6))
    drain(worker)
    assert _credited(engine, ids)["D"] == "0.0"
    assert _holds(engine, url, ids, q) == PAPER
    withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "C", now=NOW)
    drain(worker)
    assert _credited(engine, ids)["D"] == "0.0"
    assert _holds(engine, url, ids, q) == PAPER
    # B corrected back to a paper (accepted): its pin goes; D still gets nothing.
    _put(engine, partner, _item(q, "B", "湿地", 4))
    drain(worker)
    assert set(_pins(engine)) == {ids["A"]}
    assert _holds(engine, url, ids, q) == PAPER
    # A withdrawn (accepted by the mock this time): D takes A's 10 h.
    faults.reject_title_marker = "[NEVER]"
    withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "A", now=NOW)
    drain(worker)
    assert _pins(engine) == {}
    assert _credited(engine, ids) == {"A": "0.0", "B": "10.0", "C": "0.0", "D": "10.0"}
    assert _holds(engine, url, ids, q) == PAPER


def test_an_ops_edit_of_a_refused_move_frees_the_old_group(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker, make_settings: Callable[..., Settings], db_url: str) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(2151)), make_person(random.Random(2152))
    ids = _three_papers(engine, partner, q)
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3))
    drain(worker)
    edit_and_requeue(engine, make_settings(db_url, url), ids["A"], {"activity.title": "盐湖"},
                     reason="title fixed", actor="op-review")
    assert _pins(engine) == {}
    assert _credited(engine, ids) == {"A": "10.0", "B": "10.0", "C": "10.0"}
    drain(worker)
    assert _applied(url, ids["A"])[-1]["record"]["person"]["id_number"] == p.id_number
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, p) == 10


def test_a_refused_move_requeued_and_refused_again_pins_again(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(2161)), make_person(random.Random(2162))
    ids = _three_papers(engine, partner, q)
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3, "book", "first"))
    drain(worker)
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 1
    assert _pins(engine) == {} and _credited(engine, ids)["C"] == "10.0"
    drain(worker)  # C's 10 h version and A's refusal, in whichever order: C back to 0 h
    assert list(_pins(engine)) == [ids["A"]]
    assert _credited(engine, ids)["C"] == "0.0"
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, p, "book") == 0
    report = _report(engine, q)
    [listed] = report["not_counted"]
    assert (listed["source_record_id"], listed["applied_hours"]) == ("A", "10.0")
    assert p.id_number not in str(report) and q.id_number not in str(report)


@pytest.mark.postgres
@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("then", ["back_to_q", "on_to_r_refused"])
def test_a_correction_of_the_record_races_the_worker_recording_its_refused_move(
        engine: Engine, db_url: str, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        monkeypatch: pytest.MonkeyPatch, where: str, then: str) -> None:
    """The worker recording A's refused move to p waits ``where`` its group locks.

    Meanwhile A is corrected again: back to q and counted, or on to r and refused again.
    """
    _pg_only(db_url)
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p, r = (make_person(random.Random(s)) for s in (2171, 2172, 2173))
    ids = _three_papers(engine, partner, q)
    ids |= _put(engine, partner, _item(r, "R1", "雪山", 7), _item(r, "R2", "河谷", 8))
    drain(make_worker())
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3))
    gate = _Gate(monkeypatch, "refusing", where)
    errors: list[BaseException] = []
    refusing = _in_thread("refusing", make_worker(delivery_batch_size=1).run_once, errors)
    _until(gate.reached.is_set, "the worker at its cap-group lock")
    again = (_item(q, "A", "盐湖", 3) if then == "back_to_q"
             else _item(r, "A", "[REJECT] 盐湖 2", 3))
    if where == "before":
        _put(engine, partner, again)
        gate.go.set()
        refusing.join(30)
    else:
        second = _in_thread("other", lambda: _put(engine, partner, again), errors)
        _until(lambda: _waiting_on_a_lock(engine) or not second.is_alive(), "the ingest to queue")
        gate.go.set()
        refusing.join(30)
        second.join(30)
    assert not errors, errors
    drain(make_worker())
    want_pins = [] if then == "back_to_q" else [ids["A"]]
    assert list(_pins(engine)) == want_pins
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, r) == PAPER
    assert _holds(engine, url, ids, p) == 0
    assert _credited(engine, ids)["C"] == "0.0"


# -- R11: a pulled completion's change is judged on arrival -------------------------------------

COLLEGE_DONE = date(2025, 11, 10)
IN_TIME = datetime(2025, 11, 11, 2, 0, tzinfo=UTC)
AFTER_CLOSE = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


def _completion(person: GenPerson, sid: str, hours: str, title: str = "习近平新时代中国特色社会主义思想"
                ) -> dict[str, Any]:
    """A Cadre College completion as its adapter makes it (public online course, 2025)."""
    return {"source_record_id": sid,
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region},
            "year": 2025, "category": "public", "activity_type": "online_course",
            "activity": {"title": title, "provider_code": "QHGBWY", "plan_id": "KC2025001",
                         "mode": "online", "completed_on": COLLEGE_DONE.isoformat()},
            "claimed": {"quantity": hours, "unit": "hours", "details": {}},
            "evidence": {"certificate_no": "QHGBWY202500000001", "assessment": "passed"}}


def _college(engine: Engine, new_partner: Callable[..., Partner]) -> PartnerRef:
    return PartnerRef(new_partner(engine).partner_id, "cadre_college")


def _pull(engine: Engine, college: PartnerRef, sub: dict[str, Any], now: datetime,
          rules: RulesContext | None = None) -> Any:
    [answer] = ingest(engine, college, [sub], now=now, rules=rules)
    return answer


def _counts_year(engine: Engine, record_id: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(records.c.counts_year).where(
            records.c.record_id == str(record_id))).scalar_one())


def test_a_pulled_completion_resent_after_the_close_is_a_duplicate_and_changes_are_closed(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    college = _college(engine, new_partner)
    q = make_person(random.Random(2201))
    first = _pull(engine, college, _completion(q, "GB1", "4"), IN_TIME)
    assert first.status.value == "accepted", first
    again = _pull(engine, college, _completion(q, "GB1", "4"), AFTER_CLOSE)
    assert (again.status.value, again.version) == ("duplicate", 1)
    changed = _pull(engine, college, _completion(q, "GB1", "6"), AFTER_CLOSE)
    assert changed.status.value == "rejected"
    assert [e.code for e in changed.errors] == ["YEAR_CLOSED"]
    # Withdrawn (before the close), then reported again after it: a change after the close.
    withdraw(engine, college, "GB1", now=IN_TIME)
    back = _pull(engine, college, _completion(q, "GB1", "4"), AFTER_CLOSE)
    assert [e.code for e in back.errors] == ["YEAR_CLOSED"]
    # A first report pulled after the close is filed on its completion day: accepted.
    late_first = _pull(engine, college, _completion(q, "GB2", "3", "党史学习"), AFTER_CLOSE)
    assert late_first.status.value == "accepted", late_first
    assert _counts_year(engine, late_first.record_id) == 2025


def test_a_pulled_change_after_the_close_with_a_deferral_counts_toward_the_next_year(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    college = _college(engine, new_partner)
    q = make_person(random.Random(2211))
    first = _pull(engine, college, _completion(q, "GB1", "4"), IN_TIME)
    assert first.status.value == "accepted", first
    deferred = RulesContext(StoreReference.of(KEYS, deferrals=[(q.id_number, DeferralInfo(
        2025, "illness", date(2025, 12, 1)))]), RulesConfig(person_keys=KEYS))
    changed = _pull(engine, college, _completion(q, "GB1", "6"), AFTER_CLOSE, rules=deferred)
    assert changed.status.value == "corrected", changed
    assert _counts_year(engine, changed.record_id) == 2026


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_revalidating_a_year_closed_pulled_change_keeps_it_rejected(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    """The real pull: a change pulled after the close, filed YEAR_CLOSED, revalidated: still so."""
    today = datetime.now(BEIJING).date()
    done = today - timedelta(days=2)
    [item] = completions(1, seed=47)
    item = {**item, "wcsj": f"{done.isoformat()} 10:00:00", "xs": 2,
            "zsbh": f"QHGBWY{done.year}00000001"}
    changed = {**item, "xs": 20}
    college = Scripted({"": page([item], "c1", False), "c1": page([changed], "c2", False),
                        "c2": page([item], "c3", False)})
    url = serve_app(college.app)
    open_ = pull_settings(make_settings, db_url, url, year_close_extensions={done.year: today})
    assert pull_once(engine, open_).accepted == 1
    closed = pull_settings(make_settings, db_url, url,
                           year_close_extensions={done.year: today - timedelta(days=1)})
    assert pull_once(engine, closed).rejected == 1
    rules = RulesContext(ReferenceCache(engine, KEYS).current(), RulesConfig.from_settings(closed))
    result = revalidate(engine, RevalidationFilter(error_code="YEAR_CLOSED"), actor="op-review",
                        reason="review", rules=rules)
    assert (result.matched, result.rejected_again, result.corrected) == (1, 1, 0), result
    # The college sends its first version again: a duplicate, not a change.
    back = pull_once(engine, closed)
    assert (back.error, back.corrected, back.rejected) == (None, 0, 0), back
    with engine.connect() as conn:
        assert conn.execute(select(records.c.current_version)).scalars().all() == [1]
