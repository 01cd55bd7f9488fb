"""Reference data the policy rules need (SPEC §4, last paragraph): sync, CSV import, lookups.

The base directory, filed plans, deferrals and title applicants come from the management
system's reference API (:func:`sync`, run by the scheduler as :data:`REFERENCE_SYNC_JOB`) or
from a CSV file (:func:`import_csv`, ``ce-gateway reference import``).  Every change set is a
version (``ref-000012``); the rules read the current data through :class:`StoreReference`,
cached by version in :class:`ReferenceCache`, and write :attr:`StoreReference.version`
beside what they judged.  Storage, diffing and versions live in :mod:`gateway.reference_store`.

Sync, per kind: page through ``GET {DOWNSTREAM_URL}/api/v1/reference/{kind}?since=&cursor=``
from the kind's stored watermark (the newest ``updated_at`` seen), then apply every kind that
was fetched whole in one transaction, with the new watermarks and one audit event
``reference_synced``.  ``since`` is inclusive (items may share a timestamp), so the items at
the watermark come again: the watermark keeps a digest of each item there that the last sync
took, and one served again unchanged is skipped (counted ``unchanged``) — upstream did not
change it, and applying it again would undo an ops CSV import made since.  An item that is new
at that timestamp, or newer, is applied, over an import too: upstream changed it.  A kind that cannot be fetched keeps its watermark and reports why;
nothing raises past this module but programming errors (and, under the job's lease, a lease
taken over).  Each page's GET, answer included, is bounded by a deadline of a few
``DOWNSTREAM_TIMEOUT_SECONDS`` and a size cap (:func:`gateway.upstream.bounded_request`).

Errors (httpx exceptions are translated here and go no further)::

    GatewayError
    ├── UnknownReferenceKind     not one of the four kinds (also a ValueError)
    └── FetchError               a reference page could not be fetched or read
        ├── RetriableFetchError  429, 503, other 5xx, timeouts, connection errors
        └── PermanentFetchError  other 4xx, a malformed page
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import InterfaceError, OperationalError
from tenacity import Retrying

from gateway import audit, upstream
from gateway.config import Settings
from gateway.delivery.policy import retry_after_seconds
from gateway.errors import (
    PermanentUpstreamError,
    RetriableUpstreamError,
    UpstreamError,
)
from gateway.masking import mask_excerpt, mask_text
from gateway.person_keys import PersonKeys
from gateway.pipeline.rules_tables import BaseInfo, DeferralInfo, PlanInfo
from gateway.reference_store import (
    KINDS,
    ReferenceKind,
    RowError,
    UnknownReferenceKind,
    Watermark,
    apply_items,
    item_digest,
    latest_seq,
    lock_writers,
    parse_kind,
    read_reference_csv,
    read_watermarks,
    save_watermark,
    version_label,
)
from gateway.scheduling import Job, ensure_held, register
from gateway.store.db import snapshot
from gateway.store.tables import (
    reference_bases,
    reference_deferrals,
    reference_plans,
    reference_title_applicants,
)

__all__ = ["API_PATH", "REFERENCE_SYNC_JOB", "BaseInfo", "DeferralInfo", "FetchError",
           "ImportResult", "KindSync", "PermanentFetchError", "PlanInfo", "ReferenceCache",
           "ReferenceKind", "RetriableFetchError", "RowError", "StoreReference", "SyncResult",
           "UnknownReferenceKind", "import_csv", "sync"]

log = logging.getLogger(__name__)

API_PATH = "/api/v1/reference/"
MAX_PAGES = 10_000  # a runaway ``next`` ends the kind's run, not the process
DEFAULT_SYNC_INTERVAL_SECONDS = 3600.0
_STORE_ERRORS = (OperationalError, InterfaceError)  # the store is down or locked: report it


# What the rules see (BaseInfo, PlanInfo, DeferralInfo) is defined once, beside the rules'
# Reference protocol in gateway.pipeline.rules_tables, and re-exported here.


class StoreReference:
    """The current reference data in memory: the rules' lookups, answered without I/O.

    Identity numbers are looked up by their person key (``keys``), as they are stored.
    """

    def __init__(self, keys: PersonKeys, *, seq: int = 0, bases: dict[str, BaseInfo] | None = None,
                 plans: dict[str, PlanInfo] | None = None,
                 deferrals: dict[tuple[str, int], DeferralInfo] | None = None,
                 title_applicants: set[tuple[str, int]] | None = None) -> None:
        self.seq, self._keys = seq, keys
        self._bases = bases or {}
        self._plans = plans or {}
        self._deferrals = deferrals or {}
        self._title_applicants = frozenset(title_applicants or ())

    @classmethod
    def of(cls, keys: PersonKeys, *, bases: Iterable[BaseInfo] = (), plans: Iterable[PlanInfo] = (),
           deferrals: Iterable[tuple[str, DeferralInfo]] = (),
           title_applicants: Iterable[tuple[str, int]] = (), seq: int = 0) -> StoreReference:
        """Build one from plain values (id numbers in clear): for tests of the rules."""
        def key(id_number: str) -> str:
            return keys.of("resident_id", id_number)

        return cls(keys, seq=seq, bases={b.code: b for b in bases},
                   plans={p.plan_id: p for p in plans},
                   deferrals={(key(i), d.from_year): d for i, d in deferrals},
                   title_applicants={(key(i), y) for i, y in title_applicants})

    @classmethod
    def load(cls, conn: Connection, keys: PersonKeys) -> StoreReference:
        """Read the current tables into memory.

        The version is read first: were a sync to commit between the reads, the data would be
        newer than its label, and the next cache check would see that and reload.
        """
        seq = latest_seq(conn)
        bases = {r.code: BaseInfo(r.code, r.name, r.level, r.status, r.assessed_on)
                 for r in conn.execute(select(reference_bases))}
        plans = {r.plan_id: PlanInfo(r.plan_id, r.base_code, r.title, r.category,
                                     Decimal(r.hours), r.starts_on, r.ends_on, r.filed_on)
                 for r in conn.execute(select(reference_plans))}
        deferrals = {(r.person_key, r.from_year): DeferralInfo(r.from_year, r.reason, r.approved_on)
                     for r in conn.execute(select(reference_deferrals))}
        applicants = {(r.person_key, r.year) for r in conn.execute(
            select(reference_title_applicants.c.person_key, reference_title_applicants.c.year))}
        return cls(keys, seq=seq, bases=bases, plans=plans, deferrals=deferrals,
                   title_applicants=applicants)

    @property
    def version(self) -> str:
        """The reference version these answers come from, or ``"none"`` before any."""
        return version_label(self.seq)

    def base(self, code: str) -> BaseInfo | None:
        return self._bases.get(code.strip())

    def plan(self, plan_id: str) -> PlanInfo | None:
        return self._plans.get(plan_id.strip())

    def deferral(self, id_number: str, year: int) -> DeferralInfo | None:
        """The approved deferral of ``year``'s hours (R11), if the person has one."""
        return self._deferrals.get((self._keys.of("resident_id", id_number), year))

    def is_title_applicant(self, id_number: str, year: int) -> bool:
        return (self._keys.of("resident_id", id_number), year) in self._title_applicants


class ReferenceCache:
    """One :class:`StoreReference` per version, shared between threads.

    Each call costs one small query (the latest version id); the tables are read again only
    after a new version.
    """

    def __init__(self, engine: Engine, keys: PersonKeys) -> None:
        self._engine, self._keys = engine, keys
        self._lock = threading.Lock()
        self._current: StoreReference | None = None
        self.loads = 0  # how many times the tables were read (for tests and metrics)

    def current(self, conn: Connection | None = None) -> StoreReference:
        """The current data; pass ``conn`` to read inside the caller's transaction."""
        if conn is None:
            # A lock-free snapshot: on SQLite a plain connection begins IMMEDIATE, and a parse
            # worker that hung in this read held the store's write lock until it was killed.
            with snapshot(self._engine) as own:
                return self.current(own)
        seq = latest_seq(conn)
        with self._lock:
            cached = self._current
            if cached is not None and cached.seq == seq:
                return cached
            loaded = StoreReference.load(conn, self._keys)
            self._current = loaded
            self.loads += 1
            return loaded


# -- CSV import -----------------------------------------------------------------------------

@dataclass
class ImportResult:
    """What one import did.  ``errors``: refused rows (not imported); ``error``: the file."""

    kind: str
    path: str
    rows: int = 0
    valid: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    version: str | None = None
    errors: list[RowError] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def import_csv(engine: Engine, kind: str | ReferenceKind, path: str | Path,
               actor: str, *, keys: PersonKeys) -> ImportResult:
    """Import one CSV of ``kind`` (headers: the SPEC §5 field names).

    Good rows are upserted under one new version (none when nothing changed); bad rows are
    reported with their row numbers and left out.  Audited as ``reference_imported``.
    Raises :class:`UnknownReferenceKind` for a kind that does not exist.
    """
    spec = KINDS[parse_kind(kind)]
    result = ImportResult(kind=spec.kind.value, path=str(path))
    try:
        with open(path, "rb") as stream:
            parsed = read_reference_csv(stream, spec, keys)
    except OSError as exc:
        result.error = f"cannot read {path}: {exc.strerror or exc}"
        return result
    result.rows, result.errors, result.error = parsed.rows, parsed.errors, parsed.error
    if parsed.error is not None:
        return result
    result.valid = len(parsed.good)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            lock_writers(conn, now)
            applied = apply_items(conn, {spec.kind: parsed.good}, source="import", actor=actor,
                                  now=now)
            counts = applied.counts[spec.kind.value]
            result.version = applied.version
            result.inserted, result.updated = counts["inserted"], counts["updated"]
            result.unchanged = counts["unchanged"]
            audit.append(conn, [audit.Event("reference_imported", actor=actor, detail={
                "kind": spec.kind.value, "file": Path(path).name, "version": applied.version,
                "rows": result.rows, "inserted": result.inserted, "updated": result.updated,
                "unchanged": result.unchanged, "refused_rows": len({e.row for e in result.errors}),
            })], now=now)
    except _STORE_ERRORS as exc:
        log.exception("reference import of %s failed in the store", path)
        result.version, result.error = None, f"store error: {type(exc).__name__}"
    return result


# -- sync from the management system --------------------------------------------------------

# This module's names for the shared upstream errors (gateway.errors).
FetchError = UpstreamError
RetriableFetchError = RetriableUpstreamError
PermanentFetchError = PermanentUpstreamError


# Status → retry?  A table (other 5xx retry, other 4xx stop: a wrong URL needs ops).
RETRY_STATUSES = frozenset({408, 425, 429, 503})


@dataclass
class KindSync:
    """One kind's part of a sync.  ``since``: the watermark it started from."""

    kind: str
    since: str | None = None
    watermark: str | None = None
    pages: int = 0
    fetched: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    invalid: list[str] = field(default_factory=list)  # refused items, ids masked
    error: str | None = None


@dataclass
class SyncResult:
    version: str | None = None  # the new version, when the sync changed something
    kinds: dict[str, KindSync] = field(default_factory=dict)
    error: str | None = None  # the store could not be written

    @property
    def ok(self) -> bool:
        return self.error is None and all(k.error is None for k in self.kinds.values())

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "ok": self.ok, "error": self.error,
                "kinds": {name: asdict(k) for name, k in self.kinds.items()}}


def fetch_page(client: httpx.Client, url: str, since: str | None, cursor: str | None, *,
               timeout_seconds: float | None = None) -> tuple[list[Any], str | None]:
    """One GET: ``(items, next cursor)``; httpx errors become :class:`FetchError`.

    The whole GET is bounded (:func:`gateway.upstream.bounded_request`: a few timeouts, a size
    cap): an API that trickles its answer is a retriable error, not a sync held for ever.
    """
    params = {k: v for k, v in (("since", since), ("cursor", cursor)) if v}
    try:
        response = upstream.bounded_request(client, "GET", url, params=params,
                                            timeout_seconds=timeout_seconds)
    except httpx.HTTPError as exc:
        raise RetriableFetchError(f"{type(exc).__name__}: {exc}") from exc
    status = response.status_code
    if status != 200:
        reason = f"HTTP {status}: {mask_excerpt(response.text)}"
        if status in RETRY_STATUSES or 500 <= status < 600:
            raise RetriableFetchError(reason, status,
                                      retry_after_seconds(response.headers.get("Retry-After")))
        raise PermanentFetchError(reason, status)
    try:
        body = json.loads(response.content, parse_float=Decimal)  # hours: Decimal, never float
    except ValueError as exc:
        raise PermanentFetchError("the page is not JSON", status) from exc
    items = body.get("items") if isinstance(body, dict) else None
    nxt = body.get("next") if isinstance(body, dict) else None
    if not isinstance(items, list) or not (nxt is None or isinstance(nxt, str | int)):
        raise PermanentFetchError('the page is not {"items": [...], "next": null|cursor}', status)
    return items, None if nxt is None or nxt == "" else str(nxt)


def _retrying(settings: Settings) -> Retrying:
    return upstream.retrying(settings, log, "reference page")


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class _Fetched:
    rows: list[dict[str, Any]] = field(default_factory=list)
    watermark: str | None = None
    seen: frozenset[str] = frozenset()  # digests of the items at ``watermark``
    repeated: int = 0  # keys whose only items came again unchanged at the old watermark


def _fetch_kind(client: httpx.Client, settings: Settings, kind: ReferenceKind,
                report: KindSync, seen: frozenset[str] = frozenset()) -> _Fetched:
    """Every page of one kind since its watermark, validated; raises :class:`FetchError`.

    ``seen``: the digests of the items at the watermark the last sync took; those items,
    served again unchanged, are left out of the rows to apply.
    """
    spec, url = KINDS[kind], settings.downstream_url.rstrip("/") + API_PATH + kind.value
    retrying, cursor, items = _retrying(settings), None, []
    while True:
        ensure_held()  # run as the scheduled job: stop if another replica took its lease
        page, nxt = retrying(fetch_page, client, url, report.since, cursor,
                             timeout_seconds=settings.downstream_timeout_seconds)
        items.extend(page)
        report.pages += 1
        if nxt is None:
            break
        if nxt == cursor or report.pages >= MAX_PAGES:
            raise PermanentFetchError(f"paging does not end (next={nxt!r} after "
                                      f"{report.pages} pages)")
        cursor = nxt
    report.fetched = len(items)
    got = _Fetched(watermark=report.since)
    start = mark = _timestamp(report.since)
    chosen: dict[tuple[Any, ...], tuple[datetime | None, dict[str, Any]]] = {}
    repeated: set[tuple[Any, ...]] = set()
    stamped: list[tuple[datetime, str]] = []  # (updated_at, digest) of every valid item
    keys = PersonKeys(settings.person_key_secret)
    for index, raw in enumerate(items):
        try:
            row = spec.to_row(spec.model.model_validate(raw), keys)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            report.invalid.append(mask_text(f"item {index}: {_first_error(exc)}"))
            continue
        when, digest = _timestamp(raw.get("updated_at")), item_digest(row)
        if when is not None:
            stamped.append((when, digest))
            if mark is None or when > mark:
                mark, got.watermark = when, str(raw["updated_at"])
        key, held = spec.key(row), chosen.get(spec.key(row))
        if when is not None and when == start and digest in seen:
            repeated.add(key)  # taken by the last sync, unchanged upstream since
            continue
        # One key twice (an update served beside the old item): the newest wins, else the last.
        if held is None or when is None or held[0] is None or when >= held[0]:
            chosen[key] = (when, row)
    got.rows = [row for _, row in chosen.values()]
    got.seen = frozenset(d for when, d in stamped if when == mark)
    got.repeated = len(repeated - chosen.keys())
    return got


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'item'}: {first['msg']}"
    return str(exc)


def sync(engine: Engine, settings: Settings, client: httpx.Client | None = None, *,
         actor: str = "reference-sync",
         kinds: Iterable[str | ReferenceKind] | None = None) -> SyncResult:
    """Pull every kind (or ``kinds``) since its watermark and apply the changes as one version.

    Never raises a fetch or store error: they are reported in the result (and, per kind, in
    ``pull_state.last_error`` of ``reference:<kind>``).  Run as the scheduled job, it raises
    :class:`gateway.scheduling.LeaseLost` before a page or the commit once another replica
    took the job's lease over.
    """
    wanted = [parse_kind(k) for k in kinds] if kinds is not None else list(KINDS)
    result = SyncResult()
    try:
        with engine.connect() as conn:
            marks = read_watermarks(conn)
    except _STORE_ERRORS as exc:
        result.error = f"store error: {type(exc).__name__}"
        return result
    fetched: dict[ReferenceKind, _Fetched] = {}
    http = client or httpx.Client(timeout=settings.downstream_timeout_seconds)
    try:
        for kind in wanted:
            report = result.kinds[kind.value] = KindSync(kind.value, since=marks[kind].since)
            try:
                fetched[kind] = _fetch_kind(http, settings, kind, report, marks[kind].seen)
            except FetchError as exc:
                report.error = exc.reason
                log.warning("reference sync of %s failed: %s", kind.value, exc.reason)
    finally:
        if client is None:
            http.close()
    ensure_held()
    try:
        _commit(engine, result, fetched, marks, actor)
    except _STORE_ERRORS as exc:
        log.exception("reference sync could not be stored")
        result.version, result.error = None, f"store error: {type(exc).__name__}"
    log.info("reference sync: version %s, %s", result.version or "unchanged",
             {k: (r.fetched, r.inserted, r.updated, r.error) for k, r in result.kinds.items()})
    return result


def _commit(engine: Engine, result: SyncResult, fetched: dict[ReferenceKind, _Fetched],
            started: dict[ReferenceKind, Watermark], actor: str) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        lock_writers(conn, now)
        marks = read_watermarks(conn)
        rows_by_kind = {}
        for name, report in result.kinds.items():
            kind = ReferenceKind(name)
            if report.error is not None:
                save_watermark(conn, kind, since=None, fetched=0, ok=False, note=report.error,
                               now=now)
            elif marks[kind] != started[kind]:
                # Another sync stored newer data meanwhile: ours may be older, so drop it.
                report.error = "another sync moved the watermark on; this kind was skipped"
            else:
                rows_by_kind[kind] = fetched[kind].rows
        cursors = {k.value: fetched[k].watermark if k in rows_by_kind else marks[k].since
                   for k in KINDS}
        applied = apply_items(conn, rows_by_kind, source="sync", actor=actor, now=now,
                              cursors=cursors)
        for kind in rows_by_kind:
            report, got = result.kinds[kind.value], fetched[kind]
            counts = applied.counts[kind.value]
            report.inserted, report.updated = counts["inserted"], counts["updated"]
            report.unchanged = counts["unchanged"] + got.repeated
            report.watermark = got.watermark
            note = f"{len(report.invalid)} items refused: {report.invalid[0]}" if report.invalid else None
            save_watermark(conn, kind, since=got.watermark, fetched=report.fetched, ok=True,
                           note=note, now=now, seen=got.seen)
        result.version = applied.version
        if applied.version is not None:
            audit.append(conn, [audit.Event("reference_synced", actor=actor, detail={
                "version": applied.version,
                "counts": {name: {"fetched": r.fetched, "inserted": r.inserted,
                                  "updated": r.updated, "unchanged": r.unchanged,
                                  "invalid": len(r.invalid)} for name, r in result.kinds.items()},
                "errors": {name: r.error for name, r in result.kinds.items() if r.error},
            })], now=now)


# -- the scheduled job ----------------------------------------------------------------------

def _sync_interval(settings: Settings) -> float:
    # Settings has no REFERENCE_SYNC_INTERVAL_SECONDS yet: hourly until config.py grows one.
    value = getattr(settings, "reference_sync_interval_seconds", DEFAULT_SYNC_INTERVAL_SECONDS)
    return float(value)


def _run_sync(engine: Engine, settings: Settings) -> object:
    return sync(engine, settings, actor="scheduler")


REFERENCE_SYNC_JOB = register(Job("reference:sync", _run_sync, _sync_interval))
