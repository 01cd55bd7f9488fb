"""The Cadre Network College pull: completions pages → ingest, cursor in the same transaction.

``pull_once`` reads the stored cursor, then page by page::

    GET {CADRE_COLLEGE_URL}/api/completions?cursor=…&limit=PULL_PAGE_SIZE
    → adapter (one ParsedRow per item) → ingest_items(…, in_tx=advance the cursor)

The cursor, ``pulled_total`` and ``last_success_at`` are written by ``in_tx`` inside the
ingest transaction: a page's records and the cursor past them commit together or not at all.
A crash mid-page re-fetches that page next time; the records were rolled back with the cursor,
and even a page ingested twice would answer ``duplicate`` (same ``xh`` → same source id).
The cursor update is a compare-and-set on the value this run started from, so two pullers that
slipped past the job lease cannot both advance it (the loser's page is rolled back).

Short retries of one page use tenacity (exponential backoff, full jitter, ``Retry-After``
honoured up to ``PULL_RETRY_MAX_WAIT_SECONDS``); each GET, answer included, is bounded by a
deadline of a few ``PULL_TIMEOUT_SECONDS`` and a size cap (:func:`gateway.upstream.bounded_request`).
Run as the scheduled job, a run whose lease another replica took over stops before its next
page (:class:`gateway.scheduling.LeaseLost`).  When they run out, or the college answers
something that retrying cannot fix, ``last_error`` is recorded, the cursor stays where it was
and the run ends; the scheduler tries again at the next interval.

Errors (httpx exceptions are translated here and go no further)::

    GatewayError
    └── PullError                a page could not be fetched or read
        ├── RetriablePullError   transient: 429, 503, other 5xx, timeouts, connection errors
        ├── PermanentPullError   retrying will not help: other 4xx, a malformed page
        └── CursorMoved          another puller advanced the cursor first
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, select, update

from adapters.cadre_college import CadreCollegeAdapter
from contracts import RecordAnswer
from contracts.errors import message
from gateway import audit, upstream
from gateway.config import Settings
from gateway.delivery.policy import retry_after_seconds
from gateway.errors import (
    PermanentUpstreamError,
    RetriableUpstreamError,
    UpstreamError,
)
from gateway.masking import mask_excerpt, mask_text
from gateway.pipeline.ingest import ingest_items
from gateway.pipeline.items import Item, PartnerRef, RulesContext
from gateway.pipeline.rules_tables import RulesConfig
from gateway.reference import ReferenceCache
from gateway.scheduling import ensure_held
from gateway.store.db import reading
from gateway.store.tables import pull_state
from gateway.store.util import insert_ignore

__all__ = ["COMPLETIONS_PATH", "PARTNER", "SOURCE", "CursorMoved", "Page", "PermanentPullError",
           "PullError", "PullResult", "PullState", "RetriablePullError", "fetch_page",
           "pull_once", "read_state", "record_error"]

log = logging.getLogger(__name__)

SOURCE = "cadre_college"  # the pull_state row
PARTNER = PartnerRef("cadre-college", "cadre_college")
COMPLETIONS_PATH = "/api/completions"


# This module's names for the shared upstream errors (gateway.errors).
PullError = UpstreamError
RetriablePullError = RetriableUpstreamError
PermanentPullError = PermanentUpstreamError


class CursorMoved(PullError):
    pass


class _Action(StrEnum):
    PAGE = "page"
    RETRY = "retry"
    RATE_LIMITED = "rate_limited"  # retry, honouring Retry-After
    STOP = "stop"  # record the error, end this run


# How the college's answers are read: a table, not an if-chain (other 5xx → RETRY,
# other 4xx → STOP: a bad cursor or credentials need ops, not another try).
STATUS_ACTIONS: dict[int, _Action] = {
    200: _Action.PAGE,
    408: _Action.RETRY,
    429: _Action.RATE_LIMITED,
    503: _Action.RATE_LIMITED,
}


def _classify(status: int) -> _Action:
    if status in STATUS_ACTIONS:
        return STATUS_ACTIONS[status]
    return _Action.RETRY if 500 <= status < 600 else _Action.STOP


@dataclass(frozen=True)
class Page:
    data: list[Any]
    next_cursor: str
    has_more: bool


@dataclass
class PullResult:
    """What one run did.  ``cursor`` is the stored cursor when the run ended."""

    pages: int = 0
    fetched: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    corrected: int = 0
    conflict: int = 0
    cursor: str | None = None
    has_more: bool = False  # the college had more when the run stopped (max_pages or error)
    # Why the run stopped early (also stored as last_error), masked: the college's answer may
    # quote an identity number.  ``error_code`` PULL_FAILED, with the catalogue's Chinese.
    error: str | None = None
    error_code: str | None = None
    error_zh: str | None = None
    cursor_moved: bool = False  # another run took the cursor: nothing failed

    def count(self, answers: Sequence[RecordAnswer]) -> None:
        for answer in answers:
            name = answer.status.value  # every RecordStatus value is a field here
            setattr(self, name, getattr(self, name) + 1)


@dataclass(frozen=True)
class PullState:
    source: str
    cursor: str | None
    pulled_total: int
    last_error: str | None
    last_success_at: datetime | None
    updated_at: datetime


def read_state(engine: Engine, source: str = SOURCE) -> PullState | None:
    """The stored pull state of ``source`` (``None`` before its first run)."""
    with reading(engine) as conn:
        row = conn.execute(select(pull_state).where(pull_state.c.source == source)).mappings().first()
    if row is None:
        return None
    return PullState(row["source"], row["cursor"], int(row["pulled_total"]), row["last_error"],
                     row["last_success_at"], row["updated_at"])


def _ensure_row(conn: Connection, now: datetime) -> None:
    insert_ignore(conn, pull_state, {"source": SOURCE, "cursor": None, "pulled_total": 0,
                                     "updated_at": now})


def record_error(engine: Engine, reason: str, now: datetime | None = None) -> None:
    """Store why the last run stopped; the cursor is left alone."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        _ensure_row(conn, now)
        conn.execute(update(pull_state).where(pull_state.c.source == SOURCE)
                     .values(last_error=mask_text(reason)[:2000], updated_at=now))


def reset_cursor(engine: Engine, actor: str, reason: str, now: datetime | None = None) -> str | None:
    """Forget the stored cursor, so the next pull starts from the college's first page.

    For a cursor the college no longer accepts (expired, or its store was rebuilt): every run
    would stop on it (``PULL_FAILED``).  Safe: a completion pulled again is the ``duplicate`` of
    its stored record, so only what is missing is added.  An operator action, audited with the
    actor, the reason and the cursor it replaced.  Returns that cursor.
    """
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        _ensure_row(conn, now)
        old = conn.execute(select(pull_state.c.cursor).where(pull_state.c.source == SOURCE)
                           .with_for_update()).scalar()
        conn.execute(update(pull_state).where(pull_state.c.source == SOURCE)
                     .values(cursor=None, last_error=None, updated_at=now))
        audit.append(conn, [audit.Event("pull_cursor_reset", actor=actor, detail={
            "source": SOURCE, "previous_cursor": old, "reason": reason})], now)
    return old


def _advance(old: str | None, new: str, fetched: int,
             now: datetime) -> Callable[[Connection, list[RecordAnswer]], None]:
    """The ``in_tx`` step: move the cursor past a page, in the page's own transaction."""

    def in_tx(conn: Connection, _answers: list[RecordAnswer]) -> None:
        _ensure_row(conn, now)
        moved = conn.execute(
            update(pull_state)
            .where(pull_state.c.source == SOURCE, pull_state.c.cursor.is_not_distinct_from(old))
            .values(cursor=new, pulled_total=pull_state.c.pulled_total + fetched,
                    last_error=None, last_success_at=now, updated_at=now)).rowcount
        if moved != 1:
            raise CursorMoved("another pull advanced the cursor first; this page is rolled back")

    return in_tx


# -- fetching ---------------------------------------------------------------------------

def _read_page(response: httpx.Response, cursor: str | None) -> Page:
    try:
        # Decimal, never float, for hours (SPEC §3).
        body = json.loads(response.content, parse_float=Decimal)
    except ValueError as exc:
        raise PermanentPullError("the page is not JSON", 200) from exc
    if not isinstance(body, dict):
        raise PermanentPullError("the page is not a JSON object", 200)
    data, next_cursor, has_more = body.get("data"), body.get("next_cursor"), body.get("has_more")
    if not isinstance(data, list) or not isinstance(has_more, bool):
        raise PermanentPullError('the page lacks "data" (list) or "has_more" (bool)', 200)
    if not isinstance(next_cursor, str) or not next_cursor:
        if data or has_more:
            raise PermanentPullError('the page lacks "next_cursor"', 200)
        next_cursor = cursor or ""
    if has_more and next_cursor == cursor:
        raise PermanentPullError("the college says it has more but did not advance the cursor", 200)
    return Page(data, next_cursor, has_more)


def fetch_page(client: httpx.Client, url: str, cursor: str | None, limit: int, *,
               timeout_seconds: float | None = None) -> Page:
    """One GET of one page; httpx errors become :class:`PullError`.

    The whole GET is bounded (:func:`gateway.upstream.bounded_request`: a few timeouts, a size
    cap): a college that trickles its answer is a retriable error, not a pull held for ever.
    """
    params: dict[str, str | int] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    try:
        response = upstream.bounded_request(client, "GET", url, params=params,
                                            timeout_seconds=timeout_seconds)
    except httpx.HTTPError as exc:
        raise RetriablePullError(f"{type(exc).__name__}: {exc}") from exc
    action = _classify(response.status_code)
    if action is _Action.PAGE:
        return _read_page(response, cursor)
    reason = f"HTTP {response.status_code}: {mask_excerpt(response.text)}"
    if action is _Action.STOP:
        raise PermanentPullError(reason, response.status_code)
    retry_after = (retry_after_seconds(response.headers.get("Retry-After"))
                   if action is _Action.RATE_LIMITED else None)
    raise RetriablePullError(reason, response.status_code, retry_after)


def _fetch_with_retries(client: httpx.Client, settings: Settings, url: str,
                        cursor: str | None) -> Page:
    retrying = upstream.retrying(settings, log, "cadre college page")
    return retrying(fetch_page, client, url, cursor, settings.pull_page_size,
                    timeout_seconds=settings.pull_timeout_seconds)


# -- the run ----------------------------------------------------------------------------

def _items(data: Sequence[Any], adapter: CadreCollegeAdapter) -> list[Item]:
    items = []
    for index, raw in enumerate(data):
        # A completion rejected unparsed is named by its ``xh`` (gateway.pipeline.items._source_id_of).
        for row in adapter.parse(raw):
            items.append(Item(raw=row.raw, submission=row.submission, errors=row.errors,
                              warnings=row.warnings, credited_hours=row.credited_hours,
                              rule_notes=row.rule_notes, row=index))
    return items


def pull_once(engine: Engine, settings: Settings, client: httpx.Client | None = None, *,
              max_pages: int | None = None) -> PullResult:
    """Pull pages until the college has no more, or ``max_pages`` were taken, or one fails.

    ``max_pages`` defaults to ``PULL_MAX_PAGES_PER_RUN``.  A failed page is recorded as
    ``last_error`` and ends the run: this never raises a :class:`PullError`.
    """
    state = read_state(engine)
    cursor = state.cursor if state else None
    result = PullResult(cursor=cursor)
    limit_pages = max_pages if max_pages is not None else settings.pull_max_pages_per_run
    url = settings.cadre_college_url.rstrip("/") + COMPLETIONS_PATH
    adapter = CadreCollegeAdapter()
    own_client = client is None
    http = client or httpx.Client(timeout=settings.pull_timeout_seconds)
    # Judged with one reference version for the whole run, read before any transaction opens.
    config = RulesConfig.from_settings(settings)
    rules = RulesContext(ReferenceCache(engine, config.keys).current(), config)
    try:
        while result.pages < limit_pages:
            try:
                page = _fetch_with_retries(http, settings, url, cursor)
                ensure_held()  # run as the scheduled job: stop if another replica took over
                now = datetime.now(UTC)
                step = _advance(cursor, page.next_cursor, len(page.data), now)
                if page.data:
                    result.count(ingest_items(engine, PARTNER, _items(page.data, adapter),
                                              now=now, in_tx=step, rules=rules))
                else:
                    with engine.begin() as conn:
                        step(conn, [])
            except PullError as exc:
                reason = mask_text(exc.reason)
                result.error, result.has_more = reason, True
                result.error_code = "PULL_FAILED"
                result.error_zh = f"{message('PULL_FAILED')[1]}（{reason}）"
                result.cursor_moved = isinstance(exc, CursorMoved)
                log.warning("cadre college pull stopped at cursor %r: %s", cursor, reason)
                if not result.cursor_moved:
                    record_error(engine, reason)
                break
            result.pages += 1
            result.fetched += len(page.data)
            cursor = result.cursor = page.next_cursor
            result.has_more = page.has_more
            if not page.has_more:
                break
    finally:
        if own_client:
            http.close()
    log.info("cadre college pull: %d pages, %d fetched, %d accepted, %d duplicate, %d rejected",
             result.pages, result.fetched, result.accepted, result.duplicate, result.rejected)
    return result

