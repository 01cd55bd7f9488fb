"""What writers on one person's capped hours cost each other, on PostgreSQL.

``python -m benchmarks.contention [THREADS] [REQUESTS] [RECORDS]`` (default 8 threads × 40
requests × 5 papers) runs the same ingest twice into a fresh schema of the PostgreSQL server
named by ``BENCH_POSTGRES_URL`` or ``CE_GATEWAY_TEST_POSTGRES_URL``:

- ``apart``: every thread writes papers of its own people, so no two writers share a cap group
  (R10) or an activity;
- ``together``: every thread writes papers of the same four people, so every request locks
  cap groups another thread holds, and re-issues records of theirs.

It prints records/s, p50/p99 of one request and the writers' runs again by cause
(``ce_gateway_writer_retries_total``), and checks that each person's papers still credit
``min(20 h, sum)`` (R10).  Threads in one process share a GIL, so the figure is a floor for
what the ``together`` case costs against ``apart``, not a throughput of the gateway.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from benchmarks.capped_chunks import paper
from benchmarks.procs import postgres_base, postgres_schema
from gateway.metrics import WRITER_RETRIES
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.db import make_engine, upgrade
from gateway.store.tables import records
from mock_partners.generators import make_person

NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
CAP = Decimal(20)


def _retries() -> dict[str, float]:
    return {s.labels["cause"]: s.value for m in WRITER_RETRIES.collect()
            for s in m.samples if s.name.endswith("_total")}


def run(url: str, mode: str, threads: int, requests: int, per_request: int) -> dict[str, Any]:
    engine = make_engine(url)
    rng = random.Random(mode)
    shared = [make_person(rng) for _ in range(4)]
    own = [[make_person(rng) for _ in range(4)] for _ in range(threads)]
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        people = shared if mode == "together" else own[t]
        partner = PartnerRef(f"bench-{mode}-{t}", "canonical")
        local: list[float] = []
        try:
            for r in range(requests):
                subs = [paper(f"{t}-{r}-{i}", people[(r + i) % len(people)], r * per_request + i,
                              title=f"高寒草甸退化机理研究（{t}-{r}-{i}）")
                        for i in range(per_request)]
                started = time.perf_counter()
                ingest(engine, partner, subs, now=NOW)
                local.append(time.perf_counter() - started)
        except BaseException as exc:  # noqa: BLE001 - reported below, the run fails
            errors.append(exc)
        with lock:
            latencies.extend(local)

    before = _retries()
    started = time.perf_counter()
    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    after = _retries()
    totals: dict[str, tuple[int, Decimal]] = {}
    with engine.connect() as conn:
        for row in conn.execute(select(records.c.person_key, records.c.credited_hours)
                                .where(records.c.activity_type == "paper",
                                       records.c.status == "accepted")):
            count, total = totals.get(row.person_key, (0, Decimal(0)))
            totals[row.person_key] = (count + 1, total + Decimal(row.credited_hours))
    engine.dispose()
    for person_key, (count, total) in totals.items():  # papers of 10 h each: min(cap, 10 × n)
        assert total == min(CAP, Decimal(10) * count), (person_key, count, total)
    latencies.sort()
    n = threads * requests * per_request
    return {"mode": mode, "records": n, "seconds": seconds, "records_per_s": n / seconds,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
            "retries": {k: int(after.get(k, 0) - before.get(k, 0)) for k in after
                        if after.get(k, 0) != before.get(k, 0)}}


def main(threads: int, requests: int, per_request: int) -> int:
    base = postgres_base()
    if base is None:
        print("contention needs PostgreSQL: set BENCH_POSTGRES_URL or CE_GATEWAY_TEST_POSTGRES_URL")
        return 2
    print(f"{'mode':>9} {'records':>8} {'s':>6} {'rec/s':>7} {'p50 ms':>7} {'p99 ms':>7}  runs again")
    for mode in ("apart", "together"):
        with postgres_schema(base) as url:
            upgrade(url)
            r = run(url, mode, threads, requests, per_request)
        print(f"{r['mode']:>9} {r['records']:>8} {r['seconds']:>6.1f} {r['records_per_s']:>7.0f} "
              f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f}  {r['retries'] or '—'}")
    return 0


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:4]]
    sys.exit(main(*(args + [8, 40, 5][len(args):])))
