"""Annual vs monthly reconciliation for the batch partners (health, finance).

The health commission and the finance department push a batch each month and a full-year batch
at year end (SPEC §2).  This report says, per month and in total, what the annual batch
repeats unchanged, corrects (same record number, new content → a new version), adds (rows no
month carried), conflicts with (another record number for the same person, project and date
with different credits — held for ops), and lacks (monthly rows it does not carry), and which
months were never pushed at all.  A monthly record the annual changed in a way the rules
refused (``YEAR_CLOSED`` for an annual sent after the close, say) is ``refused``: the month's
version stands; one the partner withdrew is ``withdrawn``, not lacking.

It reads what ingest records: ``records.batch_id`` (the batch that first carried a record),
``batch_repeats`` (every batch that carried it again unchanged) and ``record_versions.batch_id``
(the batch whose row made a version), and ``rejections`` (annual rows refused).  Every batch of
the year counts for what it committed, whatever its status (a batch that failed part-way kept
its chunks), so an annual file sent twice, or split in two, or a month sent again after the
annual, leaves the report as it was, and a month that arrives after the annual is still a
month.  A monthly record the annual carries under another record number is ``repeated`` when
the claim is the same (the annual row is its ``duplicate``) and not ``lacking`` when it differs
(the annual row is a ``conflict``, counted as such).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, String, and_, case, func, literal, or_, select, union_all

from gateway.store.tables import batch_repeats, batches, record_versions, records, rejections

SAMPLE = 50
ADAPTERS = ("health", "finance")  # the partners that push monthly and annual batches
CATEGORIES = ("monthly_records", "repeated", "corrected", "lacking", "refused", "withdrawn", "added",
              "conflicts")


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


# A batch that arrived counts as pushed while it is queued or processing, and so does one that
# failed after committing rows (the report reconciles those); one that failed before committing
# any does not.  The missed-push alerts count pushes the same way (gateway.ops.overview).
ARRIVED = or_(batches.c.status != "failed", batches.c.rows_done > 0)


def months_never_pushed(conn: Connection, adapter: str, year: int, *,
                        today: datetime | date | None = None, partner_id: str | None = None,
                        push_day: int = 0) -> list[str]:
    """Due months of ``year`` (:func:`due_months`) with no monthly batch that :data:`ARRIVED`."""
    query = (select(batches.c.period).distinct()
             .where(batches.c.adapter == adapter, batches.c.kind == "monthly", ARRIVED,
                    batches.c.period.like(f"{year}-%")))
    if partner_id is not None:
        query = query.where(batches.c.partner_id == partner_id)
    pushed = set(conn.execute(query).scalars())
    return [m for m in due_months(year, today, push_day=push_day) if m not in pushed]


def report(conn: Connection, adapter: str, year: int, *, today: datetime | None = None,
           timezone: str = "Asia/Shanghai") -> dict[str, Any]:
    """The reconciliation of ``adapter``'s year (see the module doc): per month and in total.

    ``timezone``: the deployment's (``CE_GATEWAY_TIMEZONE``), whose midnight ends a month.

    Every batch of the year counts for what it committed, whatever its status: a batch that
    failed part-way kept its committed chunks (those records are stored and forwarded), and one
    still processing has committed part of its rows (the ``note`` says the report is partial).
    """
    carried = conn.execute(
        select(batches.c.batch_id, batches.c.kind, batches.c.period, batches.c.status)
        .where(batches.c.adapter == adapter, batches.c.period.like(f"{year}%"),
               batches.c.kind.in_(("monthly", "annual")))
        .order_by(batches.c.created_at)).all()
    monthly = [b for b in carried if b.kind == "monthly"]
    annual_ids = [b.batch_id for b in carried if b.kind == "annual"]
    months: dict[str, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(CATEGORIES, 0))
    samples: dict[str, list[str]] = {c: [] for c in CATEGORIES if c != "monthly_records"}

    judged = _monthly_records_judged([b.batch_id for b in monthly], annual_ids)
    if monthly:
        for period, kind, count in conn.execute(
                select(judged.c.period, judged.c.kind, func.count())
                .group_by(judged.c.period, judged.c.kind)):
            months[period]["monthly_records"] += int(count)
            if kind in _COUNTED_AS:
                months[period][_COUNTED_AS[kind]] += int(count)
        if annual_ids:
            for kind in ("corrected", "lacking", "refused", "withdrawn", "conflict"):
                for (source_id,) in conn.execute(
                        select(judged.c.source_record_id).where(judged.c.kind == kind)
                        .order_by(judged.c.source_record_id).limit(SAMPLE)):
                    _sample(samples[_COUNTED_AS[kind]], source_id)
    if annual_ids:
        _annual_only(conn, year, annual_ids, judged if monthly else None, months, samples)

    totals = {c: sum(m[c] for m in months.values()) for c in CATEGORIES}
    running = [b.batch_id for b in carried if b.status in ("queued", "processing")]
    note = ("no annual batch yet: nothing to reconcile against" if not annual_ids else
            f"batches still being processed ({', '.join(running)}): the report is partial"
            if running else None)
    return {
        "adapter": adapter, "year": year,
        "annual_batch_id": annual_ids[-1] if annual_ids else None,
        "annual_batches": annual_ids,
        "monthly_batches": [{"batch_id": b.batch_id, "period": b.period, "status": b.status}
                            for b in monthly],
        # Due by the province's calendar: a month is over at midnight in Xining, not in UTC.
        "months_never_pushed": months_never_pushed(
            conn, adapter, year, today=today or datetime.now(ZoneInfo(timezone))),
        "months": [{"month": k, **v} for k, v in sorted(months.items())],
        "totals": totals,
        "samples": samples,
        "note": note,
    }


# A monthly record's kind (``_monthly_records_judged``) → the category it is counted under.
# ``conflicted``: only a conflicting twin carried it, and the twin is counted (``_annual_only``).
_COUNTED_AS = {"corrected": "corrected", "repeated": "repeated", "lacking": "lacking",
               "refused": "refused", "withdrawn": "withdrawn", "conflict": "conflicts"}


def _annual_only(conn: Connection, year: int, annual_ids: list[str], judged: Any,
                 months: dict[str, dict[str, Any]], samples: dict[str, list[str]]) -> None:
    """Records an annual batch first carried and no month carried: ``added`` or ``conflicts``.

    An annual row that is a ``duplicate`` counts as added too, unless it is the same partner's
    renumbered twin of a monthly record (that record is ``repeated`` already): it repeats
    another partner's report, which the months of this partner never carried.
    """
    query = (select(records.c.record_id, records.c.status, records.c.completed_on,
                    records.c.source_record_id, records.c.partner_id, records.c.natural_key)
             .where(records.c.batch_id.in_(annual_ids), records.c.withdrawn.is_(False),
                    records.c.status.in_(("accepted", "conflict", "duplicate")))
             .order_by(records.c.source_record_id))
    if judged is not None:  # a month that came after the annual carried it: it is monthly
        query = query.where(records.c.record_id.not_in(select(judged.c.record_id)))
    rows = conn.execute(query).all()
    twins: set[tuple[str, str]] = set()
    duplicates = [r for r in rows if r.status == "duplicate"]
    if duplicates and judged is not None:
        monthly_record = records.alias("monthly_record")
        twins = {(t.partner_id, t.natural_key) for t in conn.execute(
            select(monthly_record.c.partner_id, monthly_record.c.natural_key)
            .where(monthly_record.c.record_id.in_(select(judged.c.record_id)),
                   monthly_record.c.natural_key.in_({r.natural_key for r in duplicates})))}
    for r in rows:
        if r.status == "duplicate" and (r.partner_id, r.natural_key) in twins:
            continue
        key = "conflicts" if r.status == "conflict" else "added"
        period = r.completed_on.strftime("%Y-%m") if r.completed_on else f"{year}-??"
        months[period][key] += 1
        _sample(samples[key], r.source_record_id)


def _monthly_records_judged(monthly_ids: list[str], annual_ids: list[str]) -> Any:
    """Each record a monthly batch carried: its month, and what the annual batches did of it.

    A record is a month's when a monthly batch first carried it, carried it again unchanged
    (``batch_repeats``) or made a version of it: so a December batch that arrives after the
    annual is reconciled as a month, as it would be had it come first.  Its month is the
    earliest such batch's period.

    ``kind``, the first that holds: ``conflict`` (an annual row corrected it and was judged a
    conflict, held for ops), ``corrected`` (an annual row made a new version of it, or a month
    changed what the annual first carried), ``repeated`` (an annual row carried it unchanged,
    under its own record number or — the same partner's report of the same activity with the
    same claim — under another), ``conflicted`` (only a conflicting twin carried it: that twin is
    counted under ``conflicts``), ``refused`` (an annual row under its number was refused by the
    rules, e.g. ``YEAR_CLOSED``: the monthly version stands), ``withdrawn`` (the partner withdrew
    it), ``lacking`` (no annual row carried it), or ``None`` before any annual.
    Every annual batch of the year counts, so a resent or split annual file changes nothing.
    """
    month, carrier = batches.alias("month"), batches.alias("carrier")
    ids = [*monthly_ids, *annual_ids]
    # Every carrying of a record by a batch of the year: first, again unchanged, a new version.
    carryings = union_all(
        select(records.c.record_id.label("rid"), records.c.batch_id.label("bid"),
               literal("first").label("how")).where(records.c.batch_id.in_(ids)),
        select(batch_repeats.c.record_id, batch_repeats.c.batch_id, literal("repeat"))
        .where(batch_repeats.c.batch_id.in_(ids)),
        select(record_versions.c.record_id, record_versions.c.batch_id, literal("version"))
        .where(record_versions.c.batch_id.in_(ids), record_versions.c.version > 1),
    ).subquery()

    def by(kind: str, how: str | None = None) -> Any:
        test = carrier.c.kind == kind if how is None else and_(carrier.c.kind == kind,
                                                                carryings.c.how == how)
        return func.max(case((test, 1), else_=0))

    per_record = (select(carryings.c.rid,
                         func.min(case((carrier.c.kind == "monthly", month.c.period))).label("period"),
                         by("annual", "first").label("annual_first"),
                         by("annual", "repeat").label("annual_repeat"),
                         by("annual", "version").label("annual_version"),
                         by("monthly", "version").label("month_version"))
                  .select_from(carryings.join(carrier, carrier.c.batch_id == carryings.c.bid)
                               .join(month, month.c.batch_id == carryings.c.bid))
                  .group_by(carryings.c.rid).subquery())
    source = (select(records.c.record_id, records.c.source_record_id, per_record.c.period)
              .select_from(records.join(per_record, per_record.c.rid == records.c.record_id))
              .where(per_record.c.period.is_not(None)))
    if not annual_ids:
        return source.add_columns(literal(None, String).label("kind")).subquery()
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
    # A monthly renumbered twin (a duplicate of another monthly record of its partner) is
    # carried when the record it repeats is carried unchanged.
    holder, held = records.alias("holder"), per_record.alias("held")
    refused = (select(rejections.c.partner_id, rejections.c.source_record_id)
               .where(rejections.c.batch_id.in_(annual_ids)).distinct().subquery())
    annual_changed = or_(per_record.c.annual_version == 1,
                         and_(per_record.c.annual_first == 1, per_record.c.month_version == 1))
    kind = case((and_(per_record.c.annual_version == 1, records.c.status == "conflict"), "conflict"),
                (annual_changed, "corrected"),
                (or_(per_record.c.annual_repeat == 1, per_record.c.annual_first == 1,
                     twins.c.same == 1,
                     and_(holder.c.partner_id == records.c.partner_id,
                          or_(held.c.annual_repeat == 1, held.c.annual_first == 1))), "repeated"),
                (twins.c.other == 1, "conflicted"),
                (refused.c.source_record_id.is_not(None), "refused"),
                (records.c.withdrawn.is_(True), "withdrawn"),
                else_="lacking")
    return (source.add_columns(kind.label("kind"))
            .outerjoin(twins, and_(twins.c.partner_id == records.c.partner_id,
                                   twins.c.natural_key == records.c.natural_key))
            .outerjoin(refused, and_(refused.c.partner_id == records.c.partner_id,
                                     refused.c.source_record_id == records.c.source_record_id))
            .outerjoin(holder, holder.c.record_id == records.c.duplicate_of)
            .outerjoin(held, held.c.rid == holder.c.record_id)
            .subquery())


def _sample(bucket: list[str], value: str) -> None:
    if len(bucket) < SAMPLE:
        bucket.append(value)
