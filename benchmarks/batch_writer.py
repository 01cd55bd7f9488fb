"""The batch writer's CPU a row, without the parse workers or the file: for A/B of the writer.

``python -m benchmarks.batch_writer FILE [ROWS] [REPEATS]`` parses the first ROWS rows of a
health CSV once, in this process, then ingests them REPEATS times into a fresh SQLite store,
chunk by chunk through the batch processor's own chunk step (checkpoint included), and prints
one JSON line: the writer's thread CPU µs a row, best and median of the repeats.

Thread CPU, not wall time: on a shared 2-core machine wall time measures the neighbours; the
writer's own CPU moves far less with them.  Compare two versions of the writer by running this
alternately against each (the parse is the same code in both, so it is not timed).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from benchmarks import procs

WORK = procs.ROOT / "var" / "bench" / "writer"


def _store(n: int) -> tuple[Any, str]:
    from gateway.store.db import make_engine, upgrade

    WORK.mkdir(parents=True, exist_ok=True)
    db = WORK / f"writer-{n}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    upgrade(url)
    return make_engine(url), url


def main(path: Path, rows: int, repeats: int) -> dict[str, Any]:
    from adapters.tabular import iter_rows
    from gateway.batch_parse import ParseJob, parse_rows, rules_for, to_item
    from gateway.batch_requests import NewBatch, new_batch_id, record_batch
    from gateway.batches import BatchProcessor
    from gateway.config import Settings
    from gateway.person_keys import PersonKeys
    from gateway.pipeline.ingest import paused_gc
    from gateway.pipeline.items import PartnerRef
    from gateway.signing import file_sha256

    engine, url = _store(0)
    settings = Settings(database_url=url, batch_dir=WORK)
    job = ParseJob("health", "annual", "2026", "health-bench", None,
                   settings.health_hours_per_credit, settings.finance_hours_per_credit, url,
                   datetime.now(UTC), person_keys=PersonKeys(settings.person_key_secret))
    source = list(islice(iter_rows(path, "csv"), rows))
    size = settings.batch_chunk_rows
    shipped = [parse_rows(job, source[i:i + size], rules_for(job))
               for i in range(0, len(source), size)]
    partner = PartnerRef("health-bench", "health", None)
    spent: list[float] = []
    for n in range(repeats):
        engine, url = _store(n + 1)
        processor = BatchProcessor(engine, Settings(database_url=url, batch_dir=WORK))
        batch = NewBatch(new_batch_id(), "health-bench", "health", "annual", "2026", path, "csv",
                         path.stat().st_size, file_sha256(path))
        record_batch(engine, batch, actor="bench")
        assert processor.claim(batch.batch_id) is not None
        processor._rules = rules_for(job)
        started = time.thread_time()
        for chunk in shipped:
            with paused_gc():
                processor._ingest_chunk(batch.batch_id, partner, [to_item(s) for s in chunk])
        spent.append(time.thread_time() - started)
        engine.dispose()
    per_row = [s / len(source) * 1e6 for s in spent]
    return {"rows": len(source), "repeats": repeats, "writer_us_per_row_best": min(per_row),
            "writer_us_per_row_median": statistics.median(per_row)}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(Path(args[0]), int(args[1]) if len(args) > 1 else 20_000,
                          int(args[2]) if len(args) > 2 else 3)))
