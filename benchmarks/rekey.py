"""Migration 0020 (person keys re-keyed under PERSON_KEY_SECRET) on a full store: how long.

0020 is not a rolling release (docs/operations.md): every replica is stopped while it runs, so
the operator needs its time at the store's size.

``python -m benchmarks.rekey build ROWS [URL]`` ingests a ROWS-row health annual CSV (seeded,
``mock_partners.files.health_rows``) through the gateway's batch path into URL (default
``var/bench/rekey/rekey.sqlite3``; a PostgreSQL URL must name an empty database).
``python -m benchmarks.rekey time [URL]`` rewinds the store to 0019 (drops ``person_key_check``
and stamps 0019, so the values are taken for plain digests: the work is the same) and times
``upgrade(url, "0020")``, printing one JSON line: records, records re-keyed, seconds.  The
rewound store is only good for timing again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks import procs

WORK = procs.ROOT / "var" / "bench" / "rekey"
DEFAULT_URL = f"sqlite:///{WORK / 'rekey.sqlite3'}"


def build(rows: int, url: str) -> None:
    from gateway.batch_requests import NewBatch, new_batch_id, record_batch
    from gateway.batches import BatchProcessor
    from gateway.config import Settings
    from gateway.signing import file_sha256
    from gateway.store.db import make_engine, upgrade
    from mock_partners import files

    WORK.mkdir(parents=True, exist_ok=True)
    if url == DEFAULT_URL:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{WORK / 'rekey.sqlite3'}{suffix}").unlink(missing_ok=True)
    path = WORK / f"health_annual_{rows}.csv"
    if not path.exists():
        files.write_csv(path, files.health_rows(2026, rows, 2026), files.HEALTH_HEADERS,
                        encoding="utf-8")
    upgrade(url)
    engine = make_engine(url)
    batch = NewBatch(new_batch_id(), "health-rekey", "health", "annual", "2026", path, "csv",
                     path.stat().st_size, file_sha256(path))
    record_batch(engine, batch, actor="bench")
    BatchProcessor(engine, Settings(database_url=url, batch_dir=WORK)).run_once()
    engine.dispose()


def rewind_and_time(url: str) -> dict[str, float]:
    from sqlalchemy import func, select, text

    from gateway.store.db import make_engine, upgrade
    from gateway.store.tables import records

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS person_key_check"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0019'"))
        count = int(conn.execute(select(func.count()).select_from(records)).scalar_one())
        before = conn.execute(select(records.c.person_key).order_by(records.c.record_id)
                              .limit(1)).scalar_one()
    started = time.perf_counter()
    upgrade(url, "0020")
    seconds = time.perf_counter() - started
    with engine.connect() as conn:
        after = conn.execute(select(records.c.person_key).order_by(records.c.record_id)
                             .limit(1)).scalar_one()
    engine.dispose()
    assert after != before, "0020 re-keyed nothing"
    return {"records": count, "seconds": round(seconds, 2),
            "records_per_s": round(count / seconds)}


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "build":
        build(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else DEFAULT_URL)
    else:
        print(json.dumps(rewind_and_time(sys.argv[2] if len(sys.argv) > 2 else DEFAULT_URL)))
