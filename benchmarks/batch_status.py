"""A partner's poll of ``GET /v1/batches/{id}`` on a batch that refused every row: how long.

A late annual refused whole (``YEAR_CLOSED``) holds one rejection and one row error a row, and
its partner polls the status while ops decide.  ``python -m benchmarks.batch_status URL
[ROWS]`` writes such a batch of ROWS (default 300,000) into URL (a SQLite file, or an empty
PostgreSQL database), then times :func:`gateway.batch_status.batch_status` for its first page
twenty times and prints one JSON line: store, rows, median and worst milliseconds.
Migration 0028's indexes are what keep it small (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Connection


def write_refused_batch(conn: Connection, batch_id: str, rows: int) -> None:
    """A done batch of ``rows`` rows, every one refused and none revalidated since."""
    from sqlalchemy import insert

    from gateway.store.tables import batch_errors, batches, rejections

    now = datetime.now(UTC)
    conn.execute(insert(batches).values(
        batch_id=batch_id, partner_id="p", adapter="health", kind="annual", period="2025",
        status="done", file_path="/gone", file_format="csv", file_size=1, sha256="0" * 64,
        rows_done=rows + 1, accepted=0, duplicate=0, corrected=0, conflict=0, rejected=rows,
        credits_total="0", created_at=now))
    for start in range(0, rows, 20_000):
        part = range(start, min(start + 20_000, rows))
        conn.execute(insert(rejections), [{
            "partner_id": "p", "adapter": "health", "source_record_id": f"S{i}",
            "batch_id": batch_id, "row_no": i + 2, "payload": "{}", "errors": "[]",
            "status": "open", "received_at": now} for i in part])
        conn.execute(insert(batch_errors), [{
            "batch_id": batch_id, "row_no": i + 2, "column_name": "完成日期",
            "code": "YEAR_CLOSED", "message": "m", "message_zh": "m"} for i in part])


def main(url: str, rows: int = 300_000) -> dict[str, object]:
    from sqlalchemy import text

    from gateway.batch_status import batch_status
    from gateway.store.db import make_engine, upgrade

    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        write_refused_batch(conn, "B-BENCH", rows)
        if engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE rejections"))
            conn.execute(text("ANALYZE batch_errors"))
    times = []
    for _ in range(20):
        started = time.perf_counter()
        with engine.connect() as conn:
            found = batch_status(conn, "B-BENCH")
        times.append(time.perf_counter() - started)
    engine.dispose()
    assert found is not None and len(found["rejected_rows"]) == 100
    return {"store": engine.dialect.name, "rows": rows,
            "median_ms": round(statistics.median(times) * 1000, 2),
            "worst_ms": round(max(times) * 1000, 2)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))))
