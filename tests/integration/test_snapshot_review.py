"""Review: reads of several statements (and read-then-write) while the gateway commits between them.

On PostgreSQL every connection is READ COMMITTED: each statement sees what is committed when it
starts, so a read made of several statements, or a decision read in one transaction and written
in another, may mix two moments.  Each case here reads exactly as the product does, through its
own engine, and commits a real gateway write (ingest, the batch processor, the delivery worker,
another alert evaluator) from another engine at a scripted statement, the technique of
``test_a_trail_the_gateway_appends_to_while_it_is_walked_verifies``
(tests/integration/test_audit_integrity.py).  A report a moment stale is not a bug here; an
answer whose parts cannot all be true at one moment, or a wrong decision written to the store,
is.

PostgreSQL only, but for the reconciliation (read through ``store.db.snapshot``, a lock-free
snapshot on SQLite too): on SQLite the gateway's engine begins every transaction ``BEGIN
IMMEDIATE``, so the write injected mid-read would wait for the reader's lock.  Cases 1 and 4
decide in one transaction and write in another, so they could happen on SQLite too, between
the transactions, where a cursor event cannot place the write; their fixes hold there as well.

Each case was a strict xfail written by a review against the code before its fix:
1. an ops edit of a dead version stored over a partner's correction committed meanwhile (now
   refused RECORD_CHANGED: the edit must be the next version after the one it read);
2. the reconciliation lost a record a month's batch moved between two of its statements (now
   read in one snapshot);
3. a batch's status listed rejected rows its counts did not have (now the errors are read
   before the counters that cover them);
4. a stale alert evaluation cleared an alert another evaluator had just sent, which then went
   out again (now only rows live before the conditions were read, and unclaimed since, clear).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event, select

from gateway import reconcile
from gateway.accounts import Partner
from gateway.alerts import evaluate
from gateway.batch_status import batch_status
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.ops.common import OpsConflict
from gateway.ops.edits import edit_and_requeue
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.db import make_engine, snapshot
from gateway.store.tables import outbox, records
from mock_partners import webhook_sink
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission, make_person
from tests.integration.test_reconciliation_review import YEAR, Pusher, some_rows
from tests.support.delivery import MakeWorker, drain
from tests.support.servers import uvicorn_thread

MakeSettings = Callable[..., Settings]
NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)  # the CE year 2026 is open
DEC_27 = datetime(2026, 12, 27, 2, 0, tzinfo=UTC)  # three days before the 30 December close
ROBOT_PATH = "/cgi-bin/webhook/send?key=test-robot"
AFTER = datetime(YEAR + 1, 1, 15, 9, 0, tzinfo=UTC)


def _pg_only(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("READ COMMITTED between statements: PostgreSQL only (on SQLite the gateway's "
                    "engine reads under BEGIN IMMEDIATE, so the injected write would wait)")


@pytest.fixture
def reader(db_url: str) -> Iterator[Engine]:
    """The engine the product's read runs on: the listener that injects the write goes on it."""
    _pg_only(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def snapshot_reader(db_url: str) -> Iterator[Engine]:
    """As ``reader``, on both stores: a ``snapshot`` read takes no write lock on SQLite either."""
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def _inject(reader: Engine, due: Callable[[str, int], bool], write: Callable[[], None]) -> list[str]:
    """Run ``write`` once, before the reader's first statement for which ``due(sql, n)`` holds.

    ``n`` counts the reader's statements from 0.  Returns the statements seen; the caller
    checks the write happened (``injected``), or the test tested nothing.
    """
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not any(s == "<injected>" for s in seen) and due(statement, len(seen)):
            write()
            seen.append("<injected>")
        seen.append(statement)

    event.listen(reader, "before_cursor_execute", before)
    return seen


def injected(seen: list[str]) -> bool:
    return "<injected>" in seen


# -- 1. reprocess with edit overwrites the partner's correction ----------------------------------

def test_an_ops_edit_does_not_overwrite_a_correction_committed_while_it_is_made(
        db_url: str, engine: Engine, reader: Engine, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker, make_settings: MakeSettings) -> None:
    partner = new_partner(engine)
    ref = PartnerRef(partner.partner_id, "canonical")
    rng = random.Random(7301)
    person = make_person(rng)
    first = canonical_submission(rng, "E-1", person=person, hours="8",
                                 title="[REJECT] 高原医学专题培训")
    [answer] = ingest(engine, ref, [first], now=NOW)
    record_id = str(answer.record_id)
    worker = make_worker()
    drain(worker)  # the mock refuses the title: version 1 is dead, DOWNSTREAM_REJECTED
    with engine.connect() as conn:
        assert conn.execute(select(outbox.c.status, outbox.c.error_code)
                            .where(outbox.c.record_id == record_id)).one() == (
            "dead", "DOWNSTREAM_REJECTED")

    # The base corrects the record (16 hours, a new title) while ops edit the dead version.
    correction = {**first, "activity": {**first["activity"], "title": "高原医学专题培训（更正）"},
                  "claimed": {**first["claimed"], "quantity": "16"}}

    def partner_corrects() -> None:
        [fixed] = ingest(engine, ref, [correction], now=NOW)
        assert (fixed.status.value, fixed.version) == ("corrected", 2)

    # Injected after ops read the record, its payload and its delivery, before the ingest.
    seen = _inject(reader, lambda sql, _: "partners.base_code" in sql, partner_corrects)
    refused = None
    try:
        edit_and_requeue(reader, make_settings(db_url, mock_ce[0]), record_id,
                         {"activity.title": "高原医学专题培训"}, reason="title fixed", actor="op")
    except OpsConflict as exc:
        refused = exc
    assert injected(seen), "the correction never happened: the test tested nothing"
    drain(worker)
    with engine.connect() as conn:
        current, hours = conn.execute(select(records.c.current_version, records.c.hours)
                                      .where(records.c.record_id == record_id)).one()
    versions = httpx.get(f"{mock_ce[0]}/_mock/applied/{record_id}").json()["versions"]
    counted = Decimal(versions[-1]["record"]["credited_hours"])
    # Right: the edit is refused; the partner's correction stands and is what is counted.
    # Now: version 3, the edit of version 1's stale payload (8 hours), is current and applied
    # after version 2.
    assert (current, Decimal(hours), counted) == (2, Decimal(16), Decimal(16)), (
        current, hours, [(v["version"], v["record"]["credited_hours"]) for v in versions])
    assert refused is not None and refused.code == "RECORD_CHANGED"


# -- 2. reconciliation: a record counted nowhere -------------------------------------------------

def test_a_month_committing_during_the_reconciliation_loses_no_record(
        db_url: str, engine: Engine, snapshot_reader: Engine, new_partner: Callable[..., Partner],
        tmp_path: Path, make_settings: MakeSettings) -> None:
    settings = make_settings(db_url, batch_dir=tmp_path / "batches")
    pusher = Pusher(engine, settings, tmp_path)
    health = new_partner(engine, adapter="health")
    december = some_rows()[11][:3]
    pusher.push(health, december, "annual", str(YEAR))
    # December's monthly batch arrives after the annual, repeating one of its rows unchanged:
    # accepted (202), queued, processed in the middle of the report.
    pusher.push(health, december[:1], "monthly", f"{YEAR}-12", run=False)

    def report(on: Engine) -> dict[str, Any]:
        with snapshot(on) as conn:  # as the API, the CLI and the console read it
            return reconcile.report(conn, "health", YEAR, today=AFTER)

    before = report(engine)

    def month_commits() -> None:
        processor = BatchProcessor(engine, settings, name="december")
        while processor.run_once():
            pass

    # Statement 0 lists the batches, 1 counts the months; inject before the next one.
    begins = 1 if snapshot_reader.dialect.name == "sqlite" else 0  # SQLite's BEGIN is a statement
    seen = _inject(snapshot_reader, lambda _, n: n == begins + 2, month_commits)
    during = report(snapshot_reader)
    assert injected(seen) and "count(*)" in seen[begins + 1], seen[:begins + 2]
    after = report(engine)
    assert before["totals"]["added"] == 3 and after["totals"]["repeated"] == 1, (before, after)

    def records_in(r: dict[str, Any]) -> int:
        return int(r["totals"]["monthly_records"] + r["totals"]["added"])

    assert records_in(before) == records_in(after) == 3
    # The report made during the commit must be one of the two moments', not a record short.
    assert records_in(during) == 3, during["totals"]
    assert during["totals"] in (before["totals"], after["totals"])


# -- 3. a batch's status: rejected rows its counts do not have -----------------------------------

def test_a_batch_status_lists_no_rejected_row_its_counts_do_not_have(
        db_url: str, engine: Engine, reader: Engine, new_partner: Callable[..., Partner],
        tmp_path: Path, make_settings: MakeSettings) -> None:
    settings = make_settings(db_url, batch_dir=tmp_path / "batches", batch_chunk_rows=2)
    pusher = Pusher(engine, settings, tmp_path)
    health = new_partner(engine, adapter="health")
    rows = some_rows()[0][:4]
    bad = [{**r} for r in rows]
    for r in bad[1:3]:  # two rows whose identity number fails its checksum: rejected
        r["身份证号"] = r["身份证号"][:-1] + ("0" if r["身份证号"][-1] != "0" else "1")
    batch_id = pusher.push(health, bad, "monthly", f"{YEAR}-01", run=False)

    def processed() -> None:
        processor = BatchProcessor(engine, settings, name="processor")
        while processor.run_once():
            pass

    # Between the answer's two reads (the batch's row and its errors' page, in either order).
    seen = _inject(reader, lambda _, n: n == 1, processed)
    with reader.connect() as conn:
        status = batch_status(conn, batch_id)
    assert injected(seen) and status is not None
    with engine.connect() as conn:
        final = batch_status(conn, batch_id)
    assert final is not None and final["counts"]["rejected"] == 2, final["counts"]
    listed = {e["row"] for e in status["rejected_rows"]}
    # Every rejected row listed is one the answer's counts and progress include.
    assert len(listed) <= status["counts"]["rejected"] + status["counts"]["conflict"], (
        status["status"], status["counts"], status["rows_done"], sorted(listed))
    assert all(row <= status["rows_done"] for row in listed), (status["rows_done"], listed)


# -- 4. alerts: a stale evaluation clears an alert just sent, which then goes out again ----------

@pytest.fixture
def sink() -> Iterator[str]:
    with uvicorn_thread(webhook_sink.create_app()) as url:
        yield url


def test_an_alert_another_evaluator_just_sent_is_not_cleared_and_sent_again(
        db_url: str, engine: Engine, reader: Engine, new_partner: Callable[..., Partner],
        make_worker: MakeWorker, make_settings: MakeSettings, sink: str) -> None:
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}",
                             alert_year_close_days=7, year_close_extensions={})
    partner = new_partner(engine)
    ref = PartnerRef(partner.partner_id, "canonical")
    worker = make_worker()

    def dead_letter_then_other_evaluator() -> None:
        sub = canonical_submission(random.Random(7302), "Y-1", title="[REJECT] 年终专题培训")
        ingest(engine, ref, [sub], now=NOW)
        drain(worker)  # dead-lettered DOWNSTREAM_REJECTED
        other = evaluate(engine, settings, DEC_27)
        assert "year_close:2026-12-30" in other.fired, other.as_dict()

    # The first evaluator has read its conditions (none active: its last read, year_close's
    # count of dead deliveries, found none); then the other evaluator fires, before this one
    # clears what is not active.
    done: list[bool] = []
    statements: list[str] = []

    def after(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # year_close counts the retrying deliveries, then the dead: after the second of those
        last_condition_read = bool(statements) and "outbox.attempts" in statements[-1]
        statements.append(statement)
        if last_condition_read and not done:
            dead_letter_then_other_evaluator()
            done.append(True)

    event.listen(reader, "after_cursor_execute", after)
    first = evaluate(reader, settings, DEC_27)
    assert done and first.active == [], first.as_dict()
    later = evaluate(engine, settings, DEC_27 + timedelta(hours=1))
    posts = [m for m in httpx.get(f"{sink}/_mock/received").json()["messages"]
             if "年度截止" in str(m["body"])]
    assert "year_close:2026-12-30" not in later.fired, (first.cleared, later.as_dict())
    assert len(posts) == 1, f"the year_close alert was posted {len(posts)} times"
