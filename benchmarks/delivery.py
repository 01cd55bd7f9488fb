"""(b) Delivery to the mock at zero faults, and (c) two workers against one on PostgreSQL.

The outbox is filled first, untimed: seeded canonical records go through the gateway's own
ingest (in this process), then every pending row is *held* — parked under a delivery batch
scheduled far in the future, which no worker claims.  The ``ce-gateway worker`` processes start
against the held backlog; once each has logged that it runs, one statement releases the rows
and the clock starts; it stops when no outbox row is pending.  So process start-up is not
timed, and the workers meet the backlog exactly as after a restart.

The baseline is the mock management system's own capacity (a real uvicorn process, no faults):
a bare httpx client posts the very bodies a worker builds (500 records a request, in outbox
order) with fresh Idempotency-Keys, as many at a time as there are workers.  Afterwards the mock
is reset, so the workers' records are applied fresh too.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine, delete, func, insert, select, text, update

from benchmarks import procs
from benchmarks.api_ingest import make_records, year_env, year_extension
from gateway.config import Settings
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.rules_tables import RulesConfig
from gateway.reference import ReferenceCache
from gateway.store.db import make_engine, upgrade
from gateway.store.tables import delivery_batches, outbox, record_versions

HOLD = "bench-hold"
FAR = datetime(2999, 1, 1, tzinfo=UTC)
INTAKE = "/api/v1/ce-records/batch"
POLL_SECONDS = "0.05"  # an idle worker looks again after 50 ms (default 0.5 s)


@dataclass
class Drain:
    """One timed drain of the backlog."""

    workers: int
    records: int
    seconds: float
    requests: int
    peak_rss_mb: float  # the largest worker's

    @property
    def rate(self) -> float:
        return self.records / self.seconds


@dataclass
class Capacity:
    """The mock's own capacity for the same bodies, from a bare client."""

    concurrency: int
    records: int
    requests: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def batch_size() -> int:
    return Settings().delivery_batch_size


def prefill(url: str, count: int) -> None:
    """Ingest ``count`` seeded records (untimed) and hold their outbox rows."""
    upgrade(url)
    engine = make_engine(url)
    try:
        settings = Settings(database_url=url, year_close_extensions=year_extension())
        partner = PartnerRef("bench-canonical", "canonical")
        records = make_records(count, "DLV", seed=20261127)
        for start in range(0, count, 1000):
            config = RulesConfig.from_settings(settings)
            rules = RulesContext(ReferenceCache(engine, config.keys).current(), config)
            answers = ingest(engine, partner, records[start: start + 1000], rules=rules)
            bad = [a for a in answers if a.status.value != "accepted"]
            if bad:
                raise RuntimeError(f"prefill: {len(bad)} records not accepted, e.g. {bad[0]}")
        hold(engine)
    finally:
        engine.dispose()


def hold(engine: Engine) -> None:
    """Park every pending outbox row under a batch due in 2999, and forget other batches."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(delete(delivery_batches))
        conn.execute(insert(delivery_batches).values(
            batch_key=HOLD, status="pending", attempts=0, next_attempt_at=FAR, created_at=now,
            updated_at=now))
        conn.execute(update(outbox).values(
            status="pending", batch_key=HOLD, attempts=0, error_code=None, last_error=None,
            receipt_status=None, receipt_no=None, delivered_at=None, updated_at=now))
    if engine.dialect.name == "postgresql":  # the previous run's dead tuples go first
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE outbox"))
            conn.execute(text("VACUUM ANALYZE delivery_batches"))


def release(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.batch_key == HOLD).values(batch_key=None))
        conn.execute(delete(delivery_batches).where(delivery_batches.c.batch_key == HOLD))


def pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox)
                                .where(outbox.c.status == "pending")).scalar_one())


def bodies(engine: Engine, per_request: int) -> list[bytes]:
    """The request bodies a worker builds: payloads in outbox order, ``per_request`` a body."""
    with engine.connect() as conn:
        payloads = [r.payload for r in conn.execute(
            select(record_versions.c.payload).select_from(outbox.join(
                record_versions, (record_versions.c.record_id == outbox.c.record_id)
                & (record_versions.c.version == outbox.c.version))).order_by(outbox.c.id))]
    return [b'{"records":[' + b",".join(p.encode() for p in payloads[i: i + per_request]) + b"]}"
            for i in range(0, len(payloads), per_request)]


def mock_capacity(mock_url: str, payloads: list[bytes], records: int,
                  concurrency: int) -> Capacity:
    """Post every body with a fresh Idempotency-Key, ``concurrency`` at a time; then reset."""
    limits = httpx.Limits(max_connections=concurrency)
    with httpx.Client(base_url=mock_url, timeout=120, limits=limits) as client:

        def post(body: bytes) -> int:
            response = client.post(INTAKE, content=body, headers={
                "Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"})
            response.raise_for_status()
            return sum(r["status"] == "accepted" for r in orjson.loads(response.content)["receipts"])

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            accepted = sum(pool.map(post, payloads))
        seconds = time.perf_counter() - started
        if accepted != records:
            raise RuntimeError(f"the mock accepted {accepted} of {records} records")
        client.post("/_mock/reset").raise_for_status()
    return Capacity(concurrency, records, len(payloads), seconds)


def drain(engine: Engine, db_url: str, mock_url: str, records: int, workers: int,
          logs: Path, label: str) -> Drain:
    """Start ``workers`` worker processes, release the held backlog, time it to empty."""
    env = procs.gateway_env(db_url, CE_GATEWAY_DOWNSTREAM_URL=mock_url,
                            CE_GATEWAY_DELIVERY_POLL_SECONDS=POLL_SECONDS, **year_env())
    group = [procs.worker_proc(env, logs, f"worker-{label}-{i + 1}of{workers}")
             for i in range(workers)]
    with procs.running(*group):
        for w in group:
            procs.poll(partial(_started, w), 60, f"{w.name} to start", interval=0.05)
        release(engine)
        started = time.perf_counter()
        procs.poll(lambda: pending(engine) == 0 or _all_dead(group), 1800, "the backlog to drain")
        seconds = time.perf_counter() - started
        rss = max(w.peak_rss_mb() for w in group)
    requests = _verify(engine, mock_url, records)
    return Drain(workers, records, seconds, requests, rss)


def _started(worker: procs.Proc) -> bool:
    if not worker.alive():
        raise RuntimeError(f"{worker.name} exited:\n{worker.tail()}")
    log = worker.log_path.read_text(errors="replace")
    return "delivery worker" in log and "started" in log


def _all_dead(group: list[procs.Proc]) -> bool:
    if all(not w.alive() for w in group):
        raise RuntimeError("every worker exited:\n" + "\n".join(w.tail() for w in group))
    return False


def _verify(engine: Engine, mock_url: str, records: int) -> int:
    """Every record delivered once, in order; returns how many intake requests it took."""
    with engine.connect() as conn:
        by_status: dict[str, int] = dict(conn.execute(select(outbox.c.status, func.count())
                                      .group_by(outbox.c.status)).tuples().all())
    if by_status != {"delivered": records}:
        raise RuntimeError(f"outbox after the drain: {by_status}")
    mock: dict[str, Any] = httpx.get(f"{mock_url}/_mock/applied", timeout=60).json()
    applied = {(a["record_id"], a["version"]) for a in mock["applied"]}
    if len(applied) != records or mock["double_applied"] or mock["out_of_order"]:
        raise RuntimeError(f"the mock applied {len(applied)} of {records}, double "
                           f"{len(mock['double_applied'])}, out of order {len(mock['out_of_order'])}")
    httpx.post(f"{mock_url}/_mock/reset", timeout=30).raise_for_status()
    return int(mock["requests"]["total"])


def run_delivery(backend: str, workdir: Path, count: int) -> dict[str, Any]:
    """(b): one worker draining ``count`` records to the mock, against the mock's capacity."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with procs.store(backend, workdir, "delivery") as url:
        prefill(url, count)
        engine = make_engine(url)
        mock = procs.uvicorn_server(f"mock-{backend}", "mock_partners.ce_system:create_app", {},
                                    logs)
        try:
            with procs.running(mock):
                capacity = mock_capacity(mock.url, bodies(engine, batch_size()), count, 1)
                worker = drain(engine, url, mock.url, count, 1, logs, backend)
                mock_rss = mock.peak_rss_mb()
        finally:
            engine.dispose()
    return {"backend": backend, "capacity": capacity, "worker": worker, "mock_rss_mb": mock_rss,
            "ratio": worker.rate / capacity.rate}


def run_scaling(workdir: Path, count: int) -> dict[str, Any]:
    """(c): the same PostgreSQL backlog drained by one worker process, then by two."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with procs.store("postgres", workdir, "scaling") as url:
        prefill(url, count)
        engine = make_engine(url)
        mock = procs.uvicorn_server("mock-scaling", "mock_partners.ce_system:create_app", {},
                                    logs)
        try:
            with procs.running(mock):
                payloads = bodies(engine, batch_size())
                capacity = {n: mock_capacity(mock.url, payloads, count, n) for n in (1, 2)}
                one = drain(engine, url, mock.url, count, 1, logs, "pg-scaling")
                hold(engine)
                two = drain(engine, url, mock.url, count, 2, logs, "pg-scaling")
        finally:
            engine.dispose()
    return {"capacity": capacity, "one": one, "two": two, "scaling": one.seconds / two.seconds}
