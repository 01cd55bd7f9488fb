"""Ingest: judged submissions → dedup → records + versions + outbox + audit, one transaction.

This is the only writer of partner records.  A call takes one request's (or one file chunk's)
items and commits them together, so a 2xx always means committed (SPEC §7), while one bad
record never fails its neighbours: it is answered ``rejected`` and kept in ``rejections`` for
revalidation.

The work is set-based (STYLE.md, "the hot path"): a handful of ``IN (…)`` reads load what the
chunk needs to know, the decisions are taken in memory in input order (so a chunk may resend or
correct its own earlier rows), and every table gets one ``executemany``.  Natural keys are
claimed with ``ON CONFLICT DO NOTHING`` and read back: if a concurrent replica won a key between
our read and our write, the chunk is rolled back and judged again.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, bindparam, delete, select, text, update

from contracts import CONTRACT_VERSION, Note, RecordAnswer, RecordStatus
from contracts.records import ActivityType
from gateway import audit, metrics
from gateway.config import Settings
from gateway.errors import PayloadRejected
from gateway.pipeline import caps
from gateway.pipeline.credit import allocate, cap_note, coded, day_totals, explain, overlapping
from gateway.pipeline.items import (
    Item,
    PartnerRef,
    Prepared,
    RulesContext,
    _claim,
    _no_nul,
    _source_id_of,
    error_note,
    item_from_raw,
    new_record_id,
    prepare,
)
from gateway.pipeline.rules_tables import TIME_ACTIVITIES, RulesConfig
from gateway.pipeline.writer_retry import _KeyRaceLost, writer_retries
from gateway.store.bulk import bulk_insert
from gateway.store.tables import (
    HELD,
    batch_repeats,
    natural_keys,
    outbox,
    record_versions,
    records,
    rejections,
)
from gateway.store.util import dumps_storable


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC while one request's records (or one batch chunk) are judged and stored.

    A 1,000-record request allocates tens of thousands of objects that live until it ends;
    the collections they trigger walk them again and again: ~80 of ~260 µs of CPU a record
    on SQLite (benchmarks/RESULTS.md).  Only the caller that found the GC on turns it back on,
    so concurrent requests never leave it off, and collections still run between requests.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def ingest(engine: Engine, partner: PartnerRef, raws: Sequence[object], *,
           batch_id: str | None = None, now: datetime | None = None,
           rules: RulesContext | None = None) -> list[RecordAnswer]:
    """Validate and store canonical ``raws`` (dicts from JSON); one answer per input."""
    with paused_gc():
        return ingest_items(engine, partner, [item_from_raw(raw) for raw in raws],
                            batch_id=batch_id, now=now, rules=rules)


def ingest_items(engine: Engine, partner: PartnerRef, items: Sequence[Item], *,
                 batch_id: str | None = None, now: datetime | None = None,
                 in_tx: Callable[[Connection, list[RecordAnswer]], None] | None = None,
                 rules: RulesContext | None = None) -> list[RecordAnswer]:
    """Judge and store ``items`` in one transaction.

    ``in_tx`` runs inside that transaction before commit (a pull advances its cursor there, a
    batch its checkpoint), so both commit or neither.
    """
    now = now or datetime.now(UTC)
    rules = rules or RulesContext.empty()
    for item in items:
        prepare(item, partner, now, rules)
    answers: list[RecordAnswer] = []
    lock_first: set[caps.Group] = set()
    for attempt in writer_retries():
        with attempt, engine.begin() as conn:
            # A concurrent twin (same partner and source ids, or the same activity from
            # another source) may commit first; the retry then sees its rows.
            answers = Chunk(conn, partner, now, batch_id, rules.config, lock_first).run(items)
            if in_tx is not None:
                in_tx(conn, answers)
    metrics.count_ingested(partner.partner_id, partner.adapter, answers)  # committed: count it
    return answers


@dataclass
class _Known:
    """What the chunk knows of a stored (or just decided) record."""

    record_id: str
    version: int
    content_hash: str
    withdrawn: bool
    status: str
    duplicate_of: str | None
    claim: str | None  # the hours its current version is worth (_claim); None: unknown
    natural_key: str  # of its current version (who, what, when)
    cap_group: caps.Group | None = None  # the capped group its current version counts in
    # (version, status, withdrawn) as read from the store; None: first seen in this chunk
    loaded: tuple[int, str, bool] | None = None


# What the chunk reads of a stored record (_Known), not its thirty columns.
_KNOWN_COLUMNS = (records.c.record_id, records.c.source_record_id, records.c.current_version,
                  records.c.content_hash, records.c.withdrawn, records.c.status,
                  records.c.duplicate_of, records.c.cap_type, records.c.person_key,
                  records.c.year, records.c.natural_key, records.c.hours)


def closed_year_detail(config: RulesConfig, year: int) -> dict[str, str]:
    """The detail of a YEAR_CLOSED refusal to take back what counts in ``year`` (closed)."""
    closes = config.closes(year)
    return {"detail": f"(it counts in CE year {year}, closed at the end of {closes}; it can no "
                      "longer be withdrawn)",
            "detail_zh": f"（该记录计入 {year} 年度，该年度已于 {closes} 日终关闭，不能再撤回）"}


def _stored_claim(hours: str | None) -> str | None:
    """A stored record's claim; None when its hours are unknown (then: a conflict)."""
    return _claim(Decimal(hours)) if hours else None


RULES_COLUMNS = ("category", "activity_type", "counts_year", "hours", "credited_hours",
                 "cap_type", "review_authority", "reference_version", "mode", "started_on",
                 "time_hours", "covers_professional")


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


def _rules_columns(sub: Prepared) -> dict[str, Any]:
    """The rules' verdict as record columns; ``credited_hours`` is final after caps."""
    return {"category": sub.category, "activity_type": sub.activity_type,
            "counts_year": sub.counts_year, "hours": str(sub.hours),
            "credited_hours": str(sub.hours), "cap_type": sub.cap_type,
            "review_authority": sub.review_authority, "reference_version": sub.reference_version,
            "mode": sub.mode, "started_on": sub.started_on,
            "time_hours": None if sub.time_hours is None else str(sub.time_hours),
            "covers_professional": sub.covers_professional}


@dataclass
class _Pending:
    """A version decided in this chunk; its payload is built once caps are allocated."""

    record_id: str
    version: int
    sub: Prepared
    content_hash: str
    queue: bool
    row: dict[str, Any]  # its records insert/update row, to carry the credited hours
    answer: RecordAnswer
    credited: Decimal
    cap: tuple[Note, Note] | None = None  # the CAP_APPLIED warning and rule note
    flags: list[Note] = field(default_factory=list)  # R14 warnings found across records
    # The NOT_COUNTED warning and rule note of a version that is forwarded with no hours: it
    # replaces a counted version the management system holds (queue is False: not accepted)
    uncounted: tuple[Note, Note] | None = None
    received_at: str | None = None  # the item's own arrival (Item.received_at); None: now


class Chunk:
    def __init__(self, conn: Connection, partner: PartnerRef, now: datetime,
                 batch_id: str | None, config: RulesConfig,
                 lock_first: set[caps.Group] | None = None) -> None:
        self.conn, self.partner, self.now, self.batch_id = conn, partner, now, batch_id
        self.config = config
        self.locked: set[caps.Group] = set()  # cap groups this transaction holds
        # Groups to lock before reading: shared across the attempts of one ingest (see
        # _lock_groups), so a chunk that met a group late locks it first next time.
        self.lock_first: set[caps.Group] = lock_first if lock_first is not None else set()
        self.pending: list[_Pending] = []
        self.leaving: dict[caps.Group, set[str]] = {}
        self.unsettled: set[caps.Group] = set()  # groups whose other records _settle_caps re-issues
        self.recredited: list[dict[str, Any]] = []
        self.now_iso = now.isoformat()
        self.events: list[audit.Event] = []
        self.by_source: dict[str, _Known] = {}
        self.by_record: dict[str, _Known] = {}
        self.holders: dict[str, str] = {}  # natural key → record id holding it
        self.claimed_keys: dict[str, str] = {}  # keys this chunk claims (new)
        self.moved_keys: dict[str, str] = {}  # keys taken over from withdrawn holders
        self.released_keys: dict[str, str] = {}  # keys a correction moved its record away from
        self.new_records: list[dict[str, Any]] = []
        self.record_updates: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.outbox_rows: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.seen_again: list[dict[str, Any]] = []
        self.withdrawals: list[dict[str, Any]] = []  # records withdrawn here (a failed assessment)
        # Activities whose record stopped holding them here (withdrawn, corrected away): another
        # source's report of one, held as a duplicate of that record, takes over (succeed()).
        self.freed: dict[str, set[str]] = {}  # natural key → the records that let it go
        self.stored_holders: dict[str, str] = {}  # natural key → holder in natural_keys
        self.judged: dict[str, str] = {}  # natural key → the holder a record was judged against
        self.born: set[str] = set()  # records first seen in this chunk
        # Stored records pinned where a refused correction's applied version counts (R10,
        # caps.refused_pins), with that cap group; a version sent from here ends the pin.
        self.pins: dict[str, caps.Group | None] = {}
        self.unpinned: list[str] = []
        # This partner's records met here (record id → its source id), and the activity each
        # source id's last valid item in the chunk reports (_last_words): where the chunk
        # leaves the record, so that a record it moves away from an activity does not keep it
        # from an earlier item of the same request (_let_go_for).
        self.sources: dict[str, str] = {}
        self.last_keys: dict[str, str] = {}

    # -- reads ----------------------------------------------------------------------------
    def _load(self, items: Sequence[Item]) -> None:
        subs = [i.prepared for i in items if i.prepared is not None and not i.errors]
        source_ids = sorted({s.source_record_id for s in subs}
                            | {i.refused[0] for i in items if i.refused is not None})
        for part in _chunks(source_ids):
            self._remember(self.conn.execute(select(*_KNOWN_COLUMNS).where(
                records.c.partner_id == self.partner.partner_id,
                records.c.source_record_id.in_(part))).mappings().all())
        # The activities of the chunk's records, and those its known records hold now (a
        # correction or a withdrawal may give one back).
        keys = sorted({s.natural_key for s in subs} | {k.natural_key for k in self.by_source.values()})
        for part in _chunks(keys):
            self.stored_holders.update((r.natural_key, r.record_id) for r in self.conn.execute(
                select(natural_keys.c.natural_key, natural_keys.c.record_id)
                .where(natural_keys.c.natural_key.in_(part))))
        self.holders.update(self.stored_holders)
        missing = sorted(set(self.holders.values()) - set(self.by_record))
        for part in _chunks(missing):
            self._remember(self.conn.execute(select(*_KNOWN_COLUMNS).where(
                records.c.record_id.in_(part))).mappings().all(), by_source=False)
        if self.by_source:
            self.pins = caps.pins_of(self.conn, (k.record_id for k in self.by_source.values()))

    def _remember(self, rows: Iterable[Any], by_source: bool = True) -> None:
        for r in rows:
            counted = r["status"] == "accepted" and not r["withdrawn"]
            group = caps.group_of(r) if counted else None
            known = _Known(r["record_id"], int(r["current_version"]), r["content_hash"],
                           bool(r["withdrawn"]), r["status"], r["duplicate_of"],
                           _stored_claim(r["hours"]), r["natural_key"], group,
                           (int(r["current_version"]), r["status"], bool(r["withdrawn"])))
            self.by_record[known.record_id] = known
            if by_source:
                self.by_source[r["source_record_id"]] = known
                self.sources[known.record_id] = r["source_record_id"]

    # -- decisions --------------------------------------------------------------------------
    def run(self, items: Sequence[Item]) -> list[RecordAnswer]:
        # The cap groups this chunk's records join, locked before anything is read: another
        # writer re-issuing a record of the group (R10) would otherwise change it under our
        # decisions, and _check_reads would send the chunk round again and again.  With them
        # the groups an earlier attempt found its stored records in (they may leave them).
        self._lock_groups({(i.prepared.person_key, i.prepared.year, i.prepared.cap_type)
                           for i in items if i.prepared is not None and i.prepared.cap_type}
                          | self.lock_first)
        self._load(items)
        # The groups its stored records count in (a correction or failure takes them out),
        # and those a refused one is pinned in.
        self._lock_groups({k.cap_group for k in self.by_source.values() if k.cap_group}
                          | {g for g in self.pins.values() if g})
        self.last_keys = _last_words(items)
        answers = [self._decide(index, item) for index, item in enumerate(items)]
        last = {p.record_id: p for p in self.pending}  # each record's last word in this chunk
        self._apply_caps(last)
        self._flag_integrity()
        # A record first seen in this chunk whose last word here is "withdrawn", or a version
        # that does not count (a repeat, a conflict), never reaches the management system: a
        # version forwarded first would count there, uncapped or twice.
        unsent = self.born & ({w["rid"] for w in self.withdrawals}
                              | {rid for rid, p in last.items()
                                 if not p.queue and p.uncounted is None})
        for p in self.pending:
            self._store_version(p.record_id, p.version, self._build(p), p.content_hash,
                                (p.queue or p.uncounted is not None) and p.record_id not in unsent)
        self._write(with_audit=False)
        # Audit last: its head row is the one lock every writer takes, so holding it while
        # succeed() updates other partners' records would deadlock with a crosswise twin.
        self.events += succeed(self.conn, self.config, self.now, self.freed)
        self.events += self._settle_caps()
        audit.append(self.conn, self.events, self.now)
        return answers

    # -- caps (R10) -----------------------------------------------------------------------
    def _apply_caps(self, last: dict[str, _Pending]) -> None:
        """Credit this chunk's capped records; their groups' other records are settled later.

        A record that lets an activity go here (withdrawn, corrected away) is succeeded by the
        next report of it after the writes (:func:`succeed`), which joins the group then.  So
        that a record behind them is not lifted by one re-issued version and cut back by the
        next, the successor expected is counted in now (:meth:`_successors`), and the stored
        records whose share moved are re-issued once, after the succession
        (:meth:`_settle_caps`), from the group as it then stands.
        """
        groups: dict[caps.Group, dict[str, _Pending]] = {}
        withdrawn = {w["rid"] for w in self.withdrawals}  # a version of this chunk, withdrawn in it
        # Capped versions forwarded before the record's last word here, with their groups.
        earlier: list[tuple[_Pending, caps.Group]] = []
        for p in self.pending:
            if p.queue and (group := self._group_of(p)) is not None:
                if p is last[p.record_id] and p.record_id not in withdrawn:
                    groups.setdefault(group, {})[p.record_id] = p
                else:
                    earlier.append((p, group))
                    groups.setdefault(group, {})
        for group in self.leaving:
            groups.setdefault(group, {})
        joining = self._successors(last) if self.freed else {}
        for group in joining:
            groups.setdefault(group, {})
        claims: dict[caps.Group, dict[str, Decimal]] = {}
        for group in sorted(groups):  # one lock order for every writer: no deadlocks
            mine = groups[group]
            gone = frozenset(self.leaving.get(group, set()) - set(mine))
            cap = self.config.caps[group[2]]
            self._lock_groups({group})
            hours = {**joining.get(group, {}), **{rid: p.sub.hours for rid, p in mine.items()}}
            credited, stored = caps.reallocate(self.conn, group, cap, self.now, hours,
                                               gone=gone, keys=self.config.keys)
            for rid, p in mine.items():
                self._credit(p, credited[rid], cap)
            claims[group] = {**{rid: s.hours for rid, s in stored.items() if rid not in gone},
                             **hours}
            # Stored records whose share moved are re-issued after the succession; so are those
            # of a group a successor may join or a record leaves.
            if group in joining or group in self.leaving or any(
                    rid not in hours and rid not in gone and credited[rid] != old.credited
                    for rid, old in stored.items()):
                self.unsettled.add(group)
        for p, group in earlier:
            # Forwarded too (every acknowledged version is), so capped too: as if it were the
            # record's last word, against the group as this chunk leaves it.
            cap = self.config.caps[group[2]]
            alone = allocate(sorted({**claims[group], p.record_id: p.sub.hours}.items()), cap)
            self._credit(p, alone[p.record_id], cap)

    @staticmethod
    def _group_of(p: _Pending) -> caps.Group | None:
        # The activity's year, not the year it counts toward (caps: 四(二)1–4 "当年")
        cap_type = p.sub.cap_type
        return (p.sub.person_key, p.sub.year, cap_type) if cap_type else None

    @staticmethod
    def _credit(p: _Pending, credited: Decimal, cap: Decimal) -> None:
        p.credited = credited
        p.row["credited_hours"] = str(credited)
        p.cap = cap_note(p.sub.hours, credited, cap, p.sub.cap_type or "")
        if p.cap is not None:
            p.answer.warnings.append(p.cap[0])

    def _successors(self, last: dict[str, _Pending]) -> dict[caps.Group, dict[str, Decimal]]:
        """The held reports expected to take over activities let go here, by cap group.

        :func:`succeed` decides after the writes; this reads the same beforehand: the earliest
        live duplicate of an activity nobody in the chunk holds, in arrival order — a stored
        report as stored, one this chunk versions or first sees as its last word here says.
        A guess that misses (a stored report corrected onto the activity here) only costs an
        extra re-issue: :meth:`_settle_caps` allocates each group again from what was written.
        """
        mine = self.born | set(self._versioned_ids())
        joining: dict[caps.Group, dict[str, Decimal]] = {}

        def held_here(rid: str, key: str) -> _Pending | None:
            known, p = self.by_record.get(rid), last.get(rid)
            live = (known is not None and p is not None and not known.withdrawn
                    and known.status == RecordStatus.DUPLICATE.value and known.natural_key == key)
            return p if live else None

        for key in sorted(self.freed):
            holder = self.holders.get(key)
            if holder is not None and _holds(self.by_record[holder], key):
                continue
            stored = self.conn.execute(select(records).where(
                records.c.natural_key == key, records.c.withdrawn.is_(False))
                .order_by(records.c.created_at, records.c.record_id)).mappings().all()
            first: tuple[str, Decimal, caps.Group | None] | None = None
            for r in stored:
                if r["record_id"] in mine:
                    p = held_here(r["record_id"], key)
                    if p is not None:
                        first = (p.record_id, p.sub.hours, self._group_of(p))
                elif _may_succeed(self.conn, r):
                    first = (r["record_id"], Decimal(r["hours"] or "0"), caps.group_of(r))
                if first is not None:
                    break
            if first is None:  # first seen here (arrived last, in record id order)
                born = sorted(rid for rid in self.born if held_here(rid, key) is not None)
                if born:
                    p = last[born[0]]
                    first = (p.record_id, p.sub.hours, self._group_of(p))
            if first is not None and first[2] is not None:
                joining.setdefault(first[2], {})[first[0]] = first[1]
        return joining

    def _versioned_ids(self) -> list[str]:
        """The records this chunk versions (corrections, withdrawals) — not new ones."""
        return [u["rid"] for u in self.record_updates] + [w["rid"] for w in self.withdrawals]

    def _settle_caps(self) -> list[audit.Event]:
        """Re-issue the records whose share of a group this chunk touched has moved.

        Runs after the writes and the succession, so a group is allocated from what now
        stands in it: its records, the chunk's and a successor's among them.
        """
        if not self.unsettled:
            return []
        after = Chunk(self.conn, self.partner, self.now, self.batch_id, self.config)
        for group in sorted(self.unsettled):  # locked by this transaction already
            after._reissue(group)
        after._write(with_audit=False)
        return after.events

    def _reissue(self, group: caps.Group, hours: dict[str, Decimal] | None = None,
                 gone: frozenset[str] = frozenset()) -> dict[str, Decimal]:
        """Allocate a locked ``group`` again; re-issue its stored records whose share moved.

        ``hours`` are records joining or changing here, ``gone`` records leaving (see
        :func:`caps.reallocate`); neither is re-issued.  Returns the credited hours by record.
        """
        hours = hours or {}
        cap = self.config.caps[group[2]]
        credited, stored = caps.reallocate(self.conn, group, cap, self.now, hours, gone=gone,
                                           keys=self.config.keys)
        for rid, old in stored.items():
            if rid not in hours and rid not in gone and credited[rid] != old.credited:
                self._recredit(old, credited[rid], cap, group[2])
        return credited

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

    def _lock_groups(self, groups: set[caps.Group]) -> None:
        """Lock cap groups in the one order every writer keeps (sorted), or start again.

        A group sorting before one already held cannot be locked now without risking a
        deadlock: it joins ``lock_first`` and the chunk runs again, locking it first.
        """
        new = groups - self.locked
        if not new:
            return
        if self.locked and min(new) < max(self.locked):
            self.lock_first |= new
            raise _KeyRaceLost("cap groups out of order")
        caps.lock_groups(self.conn, new, self.now)
        self.locked |= new

    def _recredit(self, old: caps.Stored, credited: Decimal, cap: Decimal | None,
                  cap_type: str | None) -> None:
        """Re-issue a stored record whose credited hours moved, as a version that counts.

        Its share of a cap moved (another record came or went), or a held record was accepted
        (no cap: ``cap_type`` None).  The notes of a version that did not count go.
        """
        payload = self.conn.execute(select(record_versions.c.payload, record_versions.c.content_hash)
                                    .where(record_versions.c.record_id == old.record_id,
                                           record_versions.c.version == old.version)).one()
        record = orjson.loads(payload.payload)
        note = (cap_note(old.hours, credited, cap, cap_type)
                if cap is not None and cap_type is not None else None)
        dropped = ("CAP_APPLIED", "NOT_COUNTED")
        keep = [n for n in record["warnings"] if n["code"] not in dropped]
        notes = [n for n in record["rule_notes"] if n["code"] not in dropped]
        version = old.version + 1
        record.update(version=version, credited_hours=str(credited),
                      warnings=keep + ([note[0].model_dump(mode="json")] if note else []),
                      rule_notes=notes + ([note[1].model_dump(mode="json")] if note else []))
        record["source"]["received_at"] = self.now_iso
        self._store_version(old.record_id, version, orjson.dumps(record).decode(),
                            payload.content_hash, True)
        self.recredited.append({"rid": old.record_id, "current_version": version,
                                "credited_hours": str(credited), "updated_at": self.now})
        self.events.append(audit.Event("recredited", old.record_id, version, "gateway", {
            "cap_type": cap_type, "credited_hours": str(credited),
            "previous_credited_hours": str(old.credited)}))

    def _decide(self, index: int, item: Item) -> RecordAnswer:
        sub = item.prepared
        if sub is None or item.errors:
            resent = self._resent(item)
            if resent is not None:
                return self._duplicate(index, item, resent, item.refused[0] if item.refused else "")
            failed = self._failed_assessment(item)
            if failed is not None:
                return self._withdraw_failed(index, item, failed)
            return self._reject(index, item)
        known = self.by_source.get(sub.source_record_id)
        if known is None:
            return self._first_seen(index, item, sub)
        if known.withdrawn or known.content_hash != sub.content_hash:
            # A change pulled after its year closed (R11): judged as a pushed one is.
            if sub.change_errors:
                item.errors = [Note.model_validate(e) for e in sub.change_errors]
                return self._reject(index, item)
            if sub.change_counts_year is not None:
                sub = replace(sub, counts_year=sub.change_counts_year,
                              rule_notes=sub.rule_notes + sub.change_rule_notes)
        return self._resubmitted(index, item, sub, known)

    def _reject(self, index: int, item: Item) -> RecordAnswer:
        source_id = _no_nul(item.submission.source_record_id if item.submission
                            else item.source_record_id or _source_id_of(item.raw))
        self.rejected.append({
            "partner_id": self.partner.partner_id, "adapter": self.partner.adapter,
            "source_record_id": source_id, "batch_id": self.batch_id, "payload": dumps_storable(item.raw),
            "errors": dumps_storable([e.model_dump(mode="json") for e in item.errors]), "status": "open",
            "received_at": self.now})
        self.events.append(audit.Event("rejected", actor=self.partner.partner_id, detail={
            "source_record_id": source_id, "row": item.row, "batch_id": self.batch_id,
            "codes": [e.code for e in item.errors], "fields": [e.field for e in item.errors]}))
        return RecordAnswer(index=index, source_record_id=source_id, status=RecordStatus.REJECTED,
                            errors=item.errors, warnings=item.warnings)

    def _give_back(self, known: _Known) -> None:
        """A record corrected away from its activity gives the activity back, if it holds it.

        A duplicate holds none.  The stored row is deleted only if it names this record; a
        key this chunk gave it (claimed, or taken from a withdrawn holder) is simply not given.
        """
        key = known.natural_key
        if self.holders.get(key) != known.record_id:
            return
        del self.holders[key]
        self.claimed_keys.pop(key, None)
        self.moved_keys.pop(key, None)
        stored = self.stored_holders.get(key)
        if stored == known.record_id:
            self.released_keys[key] = known.record_id
        elif stored is not None and key not in self.released_keys:
            # The row still names the withdrawn record this one took the key from: a newcomer
            # takes it from there (an insert would find the row).
            self.holders[key] = stored
        self.freed.setdefault(key, set()).add(known.record_id)

    def _let_go_for(self, key: str, record_id: str) -> None:
        """Give ``key`` back now if its holder is this partner's record the chunk moves off it.

        A request is judged as a whole (SPEC §2, §7 "Dedup"): a base swapping two of its
        results' dates corrects both, though the first correction meets the activity while the
        other result, corrected away from it later in the request, still holds it.  That
        holder is the same source, not "another source"; its own correction then finds the
        key given back already (:meth:`_give_back` does nothing twice).
        """
        holder = self.holders.get(key)
        if holder is None or holder == record_id or not _holds(self.by_record[holder], key):
            return
        source = self.sources.get(holder)
        if source is not None and self.last_keys.get(source, key) != key:
            self._give_back(self.by_record[holder])

    def _holder(self, key: str, record_id: str) -> str:
        """The record holding ``key``; ``record_id`` takes it if it is free or withdrawn."""
        holder = self.holders.get(key)
        if holder is None:
            self.claimed_keys[key] = record_id
        elif not _holds(self.by_record[holder], key):
            # A withdrawn record gives its activity back: the newcomer becomes the holder (as
            # from a row naming a record that no longer holds it: another activity, a repeat).
            if key in self.claimed_keys:  # claimed in this chunk: its row is not written yet
                self.claimed_keys[key] = record_id
            else:
                self.moved_keys[key] = record_id
        else:
            return holder
        self.holders[key] = record_id
        return record_id

    def _judge(self, sub: Prepared, holder: str) -> RecordStatus:
        self.judged[sub.natural_key] = holder
        claim = self.by_record[holder].claim
        same = claim is not None and claim == sub.claim
        return RecordStatus.DUPLICATE if same else RecordStatus.CONFLICT

    def _build(self, p: _Pending) -> str:
        """The CERecord's JSON for this version.

        Every part was validated already (the submission, the notes, hours rounded to one
        place), so the record is spliced from the submission's JSON rather than built and
        validated again as a model: this runs for every row of a million-row batch.  Tests
        check that the result validates as a :class:`CERecord`.
        """
        sub = p.sub
        body = orjson.loads(sub.sub_json)
        source_record_id = body.pop("source_record_id")
        cap_warning, cap_rule = ((p.cap[0].model_dump(mode="json"),), (p.cap[1].model_dump(mode="json"),)) \
            if p.cap else ((), ())
        record = {
            "contract_version": CONTRACT_VERSION, "record_id": p.record_id, "version": p.version,
            "withdrawn": False,
            "source": {"partner_id": self.partner.partner_id, "adapter": self.partner.adapter,
                       "source_record_id": source_record_id, "batch_id": self.batch_id,
                       "received_at": p.received_at or self.now_iso},
            **body,
            "credited_hours": str(p.credited),
            "rule_notes": sub.rule_notes + cap_rule,
            "review_authority": sub.review_authority,
            "warnings": sub.warnings + cap_warning + tuple(n.model_dump(mode="json") for n in p.flags),
        }
        if p.uncounted is not None:
            record["credited_hours"] = "0"
            record["warnings"] += (p.uncounted[0].model_dump(mode="json"),)
            record["rule_notes"] += (p.uncounted[1].model_dump(mode="json"),)
        return orjson.dumps(record).decode()

    def _store_version(self, record_id: str, version: int, payload: str, chash: str,
                       queue: bool) -> None:
        self.versions.append({"record_id": record_id, "version": version, "content_hash": chash,
                              "payload": payload, "batch_id": self.batch_id,
                              "created_at": self.now})
        if queue:
            self.outbox_rows.append({"record_id": record_id, "version": version,
                                     "status": "pending", "attempts": 0, "created_at": self.now,
                                     "updated_at": self.now})
            self.events.append(audit.Event("queued", record_id, version))

    def _first_seen(self, index: int, item: Item, sub: Prepared) -> RecordAnswer:
        record_id, key, chash = new_record_id(), sub.natural_key, sub.content_hash
        self._let_go_for(key, record_id)
        holder = self._holder(key, record_id)
        status = RecordStatus.ACCEPTED if holder == record_id else self._judge(sub, holder)
        duplicate_of = None if holder == record_id else holder
        known = _Known(record_id, 1, chash, False, status.value, duplicate_of, sub.claim, key)
        self.by_source[sub.source_record_id] = self.by_record[record_id] = known
        self.sources[record_id] = sub.source_record_id
        self.born.add(record_id)
        self.new_records.append({
            "record_id": record_id, "partner_id": self.partner.partner_id,
            "adapter": self.partner.adapter, "source_record_id": sub.source_record_id,
            "current_version": 1, "status": status.value, "withdrawn": False,
            "duplicate_of": duplicate_of, "natural_key": key, "content_hash": chash,
            "person_key": sub.person_key, "year": sub.year, "batch_id": self.batch_id,
            "completed_on": sub.completed_on, "last_batch_id": self.batch_id,
            **_rules_columns(sub), "created_at": self.now, "updated_at": self.now})
        self.events.append(audit.Event("received", record_id, 1, self.partner.partner_id, {
            "source_record_id": sub.source_record_id, "person": sub.masked_id,
            "credited_hours": str(sub.hours), "batch_id": self.batch_id,
            "row": item.row, "warnings": [w["code"] for w in sub.warnings]}))
        errors: list[Note] = []
        if status is RecordStatus.DUPLICATE:
            self.events.append(audit.Event("duplicate", record_id, 1, detail={"duplicate_of": holder}))
        elif status is RecordStatus.CONFLICT:
            errors = [error_note("CONFLICT_WITH_EXISTING", "claimed.quantity", f"(record {holder})")]
            self.events.append(audit.Event("conflict", record_id, 1, detail={"conflicts_with": holder}))
        answer = RecordAnswer.model_construct(
            index=index, source_record_id=sub.source_record_id, status=status,
            record_id=record_id, version=1, warnings=list(item.warnings), errors=errors)
        self.pending.append(_Pending(record_id, 1, sub, chash, status is RecordStatus.ACCEPTED,
                                     self.new_records[-1], answer, sub.hours,
                                     received_at=_arrival(item)))
        return answer

    def _resent(self, item: Item) -> _Known | None:
        """The stored record a refused submission repeats exactly, if it does."""
        if item.refused is None:
            return None
        known = self.by_source.get(item.refused[0])
        if known is None or known.withdrawn or known.content_hash != item.refused[1]:
            return None
        return known

    def _duplicate(self, index: int, item: Item, known: _Known, source_record_id: str) -> RecordAnswer:
        """A resend of the stored version: nothing new is stored or forwarded."""
        if self.batch_id is not None:
            self.seen_again.append({"rid": known.record_id, "b": self.batch_id})
        self.events.append(audit.Event("duplicate", known.record_id, known.version,
                                       self.partner.partner_id, {"resend_of": known.record_id,
                                                                 "row": item.row}))
        return RecordAnswer(index=index, source_record_id=source_record_id,
                            status=RecordStatus.DUPLICATE, record_id=known.record_id,
                            version=known.version, warnings=item.warnings)

    def _resubmitted(self, index: int, item: Item, sub: Prepared, known: _Known) -> RecordAnswer:
        chash = sub.content_hash
        if known.content_hash == chash and not known.withdrawn:
            return self._duplicate(index, item, known, sub.source_record_id)
        if any(w["rid"] == known.record_id for w in self.withdrawals):
            # Withdrawn earlier in this chunk (a failed result), sent again: the new version is
            # its last word, judged and capped as any correction of a withdrawn record.
            self.withdrawals = [w for w in self.withdrawals if w["rid"] != known.record_id]
        # Its current version counts (the management system has it, or will): if this version
        # does not, the management system must hear so, or it keeps counting the old hours.
        was_counted = known.status == RecordStatus.ACCEPTED.value and not known.withdrawn
        status = RecordStatus.ACCEPTED
        if sub.natural_key != known.natural_key:
            # The correction changes who, what or when (another person, a new date): the record
            # gives back the activity it held.
            self._give_back(known)
        self._let_go_for(sub.natural_key, known.record_id)
        if known.withdrawn or self.holders.get(sub.natural_key) != known.record_id:
            # It does not hold this activity (a new one; withdrawn, it gave it back; a repeat
            # or a conflict): judged against whoever holds it now — the record it repeated, a
            # newcomer, a duplicate that took over — or it takes the activity if nobody does,
            # as a first report of it would (SPEC §7 "Dedup").
            holder = self._holder(sub.natural_key, known.record_id)
            known.duplicate_of = None if holder == known.record_id else holder
            if known.duplicate_of is not None:
                status = self._judge(sub, known.duplicate_of)
        known.natural_key = sub.natural_key
        known.version += 1
        known.content_hash, known.withdrawn, known.status = chash, False, status.value
        known.claim = sub.claim
        new_group = ((sub.person_key, sub.year, sub.cap_type)
                     if sub.cap_type and status is RecordStatus.ACCEPTED else None)
        if known.cap_group is not None and known.cap_group != new_group:
            # It leaves its cap group (another type, person or year, or no longer accepted):
            # the hours it held there go back to the group's other records.
            self.leaving.setdefault(known.cap_group, set()).add(known.record_id)
        known.cap_group = new_group
        uncounted = (_not_counted(status, known.duplicate_of)
                     if was_counted and status is not RecordStatus.ACCEPTED else None)
        if status is RecordStatus.ACCEPTED or uncounted is not None:
            self._unpin(known)  # a version that is sent: it replaces the pinned one there
        self.record_updates.append({"rid": known.record_id, "current_version": known.version,
                                    "content_hash": chash, "withdrawn": False,
                                    "status": status.value, "updated_at": self.now,
                                    "completed_on": sub.completed_on,
                                    "last_batch_id": self.batch_id,
                                    "natural_key": sub.natural_key, "person_key": sub.person_key,
                                    "year": sub.year, "duplicate_of": known.duplicate_of,
                                    **_rules_columns(sub)})
        if uncounted is not None:
            self.record_updates[-1]["credited_hours"] = "0"
        self.events.append(audit.Event("corrected", known.record_id, known.version,
                                       self.partner.partner_id, {
                                           "previous_version": known.version - 1, "row": item.row,
                                           "credited_hours": str(sub.hours),
                                           "judged": status.value}))
        answer_status = RecordStatus.CORRECTED if status is RecordStatus.ACCEPTED else status
        errors = ([error_note("CONFLICT_WITH_EXISTING", "claimed.quantity")]
                  if status is RecordStatus.CONFLICT else [])
        answer = RecordAnswer.model_construct(
            index=index, source_record_id=sub.source_record_id, status=answer_status,
            record_id=known.record_id, version=known.version,
            warnings=list(item.warnings) + ([uncounted[0]] if uncounted else []), errors=errors)
        self.pending.append(_Pending(known.record_id, known.version, sub, chash,
                                     status is RecordStatus.ACCEPTED, self.record_updates[-1],
                                     answer, Decimal(0) if uncounted else sub.hours,
                                     uncounted=uncounted, received_at=_arrival(item)))
        return answer

    def _unpin(self, known: _Known) -> None:
        """A new version of a pinned record, sent downstream, ends its pin.

        It will count where its records row says, so the group it was pinned in (by its
        refused correction's applied version) is allocated again.  A version that is not sent
        (a correction into a repeat of a record no longer counted) leaves the pin: the
        management system keeps counting the applied version.
        """
        if known.record_id not in self.pins or known.record_id in self.unpinned:
            return
        self.unpinned.append(known.record_id)
        if (group := self.pins[known.record_id]) is not None:
            self.leaving.setdefault(group, set()).add(known.record_id)

    def _failed_assessment(self, item: Item) -> _Known | None:
        """The stored, not withdrawn record a refused submission reports as failed, if any.

        R9 "A failed assessment earns no hours" (青人社厅函〔2022〕394号 六(二) "根据考试考核结果
        如实出具…证明"): a base that corrects a result to failed takes its hours back.  Only
        when the failure is all that is wrong: a correction refused for anything else (a closed
        year, a revoked base, a bad id) changes nothing, as any refused correction — until
        revalidation finds the other error fixed and judges it again, as the base's last word
        (an older failed result the base has since corrected is closed unread there).
        """
        if item.refused is None or {e.code for e in item.errors} != {"ASSESSMENT_FAILED"}:
            return None
        known = self.by_source.get(item.refused[0])
        if known is None or known.withdrawn:
            return None
        if known.loaded is not None:  # stored: it may count in a closed year (a deferred
            # person's late result passes R11), whose hours a failed result no longer takes back
            stored = self.conn.execute(select(
                records.c.status, records.c.withdrawn, records.c.counts_year, records.c.year).where(
                records.c.record_id == known.record_id)).mappings().one()
            if (closed := self.config.closed_year_counted(stored, self.now)) is not None:
                item.errors.append(coded("YEAR_CLOSED", field="year",
                                         **closed_year_detail(self.config, closed)))
                return None
        return known

    def _forwarded(self, known: _Known) -> bool:
        """Whether the management system has (or will have) a version of the record.

        Not one first seen in this chunk: withdrawn here, none of its versions is sent (run()).
        """
        if known.record_id in self.born:
            return False
        return _reaches_downstream(self.conn, known.record_id, known.status)

    def _withdraw_failed(self, index: int, item: Item, known: _Known) -> RecordAnswer:
        """Refuse the failed result and withdraw the record it corrects (as ``withdraw`` does)."""
        # Its current version may be one decided earlier in this chunk (not stored yet).
        payload = next((self._build(p) for p in self.pending
                        if p.record_id == known.record_id and p.version == known.version), None)
        if payload is None:
            payload = self.conn.execute(select(record_versions.c.payload).where(
                record_versions.c.record_id == known.record_id,
                record_versions.c.version == known.version)).scalar_one()
        record = orjson.loads(payload)
        if record.get("pruned") is True:  # a closed year's stub (retention): it stays as it is
            return self._reject(index, item)
        answer = self._reject(index, item)
        known.version += 1
        known.withdrawn = True
        if known.cap_group is not None:  # its capped hours go back to the group's other records
            self.leaving.setdefault(known.cap_group, set()).add(known.record_id)
            known.cap_group = None
        forwarded = self._forwarded(known)
        if forwarded:
            self._unpin(known)
        self.freed.setdefault(known.natural_key, set()).add(known.record_id)
        self.withdrawals.append({"rid": known.record_id, "current_version": known.version,
                                 "updated_at": self.now})
        self.events.append(audit.Event("withdrawn", known.record_id, known.version,
                                       self.partner.partner_id, {
                                           "source_record_id": item.refused[0] if item.refused else "",
                                           "reason": "ASSESSMENT_FAILED", "row": item.row,
                                           "batch_id": self.batch_id}))
        # Only a record the management system has (or will have) needs the withdrawal.
        self._store_version(known.record_id, known.version,
                            withdrawn_version(record, known.version, item.received_at or self.now),
                            known.content_hash, forwarded)
        answer.record_id, answer.version = known.record_id, known.version
        answer.errors = [coded(
            "ASSESSMENT_FAILED", f"(record {known.record_id}, which counted the earlier result, "
            f"is withdrawn as version {known.version})",
            f"（此前计入学时的记录 {known.record_id} 已撤回，版本 {known.version}）",
            field=e.field) if e.code == "ASSESSMENT_FAILED" else e for e in answer.errors]
        return answer

    # -- writes ---------------------------------------------------------------------------
    def _check_reads(self) -> None:
        """Lock, and check, what the decisions read.

        On PostgreSQL another writer may have changed it since (READ COMMITTED); SQLite has
        one writer, and the checks just pass.

        - Records this chunk versions: still as read (a promotion, a correction, a withdrawal
          by another replica would otherwise be overwritten).  ``FOR UPDATE``.
        - Activities a record was judged a repeat or conflict of: still held by that record
          (else its withdrawal's succession ran before this chunk's record existed, and the
          record would be nobody's).  ``FOR SHARE``, so such a withdrawal waits for us.
        - Activities given back here: ``FOR UPDATE``, so a chunk judging against them waits.
        - The pins of the records it versions (caps.refused_pins): still as read.  A refusal
          landing meanwhile pinned the record; it locks the record before it writes the pin.
        A change lost to a twin raises :class:`_KeyRaceLost`: the chunk runs again.
        """
        conn = self.conn
        touched = sorted({u["rid"] for u in self.record_updates}
                         | {w["rid"] for w in self.withdrawals})
        for part in _chunks(touched):
            for r in conn.execute(select(records.c.record_id, records.c.current_version,
                                         records.c.status, records.c.withdrawn)
                                  .where(records.c.record_id.in_(part)).with_for_update()):
                loaded = self.by_record[r.record_id].loaded
                if loaded is not None and loaded != (int(r.current_version), r.status,
                                                     bool(r.withdrawn)):
                    raise _KeyRaceLost(r.record_id)
        if touched and caps.pins_of(conn, touched) != {
                rid: self.pins[rid] for rid in touched if rid in self.pins}:
            raise _KeyRaceLost("refused_pins")
        freed = sorted(self.freed)
        for part in _chunks(freed):
            conn.execute(select(natural_keys.c.natural_key).where(
                natural_keys.c.natural_key.in_(part)).with_for_update()).all()
        # Not the keys this chunk writes itself (freed, claimed, moved: checked as written).
        mine = self.freed.keys() | self.claimed_keys.keys() | self.moved_keys.keys()
        judged = sorted(k for k, holder in self.judged.items()
                        if k not in mine and holder not in self.born)
        for part in _chunks(judged):
            rows = {r.natural_key: r for r in conn.execute(
                _NAMED.where(natural_keys.c.natural_key.in_(part))
                .with_for_update(read=True, of=natural_keys))}
            for key in part:
                row = rows.get(key)
                if (row is None or row.record_id != self.judged[key]
                        or not _still_holds(row.withdrawn, row.status, row.holds, key)):
                    raise _KeyRaceLost(key)

    def _check_named(self, wanted: dict[str, str]) -> None:
        """The natural_keys rows just written name the records this chunk gave them to."""
        for part in _chunks(sorted(wanted)):
            for row in self.conn.execute(select(natural_keys.c.natural_key, natural_keys.c.record_id)
                                         .where(natural_keys.c.natural_key.in_(part))):
                if wanted[row.natural_key] != row.record_id:
                    raise _KeyRaceLost(row.natural_key)

    def _write(self, with_audit: bool = True) -> None:
        conn = self.conn
        self._check_reads()
        if self.unpinned:
            caps.write_pins(conn, self.unpinned, [])
        if self.released_keys:  # before the claims: a key given back here may be taken here
            conn.execute(delete(natural_keys).where(
                natural_keys.c.natural_key == bindparam("k"),
                natural_keys.c.record_id == bindparam("r")),
                [{"k": k, "r": r} for k, r in self.released_keys.items()])
        if self.claimed_keys:
            rows = [{"natural_key": k, "record_id": r} for k, r in self.claimed_keys.items()]
            bulk_insert(conn, natural_keys, rows, ignore_conflicts=True)
            self._check_named(self.claimed_keys)
        if self.moved_keys:
            # Only from the record this chunk read there: a concurrent twin that took the key
            # first wins, and this chunk runs again (it then sees the twin as the holder).
            conn.execute(update(natural_keys).where(natural_keys.c.natural_key == bindparam("k"),
                                                    natural_keys.c.record_id == bindparam("was"))
                         .values(record_id=bindparam("r")),
                         [{"k": k, "r": r, "was": self.stored_holders.get(k)}
                          for k, r in self.moved_keys.items()])
            self._check_named(self.moved_keys)
        bulk_insert(conn, records, self.new_records)
        if self.record_updates:
            conn.execute(update(records).where(records.c.record_id == bindparam("rid"))
                         .values(current_version=bindparam("current_version"),
                                 content_hash=bindparam("content_hash"),
                                 withdrawn=bindparam("withdrawn"), status=bindparam("status"),
                                 updated_at=bindparam("updated_at"),
                                 completed_on=bindparam("completed_on"),
                                 last_batch_id=bindparam("last_batch_id"),
                                 natural_key=bindparam("natural_key"),
                                 person_key=bindparam("person_key"), year=bindparam("year"),
                                 duplicate_of=bindparam("duplicate_of"),
                                 **{c: bindparam(c) for c in RULES_COLUMNS}),
                         self.record_updates)
        if self.withdrawals:
            conn.execute(update(records).where(records.c.record_id == bindparam("rid"))
                         .values(current_version=bindparam("current_version"), withdrawn=True,
                                 credited_hours="0", updated_at=bindparam("updated_at")),
                         self.withdrawals)
        if self.recredited:
            conn.execute(update(records).where(records.c.record_id == bindparam("rid"))
                         .values(current_version=bindparam("current_version"),
                                 credited_hours=bindparam("credited_hours"),
                                 updated_at=bindparam("updated_at")), self.recredited)
        if self.seen_again:
            # Reconciliation needs to know which batches repeated a record unchanged: every one
            # of them (batch_repeats), not only the last (a resent file must not rewrite it).
            conn.execute(update(records).where(records.c.record_id == bindparam("rid"))
                         .values(last_batch_id=bindparam("b")), self.seen_again)
            bulk_insert(conn, batch_repeats, [{"batch_id": r["b"], "record_id": r["rid"]}
                                              for r in self.seen_again], ignore_conflicts=True)
        bulk_insert(conn, record_versions, self.versions)
        bulk_insert(conn, outbox, self.outbox_rows)
        bulk_insert(conn, rejections, self.rejected)
        if with_audit:
            audit.append(conn, self.events, self.now)


def _last_words(items: Sequence[Item]) -> dict[str, str]:
    """The activity (natural key) each source id's last valid item in ``items`` reports.

    A refused item (R11's ``change_errors`` included: a refused change) leaves its record where
    it was, so it is not a last word.
    """
    return {i.prepared.source_record_id: i.prepared.natural_key for i in items
            if i.prepared is not None and not i.errors and not i.prepared.change_errors}


def _arrival(item: Item) -> str | None:
    """``source.received_at`` of the version an item makes: its arrival, if it came earlier.

    A stored rejection judged again (revalidation) reached the gateway then, and the rules
    judged it as of then (R11); the management system is told so, not the time of the rerun.
    """
    return None if item.received_at is None else item.received_at.isoformat()


def _queued(conn: Connection, record_id: str, version: int | None = None) -> bool:
    """Whether a version of the record (``version``, or any) was ever queued for delivery."""
    found = select(outbox.c.record_id).where(outbox.c.record_id == record_id)
    if version is not None:
        found = found.where(outbox.c.version == version)
    return conn.execute(found.limit(1)).first() is not None


def _reaches_downstream(conn: Connection, record_id: str, status: str) -> bool:
    """Whether the management system has (or will have) a version of the record.

    An accepted one, or one that counted once and was told so with a version of no hours
    (NOT_COUNTED).  Only such a record needs its withdrawal forwarded.
    """
    return status == RecordStatus.ACCEPTED.value or _queued(conn, record_id)


def withdrawn_version(record: dict[str, Any], version: int, now: datetime) -> str:
    """The CERecord JSON of a record's withdrawn ``version``, from its current payload."""
    record.update(version=version, withdrawn=True, credited_hours="0")
    record["source"]["received_at"] = now.isoformat()
    return orjson.dumps(record).decode()


def _not_counted(status: RecordStatus, holder: str | None) -> tuple[Note, Note]:
    """The NOT_COUNTED warning and rule note of a counted record's version that no longer counts.

    A correction that now repeats another source's report of the activity (or conflicts with
    it, held for ops) counts no hours; its version is still forwarded, with none, so the
    management system stops counting the version it holds (SPEC §7: versions in order).
    """
    if status is RecordStatus.CONFLICT:
        en, zh = (f"(conflicts with record {holder}, held for review)",
                  f"（与记录 {holder} 冲突，待人工处理）")
    else:
        en, zh = f"(repeats record {holder}, which counts it)", f"（与记录 {holder} 重复，已由其计入）"
    return (coded("NOT_COUNTED", en, zh, field="credited_hours"),
            explain("NOT_COUNTED", f"0 h: {en[1:-1]}", f"0 学时：{zh[1:-1]}"))


def _chunks(values: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start: start + size]


def withdraw(engine: Engine, partner: PartnerRef, source_record_id: str,
             now: datetime | None = None, config: RulesConfig | None = None,
             ) -> RecordAnswer | None:
    """Withdraw a partner's record: a new version with ``withdrawn = true``, forwarded.

    A withdrawn record gives its capped hours back: the rest of its cap group is allocated
    again, and records that gain are re-issued (SPEC §4 R10).  None (404) when the partner has
    no record of that source id; its open rejections of it are closed ``superseded`` all the
    same (a ``rejection_withdrawn`` audit event), so revalidation never forwards what the
    partner withdrew (:func:`_close_rejections`).
    """
    now = now or datetime.now(UTC)
    for attempt in writer_retries():
        with attempt:
            return _withdraw(engine, partner, source_record_id, now, config)
    raise AssertionError("unreachable: the last attempt re-raises")  # pragma: no cover


def _withdraw(engine: Engine, partner: PartnerRef, source_record_id: str, now: datetime,
              config: RulesConfig | None) -> RecordAnswer | None:
    with engine.begin() as conn:
        # Locked (PostgreSQL) in the order chunks lock: its cap group, the record (against a
        # correction racing us), then its activity's row (against a chunk judging a report a
        # repeat of it, see Chunk._check_reads).
        mine = (records.c.partner_id == partner.partner_id,
                records.c.source_record_id == source_record_id)
        seen = conn.execute(select(records).where(*mine)).mappings().first()
        if seen is None:
            closed = _close_rejections(conn, partner, source_record_id, now)
            if not closed and conn.execute(select(records.c.record_id).where(*mine)).first():
                raise _KeyRaceLost(source_record_id)  # a revalidation made it meanwhile
            return None
        # Its groups: where it counts, and where a refused correction's applied version is
        # pinned (caps.refused_pins); the withdrawal ends the pin.
        pinned = caps.pins_of(conn, [seen["record_id"]])
        groups = {g for g in pinned.values() if g}
        if (group := caps.group_of(seen)) and seen["status"] == "accepted" and not seen["withdrawn"]:
            groups.add(group)
        caps.lock_groups(conn, groups, now)
        existing = conn.execute(select(records).where(*mine).with_for_update()).mappings().one()
        # Changed meanwhile (a promotion keeps the version but makes it count): start again.
        if any(existing[c] != seen[c] for c in ("current_version", "status", "withdrawn",
                                                "person_key", "year", "cap_type")) or (
                caps.pins_of(conn, [seen["record_id"]]) != pinned):
            raise _KeyRaceLost(str(existing["record_id"]))
        conn.execute(select(natural_keys.c.record_id).where(
            natural_keys.c.natural_key == existing["natural_key"]).with_for_update()).all()
        record_id, version = str(existing["record_id"]), int(existing["current_version"])
        if existing["withdrawn"]:
            # Sent again and refused since it was withdrawn: that rejection is withdrawn too.
            _close_rejections(conn, partner, source_record_id, now)
            return RecordAnswer(index=0, source_record_id=source_record_id,
                                status=RecordStatus.DUPLICATE, record_id=record_id, version=version)
        config = config or RulesConfig.from_settings(Settings())
        if (closed_in := config.closed_year_counted(existing, now)) is not None:
            # R11 for a withdrawal, as for a correction: its hours stand.
            raise PayloadRejected("YEAR_CLOSED", field="year", **closed_year_detail(config, closed_in))
        chunk = Chunk(conn, partner, now, None, config)
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == record_id,
            record_versions.c.version == version)).scalar_one()
        record = orjson.loads(payload)
        if record.get("pruned") is True:  # retention only prunes a current version once its year closed
            raise PayloadRejected("YEAR_CLOSED", field="year", detail=(
                "(its payload was pruned after the year closed; it can no longer be withdrawn)"),
                detail_zh="（该记录的内容已在年度关闭后清除，不能再撤回）")
        conn.execute(update(records).where(records.c.record_id == record_id).values(
            current_version=version + 1, withdrawn=True, credited_hours="0", updated_at=now))
        chunk.events.append(audit.Event("withdrawn", record_id, version + 1, partner.partner_id,
                                        {"source_record_id": source_record_id}))
        # Sent: a pinned record had a version applied, so it reaches the management system.
        chunk._store_version(record_id, version + 1, withdrawn_version(record, version + 1, now),
                             existing["content_hash"],
                             queue=_reaches_downstream(conn, record_id, existing["status"]))
        chunk._write(with_audit=False)
        if pinned:
            caps.write_pins(conn, [record_id], [])
        # The successor first: it joins the cap group in the allocation that lets this record
        # go, so a record behind them both is not lifted by one version and cut by the next.
        chunk.events += succeed(conn, chunk.config, now, {str(existing["natural_key"]): {record_id}})
        if groups:
            given = Chunk(conn, partner, now, None, chunk.config)
            for group in sorted(groups):  # locked above
                given._reissue(group, gone=frozenset({record_id}))
            given._write(with_audit=False)
            chunk.events += given.events
        audit.append(conn, chunk.events, now)
    return RecordAnswer(index=0, source_record_id=source_record_id, status=RecordStatus.ACCEPTED,
                        record_id=record_id, version=version + 1)


def _close_rejections(conn: Connection, partner: PartnerRef, source_record_id: str,
                      now: datetime) -> int:
    """Close the partner's open rejections of ``source_record_id``: its ``DELETE`` overtook them.

    Marked ``superseded`` (revalidation's mark for a rejection a later word overtook), with one
    ``rejection_withdrawn`` audit event naming the partner (masked by the audit trail).  A
    rejection a revalidation or an ops edit took meanwhile is no longer open: the withdrawal
    runs again (:class:`_KeyRaceLost`) and finds the record it made.
    """
    mine = (rejections.c.partner_id == partner.partner_id,
            rejections.c.source_record_id == source_record_id, rejections.c.status == "open")
    ids = [int(i) for i in conn.execute(
        select(rejections.c.id).where(*mine).order_by(rejections.c.id)).scalars()]
    if not ids:
        return 0
    if conn.execute(update(rejections).where(*mine, rejections.c.id.in_(ids))
                    .values(status="superseded")).rowcount != len(ids):
        raise _KeyRaceLost(source_record_id)
    audit.append(conn, [audit.Event("rejection_withdrawn", actor=partner.partner_id, detail={
        "source_record_id": source_record_id, "rejection_ids": ids})], now)
    return len(ids)


def reallocate_after_delivery(conn: Connection, config: RulesConfig, now: datetime,
                              touched: Iterable[tuple[str, int]], *, actor: str,
                              reason: str) -> list[audit.Event]:
    """Allocate again the cap groups of records whose refusal downstream came or went (R10).

    ``touched`` are ``(record_id, version)`` deliveries the caller moved in this transaction:
    dead-lettered ``DOWNSTREAM_REJECTED`` by the delivery worker, or requeued by ops.  A record
    whose *current* version is refused for good counts nowhere (the compliance report lists it
    under ``not_counted``), so :func:`caps.stored_records` leaves it out: its share goes to the
    rest of its group, and a requeued record takes it back.  Records whose share moved are
    re-issued and forwarded, as after a withdrawal.  A refused record the management system
    still counts in its group by an earlier version keeps a share, but of that version's hours
    (:func:`caps.stored_records`), so its group is allocated again too; a requeued one takes
    back the hours freed meanwhile.  ``cap_reallocated`` is recorded only when a share moved.
    An older version's
    delivery changes nothing, and neither does a record no longer counted (withdrawn, held),
    which holds no share.

    Locks as ingest does: the groups in sorted order, then the records it re-issues.  A record
    corrected meanwhile was allocated by its own chunk under the same lock; this allocation then
    finds nothing to move.  Returns the audit events for the caller to append last.
    """
    wanted = dict(touched)
    # Where a refused record's applied version counts is pinned (caps.refused_pins): its
    # records row may say another type, person or year.  A requeued record's pin goes: its
    # version will count where the row says.  The groups of both are allocated again.
    before = caps.pins_of(conn, wanted)
    pins = caps.pins_for(conn, caps.refused_now(conn, wanted), now, config.keys)
    moved = {g for g in before.values() if g} | {
        g for g in caps.pin_groups(conn, pins).values() if g}
    current: list[tuple[str, int, caps.Group]] = []
    for part in _chunks(sorted(wanted)):
        for r in conn.execute(select(
                records.c.record_id, records.c.current_version, records.c.person_key,
                records.c.year, records.c.cap_type).where(
                records.c.record_id.in_(part), records.c.status == RecordStatus.ACCEPTED.value,
                records.c.withdrawn.is_(False))).mappings():
            group = caps.group_of(r)
            if group is not None and int(r["current_version"]) == wanted[r["record_id"]]:
                current.append((r["record_id"], int(r["current_version"]), group))
    groups = {group for _, _, group in current} | moved
    caps.lock_groups(conn, groups, now)
    if before or pins:
        # The records after their groups, the order chunks lock in: a correction committed
        # meanwhile made the refusal old news, and one waiting sees the pins (_check_reads).
        ids = sorted(wanted)
        for part in _chunks(ids):
            conn.execute(select(records.c.record_id).where(records.c.record_id.in_(part))
                         .with_for_update(read=True)).all()
        still = caps.refused_now(conn, [p["record_id"] for p in pins])
        caps.write_pins(conn, ids, [p for p in pins if p["record_id"] in still])
    if not groups:
        return []
    chunk = Chunk(conn, PartnerRef(actor, "gateway"), now, None, config)
    for group in sorted(groups):
        chunk._reissue(group)
    if not chunk.recredited:
        return []  # nothing moved (a pinned record kept the hours it held): nothing to say
    chunk._write(with_audit=False)
    return [audit.Event("cap_reallocated", rid, version, actor,
                        {"cap_type": group[2], "reason": reason})
            for rid, version, group in current] + chunk.events


def accept_held(chunk: Chunk, rec: Any, leaving: dict[caps.Group, set[str]] | None = None,
                joining: Sequence[Any] = ()) -> int:
    """Accept a held record (a duplicate or a conflict) and queue its current version.

    Its hours join its cap group (R10) in one allocation with the records ``leaving`` theirs
    and the held records ``joining`` next in this transaction (each accepted by its own call);
    records whose share moves are re-issued.  It takes its activity's natural key.  Returns
    the version queued: a new one when its share of a cap differs from what its held version
    says.  The caller writes the chunk.
    """
    conn, now = chunk.conn, chunk.now
    record_id, version = str(rec["record_id"]), int(rec["current_version"])
    groups: dict[caps.Group, tuple[dict[str, Decimal], set[str]]] = {
        group: ({}, set(gone)) for group, gone in (leaving or {}).items()}
    hours = Decimal(rec["hours"] or "0")
    credited_this, this_cap = hours, None
    for other in joining:  # held records accepted next, in this transaction: counted in now
        if (group := caps.group_of(other)) is not None:
            groups.setdefault(group, ({}, set()))[0][str(other["record_id"])] = Decimal(
                other["hours"] or "0")
    if (group := caps.group_of(rec)) is not None:
        groups.setdefault(group, ({}, set()))[0][record_id] = hours
    # Pinned where its refused 0-hour version's predecessor counts (caps.refused_pins): the
    # version queued now replaces that one there, so the pin ends and that group is freed.
    pinned = caps.pins_of(conn, [record_id])
    if pinned:
        caps.write_pins(conn, [record_id], [])
        for pin in pinned.values():
            if pin is not None and pin != group:  # in its own group it claims its hours
                groups.setdefault(pin, ({}, set()))[1].add(record_id)
    for group in sorted(groups):  # one lock order for every writer (as ingest)
        mine, gone = groups[group]
        caps.lock_group(conn, group, now)
        credited = chunk._reissue(group, mine, frozenset(gone))
        if record_id in mine:
            credited_this, this_cap = credited[record_id], (chunk.config.caps[group[2]], group[2])
    if _claim_key(conn, rec["natural_key"], record_id) != record_id:
        raise _KeyRaceLost(rec["natural_key"])  # a live record took the activity first: run again
    held = orjson.loads(conn.execute(select(record_versions.c.payload).where(
        record_versions.c.record_id == record_id,
        record_versions.c.version == version)).scalar_one())
    stored_credited = Decimal(str(held["credited_hours"]))
    conn.execute(update(records).where(records.c.record_id == record_id).values(
        status="accepted", duplicate_of=None, credited_hours=str(credited_this), updated_at=now))
    if (credited_this != stored_credited or _queued(conn, record_id, version)
            or any(n["code"] == "NOT_COUNTED" for n in held["warnings"])):
        # Its held version says other hours (its share of a cap, or none: a correction that
        # stopped counting was sent so), or was sent already: re-issue it, counting.
        chunk._recredit(caps.Stored(record_id, version, hours, stored_credited), credited_this,
                        *(this_cap or (None, None)))
        return version + 1
    # Its held version is stored already: only queue it.
    chunk.outbox_rows.append({"record_id": record_id, "version": version, "status": "pending",
                              "attempts": 0, "created_at": now, "updated_at": now})
    chunk.events.append(audit.Event("queued", record_id, version))
    return version


def succeed(conn: Connection, config: RulesConfig, now: datetime,
            freed: dict[str, set[str]]) -> list[audit.Event]:
    """Hand each activity a record let go to the next report of it (SPEC §7 "Dedup").

    ``freed`` maps a natural key to the records that let it go here: withdrawn, or corrected
    to another person, activity or date.  Other sources' reports of that activity were kept
    as duplicates, not forwarded; left so, the person would lose hours two systems recorded.
    If a live record holds the key now (a newcomer), they are linked to it.  Otherwise the
    earliest duplicate takes the key, is accepted and forwarded (its hours join its cap
    group), and the others are linked to it.  Conflicts (other hours) stay held for ops, who
    choose with ``resolve_conflict``.  Runs in the caller's transaction, after its writes;
    returns the audit events for the caller to append last (see :meth:`Chunk.run`).
    """
    events: list[audit.Event] = []
    successors: list[Any] = []
    for key in sorted(freed):
        held = conn.execute(select(records).where(
            records.c.natural_key == key, text(HELD),
            records.c.withdrawn.is_(False)).order_by(records.c.created_at, records.c.record_id)
        ).mappings().all()
        if not held:
            continue
        holder = _live_holder(conn, key)
        successor = None if holder is not None else next(
            (r for r in held if _may_succeed(conn, r)), None)
        if successor is not None:
            holder = _claim_key(conn, key, str(successor["record_id"]))
        if holder is None:
            continue  # only conflicts: ops choose
        if successor is not None and holder == successor["record_id"]:
            successors.append(successor)
        others = [r["record_id"] for r in held
                  if r["record_id"] != holder and r["duplicate_of"] != holder]
        if others:
            conn.execute(update(records).where(records.c.record_id.in_(others))
                         .values(duplicate_of=holder, updated_at=now))
    # Accepted one by one, each in one allocation with those still to come: a record behind
    # them in a cap group moves once, not up with the first and down with the next.
    for i, successor in enumerate(successors):
        holder = str(successor["record_id"])
        chunk = Chunk(conn, PartnerRef(successor["partner_id"], successor["adapter"]), now,
                      None, config)
        chunk.events.append(audit.Event("succeeded", holder, int(successor["current_version"]),
                                        "gateway", {"replaces": sorted(freed[successor["natural_key"]])}))
        accept_held(chunk, successor, joining=successors[i + 1:])
        chunk._write(with_audit=False)
        events += chunk.events
    return events


def _still_holds(withdrawn: bool, status: str, natural_key: str, key: str) -> bool:
    """Whether the record a natural_keys row names for ``key`` still holds that activity.

    Not withdrawn, still counted (not a repeat or conflict), still reporting it.
    """
    return not withdrawn and status == RecordStatus.ACCEPTED.value and natural_key == key


def _holds(known: _Known, key: str) -> bool:
    return _still_holds(known.withdrawn, known.status, known.natural_key, key)


# The record a natural_keys row names, with what _still_holds needs.
_NAMED = (select(natural_keys.c.natural_key, natural_keys.c.record_id, records.c.withdrawn,
                 records.c.status, records.c.natural_key.label("holds"))
          .join(records, records.c.record_id == natural_keys.c.record_id))


def _live_holder(conn: Connection, key: str) -> str | None:
    """The record holding ``key``: none if the row names one that no longer holds it."""
    row = conn.execute(_NAMED.where(natural_keys.c.natural_key == key)).first()
    if row is None or not _still_holds(row.withdrawn, row.status, row.holds, key):
        return None
    return str(row.record_id)


def _claim_key(conn: Connection, key: str, record_id: str) -> str | None:
    """Give ``key`` to ``record_id`` unless a live record holds it; its live holder after."""
    if _live_holder(conn, key) is None:
        conn.execute(update(natural_keys).where(natural_keys.c.natural_key == key)
                     .values(record_id=record_id))
        bulk_insert(conn, natural_keys, [{"natural_key": key, "record_id": record_id}],
                    ignore_conflicts=True)
    named = conn.execute(select(natural_keys.c.record_id)
                         .where(natural_keys.c.natural_key == key)).scalar()
    return record_id if named == record_id else _live_holder(conn, key)


def _may_succeed(conn: Connection, rec: Any) -> bool:
    """Whether a held record may take over its activity.

    A repeat (not a conflict: ops decide those) whose payload is still there to send.
    """
    return rec["status"] == RecordStatus.DUPLICATE.value and not _pruned(conn, rec)


def _pruned(conn: Connection, rec: Any) -> bool:
    payload = conn.execute(select(record_versions.c.payload).where(
        record_versions.c.record_id == rec["record_id"],
        record_versions.c.version == rec["current_version"])).scalar()
    return payload is None or orjson.loads(payload).get("pruned") is True
