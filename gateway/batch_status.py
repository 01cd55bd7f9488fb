"""A batch's status as partners, the CLI and the console read it: counters, failure, row errors.

May touch: nothing (reads ``batches`` and ``batch_errors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, select

from contracts.errors import message
from gateway.store.tables import batch_errors, batches

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


def batch_status(conn: Connection, batch_id: str, cursor: int = 0, limit: int = 100) -> dict[str, Any] | None:
    cursor = min(cursor, 2**63 - 1)  # past every id; a larger int overflows the drivers
    # The rows' errors first: a chunk commits them with the batch's counters, so the counters
    # read after them cover every error listed even when a chunk commits between the two reads
    # (PostgreSQL's READ COMMITTED sees each statement's own moment).
    errors = conn.execute(select(batch_errors).where(batch_errors.c.batch_id == batch_id,
                                                     batch_errors.c.id > cursor)
                          .order_by(batch_errors.c.id).limit(limit + 1)).mappings().all()
    row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).mappings().first()
    if row is None:
        return None
    more = len(errors) > limit
    errors = errors[:limit]
    counts = {k: int(row[k]) for k in OUTCOMES}
    return {
        "batch_id": batch_id, "adapter": row["adapter"], "kind": row["kind"], "period": row["period"],
        "status": row["status"], "error": row["error"], "failure": _failure_of(row),
        "counts": {"rows": rows_judged(counts), **counts},
        "rows_done": int(row["rows_done"]), "credits_total": row["credits_total"],
        "declared": {"rows": row["declared_rows"], "credits": row["declared_credits"]},
        "created_at": row["created_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
        "rejected_rows": [{"row": int(e["row_no"]), "column": e["column_name"], "code": e["code"],
                           "message": e["message"], "message_zh": e["message_zh"]} for e in errors],
        "next": str(errors[-1]["id"]) if more and errors else None,
    }
