"""An annual batch that repeats what the store holds: the year-end case of health and finance.

``python -m benchmarks.annual_repeat [ROWS]`` (default 60,000) ingests one health CSV twice into
a fresh SQLite store (removed afterwards), as two annual batches, with the gateway's parse
workers: the second run repeats every row, so every row is a ``duplicate`` of a stored record.
It prints each run's wall time and the writer's (this process's) CPU.  The file is kept under
``var/bench/annual_repeat/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.procs import sqlite_file
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.signing import file_sha256
from gateway.store.db import make_engine, upgrade
from mock_partners import files


def main(rows: int) -> None:
    work = Path("var/bench/annual_repeat")
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"health_2026_{rows}.csv"
    if not path.exists():
        files.write_csv(path, files.health_rows(2026, rows, 2026), files.HEALTH_HEADERS)
    with sqlite_file(work / "store.sqlite3") as url:
        upgrade(url)
        engine = make_engine(url)
        settings = Settings(database_url=url, batch_dir=work)
        print(f"{'run':>14} {'rows':>7} {'wall s':>7} {'writer CPU s':>12}")
        for run in ("first", "repeat"):
            wall, cpu = time.perf_counter(), time.process_time()
            batch = NewBatch(new_batch_id(), "health-bench", "health", "annual", "2026", path,
                             "csv", path.stat().st_size, file_sha256(path))
            record_batch(engine, batch, actor="bench")
            BatchProcessor(engine, settings).run_once()
            print(f"{run:>14} {rows:>7} {time.perf_counter() - wall:>7.1f} "
                  f"{time.process_time() - cpu:>12.1f}")
        engine.dispose()


if __name__ == "__main__":  # the guard matters: parse workers are spawned and re-import this
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60_000)
