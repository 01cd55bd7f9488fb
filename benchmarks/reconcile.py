"""The reconciliation report on a year of monthly batches and its annual: how long it takes.

``python -m benchmarks.reconcile build [PER_MONTH]`` ingests twelve monthly health batches of
PER_MONTH rows (default 4,000; ``mock_partners.files.year_dataset``, one or two months never
pushed) and the annual batch that repeats, corrects, lacks, adds and conflicts with them, into
``var/bench/recon/recon.sqlite3``; ``python -m benchmarks.reconcile time`` then runs
:func:`gateway.reconcile.report` on it three times and prints each wall time and the totals.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import procs

WORK = procs.ROOT / "var" / "bench" / "recon"
DB = WORK / "recon.sqlite3"


def build(per_month: int) -> None:
    from gateway.batch_requests import NewBatch, new_batch_id, record_batch
    from gateway.batches import BatchProcessor
    from gateway.config import Settings
    from gateway.signing import file_sha256
    from gateway.store.db import make_engine, upgrade
    from mock_partners import files

    WORK.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DB}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{DB}"
    upgrade(url)
    engine = make_engine(url)
    settings = Settings(database_url=url, batch_dir=WORK)
    monthly, annual, _ = files.year_dataset(7, 2026, people=max(1, per_month * 5 // 4),
                                            per_month=per_month)

    def push(rows: list[dict[str, str]], kind: str, period: str) -> None:
        path = WORK / f"{kind}-{period}.csv"
        files.write_csv(path, rows, files.HEALTH_HEADERS)
        record_batch(engine, NewBatch(new_batch_id(), "health-bench", "health", kind, period, path,
                                      "csv", path.stat().st_size, file_sha256(path)), actor="bench")
        while BatchProcessor(engine, settings).run_once():
            pass

    for month, rows in enumerate(monthly, start=1):
        if rows:
            push(rows, "monthly", f"2026-{month:02d}")
    push(annual, "annual", "2026")


def timed() -> None:
    from gateway import reconcile
    from gateway.store.db import make_engine

    engine = make_engine(f"sqlite:///{DB}")
    with engine.connect() as conn:
        for _ in range(3):
            started = time.perf_counter()
            result = reconcile.report(conn, "health", 2026, today=datetime(2027, 1, 15, tzinfo=UTC))
            print(f"{time.perf_counter() - started:.2f} s {result['totals']}")


if __name__ == "__main__":  # parse workers are spawned and re-import this module
    if sys.argv[1] == "build":
        build(int(sys.argv[2]) if len(sys.argv) > 2 else 4000)
    else:
        timed()
