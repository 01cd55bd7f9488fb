"""The batch list (``GET /v1/batches``, the console's 批量文件 page): filters and one page.

Newest first, by ``(created_at, batch_id)`` (a keyset cursor, so a batch uploaded while ops page
through shifts nothing).  An operator sees every partner's batches; a partner signing the request
sees its own only.  Each item carries what ``GET /v1/batches/{id}`` says of the batch, less its
rejected rows (one request a batch reads those).  May touch: nothing (reads ``batches``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, or_, select

from gateway.batch_status import OUTCOMES, rows_judged
from gateway.ops.common import (
    CURSOR_ZH,
    check_aware,
    check_text,
    decode_cursor,
    encode_cursor,
    iso,
    limit_of,
    refuse,
)
from gateway.store.tables import batches

__all__ = ["BATCH_ADAPTERS", "BATCH_KINDS", "BATCH_STATUSES", "COLUMNS", "batch_filters",
           "list_batches"]

BATCH_ADAPTERS = ("health", "finance", "training_base")
BATCH_KINDS = ("monthly", "annual", "roster")
BATCH_STATUSES = ("queued", "processing", "done", "failed")
COLUMNS = (batches.c.batch_id, batches.c.partner_id, batches.c.adapter, batches.c.kind,
           batches.c.period, batches.c.status, batches.c.rows_done, batches.c.rows_total,
           *(batches.c[k] for k in OUTCOMES), batches.c.credits_total, batches.c.created_at,
           batches.c.finished_at, batches.c.error, batches.c.error_code)


def _one_of(field: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise refuse(field, f"one of {', '.join(allowed)}", f"须为以下之一：{'、'.join(allowed)}")


def batch_filters(*, partner_id: str | None = None, adapter: str | None = None,
                  kind: str | None = None, status: str | None = None, period: str | None = None,
                  since: datetime | None = None, until: datetime | None = None,
                  ) -> list[ColumnElement[bool]]:
    """The WHERE clauses of a batch list; a value no batch can have is refused (422 SCHEMA)."""
    _one_of("adapter", adapter, BATCH_ADAPTERS)
    _one_of("kind", kind, BATCH_KINDS)
    _one_of("status", status, BATCH_STATUSES)
    check_text("partner_id", partner_id)
    check_text("period", period, max_length=7)
    check_aware("since", since)
    check_aware("until", until)
    c = batches.c
    return [clause for clause in (
        c.partner_id == partner_id if partner_id is not None else None,
        c.adapter == adapter if adapter is not None else None,
        c.kind == kind if kind is not None else None,
        c.status == status if status is not None else None,
        c.period == period if period is not None else None,
        c.created_at >= since if since is not None else None,
        c.created_at < until if until is not None else None) if clause is not None]


def _after(cursor: str | None) -> ColumnElement[bool] | None:
    after = decode_cursor(cursor, "batches", 2)
    if after is None:
        return None
    created, batch_id = after
    try:
        if not isinstance(created, str) or not isinstance(batch_id, str):
            raise ValueError("not text")
        if "\x00" in batch_id or len(batch_id) > 64:  # PostgreSQL refuses a NUL in text (500)
            raise ValueError("not a batch id")
        at = datetime.fromisoformat(created)
        check_aware("cursor", at)
    except ValueError as exc:
        raise refuse("cursor", "not a cursor this list gave out", CURSOR_ZH) from exc
    c = batches.c
    return or_(c.created_at < at, and_(c.created_at == at, c.batch_id < batch_id))


def item(row: Any) -> dict[str, Any]:
    """One batch as the list shows it (the counts as ``GET /v1/batches/{id}`` gives them)."""
    counts = {k: int(row[k]) for k in OUTCOMES}
    return {"batch_id": row["batch_id"], "partner_id": row["partner_id"],
            "adapter": row["adapter"], "kind": row["kind"], "period": row["period"],
            "status": row["status"], "counts": {"rows": rows_judged(counts), **counts},
            "rows_done": int(row["rows_done"]),
            "rows_total": None if row["rows_total"] is None else int(row["rows_total"]),
            "credits_total": row["credits_total"], "error_code": row["error_code"],
            "created_at": iso(row["created_at"]), "finished_at": iso(row["finished_at"])}


def list_batches(conn: Connection, *, cursor: str | None = None, limit: int = 50,
                 **filters: Any) -> dict[str, Any]:
    """A page of batches, newest first: ``{"items", "total", "next"}`` (SPEC §5 lists)."""
    limit = limit_of(limit)
    where = batch_filters(**filters)
    after = _after(cursor)
    total = int(conn.execute(select(func.count()).select_from(batches).where(*where)).scalar_one())
    query = select(*COLUMNS).where(*where, *(() if after is None else (after,)))
    rows = conn.execute(query.order_by(batches.c.created_at.desc(), batches.c.batch_id.desc())
                        .limit(limit + 1)).mappings().all()
    items = [item(r) for r in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    return {"items": items, "total": total,
            "next": None if last is None else encode_cursor(
                "batches", iso(last["created_at"]), last["batch_id"])}
