"""Twelve monthly health batches of the same people, in order: does each month cost the same.

``python -m benchmarks.monthly [ROWS_PER_MONTH]`` (default 20,000; the generator draws them from
ROWS/2 people, so a person has ~2 records a month) ingests January to December into a fresh
SQLite store in this process (no parse worker; the store is removed afterwards) and prints each
month's wall time and the CPU spent in R14's cross-record integrity check
(``Chunk._flag_integrity``), which is what used to grow with each person's history.  The files
are kept under ``var/bench/monthly/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.procs import sqlite_file
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.pipeline import ingest
from gateway.signing import file_sha256
from gateway.store.db import make_engine, upgrade
from mock_partners import files


def main(rows: int) -> None:
    r14_cpu = [0.0]
    check = ingest.Chunk._flag_integrity

    def timed(chunk: Any) -> None:  # the bench's own probe on R14, not a change to it
        started = time.process_time()
        check(chunk)
        r14_cpu[0] += time.process_time() - started

    ingest.Chunk._flag_integrity = timed  # type: ignore[method-assign, assignment]
    work = Path("var/bench/monthly")
    work.mkdir(parents=True, exist_ok=True)
    with sqlite_file(work / "store.sqlite3") as url:
        upgrade(url)
        engine = make_engine(url)
        settings = Settings(database_url=url, batch_dir=work, batch_parse_workers=0)
        print(f"{'month':>5} {'rows':>7} {'wall s':>7} {'R14 CPU s':>9}")
        for month in range(1, 13):
            path = work / f"health_2026-{month:02d}_{rows}.csv"
            if not path.exists():
                files.write_csv(path, files.health_rows(5, rows, 2026, month=month),
                                files.HEALTH_HEADERS)
            batch = NewBatch(new_batch_id(), "health-bench", "health", "monthly",
                             f"2026-{month:02d}", path, "csv", path.stat().st_size,
                             file_sha256(path))
            record_batch(engine, batch, actor="bench")
            r14_cpu[0] = 0.0
            started = time.perf_counter()
            BatchProcessor(engine, settings).run_once()
            print(f"{month:>5} {rows:>7,} {time.perf_counter() - started:>7.1f} "
                  f"{r14_cpu[0]:>9.2f}", flush=True)
        engine.dispose()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
