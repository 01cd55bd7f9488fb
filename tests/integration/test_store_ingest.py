"""The store suite, run on SQLite and PostgreSQL: ingest, dedup, withdrawal, audit chain."""

from __future__ import annotations

import copy
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.engine import make_url

from gateway import audit
from gateway.accounts import Partner
from gateway.pipeline.ingest import ingest, ingest_items
from gateway.pipeline.items import PartnerRef, RulesContext, item_from_raw
from gateway.pipeline.rules_tables import EmptyReference, RulesConfig
from gateway.pipeline.withdraw import withdraw
from gateway.reference import ReferenceCache
from gateway.store.bulk import bulk_insert
from gateway.store.db import make_engine
from gateway.store.tables import audit_events, outbox, record_versions, records, rejections
from mock_partners import generators as gen
from tests.support.keys import KEYS
from tests.support.reference import load_base_and_plan
from tests.support.years import fixture_rules_config


def _ref(p: Partner) -> PartnerRef:
    return PartnerRef(p.partner_id, p.adapter, p.base_code)


def _count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


@pytest.fixture
def sub() -> dict[str, Any]:
    return gen.canonical_submission(random.Random(5), "SRC-1", hours="24")


def test_accepted_record_version_outbox_and_audit_commit_together(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    p = new_partner(engine)
    [answer] = ingest(engine, _ref(p), [sub])
    assert answer.status == "accepted" and answer.version == 1
    assert _count(engine, records, records.c.record_id == answer.record_id) == 1
    assert _count(engine, record_versions, record_versions.c.record_id == answer.record_id) == 1
    assert _count(engine, outbox, outbox.c.record_id == answer.record_id,
                  outbox.c.status == "pending") == 1
    with engine.connect() as conn:
        kinds = [e["kind"] for e in audit.events_for(conn, [answer.record_id])]
        assert kinds == ["received", "queued"]
        assert audit.verify(conn).ok


def test_resend_is_duplicate_and_new_content_is_a_correction(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    p = new_partner(engine)
    [first] = ingest(engine, _ref(p), [sub])
    [again] = ingest(engine, _ref(p), [copy.deepcopy(sub)])
    assert (again.status, again.record_id, again.version) == ("duplicate", first.record_id, 1)
    changed = copy.deepcopy(sub)
    changed["claimed"]["quantity"] = "30"
    [fixed] = ingest(engine, _ref(p), [changed])
    assert (fixed.status, fixed.record_id, fixed.version) == ("corrected", first.record_id, 2)
    # Each version queued once, in order; the resend queued nothing.
    with engine.connect() as conn:
        versions = conn.execute(select(outbox.c.version).where(outbox.c.record_id == first.record_id)
                                .order_by(outbox.c.id)).scalars().all()
    assert versions == [1, 2]


@pytest.mark.parametrize("first_spelling, resend_spelling", [("24", "24.0"), ("2.5", "2.50"),
                                                              ("24.00", "24")])
def test_the_same_number_spelled_otherwise_is_a_duplicate_not_a_correction(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any],
        first_spelling: str, resend_spelling: str) -> None:
    """An annual file writing "2.0" where the month wrote "2" repeats it (SPEC §2, §7 Dedup)."""
    p = new_partner(engine)
    sub["claimed"]["quantity"] = first_spelling
    [first] = ingest(engine, _ref(p), [sub])
    resend = copy.deepcopy(sub)
    resend["claimed"]["quantity"] = resend_spelling
    [again] = ingest(engine, _ref(p), [resend])
    assert (again.status, again.record_id, again.version) == ("duplicate", first.record_id, 1)
    assert _count(engine, outbox, outbox.c.record_id == first.record_id) == 1


def test_a_resend_after_the_year_closed_is_a_duplicate_and_new_content_is_refused(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    """Resending is safe (SPEC §2): the same content is a duplicate even once R11 refuses it."""
    p = new_partner(engine)
    rules = RulesContext(EmptyReference(), RulesConfig(person_keys=KEYS))  # the notice's close, no extension
    year = int(sub["activity"]["completed_on"][:4])
    open_day = datetime(year, 6, 1, 2, tzinfo=UTC)
    closed_day = datetime(year, 12, 31, 2, tzinfo=UTC)  # 10:00 on 31 December in Xining
    [first] = ingest(engine, _ref(p), [sub], now=open_day, rules=rules)
    assert first.status == "accepted"
    [again] = ingest(engine, _ref(p), [copy.deepcopy(sub)], now=closed_day, rules=rules)
    assert (again.status, again.record_id, again.version, again.errors) == (
        "duplicate", first.record_id, 1, [])
    changed = copy.deepcopy(sub)
    changed["claimed"]["quantity"] = "30"
    [late] = ingest(engine, _ref(p), [changed], now=closed_day, rules=rules)
    assert late.status == "rejected" and [e.code for e in late.errors] == ["YEAR_CLOSED"]
    # The resend stored and queued nothing; only the changed content was kept for ops.
    assert _count(engine, outbox, outbox.c.record_id == first.record_id) == 1
    assert _count(engine, rejections) == 1
    with engine.connect() as conn:
        kinds = [e["kind"] for e in audit.events_for(conn, [first.record_id])]
    assert kinds == ["received", "queued", "duplicate"]


def test_other_source_same_activity_is_duplicate_or_conflict(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    a, b = new_partner(engine), new_partner(engine)
    [first] = ingest(engine, _ref(a), [sub])
    same = copy.deepcopy(sub) | {"source_record_id": "B-1"}
    more = copy.deepcopy(sub) | {"source_record_id": "B-2"}
    more["claimed"] = {**more["claimed"], "quantity": "40"}
    dup, conflict = ingest(engine, _ref(b), [same, more])
    assert dup.status == "duplicate" and dup.record_id != first.record_id
    assert conflict.status == "conflict"
    assert [e.code for e in conflict.errors] == ["CONFLICT_WITH_EXISTING"]
    with engine.connect() as conn:
        rows = {r.record_id: r for r in conn.execute(select(records))}
    assert rows[dup.record_id].duplicate_of == first.record_id
    assert rows[conflict.record_id].status == "conflict"
    # Neither is forwarded: only the first report is in the outbox.
    assert _count(engine, outbox) == 1


def test_rejected_submission_is_kept_for_revalidation_and_neighbours_pass(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    p = new_partner(engine)
    bad = copy.deepcopy(sub) | {"source_record_id": "SRC-BAD"}
    bad["person"] = {**bad["person"], "id_number": gen.corrupt_check_digit(sub["person"]["id_number"])}
    good, rejected, junk = ingest(engine, _ref(p), [sub, bad, "not an object"])
    assert good.status == "accepted"
    assert rejected.status == "rejected" and rejected.errors[0].code == "ID_NUMBER_INVALID"
    assert junk.status == "rejected" and junk.errors[0].code == "SCHEMA"
    assert _count(engine, rejections, rejections.c.partner_id == p.partner_id) == 2
    with engine.connect() as conn:
        details = conn.execute(select(audit_events.c.detail)).scalars().all()
    assert all(bad["person"]["id_number"] not in d and sub["person"]["id_number"] not in d
               for d in details)


def test_withdrawal_is_a_new_forwarded_version_and_frees_the_activity(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    a, b = new_partner(engine), new_partner(engine)
    [first] = ingest(engine, _ref(a), [sub])
    answer = withdraw(engine, _ref(a), "SRC-1")
    assert answer is not None and answer.version == 2
    assert withdraw(engine, _ref(a), "NO-SUCH") is None
    with engine.connect() as conn:
        row = conn.execute(select(records).where(records.c.record_id == first.record_id)).one()
    assert row.withdrawn and row.current_version == 2
    assert _count(engine, outbox, outbox.c.record_id == first.record_id) == 2
    # The withdrawn report no longer holds the activity: another source's report is accepted.
    [other] = ingest(engine, _ref(b), [copy.deepcopy(sub) | {"source_record_id": "B-9"}])
    assert other.status == "accepted"


def test_audit_verify_names_edits_deletions_and_reordering(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    p = new_partner(engine)
    ingest(engine, _ref(p), [sub, copy.deepcopy(sub) | {"source_record_id": "SRC-2"}])
    with engine.connect() as conn:
        assert audit.verify(conn).ok
        seqs = conn.execute(select(audit_events.c.seq).order_by(audit_events.c.seq)).scalars().all()
    assert len(seqs) >= 4
    target = seqs[2]

    with engine.begin() as conn:  # edit
        conn.execute(update(audit_events).where(audit_events.c.seq == target)
                     .values(actor="someone-else"))
    with engine.connect() as conn:
        result = audit.verify(conn)
    assert not result.ok and result.first_bad_seq == target


def test_audit_verify_detects_deletion_and_truncation(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    p = new_partner(engine)
    ingest(engine, _ref(p), [sub, copy.deepcopy(sub) | {"source_record_id": "SRC-2"}])
    with engine.connect() as conn:
        seqs = conn.execute(select(audit_events.c.seq).order_by(audit_events.c.seq)).scalars().all()
    with engine.begin() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq == seqs[1]))
    with engine.connect() as conn:
        result = audit.verify(conn)
    assert not result.ok and result.first_bad_seq == seqs[1]
    with engine.begin() as conn:  # restore nothing; now cut the tail instead
        conn.execute(delete(audit_events).where(audit_events.c.seq >= seqs[1]))
    with engine.connect() as conn:
        result = audit.verify(conn)
    assert not result.ok and "head" in (result.reason or "")


def test_audit_verify_detects_swapped_events(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    p = new_partner(engine)
    ingest(engine, _ref(p), [sub, copy.deepcopy(sub) | {"source_record_id": "SRC-2"}])
    with engine.connect() as conn:
        rows = conn.execute(select(audit_events).order_by(audit_events.c.seq)).mappings().all()
    a, b = dict(rows[1]), dict(rows[2])
    with engine.begin() as conn:  # swap the contents of two neighbours, keeping their seq
        for src, dst in ((a, b), (b, a)):
            values = {k: v for k, v in src.items() if k not in ("seq", "event_id")}
            conn.execute(update(audit_events).where(audit_events.c.seq == dst["seq"]).values(**values))
    with engine.connect() as conn:
        result = audit.verify(conn)
    assert not result.ok and result.first_bad_seq == a["seq"]


def test_partner_bound_to_a_base_cannot_report_another_base(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    p = new_partner(engine, base_code="QH-BASE-01")
    load_base_and_plan(engine, "QH-BASE-01", "QH-PLAN-01")
    own = copy.deepcopy(sub)
    own["activity"] = {**own["activity"], "provider_code": "QH-BASE-01", "plan_id": "QH-PLAN-01"}
    foreign = copy.deepcopy(sub) | {"source_record_id": "SRC-F"}
    foreign["activity"] = {**foreign["activity"], "provider_code": "QH-BASE-99"}
    rules = RulesContext(ReferenceCache(engine, KEYS).current(), fixture_rules_config())
    ok, refused = ingest(engine, _ref(p), [own, foreign], rules=rules)
    assert ok.status == "accepted"
    assert refused.status == "rejected"
    assert [(e.code, e.field) for e in refused.errors] == [("SCOPE_VIOLATION", "activity.provider_code")]


def _training(sub: dict[str, Any], source_id: str, start: str, end: str, hours: str,
              title: str) -> dict[str, Any]:
    out = copy.deepcopy(sub) | {"source_record_id": source_id}
    out["activity"] = {**out["activity"], "title": title, "mode": "offline",
                       "started_on": start, "completed_on": end}
    out["claimed"] = {**out["claimed"], "quantity": hours}
    return out


def test_overlapping_offline_trainings_and_over_24_hours_a_day_are_flagged_not_dropped(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    """R14 across records, with requests from two different partners."""
    a, b = new_partner(engine), new_partner(engine)
    [first] = ingest(engine, _ref(a), [_training(sub, "T-1", "2026-05-10", "2026-05-12", "24",
                                                 "高原生态修复技术研修班")])
    assert first.status == "accepted" and first.warnings == []
    overlap, apart = ingest(engine, _ref(b), [
        _training(sub, "T-2", "2026-05-12", "2026-05-13", "16", "数字政府建设实务"),
        _training(sub, "T-3", "2026-06-01", "2026-06-01", "8", "会计准则专题")])
    assert overlap.status == "accepted"  # flagged, never dropped
    assert {w.code for w in overlap.warnings} == {"INTEGRITY_OVERLAP"}
    assert apart.warnings == []
    [heavy] = ingest(engine, _ref(b), [
        _training(sub, "T-4", "2026-06-01", "2026-06-01", "20", "三江源生态保护专题")])
    assert "INTEGRITY_DAY_OVER_24H" in {w.code for w in heavy.warnings}  # 8 h + 20 h on 1 June
    with engine.connect() as conn:
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == overlap.record_id)).scalar_one()
    assert "INTEGRITY_OVERLAP" in payload


def test_r14_counts_only_trainings_as_overlapping_and_only_time_as_a_days_hours(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    """R14 flags trainings that overlap and days over 24 h of time actually spent.

    Papers do not overlap, an exam setter's granted hours fill no day, and an online course
    known only by its completion day is not a day's work (found reviewing SPEC R14).
    """
    p = new_partner(engine)

    def of(source_id: str, kind: str, unit: str, quantity: str, mode: str,
           start: str | None, end: str) -> dict[str, Any]:
        out = _training(sub, source_id, start or end, end, quantity, f"{kind} {source_id}")
        out["activity_type"], out["activity"]["mode"] = kind, mode
        out["claimed"] = {**out["claimed"], "unit": unit,
                          "details": {"authorship": "sole"} if kind == "paper" else {}}
        if start is None:
            del out["activity"]["started_on"]
        return out

    answers = ingest(engine, _ref(p), [
        of("P-1", "paper", "papers", "1", "offline", None, "2026-03-02"),
        of("P-2", "paper", "papers", "1", "offline", None, "2026-03-02"),
        of("E-1", "exam_setting", "hours", "40", "offline", None, "2026-04-01"),
        of("O-1", "online_course", "hours", "20", "online", None, "2026-05-05"),
        of("O-2", "online_course", "hours", "20", "online", None, "2026-05-05"),
        of("T-1", "training", "hours", "16", "offline", "2026-06-01", "2026-06-01"),
        of("T-2", "training", "hours", "16", "offline", "2026-06-01", "2026-06-01")])
    flags = {a.source_record_id: {w.code for w in a.warnings} & {
        "INTEGRITY_OVERLAP", "INTEGRITY_DAY_OVER_24H"} for a in answers}
    assert all(a.status == "accepted" for a in answers), [(a.source_record_id, a.errors)
                                                          for a in answers if a.errors]
    assert flags == {"P-1": set(), "P-2": set(), "E-1": set(), "O-1": set(), "O-2": set(),
                     "T-1": {"INTEGRITY_OVERLAP", "INTEGRITY_DAY_OVER_24H"},
                     "T-2": {"INTEGRITY_OVERLAP", "INTEGRITY_DAY_OVER_24H"}}


def test_a_twin_that_commits_first_makes_the_later_submission_a_correction(
        postgres_url: str, new_partner: Callable[..., Partner]) -> None:
    """Two requests with one source id and different content, overlapping (PostgreSQL).

    The later one waits on the earlier one's row, loses the race when it commits, and is
    judged again: a correction, not an error.  (Found in review: a bulk insert by ``COPY``
    raised the driver's own error, which the race retry did not recognise, so it was a 500.)
    """
    name = f"twin-{uuid.uuid4().hex[:8]}"
    engine = make_engine(make_url(postgres_url).update_query_dict({"application_name": name})
                         .render_as_string(hide_password=False))
    partner = _ref(new_partner(engine))
    first = gen.canonical_submission(random.Random(1), "SRC-TWIN", hours="24")
    second = gen.canonical_submission(random.Random(2), "SRC-TWIN", hours="24")  # another person
    written, release = threading.Event(), threading.Event()
    answers: dict[str, Any] = {}

    def hold(_conn: Any, _answers: Any) -> None:  # the first request, written, not committed
        written.set()
        release.wait(30)

    def run(key: str, call: Callable[[], Any]) -> None:
        try:
            answers[key] = call()
        except Exception as exc:  # noqa: BLE001 - reported by the asserts below
            answers[key] = exc

    one = threading.Thread(target=run, args=("first", lambda: ingest_items(
        engine, partner, [item_from_raw(first)], in_tx=hold)))
    two = threading.Thread(target=run, args=("second", lambda: ingest(engine, partner, [second])))
    one.start()
    try:
        assert written.wait(30)
        two.start()
        deadline = time.monotonic() + 30
        with engine.connect() as conn:  # the second request waits on the first one's row
            while conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
                    " AND wait_event_type = 'Lock'"), {"name": name}).scalar_one() == 0:
                assert time.monotonic() < deadline, "the second request never waited"
                conn.rollback()
                time.sleep(0.02)
    finally:
        release.set()
        one.join(30)
        two.join(30)
        engine.dispose()
    assert not isinstance(answers["first"], Exception), answers["first"]
    assert not isinstance(answers["second"], Exception), answers["second"]
    [a], [b] = answers["first"], answers["second"]
    assert (a.status.value, a.version) == ("accepted", 1)
    assert (b.status.value, b.record_id, b.version) == ("corrected", a.record_id, 2)


def test_a_bulk_insert_as_a_connections_first_statement_commits_with_it(db_url: str) -> None:
    """``COPY`` bypasses SQLAlchemy: it must still open (and so commit) a transaction."""
    engine = make_engine(db_url)
    try:
        row = {"partner_id": "p-bulk", "adapter": "canonical", "source_record_id": "S-1",
               "payload": '{"a": "tab\\there, newline\\n, backslash \\\\"}', "errors": "[]",
               "status": "open", "received_at": datetime.now(UTC)}
        with engine.connect() as conn:
            bulk_insert(conn, rejections, [row])
            conn.commit()
        with engine.connect() as conn:
            stored = conn.execute(select(rejections.c.payload, rejections.c.received_at)
                                  .where(rejections.c.partner_id == "p-bulk")).one()
    finally:
        engine.dispose()
    assert stored.payload == row["payload"]
    assert stored.received_at == row["received_at"]


def test_r14_reads_stored_records_by_their_days_not_only_by_completion(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    """R14 reads only the stored records whose days can meet the new ones'.

    A month's batch does not read the person's whole year, but a long training that began
    before the new records' first day and ends after their last still meets them.
    """
    p = new_partner(engine)
    [long_one, april] = ingest(engine, _ref(p), [
        _training(sub, "L-1", "2026-04-20", "2026-05-20", "24", "高原医学长期进修班"),
        _training(sub, "A-1", "2026-04-02", "2026-04-02", "8", "四月专题")])
    assert long_one.warnings == [] and april.warnings == []
    [inside] = ingest(engine, _ref(p), [
        _training(sub, "M-1", "2026-05-15", "2026-05-15", "8", "五月专题")])
    assert {w.code for w in inside.warnings} == {"INTEGRITY_OVERLAP"}
    [late] = ingest(engine, _ref(p), [
        _training(sub, "M-2", "2026-05-19", "2026-05-21", "16", "跨月专题")])
    assert {w.code for w in late.warnings} == {"INTEGRITY_OVERLAP"}  # shares 19-20 May
    [apart] = ingest(engine, _ref(p), [
        _training(sub, "J-1", "2026-06-03", "2026-06-03", "8", "六月专题")])
    assert apart.warnings == []


def test_r14_in_a_chunk_spanning_the_year_reads_each_records_own_days(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    """An annual chunk reads, for each of its records, the stored records meeting its days.

    Two stored trainings fill 1 August with 20 h; the chunk brings 8 h more on that day and a
    December training: only the August one is over 24 h a day and overlapping.
    """
    p = new_partner(engine)
    stored = ingest(engine, _ref(p), [
        _training(sub, "S-1", "2026-08-01", "2026-08-01", "10", "八月专题一"),
        _training(sub, "S-2", "2026-08-01", "2026-08-01", "10", "八月专题二")])
    assert [a.status for a in stored] == ["accepted"] * 2
    august, december = ingest(engine, _ref(p), [
        _training(sub, "N-8", "2026-08-01", "2026-08-01", "8", "八月专题三"),
        _training(sub, "N-12", "2026-12-01", "2026-12-01", "8", "十二月专题")])
    assert {w.code for w in august.warnings} >= {"INTEGRITY_OVERLAP", "INTEGRITY_DAY_OVER_24H"}
    # (a December date may still lie ahead today: INTEGRITY_COMPLETED_IN_FUTURE is not R14's read)
    assert not {w.code for w in december.warnings} & {"INTEGRITY_OVERLAP", "INTEGRITY_DAY_OVER_24H"}


def test_r14_judges_a_corrected_record_as_its_new_version_only(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    """A correction that moves a record to another person leaves its old days behind.

    R and S overlap for one person; the partner then corrects R to another person and sends
    Q for the first person on the same day.  Q overlaps S, but R, now alone, overlaps
    nothing: its stored version, still the first person's while the chunk is judged, must not
    count (found in review: it flagged R, or not, by which other records the chunk held).
    """
    p = new_partner(engine)
    r, s = ingest(engine, _ref(p), [
        _training(sub, "R-1", "2026-08-01", "2026-08-01", "8", "八月专题一"),
        _training(sub, "S-1", "2026-08-01", "2026-08-01", "8", "八月专题二")])
    assert {w.code for w in r.warnings} == {w.code for w in s.warnings} == {"INTEGRITY_OVERLAP"}
    moved = _training(sub, "R-1", "2026-08-01", "2026-08-01", "8", "八月专题一")
    moved["person"] = {**moved["person"], "id_number": gen.make_id_number(random.Random(77))}
    assert moved["person"]["id_number"] != sub["person"]["id_number"]
    corrected, q = ingest(engine, _ref(p), [
        moved, _training(sub, "Q-1", "2026-08-01", "2026-08-01", "8", "八月专题三")])
    assert corrected.status == "corrected" and corrected.record_id == r.record_id
    assert corrected.warnings == []
    assert {w.code for w in q.warnings} == {"INTEGRITY_OVERLAP"}


def test_a_correction_to_another_person_moves_the_record_and_its_activity(
        engine: Engine, new_partner: Callable[..., Partner], sub: dict[str, Any]) -> None:
    """SPEC §7: the record is the corrected person's now; the first person's activity is free.

    Found in review: the record kept the first person's keys, so compliance credited the wrong
    person, the first person's own report of the activity came back a duplicate of a record
    no longer theirs, and the second person's was accepted as well (credited twice).
    """
    from gateway.compliance import report

    p, other_source = new_partner(engine), new_partner(engine)
    [first] = ingest(engine, _ref(p), [sub])
    someone_else = gen.make_id_number(random.Random(78))
    moved = copy.deepcopy(sub)
    moved["person"] = {**moved["person"], "id_number": someone_else}
    [corrected] = ingest(engine, _ref(p), [moved])
    assert (corrected.status, corrected.record_id, corrected.version) == (
        "corrected", first.record_id, 2)
    year = sub["year"]
    with engine.connect() as conn:
        before, after = report(conn, sub["person"]["id_number"], year, keys=KEYS), report(conn, someone_else, year, keys=KEYS)
    assert [r["record_id"] for r in before["records"]] == []
    assert [r["record_id"] for r in after["records"]] == [first.record_id]
    # The first person's activity is free again; the second person's is this record's.
    again = copy.deepcopy(sub) | {"source_record_id": "B-1"}
    twice = copy.deepcopy(moved) | {"source_record_id": "B-2"}
    freed, repeated = ingest(engine, _ref(other_source), [again, twice])
    assert freed.status == "accepted"
    assert (repeated.status, repeated.record_id != first.record_id) == ("duplicate", True)
    with engine.connect() as conn:
        dup_of = conn.execute(select(records.c.duplicate_of)
                              .where(records.c.record_id == repeated.record_id)).scalar_one()
    assert dup_of == first.record_id


@pytest.mark.parametrize("key", ["result_id", "xh", "记录编号", "流水号"])
def test_a_native_submission_rejected_unparsed_is_answered_and_filed_by_its_own_id(
        engine: Engine, new_partner: Callable[..., Partner], key: str) -> None:
    from adapters.training_base import TrainingBaseAdapter

    p = new_partner(engine)
    if key == "result_id":  # through the adapter, as a push arrives
        [row] = TrainingBaseAdapter().parse({"base_code": "QHJD01", "results": [
            {"result_id": "PK-9", "hours": "many"}]})
        items = [item_from_raw(None)]
        items[0].raw, items[0].errors = row.raw, row.errors
    else:
        items = [item_from_raw(None)]
        items[0].raw = {key: "PK-9", "学分": "many"}
    [answer] = ingest_items(engine, _ref(p), items)
    assert (answer.status, answer.source_record_id) == ("rejected", "PK-9")
    with engine.connect() as conn:
        assert conn.execute(select(rejections.c.source_record_id)).scalars().all() == ["PK-9"]
