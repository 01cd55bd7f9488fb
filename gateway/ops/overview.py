"""The ops dashboard's numbers in one read (the console's home page, alerts, metrics).

Everything here is counts and dates: no identity number, no payload.  The queries are
aggregates over indexed status columns, plus one ``GROUP BY partner_id`` for the partners'
last push; the console calls this once per page load.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Connection, exists, func, select
from sqlalchemy.orm import aliased

from gateway.config import Settings
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pull.cadre_college import PARTNER as PULL_PARTNER
from gateway.reconcile import ARRIVED, due_months, push_deadline
from gateway.store.tables import batches, outbox, partners, pull_state, records, rejections

__all__ = ["MONTHLY_ADAPTERS", "Backlog", "MissingPushes", "YearClose", "backlog", "dead_letters",
           "first_owed_month", "later_version_alive", "latest_due_month", "missing_pushes",
           "overview", "period_bounds", "pull_lag", "year_close"]

# Partners that push a batch every month (SPEC §2): their missing months are tracked.
MONTHLY_ADAPTERS = ("health", "finance")
OUTBOX_STATUSES = ("pending", "delivered", "dead")
RECORD_STATUSES = ("accepted", "duplicate", "conflict")


@dataclass(frozen=True)
class Backlog:
    size: int
    oldest_queued_at: datetime | None

    def oldest_age_seconds(self, now: datetime) -> float | None:
        if self.oldest_queued_at is None:
            return None
        return max(0.0, (now - self.oldest_queued_at).total_seconds())


@dataclass(frozen=True)
class YearClose:
    year: int  # the CE year that closes next
    date: date  # its last day (end of day, local time)
    days_left: int  # 0 on the last day itself


def backlog(conn: Connection) -> Backlog:
    """Pending deliveries and when the longest-waiting one was queued (outbox index on status).

    A row is queued when it is created, or again when an operator reprocesses it (``queued_at``):
    a dead letter of last month sent again today has waited seconds, not a month.
    """
    queued = func.coalesce(outbox.c.queued_at, outbox.c.created_at)
    size, oldest = conn.execute(select(func.count(), func.min(queued))
                                .where(outbox.c.status == "pending")).one()
    if isinstance(oldest, str):  # SQLite hands MIN() back untyped
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return Backlog(int(size), oldest)


def later_version_alive() -> ColumnElement[bool]:
    """An outbox row's record has a later version pending or delivered: nothing of it to redo.

    A dead version so overtaken is superseded downstream by the later one (a reprocess marks it
    so rather than sending it), so it is not a failure at stake at the year close.
    """
    later = aliased(outbox)
    return exists().where(later.c.record_id == outbox.c.record_id,
                          later.c.version > outbox.c.version,
                          later.c.status.in_(("pending", "delivered")))


def dead_letters(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).where(outbox.c.status == "dead")).scalar_one())


def pull_lag(conn: Connection, now: datetime) -> dict[str, dict[str, Any]]:
    """Per pull source: the last successful run and the seconds since (``None`` before one).

    The Cadre Network College is always listed; reference-data watermarks (``reference:*``)
    are not pulls of records and stay out.
    """
    rows = conn.execute(select(pull_state.c.source, pull_state.c.last_success_at)
                        .where(pull_state.c.source.not_like("reference:%"))).all()
    found: dict[str, datetime | None] = {"cadre_college": None}
    found.update({r.source: r.last_success_at for r in rows})
    return {source: {"last_success_at": at.isoformat() if at else None,
                     "lag_seconds": max(0.0, (now - at).total_seconds()) if at else None}
            for source, at in sorted(found.items())}


def year_close(settings: Settings, now: datetime) -> YearClose:
    """The next CE year close (``YEAR_CLOSE``, extensions honoured) and the days left to it."""
    config = RulesConfig.from_settings(settings)
    today = now.astimezone(ZoneInfo(settings.timezone)).date()
    for year in (today.year - 1, today.year, today.year + 1):
        closes = config.closes(year)
        if closes >= today:
            return YearClose(year, closes, (closes - today).days)
    raise AssertionError("unreachable: next year's close lies ahead")  # pragma: no cover


def period_bounds(settings: Settings, now: datetime | None = None) -> tuple[int, date]:
    """The open CE year (the one that closes next) and today, local: what a batch may be for."""
    now = now or datetime.now(UTC)
    return year_close(settings, now).year, now.astimezone(ZoneInfo(settings.timezone)).date()


def latest_due_month(settings: Settings, now: datetime) -> str:
    """The latest month whose monthly push deadline (``ALERT_MONTHLY_PUSH_DAY``) has passed."""
    today = now.astimezone(ZoneInfo(settings.timezone)).date()
    year, month = today.year, today.month
    while True:
        month -= 1
        if month == 0:
            year, month = year - 1, 12
        candidate = f"{year}-{month:02d}"
        if push_deadline(candidate, settings.alert_monthly_push_day) <= today:
            return candidate


@dataclass(frozen=True)
class MissingPushes:
    """What one monthly partner (health, finance) owes: pushes due and never made."""

    partner_id: str
    adapter: str
    months: tuple[str, ...]  # monthly batches (YYYY-MM), oldest first
    annual: tuple[int, ...]  # CE years whose full-year batch is due


def first_owed_month(settings: Settings, registered: datetime) -> str:
    """The first month a partner registered at ``registered`` owes: its deadline came after.

    A partner owes each push whose deadline (:func:`push_deadline`, the first day it is late)
    is later than the day it was registered - one that came before it existed it cannot have
    missed.  Fixed at registration, so a month once awaited stays awaited until pushed.
    """
    day = registered.astimezone(ZoneInfo(settings.timezone)).date()
    year, month = day.year, day.month - 1  # this month's deadline is always later
    if month == 0:
        year, month = year - 1, 12
    previous = f"{year}-{month:02d}"
    if push_deadline(previous, settings.alert_monthly_push_day) > day:
        return previous
    return day.strftime("%Y-%m")


def missing_pushes(conn: Connection, settings: Settings, now: datetime) -> list[MissingPushes]:
    """Each active monthly partner's due pushes that never came, at ``now`` (local days).

    A month is due from ``ALERT_MONTHLY_PUSH_DAY`` of the next month (:func:`push_deadline`), a
    year's annual batch from ``ALERT_ANNUAL_PUSH_DAY`` of the next January.  A batch counts as
    pushed as the reconciliation counts it (:data:`gateway.reconcile.ARRIVED`): unless it failed
    before committing a row.  A missing month stays missing until its batch comes, however many
    months fall due after it.

    The look-back is bounded, so this stays one small query: months of the current and the
    previous CE year, and no earlier than the partner started: its :func:`first_owed_month`
    (the first deadline after it was registered), or its first pushed month if that is
    earlier.  An annual batch is owed for a year whose deadline came after the registration,
    or whose December the partner had started by.
    """
    local_today = now.astimezone(ZoneInfo(settings.timezone)).date()
    floor_year = local_today.year - 1
    monthly = list(conn.execute(
        select(partners.c.partner_id, partners.c.adapter, partners.c.created_at)
        .where(partners.c.active.is_(True), partners.c.adapter.in_(MONTHLY_ADAPTERS))
        .order_by(partners.c.partner_id)))
    if not monthly:
        return []
    pushed: dict[str, set[str]] = {r.partner_id: set() for r in monthly}
    annuals: dict[str, set[str]] = {r.partner_id: set() for r in monthly}
    for partner_id, kind, period in conn.execute(
            select(batches.c.partner_id, batches.c.kind, batches.c.period).distinct()
            .where(batches.c.partner_id.in_(list(pushed)),
                   batches.c.adapter.in_(MONTHLY_ADAPTERS),
                   batches.c.kind.in_(("monthly", "annual")), ARRIVED,
                   batches.c.period >= str(floor_year))):
        (annuals if kind == "annual" else pushed)[partner_id].add(period)
    due = [m for year in (floor_year, local_today.year)
           for m in due_months(year, local_today, push_day=settings.alert_monthly_push_day)]
    annual_due = [y for y in (floor_year, local_today.year)
                  if push_deadline(f"{y}-12", settings.alert_annual_push_day) <= local_today]
    out = []
    for r in monthly:
        months, years = pushed[r.partner_id], annuals[r.partner_id]
        registered = r.created_at.astimezone(ZoneInfo(settings.timezone)).date()
        started = min([first_owed_month(settings, r.created_at), *months])
        out.append(MissingPushes(
            r.partner_id, r.adapter,
            tuple(m for m in due if m >= started and m not in months),
            tuple(y for y in annual_due if str(y) not in years and (
                f"{y}-12" >= started
                or push_deadline(f"{y}-12", settings.alert_annual_push_day) > registered))))
    return out


def _last_pushes(conn: Connection, partner_ids_by_kind: dict[bool, list[str]]) -> dict[str, datetime]:
    """Latest batch ``created_at`` for batch partners, latest record ``created_at`` otherwise."""
    last: dict[str, datetime] = {}
    batch_partners, other_partners = partner_ids_by_kind[True], partner_ids_by_kind[False]
    if batch_partners:
        last.update(conn.execute(select(batches.c.partner_id, func.max(batches.c.created_at))
                                 .where(batches.c.partner_id.in_(batch_partners))
                                 .group_by(batches.c.partner_id)).all())
    if other_partners:
        last.update(conn.execute(select(records.c.partner_id, func.max(records.c.created_at))
                                 .where(records.c.partner_id.in_(other_partners))
                                 .group_by(records.c.partner_id)).all())
    out: dict[str, datetime] = {}
    for partner_id, at in last.items():
        if at is None:
            continue
        when = datetime.fromisoformat(at) if isinstance(at, str) else at
        out[partner_id] = when if when.tzinfo else when.replace(tzinfo=UTC)
    return out


def _partners(conn: Connection, settings: Settings, now: datetime) -> list[dict[str, Any]]:
    rows: list[Any] = list(conn.execute(select(partners.c.partner_id, partners.c.adapter)
                                        .where(partners.c.active.is_(True))
                                        .order_by(partners.c.adapter, partners.c.partner_id)))
    if all(r.partner_id != PULL_PARTNER.partner_id for r in rows):
        # The Cadre Network College is pulled, not registered: its records carry this id.
        rows.append(SimpleNamespace(partner_id=PULL_PARTNER.partner_id, adapter=PULL_PARTNER.adapter))
    # Health and finance partners push files; a training base may too (rosters), but its
    # day-to-day channel is the record API, so its records say when it last pushed.
    by_kind: dict[bool, list[str]] = {True: [], False: []}
    for r in rows:
        by_kind[r.adapter in MONTHLY_ADAPTERS].append(r.partner_id)
    last = _last_pushes(conn, by_kind)
    # The months the missed-push alerts name (gateway/alerts.py): the console and the robot agree.
    missing = {m.partner_id: m for m in missing_pushes(conn, settings, now)}
    out = []
    for r in rows:
        owed = missing.get(r.partner_id)
        at = last.get(r.partner_id)
        out.append({"partner_id": r.partner_id, "adapter": r.adapter,
                    "last_push_at": at.isoformat() if at else None,
                    "missing_months": list(owed.months) if owed else [],
                    "missing_annual": list(owed.annual) if owed else []})
    return out


def overview(conn: Connection, settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """What the dashboard shows, in one read; datetimes as ISO strings.

    Outbox and record counts by status, the backlog and its oldest age, dead letters, open
    conflicts and rejections, each partner's last push and missing months and annual batches
    (monthly partners only, :func:`missing_pushes`), pull lag, and the days left to the year
    close.
    """
    now = now or datetime.now(UTC)
    counts: dict[str, int] = dict(
        conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all())
    record_counts: dict[str, int] = dict(
        conn.execute(select(records.c.status, func.count()).group_by(records.c.status)).all())
    pending = backlog(conn)
    rejections_open = conn.execute(select(func.count())
                                   .where(rejections.c.status == "open")).scalar_one()
    # A conflict its partner withdrew is closed (gateway/ops/records.py, list_conflicts).
    conflicts_open = conn.execute(select(func.count()).where(
        records.c.status == "conflict", records.c.withdrawn.is_(False))).scalar_one()
    close = year_close(settings, now)
    return {
        "outbox": {s: int(counts.get(s, 0))
                   for s in (*OUTBOX_STATUSES, *sorted(set(counts) - set(OUTBOX_STATUSES)))},
        "records": {s: int(record_counts.get(s, 0))
                    for s in (*RECORD_STATUSES, *sorted(set(record_counts) - set(RECORD_STATUSES)))},
        "backlog": {"size": pending.size, "oldest_age_seconds": pending.oldest_age_seconds(now)},
        "dead_letters": int(counts.get("dead", 0)),
        "open_conflicts": int(conflicts_open),
        "rejections_open": int(rejections_open),
        "partners": _partners(conn, settings, now),
        "pull": pull_lag(conn, now),
        "year_close": {"year": close.year, "date": close.date.isoformat(), "days_left": close.days_left},
        "now": now.isoformat(),
    }
