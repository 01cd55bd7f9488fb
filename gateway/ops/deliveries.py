"""Deliveries as ops see them: filtered, paged lists and reprocessing of dead letters.

A *delivery* is an outbox row: one record version on its way to the management system
(``pending`` → ``delivered``, or ``dead`` with its reason; ``superseded`` once a later version
of the record took its place).  Reprocessing puts dead rows back to ``pending`` with their
attempts reset, so the delivery worker forms them into a **new** batch under a new
Idempotency-Key (the old key's cached answer was the failure).  That is safe:

* only ``dead`` rows move, with ``UPDATE … WHERE status = 'dead'`` — two reprocess calls at
  once cannot queue a row twice, and a delivered version is never sent again;
* a dead version whose record already has a later version pending or delivered is not sent
  (it would arrive out of order and undo the newer one); it is marked ``superseded``;
* the management system keeps one receipt per record version, so a version that was applied
  before its reply got lost is answered ``duplicate``, never applied twice.

The link from the new attempts to the original is in the record's timeline: every requeued
row gets a ``delivery_requeued`` event naming the batch it died in and the reprocess run, and
the run itself one ``ops_reprocess`` event with the operator, the reason and the filter.

A record refused for good (``DOWNSTREAM_REJECTED``) held no share of its cap group while it
was dead (R10); requeued, it takes its share back, and the records that lose some are
re-issued in the same transaction (:func:`gateway.pipeline.succession.reallocate_after_delivery`).

May touch: ``outbox`` (status, attempts, errors of dead rows), the audit trail, and through
the cap reallocation ``caps_ledger``, ``records``, ``record_versions`` and new ``outbox`` rows;
reads ``delivery_batches``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, exists, func, select, update

from gateway import audit
from gateway.accounts import ADAPTERS_WITH_PUSH
from gateway.config import Settings
from gateway.masking import mask_text
from gateway.ops.common import (
    CURSOR_ZH,
    check_aware,
    check_code,
    check_text,
    decode_cursor,
    encode_cursor,
    iso,
    limit_of,
    masked_source_id,
    refuse,
    require_reason,
)
from gateway.ops.overview import later_version_alive
from gateway.pipeline.caps import REFUSED_FOR_GOOD
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.succession import reallocate_after_delivery
from gateway.pipeline.writer_retry import writer_retries
from gateway.store.db import snapshot
from gateway.store.tables import audit_events, audit_head, delivery_batches, outbox, records

__all__ = ["OUTBOX_STATUSES", "DeliveryFilter", "ReprocessResult", "get_delivery",
           "list_deliveries", "reprocess", "status_counts"]

OUTBOX_STATUSES = ("pending", "delivered", "dead", "superseded")
CHUNK_SIZE = 500
# Audit kinds that belong to a delivery's history (the record's other events stay out).
_DELIVERY_EVENTS = frozenset({"queued", "attempt", "retry_scheduled", "dead", "delivered",
                              "split", "requeued", "delivery_requeued", "delivery_superseded"})


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries; unset fields match everything.  Bad values raise a coded 422."""

    status: str | None = None  # pending | delivered | dead | superseded
    adapter: str | None = None
    partner_id: str | None = None
    error_code: str | None = None
    since: datetime | None = None  # outbox.updated_at >= since
    until: datetime | None = None  # outbox.updated_at <  until
    record_ids: tuple[str, ...] = ()  # explicit records (reprocess "by id")

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in OUTBOX_STATUSES:
            raise refuse("status", f"one of {', '.join(OUTBOX_STATUSES)}",
                         f"须为以下之一：{'、'.join(OUTBOX_STATUSES)}")
        if self.adapter is not None and self.adapter not in ADAPTERS_WITH_PUSH:
            raise refuse("adapter", f"one of {', '.join(sorted(ADAPTERS_WITH_PUSH))}",
                         f"须为以下之一：{'、'.join(sorted(ADAPTERS_WITH_PUSH))}")
        check_text("partner_id", self.partner_id)
        check_code(self.error_code)
        check_aware("since", self.since)
        check_aware("until", self.until)
        if len(self.record_ids) > 10_000:
            raise refuse("record_ids", "at most 10000 at once", "一次最多 10000 条")
        for rid in self.record_ids:
            check_text("record_ids", rid, 32)

    def where(self) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = []
        if self.status is not None:
            clauses.append(outbox.c.status == self.status)
        if self.adapter is not None:
            clauses.append(records.c.adapter == self.adapter)
        if self.partner_id is not None:
            clauses.append(records.c.partner_id == self.partner_id)
        if self.error_code is not None:
            clauses.append(outbox.c.error_code == self.error_code)
        if self.since is not None:
            clauses.append(outbox.c.updated_at >= self.since)
        if self.until is not None:
            clauses.append(outbox.c.updated_at < self.until)
        if self.record_ids:
            clauses.append(outbox.c.record_id.in_(sorted(set(self.record_ids))))
        return clauses

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, JSON-able (for the audit trail)."""
        values: dict[str, Any] = {
            "status": self.status, "adapter": self.adapter, "partner_id": self.partner_id,
            "error_code": self.error_code, "since": iso(self.since), "until": iso(self.until),
            "record_ids": list(self.record_ids) or None}
        return {k: v for k, v in values.items() if v is not None}


_JOINED = outbox.join(records, records.c.record_id == outbox.c.record_id)
_COLUMNS = (outbox.c.id, outbox.c.record_id, outbox.c.version, outbox.c.status, records.c.adapter,
            records.c.partner_id, records.c.source_record_id, outbox.c.attempts,
            outbox.c.error_code, outbox.c.last_error, outbox.c.receipt_status,
            outbox.c.receipt_no, outbox.c.batch_key, outbox.c.created_at, outbox.c.updated_at,
            outbox.c.delivered_at)


def _item(row: Any) -> dict[str, Any]:
    item = dict(row)
    for key in ("created_at", "updated_at", "delivered_at"):
        item[key] = iso(item[key])
    if item["last_error"]:
        item["last_error"] = mask_text(item["last_error"])
    # A partner may number its records by the person's identity number.
    item["source_record_id"] = masked_source_id(item["source_record_id"])
    return item


def list_deliveries(conn: Connection, flt: DeliveryFilter, *, cursor: str | None = None,
                    limit: int = 50) -> dict[str, Any]:
    """``{"items", "total", "next"}``, newest first (by outbox id; the cursor is a keyset)."""
    limit = limit_of(limit)
    where = flt.where()
    total = int(conn.execute(select(func.count()).select_from(_JOINED).where(*where)).scalar_one())
    after = decode_cursor(cursor, "deliveries", 1)
    query = select(*_COLUMNS).select_from(_JOINED).where(*where)
    if after is not None:
        if not isinstance(after[0], int):
            raise refuse("cursor", "not a cursor this list gave out", CURSOR_ZH)
        query = query.where(outbox.c.id < after[0])
    rows = conn.execute(query.order_by(outbox.c.id.desc()).limit(limit + 1)).mappings().all()
    items = [_item(r) for r in rows[:limit]]
    more = len(rows) > limit
    return {"items": items, "total": total,
            "next": encode_cursor("deliveries", items[-1]["id"]) if more else None}


def get_delivery(conn: Connection, delivery_id: int) -> dict[str, Any] | None:
    """One delivery with its batch and its history (attempts, requeues, receipts)."""
    if not 0 < delivery_id < 2**63:  # no such id; past 2**63 the driver would overflow
        return None
    row = conn.execute(select(*_COLUMNS).select_from(_JOINED)
                       .where(outbox.c.id == delivery_id)).mappings().first()
    if row is None:
        return None
    item = _item(row)
    batch = None
    if item["batch_key"]:
        found = conn.execute(select(delivery_batches.c.batch_key, delivery_batches.c.status,
                                    delivery_batches.c.attempts, delivery_batches.c.parent_key,
                                    delivery_batches.c.last_error,
                                    delivery_batches.c.next_attempt_at)
                             .where(delivery_batches.c.batch_key == item["batch_key"])
                             ).mappings().first()
        if found is not None:
            batch = {**found, "next_attempt_at": iso(found["next_attempt_at"]),
                     "last_error": mask_text(found["last_error"] or "") or None}
    history = [e for e in audit.events_for(conn, [item["record_id"]])
               if e["version"] == item["version"] and e["kind"] in _DELIVERY_EVENTS]
    # Earlier batches this version died in, oldest first: the link from the new attempts.
    earlier = [e["detail"].get("previous_batch") for e in history
               if e["kind"] == "delivery_requeued"]
    return {**item, "batch": batch, "previous_batches": [k for k in earlier if k],
            "history": history}


def status_counts(conn: Connection) -> dict[str, int]:
    """Outbox status → number of rows (every known status present, 0 when none)."""
    counts = dict.fromkeys(OUTBOX_STATUSES, 0)
    for status, n in conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)):
        counts[str(status)] = int(n)
    return counts


@dataclass(frozen=True)
class ReprocessResult:
    """What a reprocess run found (``matched``) and did.

    ``requeued`` rows went back to pending (0 on a dry run); ``superseded`` dead rows were not
    sent because a later version of their record is pending or delivered already.
    """

    matched: int
    requeued: int  # 0 on dry run
    dry_run: bool
    superseded: int = 0
    reprocess_id: str | None = None
    # The moment the count was taken (the audit trail's head then): pass it to the confirming
    # run, and deliveries dead-lettered after it (new ones, or ones still queued at the count)
    # are left out of it.
    ceiling: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"matched": self.matched, "requeued": self.requeued, "dry_run": self.dry_run,
                "superseded": self.superseded, "reprocess_id": self.reprocess_id,
                "ceiling": self.ceiling}


def _dead_where(flt: DeliveryFilter, ceiling: int) -> list[ColumnElement[bool]]:
    """Dead deliveries ``flt`` selects, dead-lettered at or before audit event ``ceiling``."""
    died_later = exists().where(audit_events.c.record_id == outbox.c.record_id,
                                audit_events.c.version == outbox.c.version,
                                audit_events.c.kind == "dead", audit_events.c.seq > ceiling)
    return [*flt.where(), outbox.c.status == "dead", ~died_later]


def _requeue_chunk(engine: Engine, flt: DeliveryFilter, last: int, ceiling: int, size: int,
                   run_id: str, reason: str | None, actor: str, config: RulesConfig | None,
                   ) -> tuple[list[Any], set[int], set[int]]:
    """One transaction of a reprocess run: the next ``size`` dead rows after ``last``.

    Returns the rows read, the ids put back to pending and the ids marked superseded.
    """
    now = datetime.now(UTC)
    with engine.begin() as conn:
        rows = conn.execute(
            select(outbox.c.id, outbox.c.record_id, outbox.c.version, outbox.c.batch_key,
                   outbox.c.attempts, outbox.c.error_code)
            .select_from(_JOINED)
            .where(*_dead_where(flt, ceiling), outbox.c.id > last)
            .order_by(outbox.c.id).limit(size)).mappings().all()
        if not rows:
            return [], set(), set()
        by_id = {r["id"]: r for r in rows}
        # The guards are in the UPDATE itself: only rows still dead move, once.
        flipped = set(conn.execute(
            update(outbox).where(outbox.c.id.in_(list(by_id)), outbox.c.status == "dead",
                                 ~later_version_alive())
            .values(status="pending", batch_key=None, attempts=0, error_code=None,
                    last_error=None, receipt_status=None, updated_at=now, queued_at=now)
            .returning(outbox.c.id)).scalars())
        rest = sorted(set(by_id) - flipped)
        stale = set(conn.execute(
            update(outbox).where(outbox.c.id.in_(rest), outbox.c.status == "dead",
                                 later_version_alive())
            .values(status="superseded", updated_at=now)
            .returning(outbox.c.id)).scalars()) if rest else set()
        events = [audit.Event("delivery_requeued", r["record_id"], r["version"], actor, {
            "reprocess": run_id, "reason": reason, "previous_batch": r["batch_key"],
            "previous_error": r["error_code"], "previous_attempts": r["attempts"]})
            for i, r in by_id.items() if i in flipped]
        events += [audit.Event("delivery_superseded", r["record_id"], r["version"], actor, {
            "reprocess": run_id, "reason": reason, "previous_batch": r["batch_key"],
            "previous_error": r["error_code"],
            "note": "a later version of the record is pending or delivered"})
            for i, r in by_id.items() if i in stale]
        # A record refused for good held no share of its cap group; queued again, it counts.
        events += reallocate_after_delivery(
            conn, config or RulesConfig.from_settings(Settings()), now,
            [(r["record_id"], r["version"]) for i, r in by_id.items()
             if i in flipped and r["error_code"] in REFUSED_FOR_GOOD],
            actor=actor, reason=f"requeued by ops (reprocess {run_id}): it takes its share back")
        audit.append(conn, events, now)
    return list(rows), flipped, stale


def reprocess(engine: Engine, flt: DeliveryFilter, *, dry_run: bool, reason: str | None,
              actor: str, progress: Callable[[int, int], None] | None = None,
              chunk_size: int = CHUNK_SIZE, ceiling: int | None = None,
              config: RulesConfig | None = None) -> ReprocessResult:
    """Redeliver the dead deliveries ``flt`` selects (a status filter other than dead: none).

    A dry run only counts.  Otherwise a reason is required; the run is audited with ``actor``,
    the reason and the filter.  ``progress`` gets (rows done, matched) after each chunk.
    ``ceiling``: the dry run's, so the run redelivers no delivery dead-lettered after what the
    operator was shown (without it, the trail's head now).  A requeued record that was refused for
    good takes its share of its cap group back (R10; ``config`` gives the caps).
    """
    if not dry_run:
        reason = require_reason(reason)
    actor = actor[:64]
    matched, newest = 0, 0
    if flt.status in (None, "dead"):
        with snapshot(engine) as conn:  # the head and the count at one moment, no write lock
            # Rows that die after this count were not part of the operator's decision: the
            # moment is the audit head, as every dead-lettering is an event of the trail.
            newest = int(conn.execute(select(audit_head.c.last_seq)).scalar_one())
            if ceiling is not None:
                newest = min(newest, max(ceiling, 0))
            matched = int(conn.execute(select(func.count()).select_from(_JOINED).where(
                *_dead_where(flt, newest))).scalar_one())
    ceiling = newest
    if dry_run:
        return ReprocessResult(matched, 0, True, ceiling=ceiling)
    run_id = uuid.uuid4().hex[:16]
    requeued = superseded = done = 0
    if progress is not None:
        progress(0, matched)
    last = 0
    while matched:
        for attempt in writer_retries():  # a deadlock with a delivery worker (PostgreSQL)
            with attempt:
                rows, flipped, stale = _requeue_chunk(engine, flt, last, ceiling, chunk_size,
                                                      run_id, reason, actor, config)
        if not rows:
            break
        last = rows[-1]["id"]
        requeued += len(flipped)
        superseded += len(stale)
        done += len(rows)
        if progress is not None:
            progress(min(done, matched), matched)
    result = ReprocessResult(matched, requeued, False, superseded, run_id, ceiling)
    with engine.begin() as conn:
        audit.append(conn, [audit.Event("ops_reprocess", actor=actor, detail={
            "reprocess": run_id, "reason": reason, "filter": flt.as_dict(), "matched": matched,
            "requeued": requeued, "superseded": superseded, "ceiling": ceiling})])
    return result
