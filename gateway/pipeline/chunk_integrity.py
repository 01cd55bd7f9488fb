"""Integrity across records (SPEC §4 R14): the part of ``Chunk`` that flags overlaps and long days.

:class:`ChunkIntegrity` flags, never drops (青人社厅函〔2022〕394号 六(一) 诚信学习): a person's
offline trainings that overlap, and days on which the person's records together claim more time
than one day holds.  It reads the stored records that meet the chunk's days with one plain SQL
query (:func:`_r14_read`) and only adds warnings to the versions the chunk decided; it writes
nothing.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from functools import lru_cache

from contracts.records import ActivityType
from gateway.pipeline.chunk_state import ChunkState, _chunks
from gateway.pipeline.credit import day_totals, overlapping
from gateway.pipeline.items import error_note
from gateway.pipeline.rules_tables import TIME_ACTIVITIES


def _integrity_span(mode: str, activity_type: str, started_on: date | None, completed_on: date,
                    time_hours: Decimal | None) -> tuple[bool, date | None, date, Decimal | None]:
    """What R14 compares across a person's records: (an offline training?, days, time).

    Time counts only for the kinds whose hours are time spent, and only on known days: a
    record with a completion date alone is a day's work only if it was offline.
    """
    timed = activity_type in TIME_ACTIVITIES and (started_on is not None or mode == "offline")
    return (mode == "offline" and activity_type == ActivityType.TRAINING, started_on,
            completed_on, time_hours if timed else None)


@lru_cache(maxsize=8)
def _r14_read(windows: int, dialect: str, paramstyle: str) -> str:
    """R14's read of the stored records meeting ``windows`` (person, CE year, first, last day).

    Plain SQL through the driver: SQLAlchemy compiled a ``values()`` CTE afresh for every
    execution (its rows are part of the cache key), 50 ms for 500 windows against 2 ms to run.
    PostgreSQL cannot infer a VALUES column's type from parameters, so they are cast there;
    SQLite must not cast (``CAST(… AS DATE)`` is numeric affinity: '2026-08-01' → 2026) and
    compares the ISO text it stores.
    """
    marker = "?" if paramstyle == "qmark" else "%s"  # psycopg: format / pyformat
    if dialect == "sqlite":
        row = f"({marker}, {marker}, {marker}, {marker})"
    else:
        row = (f"(CAST({marker} AS VARCHAR), CAST({marker} AS INTEGER), CAST({marker} AS DATE), "
               f"CAST({marker} AS DATE))")
    return (f"WITH w(p, y, a, b) AS (VALUES {', '.join([row] * windows)}) "
            "SELECT r.record_id, r.person_key, r.counts_year, r.mode, r.activity_type, "
            "r.started_on, r.completed_on, r.time_hours FROM w JOIN records r "
            "ON r.person_key = w.p AND r.counts_year = w.y AND r.completed_on >= w.a "
            "AND coalesce(r.started_on, r.completed_on) <= w.b "
            "WHERE r.status = 'accepted' AND NOT r.withdrawn")


def _day(value: date | str) -> date:
    """A date read through the driver: SQLite gives the ISO text SQLAlchemy stored."""
    return date.fromisoformat(value) if isinstance(value, str) else value


class ChunkIntegrity(ChunkState):
    """Integrity flags (R14) on a chunk's versions."""

    # -- integrity across records (R14) ------------------------------------------------------
    def _flag_integrity(self) -> None:
        """R14 across records: flag, never drop (青人社厅函〔2022〕394号 六(一) 诚信学习).

        Offline trainings of one person that overlap, and days on which the person's records
        together claim more time than one day holds, are flagged on the records of this chunk.
        Only trainings overlap (two papers finished on one day do not), and a record dated by
        its completion alone is spread over no days unless it was offline: an online course
        finished today may have been studied for weeks.
        """
        withdrawn = {w["rid"] for w in self.withdrawals}
        mine = {p.record_id: p for p in self.pending if p.queue and p.record_id not in withdrawn}
        # Only a stored record that shares a day with one of this chunk's can matter: read, for
        # each record of the chunk, its person's records of its CE year that meet its days.  A
        # stored record starts on or before its completion (validation refuses otherwise), so
        # its completion bounds it from below: one index range on (person_key, counts_year,
        # completed_on) a window.  Reading the person's whole year instead (or the chunk's
        # first-to-last day, a year for an annual batch) read ~10 records a row at a million.
        windows = sorted({(p.sub.person_key, p.sub.counts_year,
                           p.sub.started_on or p.sub.completed_on, p.sub.completed_on)
                          for p in mine.values()})
        # A record this chunk gives a new version is judged as that version only: its stored
        # one may be another person's or year's (a correction), or no longer accepted.
        versioned = {p.record_id for p in self.pending} | withdrawn
        spans: dict[tuple[str, int], dict[str, tuple[bool, date | None, date, Decimal | None]]] = {}
        dialect = self.conn.dialect
        for part in _chunks(windows):
            # Days as ISO text: what SQLite stores and compares, and what PostgreSQL casts.
            params = tuple(v for person, year, first, last in part
                           for v in (person, year, first.isoformat(), last.isoformat()))
            for rid, person, year, mode, kind, start, end, hours in self.conn.exec_driver_sql(
                    _r14_read(len(part), dialect.name, dialect.paramstyle), params):
                if rid in versioned:
                    continue
                spans.setdefault((person, int(year or 0)), {})[rid] = _integrity_span(
                    mode or "", kind or "", _day(start) if start else None, _day(end),
                    Decimal(hours) if hours else None)
        for rid, p in mine.items():
            spans.setdefault((p.sub.person_key, p.sub.counts_year), {})[rid] = _integrity_span(
                p.sub.mode, p.sub.activity_type, p.sub.started_on, p.sub.completed_on,
                p.sub.time_hours)
        limit = self.config.integrity_day_limit_hours
        for entries in spans.values():
            if len(entries) < 2 or not mine.keys() & entries.keys():
                continue
            offline = overlapping((rid, start or end, end) for rid, (training, start, end, _) in
                                  entries.items() if training)
            days = day_totals((start, end, hours) for _, start, end, hours in entries.values()
                              if hours is not None)
            heavy = {day for day, total in days.items() if total > limit}
            for rid in mine.keys() & entries.keys():
                p, (_, start, end, _) = mine[rid], entries[rid]
                codes = {w["code"] for w in p.sub.warnings}
                if rid in offline and "INTEGRITY_OVERLAP" not in codes:
                    p.flags.append(error_note("INTEGRITY_OVERLAP", "activity",
                                              "(overlaps another offline training of this person)"))
                first = start or end
                if "INTEGRITY_DAY_OVER_24H" not in codes and any(
                        first <= day <= end for day in heavy):
                    p.flags.append(error_note("INTEGRITY_DAY_OVER_24H", "claimed.quantity",
                                              f"(with this person's other records, over {limit} h a day)"))
        for p in mine.values():
            p.answer.warnings.extend(p.flags)
