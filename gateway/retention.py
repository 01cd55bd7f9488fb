"""Payload retention (issue 5 item 8): old payloads of delivered record versions become stubs.

A record version's payload holds a person's identity number and name.  Once the management
system has it and nothing in the gateway can still need it, the payload is replaced by a stub
and ``record_versions.pruned_at`` is set; the row itself, its content hash, its delivery and
every audit event stay::

    {"pruned": true, "record_id": "…", "version": 2, "content_hash": "…", "pruned_at": "…",
     "counts": {"person_key": "…", "year": 2026, "cap_year": 2026, "category": "professional",
                "activity_type": "paper", "credited_hours": "10.0"}}

``counts`` is what the version counts in the management system, with no identity number or
name (``person_key`` is the digest the ``records`` row keeps too, keyed with
``PERSON_KEY_SECRET``: see ``gateway.person_keys``): R10 and the compliance report still need it
when a later version is refused for good (gateway.pipeline.caps.counts_of).

A version is pruned only when **all** of these hold (each guards a reader of the payload):

- its outbox row is ``delivered``, more than ``RETENTION_PAYLOAD_DAYS`` ago — a pending
  version is what the delivery worker sends;
- its record is not a ``conflict`` and has no ``pending`` or ``dead`` delivery (ops resolve,
  reprocess and edit those from the payloads);
- it is *superseded* (not the record's current version: no reader reads an old version's
  body), or its record's CE year (``counts_year``) is **closed** (``YEAR_CLOSE`` and
  ``YEAR_CLOSE_EXTENSIONS``), the record is in no cap group (R10 re-allocation re-issues a
  capped record from its current payload) and nothing else reads it: not a live duplicate
  (it may take its activity over, even one whose 0-hour NOT_COUNTED version was delivered)
  and no open conflict held against it (keeping the conflict supersedes it from its payload).
  Ingest reads a closed year's current payload only when the partner withdraws it (refused
  ``YEAR_CLOSED``); another source's report of the same activity is judged on the hours the
  record's row keeps; see ``gateway.pipeline.withdraw`` and ``gateway.pipeline.ingest``.

Closed rejections (``revalidated`` or ``superseded``: a record or a fresh open rejection
carries them on) older than the age get a stub ``{"pruned": true, "rejection_id", "pruned_at"}``
too; open rejections are never pruned (revalidation re-parses them).

Batch files go too: a file in ``BATCH_DIR`` is the partner's upload as it came, every row's
identity number and name, and nothing reads it once its batch is finished (``done`` or
``failed``; a resent file is answered from the batch row's SHA-256).  It is deleted the same
number of days after the batch finished, and ``batches.file_removed_at`` says when.  A file is
deleted only where its directory is there: a job host without the shared volume mounted skips
it (and warns) rather than mark a file removed that it never saw.  A ``.part`` file left by an
upload killed mid-stream (no batch names it) is deleted a day after it was last written.

The audit trail is never pruned by the gateway: its hash chain is the evidence, a deleted
event would break ``audit verify``, and SPEC §7 wants it kept (≥ 3 years; we keep it all).

Work goes in chunks of :data:`CHUNK_SIZE` versions, one short transaction each, walked in
primary-key order, so a large prune never holds a long lock and a crash keeps what was done.
One ``retention_pruned`` audit event per run that pruned something carries the counts, the
cutoff and the actor — never a payload.  The ``retention`` job (:data:`RETENTION_JOB`) runs it
once cluster-wide every ``RETENTION_INTERVAL_SECONDS``; ``ce-gateway retention run`` by hand.

May touch: ``record_versions`` (payload, pruned_at), ``rejections`` (payload of closed rows),
``batches.file_removed_at`` and the files in ``BATCH_DIR``,
``records.covers_professional`` (kept from a competition record's payload before it goes), the
audit trail (append); reads ``records``, ``outbox``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    bindparam,
    exists,
    false,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import aliased

from gateway import audit
from gateway.compliance import covers_tenure
from gateway.config import Settings
from gateway.person_keys import PersonKeys
from gateway.pipeline.caps import counts_of
from gateway.pipeline.rules_tables import RulesConfig
from gateway.scheduling import Job, ensure_held, register
from gateway.store.db import snapshot
from gateway.store.tables import HELD, batches, outbox, record_versions, records, rejections

__all__ = ["CHUNK_SIZE", "CLOSED_REJECTIONS", "RETENTION_JOB", "STUB_KEYS", "RetentionResult",
           "closed_years", "is_pruned", "prune", "stub"]

log = logging.getLogger(__name__)

CHUNK_SIZE = 1000  # versions per transaction
STUB_KEYS = frozenset({"pruned", "record_id", "version", "content_hash", "pruned_at", "counts"})
CLOSED_REJECTIONS = ("revalidated", "superseded")  # gateway/revalidate.py's closing marks
FINISHED_BATCHES = ("done", "failed")  # nothing reads their files again
UPLOAD_LEFTOVER_AGE = timedelta(days=1)  # a .part file not written for this long is no upload
_STUB_PREFIX = '{"pruned":true'  # how every stub written here starts (orjson, no spaces)


def stub(record_id: str, version: int, content_hash: str, pruned_at: datetime,
         payload: str | None, keys: PersonKeys) -> str:
    """The JSON that replaces a pruned version's ``payload`` (kept: what it counts)."""
    body: dict[str, Any] = {"pruned": True, "record_id": record_id, "version": version,
                            "content_hash": content_hash,
                            "pruned_at": pruned_at.astimezone(UTC).isoformat()}
    try:
        counts = None if payload is None else counts_of(orjson.loads(payload), keys)
    except (KeyError, TypeError, ValueError):  # not a record the gateway wrote: nothing kept
        counts = None
    if counts is not None:
        body["counts"] = counts
    return orjson.dumps(body).decode()


def is_pruned(payload: object) -> bool:
    """True for a parsed payload (dict) that is a retention stub rather than a record."""
    return isinstance(payload, dict) and payload.get("pruned") is True


@dataclass
class RetentionResult:
    """What one run pruned (or, on a dry run, would prune)."""

    dry_run: bool
    days: int
    cutoff: datetime | None  # None: retention is off (RETENTION_PAYLOAD_DAYS = 0)
    closed_years: tuple[int, ...] = ()
    versions: int = 0
    rejections: int = 0
    batch_files: int = 0  # finished batches' files deleted from BATCH_DIR
    upload_leftovers: int = 0  # .part files of uploads that never finished

    @property
    def anything(self) -> bool:
        return bool(self.versions or self.rejections or self.batch_files or self.upload_leftovers)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "days": self.days,
                "cutoff": self.cutoff.isoformat() if self.cutoff else None,
                "closed_years": list(self.closed_years), "versions": self.versions,
                "rejections": self.rejections, "batch_files": self.batch_files,
                "upload_leftovers": self.upload_leftovers}


def closed_years(conn: Connection, settings: Settings, now: datetime) -> tuple[int, ...]:
    """The CE years of stored records that are closed at ``now`` (end of day, TIMEZONE)."""
    config = RulesConfig.from_settings(settings)
    today = now.astimezone(config.zone).date()
    year = func.coalesce(records.c.counts_year, records.c.year)
    years = conn.execute(select(year).distinct()).scalars().all()
    return tuple(sorted(int(y) for y in years if config.closes(int(y)) < today))


def _version_filter(cutoff: datetime, years: tuple[int, ...]) -> ColumnElement[bool]:
    """The versions that may be pruned (module docstring); joined with records and outbox."""
    other = aliased(outbox)
    unfinished = exists().where(other.c.record_id == record_versions.c.record_id,
                                other.c.status.in_(("pending", "dead")))
    year = func.coalesce(records.c.counts_year, records.c.year)
    closed = and_(year.in_(years), or_(records.c.cap_type.is_(None),
                                       records.c.withdrawn.is_(True)),
                  ~_still_read()) if years else false()
    return and_(record_versions.c.pruned_at.is_(None),
                outbox.c.status == "delivered", outbox.c.delivered_at < cutoff,
                records.c.status != "conflict", ~unfinished,
                or_(record_versions.c.version < records.c.current_version, closed))


def _still_read() -> ColumnElement[bool]:
    """A closed year's current version that dedup or ops may still read, so it is kept.

    A live duplicate takes its activity over when its holder lets it go and is sent from
    this payload (``succession._may_succeed``) — even one that once counted and whose 0-hour
    NOT_COUNTED version was delivered.  A record an open conflict is held against is
    superseded from this payload when ops keep the conflicting report (``resolve_conflict``).
    """
    conflict = aliased(records, name="held")
    held_against = exists().where(conflict.c.natural_key == records.c.natural_key,
                                  text(f"held.{HELD}"),  # ix_records_held_key serves it
                                  conflict.c.status == "conflict")
    return and_(records.c.withdrawn.is_(False),
                or_(records.c.status == "duplicate", held_against))


def _joined() -> Any:
    return record_versions.join(records, records.c.record_id == record_versions.c.record_id) \
        .join(outbox, and_(outbox.c.record_id == record_versions.c.record_id,
                           outbox.c.version == record_versions.c.version))


def _rejection_filter(cutoff: datetime) -> ColumnElement[bool]:
    return and_(rejections.c.status.in_(CLOSED_REJECTIONS), rejections.c.received_at < cutoff,
                ~rejections.c.payload.startswith(_STUB_PREFIX, autoescape=True))


def prune(engine: Engine, settings: Settings, *, dry_run: bool = False, actor: str = "gateway",
          now: datetime | None = None, chunk_size: int = CHUNK_SIZE,
          progress: Callable[[int, int], None] | None = None) -> RetentionResult:
    """Prune what retention allows at ``now``; ``progress(done, total)`` after each chunk.

    A dry run only counts, with the same selection.  Safe to run twice (the second prunes 0)
    and beside a running gateway: each chunk re-checks its rows (``pruned_at IS NULL``).
    """
    now = now or datetime.now(UTC)
    days = settings.retention_payload_days
    if days <= 0:
        return RetentionResult(dry_run, days, None)
    cutoff = now - timedelta(days=days)
    with snapshot(engine) as conn:  # counts over the whole store: no SQLite write lock
        years = closed_years(conn, settings, now)
        where = _version_filter(cutoff, years)
        total = int(conn.execute(select(func.count()).select_from(_joined()).where(where)).scalar_one())
        closed_rejections = int(conn.execute(select(func.count()).select_from(rejections)
                                             .where(_rejection_filter(cutoff))).scalar_one())
    if progress:
        progress(total if dry_run else 0, total)
    leftovers = _upload_leftovers(Path(settings.batch_dir), now)
    if dry_run:  # the files the real run would delete here: those on an unmounted volume are not
        batch_files = sum(len(page) for page in _batch_files_here(engine, cutoff, chunk_size))
        return RetentionResult(True, days, cutoff, years, total, closed_rejections, batch_files,
                               len(leftovers))
    done = RetentionResult(False, days, cutoff, years)
    try:
        done.versions = _prune_versions(engine, where, now, chunk_size, total, progress, done,
                                        PersonKeys(settings.person_key_secret))
        done.rejections = _prune_rejections(engine, cutoff, now, chunk_size, done)
        done.batch_files = _remove_batch_files(engine, cutoff, now, chunk_size, done)
        done.upload_leftovers = _remove_leftovers(leftovers)
    except BaseException as exc:
        # Stopped part-way (its job lease taken over while it stalled, a store error): what its
        # committed chunks pruned is still audited, with why the run stopped.
        try:
            _audit(engine, done, actor, now, stopped=type(exc).__name__)
        except Exception:  # the store itself is down: say so, and raise what stopped the run
            log.exception("retention: could not audit the %d payloads and %d files removed "
                          "before it stopped", done.versions + done.rejections,
                          done.batch_files + done.upload_leftovers)
        raise
    _audit(engine, done, actor, now)
    log.info("retention: pruned %d version payloads and %d closed rejections, removed %d "
             "finished batch files and %d upload leftovers (cutoff %s)", done.versions,
             done.rejections, done.batch_files, done.upload_leftovers, cutoff.isoformat())
    return done


def _audit(engine: Engine, done: RetentionResult, actor: str, now: datetime,
           stopped: str | None = None) -> None:
    if not done.anything:
        return
    detail: dict[str, Any] = {k: v for k, v in done.as_dict().items() if k != "dry_run"}
    if stopped is not None:
        detail["stopped"] = stopped
    with engine.begin() as conn:
        audit.append(conn, [audit.Event("retention_pruned", actor=actor, detail=detail)], now)


def _prune_versions(engine: Engine, where: ColumnElement[bool], now: datetime, chunk_size: int,
                    total: int, progress: Callable[[int, int], None] | None,
                    done_so_far: RetentionResult, person_keys: PersonKeys) -> int:
    key = tuple_(record_versions.c.record_id, record_versions.c.version)
    write = update(record_versions).where(
        record_versions.c.record_id == bindparam("rid"), record_versions.c.version == bindparam("v"),
        record_versions.c.pruned_at.is_(None)).values(payload=bindparam("stub"), pruned_at=now)
    done, after = 0, None
    while True:
        query = select(record_versions.c.record_id, record_versions.c.version,
                       record_versions.c.content_hash, record_versions.c.payload,
                       records.c.current_version, records.c.activity_type,
                       ).select_from(_joined()).where(where)
        if after is not None:
            query = query.where(key > tuple_(*after))  # keyset: each chunk starts past the last
        ensure_held()  # run as the scheduled job: stop if another replica took its lease
        with engine.begin() as conn:
            rows = conn.execute(query.order_by(record_versions.c.record_id,
                                               record_versions.c.version).limit(chunk_size)).all()
            if not rows:
                break
            keys = [(r.record_id, r.version) for r in rows]
            _keep_tenure_cover(conn, rows)
            conn.execute(write, [{"rid": r.record_id, "v": r.version,
                                  "stub": stub(r.record_id, int(r.version), r.content_hash, now,
                                               r.payload, person_keys)}
                                 for r in rows])
            # An executemany's rowcount is not reliable on every driver, and a concurrent run
            # may have taken some rows first: count what carries this run's stamp.
            done += int(conn.execute(select(func.count()).select_from(record_versions).where(
                key.in_(keys), record_versions.c.pruned_at == now)).scalar_one())
        done_so_far.versions = done  # committed: audited even if a later chunk stops the run
        after = (rows[-1].record_id, rows[-1].version)
        if progress:
            progress(done, max(total, done))
    return done


def _keep_tenure_cover(conn: Connection, rows: Sequence[Any]) -> None:
    """Set ``records.covers_professional`` from the payloads of competition records pruned now.

    Once its current version is a stub, a competition record's column is all the compliance
    read-model has to tell whether the award covers the tenure's professional hours (R7,
    四(二)5; ``compliance._covers``).  Code before migration 0023 left it null, and a replica on
    it may have left a stale value in a rolling release, so the payload about to go decides.
    """
    covers = [{"rid": r.record_id, "v": r.version, "covers": covers_tenure(_parsed(r.payload))}
              for r in rows if r.activity_type == "competition"
              and r.version == r.current_version]
    if covers:
        conn.execute(update(records).where(
            records.c.record_id == bindparam("rid"),
            records.c.current_version == bindparam("v")).values(
            covers_professional=bindparam("covers")), covers)


def _parsed(payload: str | None) -> object:
    try:
        return None if payload is None else orjson.loads(payload)
    except orjson.JSONDecodeError:  # not a record the gateway wrote: it covers nothing
        return None


def _prune_rejections(engine: Engine, cutoff: datetime, now: datetime, chunk_size: int,
                      done_so_far: RetentionResult) -> int:
    done = 0
    while True:
        ensure_held()
        with engine.begin() as conn:
            # Locked as read: another run (the job beside `retention run`, another replica)
            # that read the same chunk waits, and PostgreSQL then checks its filter again on
            # the stubs this one wrote, so each rejection is pruned and counted once (SQLite:
            # one writer, in turn).
            ids = conn.execute(select(rejections.c.id).where(_rejection_filter(cutoff))
                               .order_by(rejections.c.id).limit(chunk_size)
                               .with_for_update()).scalars().all()
            if not ids:
                return done
            conn.execute(update(rejections).where(rejections.c.id == bindparam("rid")), [
                {"rid": rid, "payload": orjson.dumps({"pruned": True, "rejection_id": rid,
                                                      "pruned_at": now.isoformat()}).decode()}
                for rid in ids])
        done += len(ids)
        done_so_far.rejections = done


def _batch_file_filter(cutoff: datetime) -> ColumnElement[bool]:
    finished = func.coalesce(batches.c.finished_at, batches.c.created_at)
    return and_(batches.c.status.in_(FINISHED_BATCHES), finished < cutoff,
                batches.c.file_removed_at.is_(None))


def _batch_files_here(engine: Engine, cutoff: datetime, chunk_size: int
                      ) -> Iterator[list[tuple[str, Path]]]:
    """Finished batches' files due for deletion, a page at a time: those this host can reach.

    A file whose directory is not there (the shared volume not mounted on this host) is left
    out, with a warning once the walk ends, for a run on a host that has it.  Each directory
    is looked at once, not once a file.  Pages are read from a snapshot (on SQLite no write
    lock); the caller's mark re-checks ``file_removed_at``.
    """
    after, mounted = "", {}
    while True:
        with snapshot(engine) as conn:
            rows = conn.execute(select(batches.c.batch_id, batches.c.file_path).where(
                _batch_file_filter(cutoff), batches.c.batch_id > after)
                .order_by(batches.c.batch_id).limit(chunk_size)).all()
        if not rows:
            break
        after = rows[-1].batch_id
        page = []
        for row in rows:
            path = Path(row.file_path)
            if path.parent not in mounted:
                mounted[path.parent] = path.parent.is_dir()
            if mounted[path.parent]:
                page.append((row.batch_id, path))
        yield page
    for directory in sorted(str(d) for d, there in mounted.items() if not there):
        log.warning("retention: batch directory %s is not there on this host; its finished "
                    "batches' files are left for a run where it is mounted", directory)


def _remove_batch_files(engine: Engine, cutoff: datetime, now: datetime, chunk_size: int,
                        done_so_far: RetentionResult) -> int:
    """Delete finished batches' files, then mark them removed; a crash between is retried."""
    done = 0
    for page in _batch_files_here(engine, cutoff, chunk_size):
        ensure_held()
        for _, path in page:
            path.unlink(missing_ok=True)  # already gone (removed by hand, or a crash here): mark it
        if page:
            with engine.begin() as conn:
                done += conn.execute(update(batches).where(
                    batches.c.batch_id.in_([batch_id for batch_id, _ in page]),
                    batches.c.file_removed_at.is_(None)).values(file_removed_at=now)).rowcount
            done_so_far.batch_files = done
    return done


def _upload_leftovers(directory: Path, now: datetime) -> list[Path]:
    """``.part`` files (uploads killed mid-stream) not written for a day, in BATCH_DIR."""
    if not directory.is_dir():
        return []
    before = (now - UPLOAD_LEFTOVER_AGE).timestamp()
    old = []
    for path in directory.glob("*.part"):
        try:
            if path.stat().st_mtime < before:
                old.append(path)
        except FileNotFoundError:  # its upload just finished or failed
            continue
    return old


def _remove_leftovers(paths: Sequence[Path]) -> int:
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed


# -- the scheduled job ---------------------------------------------------------------------

def _run_job(engine: Engine, settings: Settings) -> object:
    return prune(engine, settings, actor="scheduler")


RETENTION_JOB = register(Job("retention", _run_job, lambda s: s.retention_interval_seconds
                             if s.retention_payload_days > 0 else 0))
