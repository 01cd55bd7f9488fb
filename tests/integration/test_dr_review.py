"""Review of backup and restore (commits 674d63f, 71b3166): findings and guards.

Both findings are fixed and their tests pass now: a second restore lifts past the first
one's floor (high), and a delivery pending in the backup is not an "unexpected" duplicate
(medium).  The rest are guards of behaviour checked and found right.  A restore is simulated with
:func:`gateway.backup.mark_restored` on the live store where the backup's contents do not
matter (the store *is* the backup then), and with a real ``db backup`` / copy where they do.
"""

from __future__ import annotations

import copy
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, select, update

from gateway.accounts import Partner
from gateway.backup import backup_sqlite, mark_restored
from gateway.config import Settings
from gateway.errors import PayloadRejected
from gateway.ops.deliveries import DeliveryFilter, reprocess
from gateway.ops.edits import edit_and_requeue
from gateway.ops.records import resolve_conflict
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.store.db import make_engine
from gateway.store.tables import audit_events, outbox, records
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission, make_person
from tests.integration.test_backup_restore import (  # noqa: F401 (worker_for: a fixture)
    _backup,
    _drain,
    _held_downstream,
    _restore,
    _sqlite_file,
    worker_for,
)
from tests.integration.test_caps_ledger import NOW, paper


def _ref(p: Partner) -> PartnerRef:
    return PartnerRef(p.partner_id, p.adapter, p.base_code)


def _sub(hours: str) -> dict[str, Any]:
    return canonical_submission(random.Random(7), "REC-1", hours=hours)


def _row(engine: Engine, record_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(records.c.current_version, records.c.version_floor,
                                   records.c.withdrawn).where(
            records.c.record_id == record_id)).one()


# -- (1) a second restore ---------------------------------------------------------------------


def test_a_second_restore_lifts_past_the_numbers_made_after_the_first(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """A second restore must lift past what was made after the first.

    Restore 1 sets floor 1001 on a record at version 1.  Backup 2 is taken then (the store
    as it is now).  Before disaster 2 the partner corrects: version 1001 is made and delivered.
    Restore 2 puts backup 2 back (current 1, floor 1001) and runs ``db restored`` again: the
    next version must not be 1001, which the management system holds.
    """
    ref = _ref(new_partner(engine))
    [first] = ingest(engine, ref, [_sub("16")])
    rid = first.record_id
    mark_restored(engine, "disaster 1", "ops")
    assert _row(engine, rid).version_floor == 1001
    # ... backup 2 taken here; 1001 made and delivered after it; disaster 2; backup 2 restored:
    done = mark_restored(engine, "disaster 2", "ops")
    [again] = ingest(engine, ref, [_sub("32")])
    assert again.record_id == rid
    assert again.version > 1001, "1001 is held downstream: this content would be lost"
    assert done.records == 1


def test_db_restored_twice_for_one_restore_numbers_as_once(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """Guard: one restore marked twice.

    Guard: the command run twice by mistake does not stack the gap (the existing test's
    smaller second gap; here the same gap).
    """
    ref = _ref(new_partner(engine))
    rid = ingest(engine, ref, [_sub("16")])[0].record_id
    mark_restored(engine, "restored", "ops", version_gap=10)
    [answer] = ingest(engine, ref, [_sub("20")])
    assert (answer.record_id, answer.version) == (rid, 11)
    # A new version at the floor: a second mark now lifts past it (current 11 + 10).
    assert mark_restored(engine, "restored again", "ops", version_gap=10).records == 1
    assert ingest(engine, ref, [_sub("24")])[0].version == 21


# -- (1) every writer numbers past the floor ----------------------------------------------------


def test_ops_edit_after_a_restore_numbers_past_the_floor_and_takes_the_shown_version(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings]) -> None:
    """Guard: an ops edit after a restore.

    Guard, (1) and (5): a dead record edited after a restore, with the version the console
    showed (its current one, below the floor) as expected_version: not RECORD_CHANGED.
    """
    ref = _ref(new_partner(engine))
    rid = ingest(engine, ref, [_sub("16")])[0].record_id
    with engine.begin() as conn:
        assert conn.execute(update(outbox).where(outbox.c.record_id == rid).values(
            status="dead", error_code="DOWNSTREAM_REJECTED", last_error="rejected")).rowcount == 1
    mark_restored(engine, "restored", "ops", version_gap=100)
    done = edit_and_requeue(engine, make_settings(db_url), rid, {"activity.title": "盐湖研修班"},
                            reason="title fixed", actor="op", expected_version=1)
    assert done["version"] == 101
    with engine.connect() as conn:
        states = {r.version: r.status for r in conn.execute(select(
            outbox.c.version, outbox.c.status).where(outbox.c.record_id == rid))}
    assert states == {1: "superseded", 101: "pending"}


def test_keep_this_after_a_restore_numbers_both_records_past_their_floors(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings]) -> None:
    """Guard: keep=this after a restore.

    Guard, (1) and (5): conflict resolution keep=this re-issues the held record past its
    floor and withdraws the holder past its own; expected_version is the held current one.
    """
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    person = make_person(random.Random(44))
    mine, theirs = paper("A-1", person, 1), paper("B-1", person, 2)
    ingest(engine, a, [mine], now=NOW)
    [holder] = ingest(engine, b, [theirs], now=NOW)
    moved = copy.deepcopy(theirs) | {"source_record_id": "A-1"}
    moved["claimed"] = {**moved["claimed"], "quantity": "2"}
    [held] = ingest(engine, a, [moved], now=NOW)
    assert held.status == "conflict" and held.version == 2
    mark_restored(engine, "restored", "ops", version_gap=100)
    result = resolve_conflict(engine, make_settings(db_url), held.record_id, keep="this",
                              reason="经核实以本单位数据为准", actor="op", expected_version=2)
    assert result["status"] == "accepted" and result["version"] == 102
    kept, gone = _row(engine, held.record_id), _row(engine, holder.record_id)
    assert kept.current_version == 102
    assert (gone.current_version, gone.withdrawn) == (101, True)
    with engine.connect() as conn:
        queued = {(r.record_id, r.version) for r in conn.execute(
            select(outbox.c.record_id, outbox.c.version))}
    assert {(held.record_id, 102), (holder.record_id, 101)} <= queued


def test_failed_assessment_after_a_restore_withdraws_past_the_floor(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """Guard (1): a failed result for a counted record withdraws it at the floor."""
    ref = _ref(new_partner(engine))
    person = make_person(random.Random(3))
    good = paper("P-1", person, 1)
    rid = ingest(engine, ref, [good], now=NOW)[0].record_id
    mark_restored(engine, "restored", "ops", version_gap=40)
    failed = copy.deepcopy(good)
    failed["evidence"] = {**(failed.get("evidence") or {}), "assessment": "failed"}
    [answer] = ingest(engine, ref, [failed], now=NOW)
    row = _row(engine, rid)
    assert (row.current_version, row.withdrawn) == (41, True), answer


def test_a_partner_withdrawal_then_correction_after_a_restore_keep_rising(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    """Guard (2): versions with a gap stay in order: withdrawn at the floor, revived after."""
    ref = _ref(new_partner(engine))
    rid = ingest(engine, ref, [_sub("16")])[0].record_id
    mark_restored(engine, "restored", "ops", version_gap=7)
    assert withdraw(engine, ref, "REC-1").version == 8  # type: ignore[union-attr]
    [back] = ingest(engine, ref, [_sub("20")])
    assert (back.record_id, back.version) == (rid, 9)
    with engine.connect() as conn:
        versions = sorted(conn.execute(select(outbox.c.version).where(
            outbox.c.record_id == rid)).scalars())
    assert versions == [1, 8, 9]


# -- (3) db backup --------------------------------------------------------------------------


def _fill(store: Path, megabytes: int) -> sqlite3.Connection:
    """A bigger store, as years of data make it.

    Bulk the store up with a table of its own (not the gateway's), written as the gateway
    writes (WAL, checkpoint every 20,000 pages), the connection left open as a running
    gateway's are: its recent pages are in the write-ahead log, as in production.
    """
    conn = sqlite3.connect(store)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE review_filler (x BLOB)")
    conn.executemany("INSERT INTO review_filler VALUES (randomblob(4000))",
                     [()] * (megabytes * 256))
    conn.commit()
    return conn


def _backup_while_writing(sqlite_url: str, dest: Path, pause: float,
                          deadline: float) -> tuple[bool, int]:
    """Run ``backup_sqlite`` while another connection commits every ``pause`` s."""
    store = _sqlite_file(sqlite_url)
    finished, failed = threading.Event(), []

    def run() -> None:
        try:
            backup_sqlite(sqlite_url, dest)
        except Exception as exc:  # reported through the test's assertion
            failed.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=run, daemon=True)
    writer = sqlite3.connect(store, timeout=30)
    writes = 0
    try:
        thread.start()
        end = time.monotonic() + deadline
        while not finished.is_set() and time.monotonic() < end:
            writer.execute("INSERT INTO review_filler VALUES (randomblob(100))")
            writer.commit()
            writes += 1
            finished.wait(pause)
        done = finished.is_set()
    finally:
        writer.close()
        thread.join(120)  # with the writer gone the copy completes
    assert not failed, failed
    return done, writes


def test_db_backup_finishes_while_the_gateway_keeps_writing(
        sqlite_url: str, tmp_path: Path) -> None:
    """Guard: a stepped backup under steady writes.

    Guard (3): a 60 MB store (four 4096-page steps) copied while another connection
    commits every 5 ms to its biggest table; suspected to restart for ever (SQLite restarts a
    stepped backup when another connection writes), not so: it finishes well within 20 s.
    """
    gateway = _fill(_sqlite_file(sqlite_url), 60)  # 60 MB: ~15,000 pages, four steps
    try:
        done, writes = _backup_while_writing(sqlite_url, tmp_path / "busy.sqlite3", 0.005, 20)
    finally:
        gateway.close()
    assert done, f"still copying after 20 s and {writes} commits"


def test_db_backup_of_a_small_store_under_ingest_is_a_consistent_checked_copy(
        sqlite_url: str, new_partner: Callable[..., Partner], tmp_path: Path) -> None:
    """Guard (3): ingest runs in another thread while the copy is taken; the copy verifies."""
    engine = make_engine(sqlite_url)
    ref = _ref(new_partner(engine))
    stop, errors = threading.Event(), []

    def ingesting() -> None:
        n = 0
        try:
            while not stop.is_set():
                ingest(engine, ref, [canonical_submission(random.Random(n), f"W-{n}")])
                n += 1
        except Exception as exc:
            errors.append(exc)

    writer = threading.Thread(target=ingesting)
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline:  # a few committed before the copy
            with engine.connect() as conn:
                if len(conn.execute(select(records.c.record_id)).all()) >= 3:
                    break
        made = backup_sqlite(sqlite_url, tmp_path / "live.sqlite3")
    finally:
        stop.set()
        writer.join(60)
    assert not errors, errors
    assert made.audit_ok and made.records >= 3 and made.audit_anchor is not None
    copy_engine = make_engine(f"sqlite:///{tmp_path / 'live.sqlite3'}")
    try:
        with copy_engine.connect() as conn:
            assert len(conn.execute(select(records.c.record_id)).all()) == made.records
            # every stored record's current version has its outbox row in the copy (one tx)
            pairs = conn.execute(select(records.c.record_id).where(~select(outbox.c.id).where(
                outbox.c.record_id == records.c.record_id).exists())).all()
        assert pairs == []
    finally:
        copy_engine.dispose()
        engine.dispose()


def test_db_backup_refuses_a_missing_dir_an_existing_file_and_the_store(
        sqlite_url: str, tmp_path: Path) -> None:
    """Guard (3): each refused as SCHEMA on ``to``, nothing written."""
    store = _sqlite_file(sqlite_url)
    existing = tmp_path / "old.bak"
    existing.write_bytes(b"keep me")
    sidecar_only = tmp_path / "side.bak"
    (tmp_path / "side.bak.json").write_text("{}")
    for dest in (tmp_path / "no" / "such" / "dir.bak", existing, store, sidecar_only):
        with pytest.raises(PayloadRejected) as caught:
            backup_sqlite(sqlite_url, dest)
        assert caught.value.code == "SCHEMA" and caught.value.field == "to", dest
    assert existing.read_bytes() == b"keep me"
    assert not sidecar_only.exists()
    assert not list(tmp_path.glob("*.partial"))



# -- (4) after a correct restore ---------------------------------------------------------------


def test_a_version_pending_at_the_backup_is_not_an_unexpected_duplicate_after_a_restore(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        worker_for: Callable[[], Any], tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    partner = new_partner(engine)
    rid = ingest(engine, PartnerRef(partner.partner_id, "canonical"), [_sub("16")])[0].record_id
    backup = tmp_path / "before.bak"
    _backup(db_url, backup)  # version 1 still pending in the backup
    _drain(worker_for())  # ... and delivered before the disaster
    engine.dispose()
    _restore(db_url, backup)
    after = make_engine(db_url)
    try:
        mark_restored(after, "restored last night's backup", "ops")
        _drain(worker_for())  # version 1 is sent again: the management system holds it
        with after.connect() as conn:
            details = [orjson.loads(d) for d in conn.execute(select(audit_events.c.detail).where(
                audit_events.c.kind == "delivered", audit_events.c.record_id == rid)).scalars()]
    finally:
        after.dispose()
    assert [d["receipt_status"] for d in details] == ["duplicate"]
    assert not details[0].get("unexpected"), details


def test_a_version_pending_at_the_backup_that_went_dead_before_the_disaster_is_delivered_after(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        worker_for: Callable[[], Any], mock_ce: tuple[str, Faults],  # noqa: F811
        tmp_path: Path) -> None:
    """Pending in the backup; refused for good by the management system before the disaster.

    The management system never held it, so after the restore it is not a duplicate to expect:
    sent again (its operators fixed what made them refuse it meanwhile) it is applied once, as
    any first delivery, and nothing calls it unexpected.  Refused still, it goes dead again
    with the refusal's code, where ops see it.
    """
    url, faults = mock_ce
    partner = new_partner(engine)
    rid = ingest(engine, PartnerRef(partner.partner_id, "canonical"), [_sub("16")])[0].record_id
    backup = tmp_path / "before.bak"
    _backup(db_url, backup)  # version 1 pending in the backup
    faults.reject_ids.add(rid)
    _drain(worker_for())  # ... and refused before the disaster: dead, never held downstream
    with engine.connect() as conn:
        dead = conn.execute(select(outbox.c.status, outbox.c.error_code).where(
            outbox.c.record_id == rid)).one()
    assert dead.status == "dead" and _held_downstream(url, rid) == [], dead
    engine.dispose()
    _restore(db_url, backup)
    after = make_engine(db_url)
    try:
        mark_restored(after, "restored last night's backup", "ops")
        _drain(worker_for())  # refused again: dead again, with the management system's code
        with after.connect() as conn:
            again = conn.execute(select(outbox.c.status, outbox.c.error_code).where(
                outbox.c.record_id == rid)).one()
        assert (again.status, again.error_code) == ("dead", dead.error_code)
        # Its operators fixed it; ops reprocess the dead letter.
        faults.reject_ids.discard(rid)
        assert reprocess(after, DeliveryFilter(record_ids=(rid,)), dry_run=False,
                         reason="管理系统已修正", actor="ops").requeued == 1
        _drain(worker_for())
        with after.connect() as conn:
            details = [orjson.loads(d) for d in conn.execute(select(audit_events.c.detail).where(
                audit_events.c.kind == "delivered", audit_events.c.record_id == rid)).scalars()]
    finally:
        after.dispose()
    assert [d["receipt_status"] for d in details] == ["accepted"], details
    assert not details[0].get("unexpected"), details
    assert [v for v, _ in _held_downstream(url, rid)] == [1]
