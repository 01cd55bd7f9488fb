"""One measured run, in its own process so peak RSS is this run's alone.

``python -m benchmarks.batch_ingest baseline|gateway FILE WORKDIR`` prints one JSON line:
rows, seconds, rows_per_s, peak_rss_mb, and the CPU seconds of this process (the writer) and of
its parse workers: the workers' code is the same in an A/B of the writer, so their CPU shows how
fast the (shared, noisy) machine was during the run.

- ``baseline``: the same file read and parsed by the csv module and bulk-inserted into SQLite
  (same pragmas as the gateway's store), with no validation, dedup, outbox or audit.
- ``gateway``: the gateway's own batch path — record the batch, then the BatchProcessor reads,
  parses, validates, converts credits, dedups and writes records, versions, outbox rows,
  natural keys and hash-chained audit events, chunk by chunk.
"""

from __future__ import annotations

import csv
import json
import resource
import sqlite3
import sys
import time
from pathlib import Path


def _own_peak_kb() -> int:
    """Peak RSS of this process in kB: ``VmHWM``, which starts afresh at exec.

    ``ru_maxrss`` does not: Linux folds in the memory of the process that forked us, so a
    large ``benchmarks.run`` (after the HTTP benches) showed up as this run's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_mb() -> float:
    """Peak RSS of this process or of its largest parse worker, whichever is higher."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(_own_peak_kb(), children) / 1024


def baseline(path: Path, workdir: Path) -> dict[str, float]:
    db = workdir / "baseline.sqlite3"
    db.unlink(missing_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute("PRAGMA wal_autocheckpoint=20000")
    started = time.perf_counter()
    rows = 0
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        columns = ", ".join(f"c{i}" for i in range(len(header)))
        conn.execute(f"CREATE TABLE rows (id INTEGER PRIMARY KEY, {columns})")
        sql = f"INSERT INTO rows ({columns}) VALUES ({', '.join('?' * len(header))})"
        chunk: list[list[str]] = []
        for record in reader:
            if not record:
                continue
            chunk.append(record[: len(header)] + [""] * (len(header) - len(record)))
            if len(chunk) == 2000:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(sql, chunk)
                conn.execute("COMMIT")
                rows += len(chunk)
                chunk = []
        if chunk:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, chunk)
            conn.execute("COMMIT")
            rows += len(chunk)
    seconds = time.perf_counter() - started
    conn.close()
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_mb": _peak_rss_mb()}


def gateway(path: Path, workdir: Path) -> dict[str, float]:
    from sqlalchemy import func, select

    from gateway.batch_requests import NewBatch, new_batch_id, record_batch
    from gateway.batches import BatchProcessor
    from gateway.config import Settings
    from gateway.signing import file_sha256
    from gateway.store.db import make_engine, upgrade
    from gateway.store.tables import batches

    db = workdir / "gateway.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    upgrade(url)
    engine = make_engine(url)
    settings = Settings(database_url=url, batch_dir=workdir)
    started, cpu = time.perf_counter(), time.process_time()
    batch = NewBatch(new_batch_id(), "health-bench", "health", "annual", "2026", path, "csv",
                     path.stat().st_size, file_sha256(path))
    record_batch(engine, batch, actor="bench")
    BatchProcessor(engine, settings).run_once()
    seconds, writer_cpu = time.perf_counter() - started, time.process_time() - cpu
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    with engine.connect() as conn:
        row = conn.execute(select(batches).where(batches.c.batch_id == batch.batch_id)).mappings().one()
        rows = int(row["rows_total"] or 0)
        status = row["status"]
        assert status == "done", f"batch ended {status}: {row['error']}"
        assert conn.execute(select(func.count()).select_from(batches)).scalar_one() == 1
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_mb": _peak_rss_mb(), "writer_cpu_s": writer_cpu,
            "workers_cpu_s": workers.ru_utime + workers.ru_stime, "accepted": int(row["accepted"]),
            "rejected": int(row["rejected"])}


if __name__ == "__main__":  # the guard matters: parse workers are spawned and re-import this
    mode, file, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    result = baseline(file, work) if mode == "baseline" else gateway(file, work)
    print(json.dumps(result))
