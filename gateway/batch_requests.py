"""Accepting a batch file (``POST /v1/batches``, ``ce-gateway ingest``): check, store, record.

The body is streamed to a file under ``BATCH_DIR`` while its SHA-256 is computed (the
signature covers that hash), fsynced, renamed into place (:func:`fsync_into_place`), and the
``batches`` row committed (:func:`record_batch`) — only then the 202 with the batch id
(SPEC §7: acknowledged means durable).  Before any of it, the adapter, kind and period
(:func:`check_batch_request`) and the optional control totals (:func:`parse_control_totals`)
are checked, so a request no batch can be for is refused at once.  Processing is
:mod:`gateway.batches`' work.

May touch: ``batches`` (insert), the audit trail (``batch_received``, ``batch_resent``), and
the batch file and its directory (fsync, rename).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from sqlalchemy import Engine, insert, select

from adapters.registry import BATCH_ADAPTERS
from gateway import audit
from gateway.errors import PayloadRejected
from gateway.store.tables import batches

PERIOD = {"monthly": re.compile(r"^\d{4}-(0[1-9]|1[0-2])$"), "annual": re.compile(r"^\d{4}$"),
          "roster": re.compile(r"^\d{4}(-(0[1-9]|1[0-2]))?$")}

# The first CE year a batch may be for (the gateway's data starts in this century).
FIRST_PERIOD_YEAR = 2000


def check_batch_request(adapter: str, kind: str, period: str, open_year: int | None = None,
                        today: date | None = None) -> None:
    """Refuse (422 SCHEMA) an adapter/kind pair, or a period, no batch can be for.

    With ``open_year`` (the CE year that closes next, ``ops.overview.year_close``): a period
    before 2000, or of a later year than that one whose month has not begun by ``today``, is a
    typo.  Taken, its rows would all be refused OUTSIDE_YEAR and the batch would still count as
    that month's push, so the missed-push alert would never name the month when it comes
    (notice 六(四): each month's data is pushed at its end).  A month of the open year not
    begun yet is let through: past the year's close (31 December) the open year is the next.
    """
    if (adapter, kind) not in BATCH_ADAPTERS:
        allowed = ", ".join(f"{a}/{k}" for a, k in sorted(BATCH_ADAPTERS))
        raise PayloadRejected("SCHEMA", field="adapter", detail=f"(adapter/kind must be one of {allowed})",
                              detail_zh=f"（adapter/kind 须为以下之一：{allowed}）")
    if not PERIOD[kind].match(period or ""):
        raise PayloadRejected("SCHEMA", field="period",
                              detail="(monthly: YYYY-MM; annual: YYYY; roster: YYYY or YYYY-MM)",
                              detail_zh="（月度：YYYY-MM；年度：YYYY；花名册：YYYY 或 YYYY-MM）")
    if open_year is None:
        return
    today = today or datetime.now(UTC).date()  # callers give the local day (period_bounds)
    year, month = int(period[:4]), int(period[5:7]) if len(period) == 7 else 1
    begun = (year, month) <= (today.year, today.month)
    if year < FIRST_PERIOD_YEAR or not (begun or year <= open_year):
        raise PayloadRejected("SCHEMA", field="period", detail=(
            f"(a period from {FIRST_PERIOD_YEAR} to the open CE year {open_year}, or one that "
            "has begun)"), detail_zh=f"（期间须在 {FIRST_PERIOD_YEAR} 年至当前开放的继续教育年度 "
                                     f"{open_year} 年之间，或已开始）")



def parse_control_totals(row_count: str | None, credits: str | None) -> tuple[int | None, str | None]:
    """The optional control totals; a bad one is refused naming its own header."""
    rows: int | None = None
    total: Decimal | None = None
    try:
        # At most 18 digits: a row count beyond that is no file's, and overflows the column.
        rows = int(row_count) if row_count not in (None, "") and len(row_count) <= 18 else None
    except ValueError:
        pass
    if row_count not in (None, "") and (rows is None or rows < 0):
        raise PayloadRejected("SCHEMA", field="X-CE-Row-Count",
                              detail="(the number of data rows, a whole number)",
                              detail_zh="（应为数据行数，一个非负整数）")
    try:
        total = Decimal(credits) if credits not in (None, "") else None
    except InvalidOperation:
        pass
    if credits not in (None, "") and (total is None or not total.is_finite() or total < 0
                                      or len(str(total)) > 32):  # the column holds 32
        raise PayloadRejected("SCHEMA", field="X-CE-Total-Credits",
                              detail="(the sum of the credits column, a number)",
                              detail_zh="（应为学分列之和，一个非负数）")
    return rows, None if total is None else str(total)


@dataclass(frozen=True)
class NewBatch:
    batch_id: str
    partner_id: str
    adapter: str
    kind: str
    period: str
    file_path: Path
    file_format: str
    file_size: int
    sha256: str
    declared_rows: int | None = None
    declared_credits: str | None = None


def new_batch_id() -> str:
    return "B" + uuid.uuid4().hex[:24]


# A batch that took, or is taking, its file: a byte-identical upload is a resend of it.
_TAKEN = ("queued", "processing", "done")


@dataclass(frozen=True)
class Acknowledged:
    """The batch an upload is acknowledged as: its own, or the one that has its file."""

    batch_id: str
    status: str
    resent: bool = False


def record_batch(engine: Engine, batch: NewBatch, actor: str) -> Acknowledged:
    """Commit the batch row (the file is already durable): from here it is acknowledged.

    Returns the batch acknowledged.  The same file again (same bytes, totals, adapter, kind
    and period, from the same partner: the resend after a lost 202) is answered with the batch
    that has it, queued, processing or done, and nothing is recorded but an audit event: taken
    twice, a month resent after the annual batch would correct its rows back to the month's
    (SPEC §2 "resend safely").  After a failed batch the file is taken anew.
    """
    now = datetime.now(UTC)
    with engine.begin() as conn:
        earlier = conn.execute(select(batches.c.batch_id, batches.c.status).where(
            batches.c.partner_id == batch.partner_id, batches.c.adapter == batch.adapter,
            batches.c.kind == batch.kind, batches.c.period == batch.period,
            batches.c.sha256 == batch.sha256, batches.c.status.in_(_TAKEN),
            batches.c.declared_rows.is_not_distinct_from(batch.declared_rows),
            batches.c.declared_credits.is_not_distinct_from(batch.declared_credits),
        ).order_by(batches.c.created_at).limit(1)).first()
        if earlier is not None:
            audit.append(conn, [audit.Event("batch_resent", actor=actor, detail={
                "batch_id": earlier.batch_id, "adapter": batch.adapter, "kind": batch.kind,
                "period": batch.period, "bytes": batch.file_size, "sha256": batch.sha256})], now)
            return Acknowledged(str(earlier.batch_id), str(earlier.status), resent=True)
        conn.execute(insert(batches).values(
            batch_id=batch.batch_id, partner_id=batch.partner_id, adapter=batch.adapter,
            kind=batch.kind, period=batch.period, status="queued", file_path=str(batch.file_path),
            file_format=batch.file_format, file_size=batch.file_size, sha256=batch.sha256,
            declared_rows=batch.declared_rows, declared_credits=batch.declared_credits,
            rows_done=0, accepted=0, duplicate=0, corrected=0, conflict=0, rejected=0,
            credits_total="0", created_at=now))
        audit.append(conn, [audit.Event("batch_received", actor=actor, detail={
            "batch_id": batch.batch_id, "adapter": batch.adapter, "kind": batch.kind,
            "period": batch.period, "bytes": batch.file_size, "sha256": batch.sha256,
            "format": batch.file_format})], now)
    return Acknowledged(batch.batch_id, "queued")


def fsync_into_place(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
