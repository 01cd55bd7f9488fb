"""Annual vs monthly reconciliation for the batch partners (health, finance).

The health commission and the finance department push a batch each month and a full-year batch
at year end (SPEC §2).  This report says, per month and in total, what the annual batch
repeats unchanged, corrects (same record number, new content → a new version), adds (rows no
month carried), conflicts with (another record number for the same person, project and date
with different credits — held for ops), and lacks (monthly rows it does not carry), and which
months were never pushed at all.

It reads what ingest already records: ``records.batch_id`` (the batch that first carried a
record), ``records.last_batch_id`` (the last batch that carried it, changed or not) and
``record_versions.batch_id`` (the batch whose row made a version).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, case, func, select

from gateway.store.tables import batches, record_versions, records

SAMPLE = 50
CATEGORIES = ("monthly_records", "repeated", "corrected", "lacking", "added", "conflicts")


def push_deadline(month: str, push_day: int = 0) -> date:
    """The first day on which month ``YYYY-MM``'s monthly batch is late.

    With ``push_day`` 0 that is the first of the next month (the month is over); with 5 the
    batch must exist by the 5th of the next month, so it is late from the 6th.
    """
    year, m = int(month[:4]), int(month[5:7])
    return date(year + m // 12, m % 12 + 1, 1) + timedelta(days=push_day)


def due_months(year: int, today: datetime | date | None = None, *, push_day: int = 0) -> list[str]:
    """The months of ``year`` whose monthly push is due by ``today`` (see :func:`push_deadline`)."""
    today = today or datetime.now(UTC)
    day = today.date() if isinstance(today, datetime) else today
    months = [f"{year}-{m:02d}" for m in range(1, 13)]
    return [m for m in months if push_deadline(m, push_day) <= day]


def months_never_pushed(conn: Connection, adapter: str, year: int, *,
                        today: datetime | date | None = None, partner_id: str | None = None,
                        push_day: int = 0) -> list[str]:
    """Due months of ``year`` (:func:`due_months`) without a monthly batch of ``adapter``.

    A batch that arrived counts as pushed while it is queued or processing; only a failed one
    does not (the report below, which reconciles contents, counts finished batches only).
    """
    query = (select(batches.c.period).distinct()
             .where(batches.c.adapter == adapter, batches.c.kind == "monthly",
                    batches.c.status != "failed", batches.c.period.like(f"{year}-%")))
    if partner_id is not None:
        query = query.where(batches.c.partner_id == partner_id)
    pushed = set(conn.execute(query).scalars())
    return [m for m in due_months(year, today, push_day=push_day) if m not in pushed]


def report(conn: Connection, adapter: str, year: int, *, today: datetime | None = None) -> dict[str, Any]:
    done = conn.execute(
        select(batches.c.batch_id, batches.c.kind, batches.c.period, batches.c.finished_at)
        .where(batches.c.adapter == adapter, batches.c.status == "done",
               batches.c.period.like(f"{year}%"), batches.c.kind.in_(("monthly", "annual")))
        .order_by(batches.c.created_at)).all()
    monthly = [b for b in done if b.kind == "monthly"]
    annuals = [b for b in done if b.kind == "annual"]
    annual_id = annuals[-1].batch_id if annuals else None
    month_of_batch = {b.batch_id: b.period for b in monthly}
    months: dict[str, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(CATEGORIES, 0))
    samples: dict[str, list[str]] = {c: [] for c in CATEGORIES if c != "monthly_records"}

    if monthly:
        carried = case((records.c.last_batch_id == annual_id, 1), else_=0) if annual_id else 0
        for period, total, kept in conn.execute(
                select(batches.c.period, func.count(), func.sum(carried))
                .select_from(records.join(batches, records.c.batch_id == batches.c.batch_id))
                .where(records.c.batch_id.in_(list(month_of_batch)))
                .group_by(batches.c.period)):
            months[period]["monthly_records"] += int(total)
            months[period]["lacking"] += int(total) - int(kept or 0) if annual_id else 0
            months[period]["repeated"] += int(kept or 0)
    if annual_id and monthly:
        corrected = (select(batches.c.period, records.c.source_record_id)
                     .select_from(record_versions.join(records, record_versions.c.record_id == records.c.record_id)
                                  .join(batches, records.c.batch_id == batches.c.batch_id))
                     .where(record_versions.c.batch_id == annual_id, record_versions.c.version > 1,
                            records.c.batch_id.in_(list(month_of_batch)))
                     .distinct())
        for period, source_id in conn.execute(corrected):
            months[period]["corrected"] += 1
            months[period]["repeated"] -= 1  # carried, but changed
            _sample(samples["corrected"], source_id)
    if annual_id:
        for status, completed_on, source_id in conn.execute(
                select(records.c.status, records.c.completed_on, records.c.source_record_id)
                .where(records.c.batch_id == annual_id, records.c.status.in_(("accepted", "conflict")))
                .order_by(records.c.source_record_id)):
            key = "added" if status == "accepted" else "conflicts"
            period = completed_on.strftime("%Y-%m") if completed_on else f"{year}-??"
            months[period][key] += 1
            _sample(samples[key], source_id)
        if monthly:
            for (source_id,) in conn.execute(
                    select(records.c.source_record_id)
                    .where(records.c.batch_id.in_(list(month_of_batch)),
                           and_(records.c.last_batch_id.is_distinct_from(annual_id)))
                    .order_by(records.c.source_record_id).limit(SAMPLE)):
                _sample(samples["lacking"], source_id)

    pushed = set(month_of_batch.values())
    totals = {c: sum(m[c] for m in months.values()) for c in CATEGORIES}
    return {
        "adapter": adapter, "year": year, "annual_batch_id": annual_id,
        "monthly_batches": [{"batch_id": b.batch_id, "period": b.period} for b in monthly],
        "months_never_pushed": [m for m in due_months(year, today) if m not in pushed],
        "months": [{"month": k, **v} for k, v in sorted(months.items())],
        "totals": totals,
        "samples": samples,
        "note": None if annual_id else "no annual batch yet: nothing to reconcile against",
    }


def _sample(bucket: list[str], value: str) -> None:
    if len(bucket) < SAMPLE:
        bucket.append(value)
