"""A batch's status as partners, the CLI and the console read it: counters, failure, row errors.

May touch: nothing (reads ``batches``, ``batch_errors`` and the batch's ``rejections``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, func, select

from contracts.errors import message
from gateway.ops.common import CURSOR_ZH, decode_cursor, encode_cursor, refuse
from gateway.store.tables import batch_errors, batches, rejections

# What a batch row can come to: the batch's counters, in this order wherever they are shown.
OUTCOMES = ("accepted", "duplicate", "corrected", "conflict", "rejected")


def rows_judged(counts: Mapping[Any, Any]) -> int:
    """Data rows judged so far: the outcomes' sum (``rows_done`` is a file row, header = 1)."""
    return sum(int(counts[k]) for k in OUTCOMES)


def _failure_of(row: Any) -> dict[str, str] | None:
    """A failed batch's coded reason, as every coded error is shown (SPEC §6).

    ``error`` holds the English detail; a batch that failed before codes were kept (no
    ``error_code``) is reported as ``BATCH_FAILED`` with that detail.
    """
    if row["status"] != "failed" or not row["error"]:
        return None
    code = row["error_code"] or "BATCH_FAILED"
    en, zh = message(code)
    return {"code": code, "message": f"{en} ({row['error']})",
            "message_zh": f"{zh}（{row['error_zh'] or row['error']}）"}


# The rejected rows' cursor names its batch with the last row error's id: a cursor from another
# batch's listing (or a bare id, as cursors once were) is refused, not read as a place in this one.
ROWS_CURSOR = "batch_rows"


def rows_after(cursor: str | None, batch_id: str) -> int:
    """The last row error's id a cursor of this batch's rejected rows holds (0: from the start)."""
    after = decode_cursor(cursor, ROWS_CURSOR, 2)
    if after is None:
        return 0
    owner, last = after
    if owner != batch_id or not isinstance(last, int) or last < 0:
        raise refuse("cursor", "not a cursor this list gave out", CURSOR_ZH)
    return last


def _revalidated(conn: Connection, batch_id: str, row_nos: set[int]) -> tuple[int, set[int]]:
    """How many of the batch's rejected rows a revalidation let through, and which of ``row_nos``.

    ``counts`` stay what the batch judged when it ran; these say what became of its rejections
    later: ops fixed reference data and ``revalidate`` judged the row again without rejecting
    it, or an operator edited the rejection through (its record is in the store, or it is held
    as a conflict).  A row refused again keeps its row number on the fresh rejection, so a row
    counts once whichever run let it through.  Rejections written before migration 0028 have
    no row number: counted, never marked.  Both reads are served by
    ``ix_rejections_batch_id_status_row_no`` alone (partners poll this).
    """
    mine = (rejections.c.batch_id == batch_id, rejections.c.status == "revalidated")
    total = int(conn.execute(select(func.count()).select_from(rejections).where(*mine)).scalar_one())
    if not total or not row_nos:
        return total, set()
    marked = conn.execute(select(rejections.c.row_no).where(
        *mine, rejections.c.row_no.in_(sorted(row_nos)))).scalars()
    return total, set(marked)


def batch_status(conn: Connection, batch_id: str, cursor: str | None = None,
                 limit: int = 100) -> dict[str, Any] | None:
    """The batch's status with a page of its rejected rows; ``None`` if there is no such batch.

    ``cursor`` is a previous page's ``next`` for this batch; any other is a 422 ``SCHEMA``.
    """
    after = rows_after(cursor, batch_id)
    # The rows' errors first: a chunk commits them with the batch's counters, so the counters
    # read after them cover every error listed even when a chunk commits between the two reads
    # (PostgreSQL's READ COMMITTED sees each statement's own moment).
    errors = conn.execute(select(batch_errors).where(batch_errors.c.batch_id == batch_id,
                                                     batch_errors.c.id > after)
                          .order_by(batch_errors.c.id).limit(limit + 1)).mappings().all()
    row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).mappings().first()
    if row is None:
        return None
    more = len(errors) > limit
    errors = errors[:limit]
    counts = {k: int(row[k]) for k in OUTCOMES}
    revalidated, passed = _revalidated(conn, batch_id, {int(e["row_no"]) for e in errors})
    return {
        "batch_id": batch_id, "adapter": row["adapter"], "kind": row["kind"], "period": row["period"],
        "status": row["status"], "error": row["error"], "failure": _failure_of(row),
        "counts": {"rows": rows_judged(counts), **counts},
        # Of the rejected rows, those a later revalidation let through (``_revalidated``).
        "revalidated": revalidated,
        "rows_done": int(row["rows_done"]), "credits_total": row["credits_total"],
        "declared": {"rows": row["declared_rows"], "credits": row["declared_credits"]},
        "created_at": row["created_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
        # When retention deleted the uploaded file (gateway/retention.py); null: still kept.
        "file_removed_at": row["file_removed_at"].isoformat() if row["file_removed_at"] else None,
        "rejected_rows": [{"row": int(e["row_no"]), "column": e["column_name"], "code": e["code"],
                           "message": e["message"], "message_zh": e["message_zh"],
                           "revalidated": int(e["row_no"]) in passed} for e in errors],
        "next": encode_cursor(ROWS_CURSOR, batch_id, int(errors[-1]["id"])) if more and errors else None,
    }
