"""Review of 4b66d9e: a record refused for good downstream gives its R10 cap share away.

Real ingest, the real delivery worker against the mock management system on uvicorn
(127.0.0.1), on SQLite and PostgreSQL.  After every step, :func:`_check` holds the invariant:
per person, year and cap type, the records that count (accepted, not withdrawn, current version
not dead-lettered ``DOWNSTREAM_REJECTED``) are credited ``allocate(cap, hours)`` in record-id
order, the caps_ledger row agrees, the compliance report agrees, and — once the outbox is
drained — the management system's last applied version of every counted record carries the
stored credited hours, and what it counts of a cap type stays within the cap.

Found, and fixed:
- a record whose earlier version the management system applied, corrected to a version it
  refuses, gave its share away although the applied version still counts there: the
  management system then counted 30 h of papers (cap 20).  Such a record keeps its share
  (``caps.stored_records``), so the invariant's share holders include it — when its last
  applied version counts hours of its cap type there (a model walk found a training corrected
  into a refused paper keeping a paper share, which cut another paper to 0 h).
Found, and kept by design:
- a refused record keeps holding its activity, so another source's report of the same paper
  stays a duplicate until the refused record is withdrawn (reprocessing it later must not
  make the activity count twice downstream).

Held: refusals of several records in one batch across paper, book and lecture groups; a 400
on the record alone (the split path); a newcomer while one is refused, reprocess refused
again, reprocess accepted; a refused record then withdrawn, corrected, ops-edited, corrected
still refused; a re-issued version refused; a duplicate taking over a refused record that is
withdrawn; on PostgreSQL, a refusal recorded while an ingest, a reprocess, a second worker or a
conflict resolution (a real deadlock, run again) changes the group, either side of its lock.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, and_, func, select, text

from gateway import compliance
from gateway.accounts import Partner
from gateway.config import Settings
from gateway.ops.deliveries import DeliveryFilter, reprocess
from gateway.ops.edits import edit_and_requeue
from gateway.ops.records import resolve_conflict
from gateway.pipeline import caps as caps_module
from gateway.pipeline.credit import allocate
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.withdraw import withdraw
from gateway.store.tables import audit_events, caps_ledger, outbox, record_versions, records
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, make_person
from tests.support.delivery import MakeWorker, drain
from tests.support.keys import KEYS, person_key_of

NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)  # the CE year 2026 is open
CAPS = RulesConfig().caps


# -- harness ------------------------------------------------------------------------------------





def _item(person: GenPerson, sid: str, title: str, month: int, kind: str = "paper",
          authorship: str = "sole", quantity: str = "1") -> dict[str, Any]:
    """A capped activity: paper (10 h sole, 5 h co), book (first 20 h, other 10 h), lecture.

    A lecture counts its ``quantity`` teaching hours × 6 (R5).
    """
    unit, details = {"paper": ("papers", {"authorship": authorship}),
                     "book": ("books", {"authorship": authorship}),
                     "lecture": ("lecture_hours", {})}[kind]
    return {"source_record_id": sid,
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region},
            "year": 2026, "category": "professional", "activity_type": kind,
            "activity": {"title": title, "completed_on": f"2026-{month:02d}-15"},
            "claimed": {"quantity": quantity, "unit": unit, "details": details}}


def _put(engine: Engine, partner: Partner, *subs: dict[str, Any],
         expect: tuple[str, ...] = ("accepted", "corrected")) -> dict[str, str]:
    answers = ingest(engine, PartnerRef(partner.partner_id, "canonical"), list(subs), now=NOW)
    assert all(a.status.value in expect for a in answers), [(a.status, a.errors) for a in answers]
    return {s["source_record_id"]: str(a.record_id) for s, a in zip(subs, answers, strict=True)}


def _rows(engine: Engine, person: GenPerson) -> list[Any]:
    on_current = and_(outbox.c.record_id == records.c.record_id,
                      outbox.c.version == records.c.current_version)
    # The last version of it the management system applied, if any.
    last = (select(outbox.c.record_id, func.max(outbox.c.version).label("version"))
            .where(outbox.c.status == "delivered").group_by(outbox.c.record_id).subquery())
    with engine.connect() as conn:
        rows = conn.execute(
            select(records.c.record_id, records.c.current_version, records.c.status,
                   records.c.withdrawn, records.c.cap_type, records.c.activity_type,
                   records.c.hours, records.c.credited_hours,
                   outbox.c.status.label("delivery"), outbox.c.error_code,
                   record_versions.c.payload.label("applied_payload"))
            .select_from(records.outerjoin(outbox, on_current)
                         .outerjoin(last, last.c.record_id == records.c.record_id)
                         .outerjoin(record_versions, and_(
                             record_versions.c.record_id == last.c.record_id,
                             record_versions.c.version == last.c.version)))
            .where(records.c.person_key == person_key_of("resident_id", person.id_number),
                   records.c.counts_year == 2026)
            .order_by(records.c.record_id)).all()
    return [SimpleNamespace(**r._mapping, applied=_counts_there(r)) for r in rows]


def _counts_there(r: Any) -> bool:
    """The management system counts hours of the record's own cap type in its last applied version."""
    if r.applied_payload is None:
        return False
    body = orjson.loads(r.applied_payload)
    return (not body["withdrawn"] and Decimal(body["credited_hours"]) > 0
            and body["activity_type"] == r.activity_type)


def _refused(r: Any) -> bool:
    return bool(r.delivery == "dead" and r.error_code == "DOWNSTREAM_REJECTED")


def _counts(r: Any) -> bool:
    """Counted by the compliance report: its current version was not refused for good."""
    return r.status == "accepted" and not r.withdrawn and not _refused(r)


def _holds_share(r: Any) -> bool:
    """Holds a share of its cap: counted, or refused now but counted there by an earlier version."""
    return r.status == "accepted" and not r.withdrawn and (not _refused(r) or bool(r.applied))


def _applied(url: str, record_id: str) -> list[dict[str, Any]]:
    versions: list[dict[str, Any]] = httpx.get(f"{url}/_mock/applied/{record_id}").json()["versions"]
    return versions


def _check(engine: Engine, person: GenPerson, url: str | None = None) -> dict[str, Decimal]:
    """The invariant (module docstring); ``url``: the outbox is drained, compare downstream.

    Returns record id → credited hours of the records that count.
    """
    rows = _rows(engine, person)
    counted = {r.record_id: Decimal(r.credited_hours) for r in rows if _counts(r)}
    pk = person_key_of("resident_id", person.id_number)
    with engine.connect() as conn:
        ledger = {t: Decimal(c) for t, c in conn.execute(
            select(caps_ledger.c.cap_type, caps_ledger.c.credited)
            .where(caps_ledger.c.person_key == pk, caps_ledger.c.year == 2026))}
        report = compliance.report(conn, person.id_number, 2026, keys=KEYS)
    for cap_type, cap in CAPS.items():
        mine = [r for r in rows if r.cap_type == cap_type and _holds_share(r)]
        want = allocate([(r.record_id, Decimal(r.hours)) for r in mine], cap)
        got = {r.record_id: Decimal(r.credited_hours) for r in mine}
        assert got == want, (cap_type, got, want)
        if mine or cap_type in ledger:
            assert ledger.get(cap_type, Decimal(0)) == sum(want.values(), Decimal(0)), \
                (cap_type, ledger, want)
    by_type: dict[str, Decimal] = {}
    for r in rows:
        if _counts(r):
            by_type[r.activity_type] = by_type.get(r.activity_type, Decimal(0)) + Decimal(
                r.credited_hours)
        elif r.status == "accepted" and not r.withdrawn and r.applied:
            # Refused now, counted there by an earlier version: the report counts its hours.
            there = Decimal(orjson.loads(r.applied_payload)["credited_hours"])
            by_type[r.activity_type] = by_type.get(r.activity_type, Decimal(0)) + there
    assert {t: Decimal(v["credited"]) for t, v in report["by_type"].items()} == by_type
    if url is not None:
        with engine.connect() as conn:
            assert conn.execute(select(outbox.c.id).where(
                outbox.c.status == "pending")).first() is None, "outbox not drained"
        downstream: dict[str, Decimal] = {}
        for r in rows:
            versions = _applied(url, r.record_id)
            last = versions[-1]["record"] if versions else None
            if r.record_id in counted:
                assert last is not None, f"{r.record_id} counts here, never applied there"
                assert int(last["version"]) == int(r.current_version), (r.record_id, last["version"])
                assert Decimal(last["credited_hours"]) == counted[r.record_id], r.record_id
            if last is not None and not last["withdrawn"] and r.cap_type:
                downstream[r.cap_type] = downstream.get(r.cap_type, Decimal(0)) + Decimal(
                    last["credited_hours"])
        for cap_type, total in downstream.items():
            assert total <= CAPS[cap_type], (
                f"the management system counts {total} h of {cap_type} (cap {CAPS[cap_type]})")
    return counted


def _by_sid(counted: dict[str, Decimal], ids: dict[str, str]) -> dict[str, str]:
    return {sid: f"{counted[rid]:.1f}" for sid, rid in ids.items() if rid in counted}


def _reprocess(engine: Engine, **flt: Any) -> int:
    return reprocess(engine, DeliveryFilter(**flt), dry_run=False, reason="review",
                     actor="op-review").requeued


def _until(predicate: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- 1. an earlier version the management system applied still counts there -------------------

def test_a_refused_correction_of_an_applied_paper_keeps_the_management_system_within_the_cap(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(101))
    ids = _put(engine, partner, _item(person, "A", "柴达木盆地盐湖资源研究", 3),
               _item(person, "B", "三江源湿地碳汇研究", 4),
               _item(person, "C", "高寒草甸退化机理研究", 5))
    worker = make_worker()
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids) == {"A": "10.0", "B": "10.0", "C": "0.0"}
    # A's partner corrects the title; the management system refuses the new version, and
    # keeps version 1 (10 h) applied.
    _put(engine, partner, _item(person, "A", "[REJECT] 柴达木盆地盐湖资源研究", 3))
    drain(worker)
    assert [v["version"] for v in _applied(url, ids["A"])] == [1]
    _check(engine, person, url)
    # A keeps its share (the management system counts its version 1): C stays at 0 h.
    assert [v["version"] for v in _applied(url, ids["C"])] == [1]
    with engine.connect() as conn:
        assert conn.execute(select(audit_events.c.seq).where(
            audit_events.c.kind == "cap_reallocated")).first() is None


# -- 2. paths that held ------------------------------------------------------------------------

class _BadRequestFor(httpx.BaseTransport):
    """Forwards to the mock, but answers 400 (malformed) to a request carrying ``marker``."""

    def __init__(self, marker: bytes) -> None:
        self.marker, self.inner = marker, httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.marker in request.read():
            return httpx.Response(400, json={"error": "records[0] malformed"})
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_refusals_in_one_batch_across_groups_and_by_a_400_on_the_record_alone(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(102))
    ids = _put(engine, partner,
               _item(person, "P1", "[REJECT] 盐湖提锂工艺", 1), _item(person, "P2", "冻土路基", 2),
               _item(person, "P3", "[400] 牦牛育种", 3), _item(person, "P4", "青稞加工", 4),
               _item(person, "B1", "[REJECT] 青海通史", 1, "book", "first"),
               _item(person, "B2", "河湟文化", 2, "book", "first"),
               _item(person, "B3", "藏医药学", 3, "book", "other"),
               _item(person, "B4", "高原生态", 4, "book", "first"),
               _item(person, "L1", "全省教研讲座", 5, "lecture", quantity="3"),
               _item(person, "L2", "[400] 省级骨干培训", 6, "lecture", quantity="2"),
               _item(person, "L3", "省级师资培训", 7, "lecture", quantity="3"))
    assert _by_sid(_check(engine, person), ids) == {
        "P1": "10.0", "P2": "10.0", "P3": "0.0", "P4": "0.0",
        "B1": "20.0", "B2": "20.0", "B3": "0.0", "B4": "0.0",
        "L1": "18.0", "L2": "12.0", "L3": "0.0"}
    client = httpx.Client(base_url=url, transport=_BadRequestFor(b"[400]"))
    worker = make_worker(client=client)
    drain(worker)
    counted = _check(engine, person, url)
    assert _by_sid(counted, ids) == {"P2": "10.0", "P4": "10.0", "B2": "20.0", "B3": "10.0",
                                     "B4": "10.0", "L1": "18.0", "L3": "12.0"}


def test_a_newcomer_while_refused_then_reprocess_then_accepted(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(103))
    ids = _put(engine, partner, _item(person, "A", "[REJECT] 盐湖", 3),
               _item(person, "B", "湿地", 4, authorship="co"), _item(person, "C", "草甸", 5))
    worker = make_worker()
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids) == {"B": "5.0", "C": "10.0"}
    ids |= _put(engine, partner, _item(person, "D", "冻土", 6))
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids) == {"B": "5.0", "C": "10.0", "D": "5.0"}
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 1
    assert _by_sid(_check(engine, person), ids) == {"A": "10.0", "B": "5.0", "C": "5.0",
                                                    "D": "0.0"}
    drain(worker)  # refused again: the share goes back out
    assert _by_sid(_check(engine, person, url), ids) == {"B": "5.0", "C": "10.0", "D": "5.0"}
    faults.reject_title_marker = "[NEVER]"
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 1
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids) == {"A": "10.0", "B": "5.0", "C": "5.0",
                                                         "D": "0.0"}


@pytest.mark.parametrize("then", ["withdrawn", "corrected", "ops_edit", "still_refused",
                                  "recredit_refused"])
def test_a_refused_paper_then_withdrawn_corrected_or_edited(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker, make_settings: Callable[..., Settings], db_url: str,
        then: str) -> None:
    url, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(104))
    ids = _put(engine, partner, _item(person, "A", "[REJECT] 盐湖", 3),
               _item(person, "B", "湿地", 4), _item(person, "C", "草甸", 5),
               _item(person, "D", "冻土", 6))
    worker = make_worker()
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids) == {"B": "10.0", "C": "10.0", "D": "0.0"}
    if then == "withdrawn":
        withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "A", now=NOW)
        withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "B", now=NOW)
        want = {"C": "10.0", "D": "10.0"}
    elif then == "corrected":
        _put(engine, partner, _item(person, "A", "盐湖", 3))
        want = {"A": "10.0", "B": "10.0", "C": "0.0", "D": "0.0"}
    elif then == "ops_edit":
        edit_and_requeue(engine, make_settings(db_url, url), ids["A"],
                         {"activity.title": "盐湖"}, reason="title fixed", actor="op-review")
        want = {"A": "10.0", "B": "10.0", "C": "0.0", "D": "0.0"}
    elif then == "recredit_refused":  # D's re-issue (B's share) is refused: C keeps 10 h
        faults.reject_ids = {ids["D"]}
        withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "B", now=NOW)
        want = {"C": "10.0"}
    else:  # corrected, still refused
        _put(engine, partner, _item(person, "A", "[REJECT] 盐湖 2", 3))
        assert _by_sid(_check(engine, person), ids) == {"A": "10.0", "B": "10.0", "C": "0.0",
                                                        "D": "0.0"}
        want = {"B": "10.0", "C": "10.0", "D": "0.0"}
    _check(engine, person)
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids) == want


def test_a_duplicate_from_another_source_takes_over_a_refused_paper_withdrawn(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    mine, theirs = new_partner(engine), new_partner(engine)
    person = make_person(random.Random(105))
    ids = _put(engine, mine, _item(person, "A", "盐湖", 3), _item(person, "B", "湿地", 4),
               _item(person, "C", "草甸", 5))
    faults.reject_ids = {ids["A"]}
    dup = _put(engine, theirs, _item(person, "X", "盐湖", 3), expect=("duplicate",))
    worker = make_worker()
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids) == {"B": "10.0", "C": "10.0"}
    withdraw(engine, PartnerRef(mine.partner_id, "canonical"), "A", now=NOW)
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids | dup) == {"B": "10.0", "C": "10.0",
                                                                "X": "0.0"}


# -- 3. PostgreSQL: a refusal recorded while others write the same group ------------------------

def _pg_only(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("row locks and READ COMMITTED: PostgreSQL only (SQLite has one writer)")


class _Gate:
    """Holds the thread named ``who`` at its first cap-group lock: ``before`` or ``after`` it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, who: str, where: str) -> None:
        self.who, self.where = who, where
        self.reached, self.go = threading.Event(), threading.Event()
        real = caps_module.lock_groups

        def gated(conn: Any, groups: Any, now: Any) -> None:
            mine = threading.current_thread().name == self.who and not self.reached.is_set()
            if mine and where == "before":
                self.reached.set()
                assert self.go.wait(30)
            real(conn, groups, now)
            if mine and where == "after":
                self.reached.set()
                assert self.go.wait(30)

        monkeypatch.setattr(caps_module, "lock_groups", gated)


def _waiting_on_a_lock(engine: Engine) -> bool:
    """A backend of this test's schema waits on a lock.

    The database is shared by the other test process (pytest -n 2) and its schemas: a lock wait
    of theirs must not open the gate before ours has queued.
    """
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity a WHERE a.wait_event_type = 'Lock' "
            "AND a.datname = current_database() AND EXISTS ("
            " SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE l.pid = a.pid AND c.relnamespace = current_schema()::regnamespace)"))
            .scalar())


def _in_thread(name: str, job: Callable[[], Any], errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


@pytest.mark.postgres
@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("other", ["ingest", "reprocess", "worker", "resolve"])
def test_a_refusal_recorded_while_the_group_changes(
        engine: Engine, db_url: str, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
        where: str, other: str) -> None:
    """The worker refusing B waits ``where`` its group lock while ``other`` changes the group."""
    _pg_only(db_url)
    url, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(106))
    ids = _put(engine, partner, _item(person, "A", "[REJECT] 盐湖", 3),
               _item(person, "Z", "湿地", 4, authorship="co"))
    worker = make_worker(delivery_batch_size=1)
    drain(worker)  # A refused: Z 5 h
    ids |= _put(engine, partner, _item(person, "B", "[REJECT] 草甸", 5),
                _item(person, "C", "[REJECT] 冻土", 6))
    # Another source reports C's paper as two papers: a conflict, held for ops.
    conflict = _put(engine, new_partner(engine), _item(person, "X", "[REJECT] 冻土", 6,
                                                       quantity="2"), expect=("conflict",))
    # B (10 h) and C (5 h) pending; A dead.  The worker sends B alone and stops at its lock.
    gate = _Gate(monkeypatch, "refusing", where)
    errors: list[BaseException] = []
    refusing = _in_thread("refusing", worker.run_once, errors)
    _until(gate.reached.is_set, "the worker at its cap-group lock")
    jobs: dict[str, Callable[[], Any]] = {
        "ingest": lambda: _put(engine, partner, _item(person, "D", "青稞", 7)),
        "reprocess": lambda: _reprocess(engine, record_ids=(ids["A"],)),
        "worker": make_worker(delivery_batch_size=1).run_once,  # sends C: refused too
        # Ops keep X: C is withdrawn, X joins the group (C is re-issued by the refusal).
        "resolve": lambda: resolve_conflict(engine, make_settings(db_url, url), conflict["X"],
                                            keep="this", reason="review", actor="op-review")}
    job = jobs[other]
    if where == "before":
        job()
        gate.go.set()
        refusing.join(30)
    else:
        second = _in_thread("other", job, errors)
        _until(lambda: _waiting_on_a_lock(engine) or not second.is_alive(), "the other to queue")
        gate.go.set()
        refusing.join(30)
        second.join(30)
    assert not errors, errors
    _check(engine, person)
    faults.reject_title_marker = "[REJECT]"
    drain(make_worker())
    _check(engine, person, url)


# -- 4. another source's report of a refused record's activity -----------------------------------

def test_a_refused_record_keeps_its_activity_until_its_partner_withdraws_it(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """By design, a refusal hands no activity over (the reviewer's finding, decided so).

    Ops may reprocess the refused record once the management system accepts it; had another
    source's report taken the activity over meanwhile, both would then count there.  So the
    report stays a duplicate, not forwarded, until the refused record is withdrawn (by its
    partner, or an operator acting for it) — then it takes over as after any withdrawal.
    """
    url, faults = mock_ce
    mine, theirs = new_partner(engine), new_partner(engine)
    person = make_person(random.Random(107))
    ids = _put(engine, mine, _item(person, "A", "盐湖", 3), _item(person, "B", "湿地", 4))
    faults.reject_ids = {ids["A"]}  # the management system refuses A's record, not the paper
    dup = _put(engine, theirs, _item(person, "X", "盐湖", 3), expect=("duplicate",))
    worker = make_worker()
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids | dup) == {"B": "10.0"}
    assert _applied(url, dup["X"]) == []

    withdraw(engine, PartnerRef(mine.partner_id, "canonical"), "A", now=NOW)
    drain(worker)
    assert _by_sid(_check(engine, person, url), ids | dup) == {"B": "10.0", "X": "10.0"}
