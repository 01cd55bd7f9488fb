"""Revalidation (SPEC §2 ops, §5 ``POST /v1/records/revalidate``): rejected records, again.

After reference data was fixed — a base added to the directory, a plan filed, a deferral
approved — ops re-run the pipeline for the open rejections a filter selects.  Each rejection's
raw payload is parsed again by the adapter it came through (:data:`REPARSE`), judged with the
*current* reference data under its original partner and arrival time, and handed to
:func:`~gateway.pipeline.ingest.ingest_items` like any submission arriving, so dedup, caps,
outbox and audit behave exactly as on the way in (a failed result withdraws the record it
corrects, R9).  The version it makes says it reached the gateway when it did
(``source.received_at``), not when it was run again.

Only a partner's *last word* on a source id is replayed.  A rejection the partner has since
overtaken — a later submission of the same ``source_record_id`` that was accepted, corrected,
resent, withdrawn or refused again, or a ``DELETE`` — is closed ``superseded`` unread
(:func:`gateway.last_word.stale_rejections`): replayed, old content would become the record's newest version
over the partner's correction, or bring a withdrawn record back.  The rest are replayed in
arrival order (``received_at``, then id: a rejection refused again keeps its arrival time on a
fresh, higher id), one ingest call per run of one partner and batch, so a partner's push and
roster file keep their order.  A dry run counts both the same way (``superseded`` beside
``would_pass``).

A rejection that passes now is marked ``revalidated``; one that fails again ``superseded``
(ingest writes a fresh ``open`` row for it, which keeps the original arrival time so the rules
and later filters see the record as it came).  The marks are written inside the ingest
transaction, so a chunk's records and its marks commit together; a rejection another
revalidation took first, or that the partner overtook meanwhile, rolls the run back and it is
read again.  Work goes in chunks of :data:`CHUNK_SIZE`; one ``revalidation`` audit event names
the operator, the reason, the filter and the counts — also for a run stopped part-way (Ctrl-C,
a store error), with why it stopped, since its committed chunks stand.

May touch: ``rejections`` (read; ``status`` and ``received_at`` of its own rows), ``batches``
and ``partners`` (read), the audit trail (its event); records only through ingest; a partner's
later word through :mod:`gateway.last_word` (reads).

Errors::

    GatewayError
    └── RevalidationRefused   a filter or request that cannot run (also a ValueError)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    bindparam,
    func,
    or_,
    select,
    update,
)

from adapters.base import ParsedRow
from adapters.cadre_college import item_to_row
from adapters.registry import BATCH_ADAPTERS, get_adapter
from adapters.training_base import TrainingBaseAdapter, result_to_row
from contracts import RecordStatus
from contracts.errors import CATALOGUE
from gateway import audit
from gateway.accounts import ADAPTERS_WITH_PUSH
from gateway.config import Settings
from gateway.errors import GatewayError, PayloadRejected
from gateway.last_word import Arrival, parts, stale_rejections
from gateway.ops.common import check_aware
from gateway.pipeline.ingest import ingest_items
from gateway.pipeline.items import Item, PartnerRef, RulesContext, error_note, prepare
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.validate import validate_submission
from gateway.reference import ReferenceCache
from gateway.store.db import reading, snapshot
from gateway.store.tables import batches, partners, rejections

__all__ = ["CHUNK_SIZE", "REPARSE", "AlreadyTaken", "Entry", "Overtaken", "RevalidationFilter",
           "RevalidationRefused", "RevalidationResult", "Run", "check_still_last", "count",
           "group_entries", "mark_outcomes", "revalidate"]

log = logging.getLogger(__name__)

CHUNK_SIZE = 500
_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,31}")
_MAX_RETRIES = 20  # chunks read again after another revalidation took some of their rows


class RevalidationRefused(GatewayError, ValueError):
    """The filter or request cannot run as given (unknown code, naive time, no reason).

    ``str(exc)`` is the English reason; ``message_zh`` the Chinese one (SPEC §6); ``field``
    the filter field refused, where it is one.
    """

    def __init__(self, message: str, message_zh: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message_zh, self.field = message_zh, field

    def coded(self) -> PayloadRejected:
        """The refusal as the API and the CLI give it: SCHEMA naming the field refused."""
        return PayloadRejected("SCHEMA", field=self.field or "filter", detail=f"({self})",
                               detail_zh=f"（{self.message_zh}）")


@dataclass(frozen=True)
class RevalidationFilter:
    """Which open rejections to take; unset fields match everything.

    ``since`` is inclusive and ``until`` exclusive, on the time the rejection was received;
    both must be timezone-aware.
    """

    partner_id: str | None = None
    adapter: str | None = None
    error_code: str | None = None
    batch_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        code = self.error_code
        if code is not None and (not _CODE.fullmatch(code) or code not in CATALOGUE):
            raise RevalidationRefused(f"unknown error code {code!r}", f"未知的错误代码 {code!r}",
                                      "error_code")
        if self.adapter is not None and self.adapter not in ADAPTERS_WITH_PUSH:
            raise RevalidationRefused(f"unknown adapter {self.adapter!r}; known: "
                                      f"{', '.join(sorted(ADAPTERS_WITH_PUSH))}",
                                      f"未知的适配器 {self.adapter!r}；已知的有："
                                      f"{'、'.join(sorted(ADAPTERS_WITH_PUSH))}", "adapter")
        for name in ("since", "until"):
            try:  # aware, and inside the years 2000-2999 (0001-01-01+08:00 overflowed to a 500)
                check_aware(name, getattr(self, name))
            except PayloadRejected as exc:
                raise RevalidationRefused(f"{name}: {exc.message}", f"{name}：{exc.message_zh}",
                                          name) from None

    def where(self) -> list[ColumnElement[bool]]:
        c = rejections.c
        clauses: list[ColumnElement[bool]] = [c.status == "open"]
        if self.partner_id is not None:
            clauses.append(c.partner_id == self.partner_id)
        if self.adapter is not None:
            clauses.append(c.adapter == self.adapter)
        if self.batch_id is not None:
            clauses.append(c.batch_id == self.batch_id)
        if self.error_code is not None:
            # ``errors`` is the notes' JSON as ingest wrote it (orjson: no spaces), and a quote
            # inside a message is escaped, so only a note's own code matches.
            clauses.append(c.errors.contains(f'"code":"{self.error_code}"', autoescape=True))
        if self.since is not None:
            clauses.append(c.received_at >= self.since)
        if self.until is not None:
            clauses.append(c.received_at < self.until)
        return clauses

    def as_dict(self) -> dict[str, str]:
        """The fields that are set, as text (for the audit trail and answers)."""
        values = {"partner_id": self.partner_id, "adapter": self.adapter,
                  "error_code": self.error_code, "batch_id": self.batch_id,
                  "since": self.since.isoformat() if self.since else None,
                  "until": self.until.isoformat() if self.until else None}
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class RevalidationResult:
    """What one revalidation did (or, in a dry run, found).

    ``accepted`` … ``rejected_again`` count ingest's answers; all but ``rejected_again`` mark the
    rejection ``revalidated``.  ``superseded`` counts the rejections closed unread because the
    partner has sent a later word on the same source id (a dry run: would be closed).
    ``would_pass`` (dry run only) counts the other rejections that pass the rules with the
    current reference data, before dedup and caps.
    """

    matched: int
    dry_run: bool
    reference_version: str
    accepted: int = 0
    corrected: int = 0
    duplicate: int = 0
    conflict: int = 0
    rejected_again: int = 0
    superseded: int = 0
    would_pass: int | None = None
    codes_again: dict[str, int] = field(default_factory=dict)

    def add(self, status: RecordStatus, codes: Iterable[str]) -> None:
        if status is RecordStatus.REJECTED:
            self.rejected_again += 1
            for code in codes:
                self.codes_again[code] = self.codes_again.get(code, 0) + 1
        else:
            name = status.value
            setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "matched": self.matched, "dry_run": self.dry_run, "accepted": self.accepted,
            "corrected": self.corrected, "duplicate": self.duplicate, "conflict": self.conflict,
            "rejected_again": self.rejected_again, "superseded": self.superseded,
            "codes_again": dict(sorted(self.codes_again.items())),
            "reference_version": self.reference_version}
        if self.dry_run:
            out["would_pass"] = self.would_pass
        return out


# -- parsing a stored payload again ----------------------------------------------------------


def _canonical(raw: Any) -> ParsedRow:
    v = validate_submission(raw)
    return ParsedRow(row=None, raw=raw, submission=v.submission, errors=list(v.errors),
                     warnings=list(v.warnings))


def _training_base(raw: Any) -> ParsedRow:
    """A pushed result, kept with its document's ``base_code`` and ``plan_id``."""
    if isinstance(raw, dict) and "results" in raw:  # a document refused as a whole
        return next(iter(TrainingBaseAdapter().parse(raw)))
    if not isinstance(raw, dict):
        return result_to_row(0, None, None, raw)
    return result_to_row(0, raw.get("base_code"), raw.get("plan_id"), raw)


def _tabular(name: str) -> Callable[[Any], ParsedRow]:
    def parse(raw: Any) -> ParsedRow:  # a row's cells dict; tabular adapters take it bare
        return next(iter(get_adapter(name).parse(raw)))
    return parse


# Adapter (as the rejection or its batch names it) → how its stored payload parses again.
REPARSE: Mapping[str, Callable[[Any], ParsedRow]] = {
    "canonical": _canonical,  # the submission dict
    "training_base": _training_base,  # the result dict (+ base_code, plan_id)
    "training_base_roster": _tabular("training_base_roster"),  # the row's cells
    "cadre_college": item_to_row,  # the page item
    "health": _tabular("health"),
    "finance": _tabular("finance"),
}


@dataclass(frozen=True)
class _Batch:
    adapter: str
    kind: str
    period: str
    created_at: datetime


@dataclass
class Entry:
    rejection_id: int
    received_at: datetime
    item: Item


# One ingest call's worth: consecutive rejections of one partner and batch, in arrival order.
Run = tuple[PartnerRef, str | None, list[Entry]]


def _parsed(row: Any, batch: _Batch | None) -> ParsedRow:
    name = BATCH_ADAPTERS.get((batch.adapter, batch.kind), row.adapter) if batch else row.adapter
    try:
        raw = orjson.loads(row.payload)
    except orjson.JSONDecodeError:
        return ParsedRow(row=None, raw=row.payload,
                         errors=[error_note("SCHEMA", None, "(stored payload is not JSON)")])
    reparse = REPARSE.get(name)
    if reparse is None:
        return ParsedRow(row=None, raw=raw,
                         errors=[error_note("SCHEMA", None, f"(no adapter {name!r} to parse it)")])
    parsed = reparse(raw)
    parsed.raw = raw  # kept as stored, so a fresh rejection holds the same payload
    sub = parsed.submission
    if batch is not None and sub is not None and not parsed.errors and \
            sub.year != int(batch.period[:4]):
        # As the batch processor judges it: a batch is for one CE year.
        column = "completed_on" if batch.adapter == "training_base" else "完成日期"
        parsed.errors.append(error_note("OUTSIDE_YEAR", column, f"(completed in {sub.year}, "
                                        f"batch is for {batch.period[:4]})"))
    return parsed


def group_entries(conn: Connection, rows: Sequence[Any], rules: RulesContext) -> list[Run]:
    """Parse and judge rejections, kept in the order given, as runs of one (partner, batch).

    Each run is one ingest call; a new run starts whenever the partner or batch changes, so
    the submissions are replayed in the order they came (a push, a roster file, a push).
    """
    batch_ids = sorted({r.batch_id for r in rows if r.batch_id})
    found = {b.batch_id: _Batch(b.adapter, b.kind, b.period, b.created_at)
             for b in conn.execute(select(batches.c.batch_id, batches.c.adapter, batches.c.kind,
                                          batches.c.period, batches.c.created_at)
                                   .where(batches.c.batch_id.in_(batch_ids)))} if batch_ids else {}
    partner_ids = sorted({r.partner_id for r in rows})
    base_codes = dict(conn.execute(select(partners.c.partner_id, partners.c.base_code)
                                   .where(partners.c.partner_id.in_(partner_ids))).all())
    runs: list[Run] = []
    for r in rows:
        batch = found.get(r.batch_id) if r.batch_id else None
        parsed = _parsed(r, batch)
        partner = PartnerRef(r.partner_id, r.adapter, base_codes.get(r.partner_id))
        item = Item(raw=parsed.raw, submission=parsed.submission, errors=list(parsed.errors),
                    warnings=list(parsed.warnings), source_record_id=r.source_record_id,
                    received_at=r.received_at, row=r.row_no)
        # Judged as of its arrival (R11): a record sent before the year closed stays in time.
        prepare(item, partner, batch.created_at if batch else r.received_at, rules)
        if not runs or runs[-1][:2] != (partner, r.batch_id):
            runs.append((partner, r.batch_id, []))
        runs[-1][2].append(Entry(r.id, r.received_at, item))
    return runs


def _close_superseded(engine: Engine, ids: Sequence[int]) -> int:
    """Close open rejections the partner has overtaken; how many this call closed."""
    closed = 0
    with engine.begin() as conn:
        for part in parts(sorted(ids), CHUNK_SIZE):
            closed += conn.execute(update(rejections).where(
                rejections.c.id.in_(part), rejections.c.status == "open")
                .values(status="superseded")).rowcount
    return closed


# -- the run -----------------------------------------------------------------------------------


class AlreadyTaken(Exception):
    """Another revalidation marked some of this group's rejections first: roll it back."""


class Overtaken(Exception):
    """The partner sent a later word on one of this group's source ids meanwhile: roll it back."""


def mark_outcomes(conn: Connection, entries: Sequence[Entry], answers: Sequence[Any],
                  partner: PartnerRef, batch_id: str | None, now: datetime) -> None:
    """Mark the group's rejections and give fresh rejections their original arrival time."""
    passed = [e.rejection_id for e, a in zip(entries, answers, strict=True)
              if a.status is not RecordStatus.REJECTED]
    again = [e for e, a in zip(entries, answers, strict=True) if a.status is RecordStatus.REJECTED]
    taken = 0
    for status, ids in (("revalidated", passed), ("superseded", [e.rejection_id for e in again])):
        for start in range(0, len(ids), CHUNK_SIZE):
            taken += conn.execute(update(rejections).where(
                rejections.c.id.in_(ids[start:start + CHUNK_SIZE]),
                rejections.c.status == "open").values(status=status)).rowcount
    if taken != len(entries):
        raise AlreadyTaken()
    if not again:
        return
    # Ingest wrote one open row per rejected item, in input order, stamped ``now``.
    fresh = conn.execute(select(rejections.c.id).where(
        rejections.c.partner_id == partner.partner_id, rejections.c.adapter == partner.adapter,
        rejections.c.batch_id.is_not_distinct_from(batch_id), rejections.c.status == "open",
        rejections.c.received_at == now).order_by(rejections.c.id)).scalars().all()
    if len(fresh) != len(again):  # pragma: no cover - only if a twin wrote at the same µs
        log.warning("revalidation: %d fresh rejections for %d rejected items; arrival times "
                    "left as now", len(fresh), len(again))
        return
    conn.execute(update(rejections).where(rejections.c.id == bindparam("rid"))
                 .values(received_at=bindparam("at")),
                 [{"rid": rid, "at": e.received_at} for rid, e in zip(fresh, again, strict=True)])


def check_still_last(conn: Connection, partner: PartnerRef, entries: Sequence[Entry],
                     now: datetime) -> None:
    """Inside the ingest transaction: raise :class:`Overtaken` if the partner overtook one.

    A submission committed since the entries were read (a correction, a withdrawal) is newer
    than the one replayed: applied over it, the old content would be the record's last version.
    What this transaction wrote itself (at ``now``) is left out.
    """
    arrivals = [Arrival(e.rejection_id, partner.partner_id, e.item.source_record_id,
                         e.received_at) for e in entries]
    if stale_rejections(conn, arrivals, ignore_at=now):
        raise Overtaken()


def _ingest_group(engine: Engine, partner: PartnerRef, batch_id: str | None,
                  entries: list[Entry], rules: RulesContext, result: RevalidationResult) -> None:
    now = datetime.now(UTC)

    def in_tx(conn: Connection, answers: list[Any]) -> None:
        check_still_last(conn, partner, entries, now)
        mark_outcomes(conn, entries, answers, partner, batch_id, now)

    answers = ingest_items(engine, partner, [e.item for e in entries], batch_id=batch_id,
                           now=now, in_tx=in_tx, rules=rules)
    for answer in answers:
        result.add(answer.status, (e.code for e in answer.errors))


def _chunks(engine: Engine, flt: RevalidationFilter, ceiling: int,
            size: int) -> Iterable[list[Any]]:
    """Open rejections in arrival order, up to ``ceiling`` (so fresh rejections are not taken).

    Arrival is (``received_at``, ``id``), not the id alone: a rejection refused again gets a
    fresh row, a higher id, that keeps its older arrival time (:func:`mark_outcomes`), and R10
    allocates a cap in the order records are made.  Keyset pages on the pair; the
    ``received_at`` index serves it (SQLite keeps the rowid, ``id``, in the index; PostgreSQL
    sorts the few ties of one instant by id).
    """
    c = rejections.c
    after: tuple[datetime, int] | None = None
    while True:
        page = [*flt.where(), c.id <= ceiling]
        if after is not None:
            # ``>=`` first: a bound the received_at index seeks to (the OR alone is a filter).
            page += [c.received_at >= after[0],
                     or_(c.received_at > after[0], c.id > after[1])]
        with reading(engine) as conn:
            rows = conn.execute(select(rejections).where(*page)
                                .order_by(c.received_at, c.id).limit(size)).all()
        if not rows:
            return
        yield list(rows)
        after = (rows[-1].received_at, rows[-1].id)


def count(engine: Engine, flt: RevalidationFilter) -> int:
    """How many open rejections the filter selects now."""
    with reading(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(rejections)
                                .where(*flt.where())).scalar_one())


def default_rules(engine: Engine) -> RulesContext:
    """The current reference data with the deployment's configuration (``CE_GATEWAY_*``)."""
    config = RulesConfig.from_settings(Settings())
    return RulesContext(ReferenceCache(engine, config.keys).current(), config)


def revalidate(engine: Engine, flt: RevalidationFilter, *, actor: str, reason: str | None = None,
               dry_run: bool = False, rules: RulesContext | None = None,
               chunk_size: int = CHUNK_SIZE,
               progress: Callable[[int, int], None] | None = None) -> RevalidationResult:
    """Re-run the pipeline for the open rejections ``flt`` selects.

    ``rules`` should be read before the call (:meth:`gateway.state.AppState.rules`); by default
    it is the current reference data with the notice's configuration.  ``progress`` is called
    with (rejections done, matched) after each chunk.  A run that is not a dry run needs a
    ``reason``; it is kept in the ``revalidation`` audit event with ``actor``, written when the
    run ends — or stops part-way, with what its committed chunks did and why it stopped.
    """
    if not dry_run and not (reason and reason.strip()):
        raise RevalidationRefused("a reason is required unless it is a dry run",
                                  "不是试运行时必须填写原因")
    rules = rules or default_rules(engine)
    with snapshot(engine) as conn:  # the ceiling and the count at one moment, no write lock
        ceiling = int(conn.execute(select(func.coalesce(func.max(rejections.c.id), 0))).scalar_one())
        matched = int(conn.execute(select(func.count()).select_from(rejections).where(
            *flt.where(), rejections.c.id <= ceiling)).scalar_one())
    result = RevalidationResult(matched, dry_run, rules.reference.version,
                                would_pass=0 if dry_run else None)
    done = 0
    try:
        if progress is not None:
            progress(done, matched)
        for rows in _chunks(engine, flt, ceiling, chunk_size):
            _run_chunk(engine, rows, rules, result)
            done += len(rows)
            if progress is not None:
                progress(done, matched)
    except BaseException as exc:
        if not dry_run:
            # Stopped part-way (Ctrl-C, a store error, rows kept being taken): what its
            # committed chunks did stands, so who did it and why is audited all the same.
            try:
                _audit(engine, actor, reason, flt, result, stopped=(type(exc).__name__, done))
            except Exception:  # the store itself is down: say so, and raise what stopped the run
                log.exception("revalidation: could not audit a run stopped after %d of %d "
                              "rejections", done, matched)
        raise
    if not dry_run:
        _audit(engine, actor, reason, flt, result)
    return result


def _audit(engine: Engine, actor: str, reason: str | None, flt: RevalidationFilter,
           result: RevalidationResult, stopped: tuple[str, int] | None = None) -> None:
    detail: dict[str, Any] = {"reason": reason, "filter": flt.as_dict(), "counts": result.as_dict()}
    if stopped is not None:
        detail["stopped"], detail["done"] = stopped
    with engine.begin() as conn:
        audit.append(conn, [audit.Event("revalidation", actor=actor, detail=detail)])


def _run_chunk(engine: Engine, rows: list[Any], rules: RulesContext,
               result: RevalidationResult) -> None:
    """One chunk: close what the partner overtook, replay the rest in order (or count them)."""
    with reading(engine) as conn:
        stale = stale_rejections(conn, rows)
        runs = group_entries(conn, [r for r in rows if r.id not in stale], rules)
    if result.dry_run:
        result.superseded += len(stale)
        result.would_pass = (result.would_pass or 0) + sum(
            1 for _, _, entries in runs for e in entries
            if e.item.prepared is not None and not e.item.errors)
        return
    result.superseded += _close_superseded(engine, sorted(stale))
    for partner, batch_id, entries in runs:
        _ingest_with_retries(engine, partner, batch_id, entries, rules, result)


def _ingest_with_retries(engine: Engine, partner: PartnerRef, batch_id: str | None,
                         entries: list[Entry], rules: RulesContext,
                         result: RevalidationResult) -> None:
    """Ingest a run; go on with the rest if some of its rows were taken or overtaken.

    Another revalidation took them first, or the partner sent a later word meanwhile (those
    are closed ``superseded``).
    """
    for _ in range(_MAX_RETRIES):
        try:
            _ingest_group(engine, partner, batch_id, entries, rules, result)
            return
        except (AlreadyTaken, Overtaken):
            with reading(engine) as conn:
                rows = conn.execute(select(rejections).where(
                    rejections.c.id.in_([e.rejection_id for e in entries]),
                    rejections.c.status == "open")).all()
                stale = stale_rejections(conn, rows)
            result.superseded += _close_superseded(engine, sorted(stale))
            still_open = {r.id for r in rows} - stale
            entries = [e for e in entries if e.rejection_id in still_open]
            if not entries:
                return
    raise RuntimeError("revalidation: rejections kept being taken by another run")
