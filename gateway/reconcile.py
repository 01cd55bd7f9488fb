"""Annual vs monthly reconciliation for the batch partners (health, finance).

The health commission and the finance department push a batch each month and a full-year batch
at year end (SPEC §2).  This report says, per month and in total, what the annual batch
repeats unchanged, corrects (same record number, new content → a new version), adds (rows no
month carried), conflicts with (another record number for the same person, project and date
with different credits — held for ops), and lacks (monthly rows it does not carry), and which
months were never pushed at all.

It reads what ingest records: ``records.batch_id`` (the batch that first carried a record),
``batch_repeats`` (every batch that carried it again unchanged) and ``record_versions.batch_id``
(the batch whose row made a version).  Every annual batch of the year counts, so an annual file
sent twice, or split in two, or a month sent again after the annual, leaves the report as it
was.  A monthly record the annual carries under another record number is ``repeated`` when
the claim is the same (the annual row is its ``duplicate``) and not ``lacking`` when it differs
(the annual row is a ``conflict``, counted as such).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, String, and_, case, func, literal, or_, select

from gateway.store.tables import batch_repeats, batches, record_versions, records

SAMPLE = 50
ADAPTERS = ("health", "finance")  # the partners that push monthly and annual batches
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
    annual_ids = [b.batch_id for b in done if b.kind == "annual"]
    month_of_batch = {b.batch_id: b.period for b in monthly}
    months: dict[str, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(CATEGORIES, 0))
    samples: dict[str, list[str]] = {c: [] for c in CATEGORIES if c != "monthly_records"}

    if monthly:
        judged = _monthly_records_judged(list(month_of_batch), annual_ids)
        for period, kind, count in conn.execute(
                select(judged.c.period, judged.c.kind, func.count())
                .group_by(judged.c.period, judged.c.kind)):
            months[period]["monthly_records"] += int(count)
            if kind in CATEGORIES:
                months[period][kind] += int(count)
        if annual_ids:
            for kind in ("corrected", "lacking"):
                for (source_id,) in conn.execute(
                        select(judged.c.source_record_id).where(judged.c.kind == kind)
                        .order_by(judged.c.source_record_id).limit(SAMPLE)):
                    _sample(samples[kind], source_id)
    if annual_ids:
        for status, completed_on, source_id in conn.execute(
                select(records.c.status, records.c.completed_on, records.c.source_record_id)
                .where(records.c.batch_id.in_(annual_ids),
                       records.c.status.in_(("accepted", "conflict")))
                .order_by(records.c.source_record_id)):
            key = "added" if status == "accepted" else "conflicts"
            period = completed_on.strftime("%Y-%m") if completed_on else f"{year}-??"
            months[period][key] += 1
            _sample(samples[key], source_id)

    pushed = set(month_of_batch.values())
    totals = {c: sum(m[c] for m in months.values()) for c in CATEGORIES}
    return {
        "adapter": adapter, "year": year,
        "annual_batch_id": annual_ids[-1] if annual_ids else None,
        "annual_batches": annual_ids,
        "monthly_batches": [{"batch_id": b.batch_id, "period": b.period} for b in monthly],
        "months_never_pushed": [m for m in due_months(year, today) if m not in pushed],
        "months": [{"month": k, **v} for k, v in sorted(months.items())],
        "totals": totals,
        "samples": samples,
        "note": None if annual_ids else "no annual batch yet: nothing to reconcile against",
    }


def _monthly_records_judged(monthly_ids: list[str], annual_ids: list[str]) -> Any:
    """Each record a monthly batch first carried: its month, and what the annual batches did.

    ``kind``: ``corrected`` (an annual row made a new version of it), ``repeated`` (an annual
    row carried it unchanged, under its own record number or, the same partner's report of the
    same activity with the same claim, under another), ``conflicted`` (only a conflicting twin
    carried it: that twin is counted under ``conflicts``), ``lacking`` (no annual row carried
    it), or ``None`` before any annual.
    Every annual batch of the year counts, so a resent or split annual file changes nothing.
    """
    month = batches.alias("month")
    source = select(records.c.record_id, records.c.source_record_id, month.c.period).select_from(
        records.join(month, records.c.batch_id == month.c.batch_id)).where(
        records.c.batch_id.in_(monthly_ids))
    if not annual_ids:
        return source.add_columns(literal(None, String).label("kind")).subquery()
    corrected = (select(record_versions.c.record_id)
                 .where(record_versions.c.batch_id.in_(annual_ids), record_versions.c.version > 1)
                 .distinct().subquery())
    repeated = (select(batch_repeats.c.record_id).where(batch_repeats.c.batch_id.in_(annual_ids))
                .distinct().subquery())
    # An annual row under another record number carries a monthly record when it is the same
    # partner's report of the same activity (natural key): a duplicate (same claim as the
    # activity's holder) or a conflict.  Not by ``duplicate_of``: that names the holder, which
    # may be another partner's record when the monthly one was itself a duplicate.
    twin = records.alias("twin")
    twins = (select(twin.c.partner_id, twin.c.natural_key,
                    func.max(case((twin.c.status == "duplicate", 1), else_=0)).label("same"),
                    func.max(case((twin.c.status == "conflict", 1), else_=0)).label("other"))
             .where(twin.c.batch_id.in_(annual_ids), twin.c.status.in_(("duplicate", "conflict")))
             .group_by(twin.c.partner_id, twin.c.natural_key).subquery())
    kind = case((corrected.c.record_id.is_not(None), "corrected"),
                (or_(repeated.c.record_id.is_not(None), twins.c.same == 1), "repeated"),
                (twins.c.other == 1, "conflicted"), else_="lacking")
    return (source.add_columns(kind.label("kind"))
            .outerjoin(corrected, corrected.c.record_id == records.c.record_id)
            .outerjoin(repeated, repeated.c.record_id == records.c.record_id)
            .outerjoin(twins, and_(twins.c.partner_id == records.c.partner_id,
                                   twins.c.natural_key == records.c.natural_key))
            .subquery())


def _sample(bucket: list[str], value: str) -> None:
    if len(bucket) < SAMPLE:
        bucket.append(value)
