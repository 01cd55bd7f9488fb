"""Scale-out under faults: replicas and workers sharing one PostgreSQL (SPEC §7 "Scale-out").

What lives here:

* **Lease fencing** (both stores, fast, in-process): a worker whose lease ran out while it was
  still busy must not overwrite what the worker that took the lease over decided — neither a
  delivery batch's outcome nor a batch file's checkpoint.  A scheduled job runs once an
  interval however many workers tick.  Forming a delivery batch on a fresh PostgreSQL outbox
  (no statistics yet) stays linear in the backlog.
* **Clusters of real processes** (PostgreSQL only): ``serve --no-worker`` replicas and
  ``ce-gateway worker`` processes on one schema, with the mock management system injecting
  503s, 429s, lost replies and an outage, and workers SIGKILLed mid-lease.  What the mock
  applied is compared with what the partners were acknowledged: every acknowledged record
  version exactly once, versions of a record in order.

The clusters run scaled down in ``make test``; ``make soak`` (``CE_GATEWAY_SOAK=1``) runs the
full sizes of issue 6: 20,000 records through 2 replicas + 2 workers, a 100,000-row batch.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, create_engine, func, select, update
from sqlalchemy import event as sqlalchemy_event

from adapters.health import HealthAdapter
from gateway import audit
from gateway.accounts import Partner
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.batches import BatchProcessor, LeaseLost
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.demo import free_port
from gateway.metrics import CIRCUIT_VALUES
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.scheduling import Job, run_job
from gateway.signing import SigningClient, file_sha256, signed_headers
from gateway.store.db import make_engine, normalize_url
from gateway.store.tables import (
    audit_events,
    batch_errors,
    batches,
    delivery_batches,
    job_locks,
    outbox,
    records,
)
from mock_partners import generators as gen
from mock_partners.ce_system import Faults, MockState, create_app
from tests.conftest import PG_ENV, SECRET_KEY
from tests.e2e.test_batch_crash import (
    _children,
    _kill_orphans,
    assert_each_row_once,
    health_file,
    open_ce_year,
    upload_and_wait,
)
from tests.support.files import another_export
from tests.support.servers import (
    GatewayProcess,
    WorkerProcess,
    poll,
    start_all,
    uvicorn_thread,
)

SOAK = os.environ.get("CE_GATEWAY_SOAK") == "1"
YEAR = open_ce_year()
COUNTS = ("accepted", "duplicate", "corrected", "conflict", "rejected")
needs_postgres = pytest.mark.skipif(
    not os.environ.get(PG_ENV),
    reason=f"several replicas and workers share one store only on PostgreSQL: set {PG_ENV} "
           "(e.g. postgresql://postgres@127.0.0.1/test)")
soak_only = pytest.mark.skipif(not SOAK, reason="full-size run: make soak (CE_GATEWAY_SOAK=1)")


class Clock:
    """A wall clock the test moves by hand (the delivery worker's ``clock``)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _mock(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/_mock/applied", timeout=30).json()
    return body


def _batch_row(engine: Engine, key: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(delivery_batches)
                                 .where(delivery_batches.c.batch_key == key)).mappings().one())


def _outbox_status(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(outbox.c.status)).scalars())


# -- lease fencing: a worker that lost its lease changes nothing --------------------------------

Workers = tuple[Clock, DeliveryWorker, DeliveryWorker, DeliveryWorker]


@pytest.fixture
def workers(db_url: str, mock_ce: tuple[str, Faults],
            make_settings: Callable[..., Settings]) -> Iterator[Workers]:
    """Workers A, B, C on one clock: 5 s leases, one try an attempt, one attempt at most."""
    clock = Clock()
    a, b, c = (DeliveryWorker(make_engine(db_url), make_settings(
        db_url, mock_ce[0], delivery_lease_seconds=5, inline_retries=1, delivery_max_attempts=1),
        clock=clock, name=name) for name in ("worker-a", "worker-b", "worker-c"))
    yield clock, a, b, c
    for worker in (a, b, c):
        worker.close()
        worker.engine.dispose()


def _queue(engine: Engine, partner: Partner, n: int) -> None:
    rng = random.Random(5)
    answers = ingest(engine, PartnerRef(partner.partner_id, "canonical"),
                     [gen.canonical_submission(rng, f"F-{i}") for i in range(n)])
    assert {a.status for a in answers} == {"accepted"}


def test_a_stale_worker_cannot_dead_letter_what_the_new_lease_holder_delivered(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        workers: Workers) -> None:
    url, faults = mock_ce
    clock, a, b, _ = workers
    _queue(engine, new_partner(engine), 3)
    held = a.claim()  # A claims, then stalls (a long GC pause, a slow network) past its lease
    assert held is not None and len(held.rows) == 3
    clock.advance(10)
    assert b.run_once() == 3  # B takes the expired lease over and delivers the batch
    assert _outbox_status(engine) == {"delivered": 3}

    faults.start_outage()  # A's late attempt fails: its only attempt (max 1) is used up
    assert a.deliver(held) == 3
    faults.stop_outage()
    # What the downstream applied stays delivered; A's stale failure changes nothing.
    assert _outbox_status(engine) == {"delivered": 3}
    assert _batch_row(engine, held.batch_key)["status"] == "done"
    snap = _mock(url)
    assert snap["double_applied"] == [] and len(snap["applied"]) == 3
    with engine.connect() as conn:
        dead = conn.execute(select(func.count()).select_from(audit_events)
                            .where(audit_events.c.kind == "dead")).scalar_one()
        assert dead == 0
        assert audit.verify(conn).ok


def test_a_stale_worker_cannot_release_a_lease_another_worker_holds(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        workers: Workers) -> None:
    url, faults = mock_ce
    clock, a, b, c = workers
    a.settings = b.settings.model_copy(update={"delivery_max_attempts": 5})
    _queue(engine, new_partner(engine), 2)
    held = a.claim()
    assert held is not None
    clock.advance(10)
    taken = b.claim()  # B holds the lease now and is about to send
    assert taken is not None and taken.batch_key == held.batch_key

    faults.start_outage()
    a.deliver(held)  # A's stale failure would schedule a retry in 1 s and clear B's lease
    faults.stop_outage()
    row = _batch_row(engine, held.batch_key)
    assert row["lease_owner"] == "worker-b" and row["attempts"] == 0
    clock.advance(2)  # B's lease (5 s) has 3 s left: nobody else may take the batch
    assert c.claim() is None

    assert b.deliver(taken) == 2
    assert _outbox_status(engine) == {"delivered": 2}
    assert _mock(url)["double_applied"] == []


def _health_batch(engine: Engine, tmp_path: Path, partner: Partner, n: int,
                  seed: int = 17) -> tuple[str, set[str], int]:
    path, good, bad = health_file(tmp_path, n, seed, bad_ratio=0.02)
    batch_id = new_batch_id()
    record_batch(engine, NewBatch(batch_id, partner.partner_id, "health", "monthly", f"{YEAR}-03",
                                  path, "csv", path.stat().st_size, file_sha256(path)), "test")
    return batch_id, good, len(bad)


def test_a_batch_processor_that_lost_its_lease_commits_no_chunk(
        engine: Engine, tmp_path: Path, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings], db_url: str) -> None:
    partner = new_partner(engine, adapter="health")
    batch_id, good, bad = _health_batch(engine, tmp_path, partner, 600)
    settings = make_settings(db_url, batch_chunk_rows=200, batch_parse_workers=0,
                             batch_dir=tmp_path / "batches")
    a = BatchProcessor(engine, settings, name="proc-a")
    b = BatchProcessor(engine, settings, name="proc-b")
    stale = a.claim()  # A claims the file, then stalls past its lease
    assert stale is not None and stale["batch_id"] == batch_id
    with engine.begin() as conn:
        conn.execute(update(batches).where(batches.c.batch_id == batch_id)
                     .values(lease_until=datetime.now(UTC) - timedelta(seconds=1)))
    fresh = b.claim()
    assert fresh is not None and fresh["batch_id"] == batch_id
    b.process(fresh)

    with pytest.raises(LeaseLost):
        a.process(stale)  # A wakes up: its first chunk must not commit
    assert a.run_once() is False  # and nothing is left to claim
    with engine.connect() as conn:
        final = dict(conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                     .mappings().one())
        stored = conn.execute(select(func.count()).select_from(records)).scalar_one()
        errors = conn.execute(select(func.count()).select_from(batch_errors)).scalar_one()
        finished = conn.execute(select(func.count()).select_from(audit_events)
                                .where(audit_events.c.kind == "batch_done")).scalar_one()
    assert final["status"] == "done" and final["lease_owner"] is None
    assert {k: int(final[k]) for k in COUNTS} == {
        "accepted": len(good), "duplicate": 0, "corrected": 0, "conflict": 0, "rejected": bad}
    assert stored == len(good) and errors == bad and finished == 1


def test_a_batch_processor_keeps_its_lease_while_a_chunk_takes_longer_than_the_lease(
        engine: Engine, tmp_path: Path, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings], db_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease measures whether the processor is alive, not how long a chunk takes.

    Renewed only at a chunk's commit, a lease shorter than a chunk (a year-end rush slows every
    chunk) let a second processor take the file over mid-chunk, and the first the file back
    mid-chunk in turn: fenced, nothing doubled, but no chunk ever committed.
    """
    partner = new_partner(engine, adapter="health")
    # A 5 s lease, renewed every third of it, and one 150-row chunk whose rows are read slowly
    # (a year-end rush; 50 ms a row: 7.5 s).  It was a 1 s lease and a 6,000-row chunk made slow
    # by its own work: on a loaded machine one SQLite commit of it took longer than the
    # renewals' slack, and the test failed for the machine, not the lease; then a 2 s lease,
    # which a renewal on the CI machine (four times slower than 2 idle cores) still outwaited.
    batch_id, good, bad = _health_batch(engine, tmp_path, partner, 150, seed=23)
    settings = make_settings(db_url, batch_chunk_rows=1000, batch_parse_workers=0,
                             batch_lease_seconds=5.0, batch_dir=tmp_path / "batches")
    parse = HealthAdapter.parse

    def slow_parse(self: HealthAdapter, raw: Any) -> Any:
        time.sleep(0.05)  # a slow chunk, not a synchronisation: the thief polls on its own
        return parse(self, raw)

    monkeypatch.setattr(HealthAdapter, "parse", slow_parse)
    worker = BatchProcessor(engine, settings, name="proc-a")
    thief = BatchProcessor(make_engine(db_url), settings, name="proc-b")
    stolen: list[str] = []
    done = threading.Event()

    def steal() -> None:
        while not done.is_set():
            claimed = thief.claim()
            if claimed is not None:
                stolen.append(claimed["batch_id"])
                return
            # Every 0.2 s: a lapsed lease is still seen at once, and the claims (each a
            # write transaction on SQLite) leave the renewals room on a loaded machine - polled
            # every 20 ms they starved them there, and the lease lapsed under a live processor.
            done.wait(0.2)

    claimed = worker.claim()
    assert claimed is not None
    watcher = threading.Thread(target=steal)
    watcher.start()
    try:
        started = time.monotonic()
        worker.process(claimed)  # one 150-row chunk: well over 5 s
        took = time.monotonic() - started
    finally:
        done.set()
        watcher.join()
        thief.engine.dispose()
    assert took > settings.batch_lease_seconds, "the chunk was quicker than the lease: nothing was tested"
    assert stolen == []
    with engine.connect() as conn:
        final = dict(conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                     .mappings().one())
    assert final["status"] == "done"
    assert (int(final["accepted"]), int(final["rejected"])) == (len(good), bad)


# -- a scheduled job runs once per interval, however many workers tick --------------------------

def test_a_scheduled_job_runs_once_per_interval_however_many_workers_tick(
        engine: Engine, make_settings: Callable[..., Settings], db_url: str) -> None:
    runs: list[int] = []
    job = Job("test:once-per-interval", lambda _e, _s: runs.append(1), lambda _s: 60)
    settings = make_settings(db_url)
    # M workers each tick every 60 s, at their own phase: A's tick runs the job ...
    assert run_job(engine, settings, job) is True
    # ... and B's tick a few seconds later finds this interval's run done, not merely finished.
    assert run_job(engine, settings, job) is False
    assert runs == [1]
    with engine.connect() as conn:
        held = conn.execute(select(job_locks.c.until).where(job_locks.c.name == job.name)).scalar()
    assert held is not None and held > datetime.now(UTC) + timedelta(seconds=45)
    # The next interval (the hold ends a little before the next due time): whoever ticks runs it.
    with engine.begin() as conn:
        conn.execute(update(job_locks).where(job_locks.c.name == job.name)
                     .values(until=datetime.now(UTC) - timedelta(seconds=1)))
    assert run_job(engine, settings, job) is True
    assert runs == [1, 1]


# -- forming a batch stays linear in the backlog ---------------------------------------------------

def _rows_touched(plan: dict[str, Any]) -> int:
    """Rows a plan node and its children produced or threw away, over all their loops."""
    loops = int(plan.get("Actual Loops", 1))
    own = (int(plan.get("Actual Rows", 0)) + int(plan.get("Rows Removed by Filter", 0))
           + int(plan.get("Rows Removed by Join Filter", 0))) * loops
    return own + sum(_rows_touched(child) for child in plan.get("Plans", []))


@pytest.mark.postgres
@needs_postgres
def test_forming_a_batch_never_compares_every_pending_row_with_every_other(
        postgres_url: str, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings]) -> None:
    """A fresh outbox has no statistics yet (the first burst of a deployment, a year-end rush).

    The check "is an earlier version of this record still undelivered?" once let PostgreSQL
    probe through the status index then: every pending row compared with every other, 0.6 s
    a claim at 2,000 pending and quadratic beyond.  It must use the (record_id, version) index.
    """
    engine = make_engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE outbox SET (autovacuum_enabled = false)")
    _queue(engine, new_partner(engine), 2000)
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "FOR UPDATE SKIP LOCKED" in statement and "EXISTS" in statement:
            statements.append((statement, params))

    worker = DeliveryWorker(engine, make_settings(postgres_url, delivery_batch_size=50))
    try:
        sqlalchemy_event.listen(engine, "before_cursor_execute", capture)
        claimed = worker.claim()
        sqlalchemy_event.remove(engine, "before_cursor_execute", capture)
        assert claimed is not None and len(claimed.rows) == 50
        [(statement, params)] = statements
        with engine.connect() as conn:
            [[explained]] = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).all()
            conn.rollback()
    finally:
        worker.close()
        engine.dispose()
    plan = (explained if isinstance(explained, list) else orjson.loads(explained))[0]["Plan"]
    touched = _rows_touched(plan)
    assert touched < 10 * 2000, f"{touched} rows touched to form one batch of 50 out of 2,000"


# -- clusters of real processes on one PostgreSQL ----------------------------------------------

class CountingMock(MockState):
    """The mock management system, noting when each intake request was judged and what it got.

    Instrumentation only: every answer is still the mock's own.  The time is taken under the
    mock's lock just before its outage check, not once the answer is made: a request judged
    before an outage began, whose 50 records were still being applied when it began, was once
    noted inside the outage as a 200 (seen on a loaded machine).
    """

    def __init__(self, faults: Faults) -> None:
        super().__init__(faults)
        self.calls: list[tuple[float, int, str]] = []  # (monotonic time, status, kind)

    def _intake(self, key: str | None, raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        at = time.monotonic()  # under the lock, just before the outage check
        replay = key is not None and key in self.replies
        status, body, headers = super()._intake(key, raw)
        error = str(body.get("error", ""))
        kind = ("lost_reply" if "reply lost" in error else "outage" if "outage" in error
                else "replayed" if status == 200 and replay else str(status))
        self.calls.append((at, status, kind))  # under the mock's lock
        return status, body, headers

    def tally(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        return Counter(kind for at, _, kind in list(self.calls) if since <= at < until)


@pytest.fixture
def counting_mock() -> Iterator[tuple[str, CountingMock]]:
    faults = Faults(seed=6)
    app = create_app(faults)
    state = CountingMock(faults)
    app.state.mock = state  # the routes read app.state.mock on every request
    with uvicorn_thread(app) as url:
        yield url, state


def _env(db_url: str, mock_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_DOWNSTREAM_URL": mock_url,
        "CE_GATEWAY_SECRET_KEY": SECRET_KEY, "CE_GATEWAY_BATCH_DIR": str(tmp_path / "batches"),
        # short leases, so a killed worker's batches come back within seconds
        "CE_GATEWAY_DELIVERY_LEASE_SECONDS": "2", "CE_GATEWAY_BATCH_LEASE_SECONDS": "3",
        "CE_GATEWAY_RETRY_SCHEDULE": "1", "CE_GATEWAY_DELIVERY_MAX_ATTEMPTS": "1000",
        "CE_GATEWAY_DELIVERY_POLL_SECONDS": "0.05", "CE_GATEWAY_INLINE_RETRY_MAX_WAIT_SECONDS": "0.2",
        "CE_GATEWAY_CIRCUIT_FAILURE_THRESHOLD": "20", "CE_GATEWAY_CIRCUIT_RESET_SECONDS": "0.5",
        "CE_GATEWAY_RATE_LIMIT_PER_MINUTE": "0",
        "CE_GATEWAY_PULL_INTERVAL_SECONDS": "0", "CE_GATEWAY_REFERENCE_SYNC_INTERVAL_SECONDS": "0",
        "CE_GATEWAY_RETENTION_INTERVAL_SECONDS": "0", "CE_GATEWAY_ALERT_INTERVAL_SECONDS": "0",
        **extra,
    }


@dataclass
class Cluster:
    """Replicas (``serve --no-worker``) and workers (``ce-gateway worker``) on one store."""

    env: dict[str, str]
    logs: Path
    replicas: list[GatewayProcess] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(self, replicas: int, workers: int, *worker_args: str) -> Cluster:
        self.logs.mkdir(exist_ok=True)
        self.replicas = [GatewayProcess(self.env, self.logs / f"replica-{i}.log", "--no-worker")
                         for i in range(replicas)]
        self.workers = [WorkerProcess(self.env, self.logs / f"worker-{i}.log",
                                      *(worker_args if i == 0 else ()))
                        for i in range(workers)]
        start_all(*self.replicas, *self.workers)
        return self

    def add_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.logs / f"worker-{len(self.workers)}.log").start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        orphans = [pid for w in self.workers if w.proc is not None for pid in _children(w.pid)]
        processes: list[GatewayProcess | WorkerProcess] = [*self.replicas, *self.workers]
        for process in processes:
            process.stop()
        _kill_orphans(orphans)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


def _reader(db_url: str) -> Engine:
    """The test's own reads: plain connections, no write locks."""
    return create_engine(normalize_url(db_url))


def _pending(store: Engine) -> int:
    with store.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox)
                                .where(outbox.c.status == "pending")).scalar_one())


def _queued(store: Engine) -> set[tuple[str, int]]:
    with store.connect() as conn:
        return {(r.record_id, int(r.version))
                for r in conn.execute(select(outbox.c.record_id, outbox.c.version))}


def _frozen_holding(store: Engine, worker: WorkerProcess) -> bool:
    """Freeze ``worker`` (SIGSTOP); leave it frozen if it holds a delivery lease, else thaw it.

    Checking a lease and then killing races with a fast worker finishing its batch in between;
    a frozen worker can neither finish nor release, so what it holds is what the kill orphans.
    """
    if not _leases_of(store, worker):
        return False
    os.kill(worker.pid, signal.SIGSTOP)
    # Stopped, and whatever it sent before it stopped (a COMMIT that releases its lease) done:
    # else the lease seen now may be gone by the kill ("the kill came too late").
    try:
        poll(lambda: _stopped(worker.pid) and not _busy_backends(store, worker.pid), 5,
             interval=0.005, what="the frozen worker's statements to settle")
    except AssertionError:  # a statement of its own waits on a lock: thaw, try another time
        os.kill(worker.pid, signal.SIGCONT)
        return False
    if _leases_of(store, worker):
        return True
    os.kill(worker.pid, signal.SIGCONT)
    return False


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (state ``T`` in /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def _busy_backends(store: Engine, pid: int) -> int:
    """PostgreSQL backends of ``pid``'s connections still running a statement."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    if not ports:
        return 0
    with store.connect() as conn:
        return int(conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND client_port = ANY(%s)",
            (ports,)).scalar_one())


def _leases_of(store: Engine, worker: WorkerProcess) -> set[str]:
    with store.connect() as conn:
        owners = conn.execute(select(delivery_batches.c.batch_key, delivery_batches.c.lease_owner)
                              .where(delivery_batches.c.status == "pending",
                                     delivery_batches.c.lease_owner.is_not(None))).all()
    return {key for key, owner in owners if worker.owns(owner)}


def _assert_exactly_once_in_order(state: MockState, expected: set[tuple[str, int]]) -> None:
    """What the mock applied is exactly ``expected``, each once, each record's versions rising."""
    snap = state.snapshot()
    applied = [(a["record_id"], int(a["version"])) for a in sorted(snap["applied"],
                                                                    key=lambda a: a["seq"])]
    assert snap["double_applied"] == []
    assert snap["key_mismatch"] == []
    assert snap["out_of_order"] == []
    assert len(applied) == len(set(applied)), "a record version was applied twice"
    missing, extra = expected - set(applied), set(applied) - expected
    assert not missing, f"{len(missing)} acknowledged versions never applied, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} applied versions nobody was acknowledged for"
    seen: dict[str, list[int]] = defaultdict(list)
    for record_id, version in applied:
        seen[record_id].append(version)
    bad = {rid: v for rid, v in seen.items() if v != list(range(1, len(v) + 1))}
    assert not bad, f"versions out of order or skipped: {list(bad.items())[:3]}"


@dataclass(frozen=True)
class Size:
    records: int
    corrected: int  # records that get a version 2 ...
    corrected_twice: int  # ... and of those, a version 3
    delivery_batch: int
    restart_killed: bool  # start a replacement worker (else the survivor takes over alone)


FAST = Size(records=2_000, corrected=200, corrected_twice=70, delivery_batch=50,
            restart_killed=False)
FULL = Size(records=20_000, corrected=2_000, corrected_twice=667, delivery_batch=100,
            restart_killed=True)


def _push(replicas: list[GatewayProcess], partner: Partner,
          requests: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Send the requests signed, alternating replicas, two at a time; every answer, in order."""
    answers: list[list[dict[str, Any]]] = [[] for _ in requests]

    def sender(lane: int) -> None:
        with SigningClient(replicas[lane % len(replicas)].url, partner.app_key, partner.secret,
                           timeout=120) as client:
            for i in range(lane, len(requests), 2):
                response = client.submit(requests[i])
                while response.status_code == 429:  # a partner rate limit: wait as told
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                    response = client.submit(requests[i])
                assert response.status_code == 200, response.text[:500]
                answers[i] = response.json()["results"]

    lanes = [threading.Thread(target=sender, args=(lane,)) for lane in range(2)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    assert all(answers), "a sender failed (see the assertion above)"
    return [a for batch in answers for a in batch]


def _in_requests(subs: list[dict[str, Any]], size: int = 1000) -> list[list[dict[str, Any]]]:
    return [subs[i:i + size] for i in range(0, len(subs), size)]


def _corrected(sub: dict[str, Any], quantity: str) -> dict[str, Any]:
    return {**sub, "claimed": {**sub["claimed"], "quantity": quantity}}


def run_replicas_and_workers_under_faults(size: Size, db_url: str, tmp_path: Path,
                                          mock: tuple[str, CountingMock],
                                          new_partner: Callable[..., Partner]) -> dict[str, Any]:
    mock_url, state = mock
    faults = state.faults
    faults.latency_ms = 20  # a request takes long enough for a worker to be caught holding it
    faults.error_rate = 0.05  # 503, not applied
    faults.rate_limit_every = 9  # 429 + Retry-After, not applied
    faults.lost_reply_rate = 0.1  # applied, then answered 503
    writer = make_engine(db_url)
    partner = new_partner(writer)
    writer.dispose()
    store = _reader(db_url)
    rng = random.Random(2026)
    subs = [gen.canonical_submission(rng, f"SC-{i:06d}") for i in range(size.records)]
    cluster = Cluster(_env(db_url, mock_url, tmp_path,
                           CE_GATEWAY_DELIVERY_BATCH_SIZE=str(size.delivery_batch)),
                      tmp_path / "logs")
    started = time.monotonic()
    acked: set[tuple[str, int]] = set()
    try:
        cluster.start(replicas=2, workers=2)
        victim = cluster.workers[0]
        pushed: dict[str, list[dict[str, Any]]] = {}

        def push_all() -> None:
            pushed["v1"] = _push(cluster.replicas, partner, _in_requests(subs))
            twice = [_corrected(s, "7") for s in subs[:size.corrected]]
            pushed["v2"] = _push(cluster.replicas, partner, _in_requests(twice))
            thrice = [_corrected(s, "5") for s in subs[:size.corrected_twice]]
            pushed["v3"] = _push(cluster.replicas, partner, _in_requests(thrice))

        partners = threading.Thread(target=push_all)
        partners.start()
        # SIGKILL one worker while it holds delivery leases, some deliveries already applied.
        poll(lambda: len(state.applied) >= size.delivery_batch * 2 and _frozen_holding(store, victim),
             120, interval=0.01, what="the victim worker frozen while it holds a lease")
        victim.kill9()
        killed_at = time.monotonic()
        orphaned = _leases_of(store, victim)
        assert orphaned, "the kill came too late to test anything"
        if size.restart_killed:  # the supervisor restarts it; it and the survivor share the work
            cluster.add_worker()
        partners.join()
        pushed_at = time.monotonic()
        assert set(pushed) == {"v1", "v2", "v3"}, "a partner request failed"
        expected = {"v1": "accepted", "v2": "corrected", "v3": "corrected"}
        for phase, answers in pushed.items():
            assert {a["status"] for a in answers} == {expected[phase]}, phase
            acked.update((a["record_id"], int(a["version"])) for a in answers)
        assert len(acked) == size.records + size.corrected + size.corrected_twice
        assert {v for _, v in acked} == {1, 2, 3}
        # Nonces live in the shared store: a request replayed to the other replica is refused.
        body = orjson.dumps({"records": [gen.canonical_submission(rng, "SC-REPLAYED")]})
        headers = {**signed_headers(partner.app_key, partner.secret, "POST", "/v1/records", body),
                   "Content-Type": "application/json"}
        first, replayed = (httpx.post(f"{r.url}/v1/records", content=body, headers=headers,
                                      timeout=30) for r in cluster.replicas)
        assert first.status_code == 200, first.text
        assert replayed.status_code == 401 and replayed.json()["error"]["code"] == "REPLAYED"
        [answer] = first.json()["results"]
        acked.add((answer["record_id"], int(answer["version"])))

        poll(lambda: _pending(store) == 0, 600, interval=0.2, what="the backlog to drain")
        drained_at = time.monotonic()
        assert _queued(store) == acked  # nothing queued beyond what partners were told
        _assert_exactly_once_in_order(state, acked)
        # Each version applied carries that version's content (answers come in input order).
        record_ids = [a["record_id"] for a in pushed["v1"]]
        for i, rid in enumerate(record_ids[:size.corrected]):
            quantities = [state.bodies[(rid, v)]["claimed"]["quantity"] for v in (1, 2)]
            assert quantities == [subs[i]["claimed"]["quantity"], "7"]
            if i < size.corrected_twice:
                assert state.bodies[(rid, 3)]["claimed"]["quantity"] == "5"
        assert _outbox_status(store) == {"delivered": len(acked)}

        # The killed worker's leases were taken over: finished by somebody else.
        with store.connect() as conn:
            taken = {key: conn.execute(select(delivery_batches.c.status)
                                       .where(delivery_batches.c.batch_key == key)).scalar_one()
                     for key in orphaned}
            actors = {str(e.actor) for e in conn.execute(
                select(audit_events.c.actor, audit_events.c.detail)
                .where(audit_events.c.kind == "delivered"))
                if orjson.loads(e.detail).get("batch") in orphaned}
            verified = audit.verify(conn)
        assert set(taken.values()) == {"done"}, taken
        assert actors and not any(victim.owns(a) for a in actors)
        assert verified.ok, verified.reason
        text = cluster.log_text()
        assert not any(s["person"]["id_number"] in text for s in subs), "an id number reached a log"
    finally:
        cluster.stop()
        store.dispose()
    faults_seen = state.tally()
    assert faults_seen["503"] > 0 and faults_seen["429"] > 0 and faults_seen["lost_reply"] > 0
    return {"records": size.records, "versions": len(acked), "orphaned_batches": len(orphaned),
            "push_s": round(pushed_at - started, 1), "kill_at_s": round(killed_at - started, 1),
            "drained_s": round(drained_at - started, 1), "mock": dict(faults_seen)}


@pytest.mark.postgres
@needs_postgres
def test_two_replicas_two_workers_sigkill_and_faults_apply_every_version_once_in_order(
        postgres_url: str, tmp_path: Path, counting_mock: tuple[str, CountingMock],
        new_partner: Callable[..., Partner]) -> None:
    figures = run_replicas_and_workers_under_faults(FAST, postgres_url, tmp_path, counting_mock,
                                                    new_partner)
    print(f"\nscale faults (make test): {figures}")


@pytest.mark.soak
@pytest.mark.postgres
@needs_postgres
@soak_only
def test_soak_20000_records_two_replicas_two_workers_under_faults(
        postgres_url: str, tmp_path: Path, counting_mock: tuple[str, CountingMock],
        new_partner: Callable[..., Partner]) -> None:
    figures = run_replicas_and_workers_under_faults(FULL, postgres_url, tmp_path, counting_mock,
                                                    new_partner)
    print(f"\nscale faults (soak): {figures}")


# -- an outage opens each worker's circuit: only probes go out, then the backlog drains ----------

def run_outage(records_n: int, outage_s: float, db_url: str, tmp_path: Path,
               mock: tuple[str, CountingMock], new_partner: Callable[..., Partner],
               threshold: int = 3) -> dict[str, Any]:
    mock_url, state = mock
    state.faults.latency_ms = 10
    reset, workers, batch_size = 1.0, 2, 50
    writer = make_engine(db_url)
    partner = new_partner(writer)
    rng = random.Random(77)
    acked: set[tuple[str, int]] = set()
    for start in range(0, records_n, 1000):
        subs = [gen.canonical_submission(rng, f"OU-{i:06d}")
                for i in range(start, min(start + 1000, records_n))]
        answers = ingest(writer, PartnerRef(partner.partner_id, "canonical"), subs)
        acked.update((str(a.record_id), int(a.version or 0)) for a in answers
                     if a.status == "accepted")
    writer.dispose()
    assert len(acked) == records_n
    store = _reader(db_url)
    cluster = Cluster(_env(db_url, mock_url, tmp_path,
                           CE_GATEWAY_DELIVERY_BATCH_SIZE=str(batch_size),
                           CE_GATEWAY_DELIVERY_LEASE_SECONDS="5",
                           CE_GATEWAY_CIRCUIT_FAILURE_THRESHOLD=str(threshold),
                           CE_GATEWAY_CIRCUIT_RESET_SECONDS=str(reset),
                           CE_GATEWAY_INLINE_RETRIES="3",
                           # in-call retries come fast: without the circuit a worker in an
                           # outage would send tens of requests a second
                           CE_GATEWAY_INLINE_RETRY_MAX_WAIT_SECONDS="0.05"),
                      tmp_path / "logs")
    metrics_port = free_port()

    def scrape() -> dict[str, float]:
        """The first worker's own /metrics (``ce-gateway worker --metrics-port``)."""
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        return {name: float(value) for name, _, value in
                (line.rpartition(" ") for line in text.splitlines() if not line.startswith("#"))}

    window: list[float] = []  # [began, ended): monotonic times inside the outage

    def outage_once_flowing() -> bool:
        """Start the outage as soon as deliveries flow, while most of the backlog still waits.

        Started here, in the poll's own check, so no scrape or query delays it.
        """
        if len(state.applied) < 200:
            return False
        before = time.monotonic()
        state.faults.start_outage(outage_s)  # a window that ends by itself
        # The mock answers "outage" until outage_s after the call (its own clock): a request
        # it notes at or after the call's return, and before `before + outage_s`, was answered
        # inside the outage.  Only the window's bounds are read from the clock, never the
        # moment the test happens to notice the end.  The end is read 50 ms early: the mock's
        # window runs on the wall clock (time.time), this one on the monotonic clock, and a
        # slewing wall clock may drift from it by a few milliseconds over the outage.
        window[:] = [time.monotonic(), before + outage_s - 0.05]
        return True

    try:
        cluster.start(0, workers, "--metrics-port", str(metrics_port))
        # The gauge has a sample once the worker's delivery loop is set up (just after it logs
        # that it started): closed, as deliveries begin.
        poll(lambda: scrape().get("ce_gateway_circuit_state") == CIRCUIT_VALUES["closed"], 30,
             what="the worker to report its circuit closed")
        poll(outage_once_flowing, 60, interval=0.01, what="deliveries to flow")
        began, ended = window
        # Nothing is applied during the outage but what each worker had in flight before it
        # began (one batch each): more pending than that is a backlog the outage holds up.
        pending = _pending(store)
        assert pending > workers * batch_size, (
            f"{pending} pending at the outage's start: the backlog drained before it")
        # Polled until the outage's end: a scrape is slow on a loaded machine, so the outage is
        # long enough for several.
        poll(lambda: scrape()["ce_gateway_circuit_state"] == CIRCUIT_VALUES["open"],
             ended - time.monotonic(), interval=0.02,
             what="the worker to report its circuit open during the outage")
        poll(lambda: not state.faults.in_outage(), outage_s + 10, interval=0.05,
             what="the outage window to end")
        poll(lambda: _pending(store) == 0, 300, interval=0.1, what="the backlog to drain")
        drained = time.monotonic()
        during = state.tally(began, ended)  # long after the window: every call in it is noted
        _assert_exactly_once_in_order(state, acked)
        assert _outbox_status(store) == {"delivered": records_n}
        after = scrape()
        assert after["ce_gateway_circuit_state"] == CIRCUIT_VALUES["closed"]
        assert after['ce_gateway_delivery_attempts_total{outcome="rate_limited"}'] > 0  # the 503s
        assert after['ce_gateway_delivery_attempts_total{outcome="delivered"}'] > 0
    finally:
        cluster.stop()
        store.dispose()
    sent = sum(during.values())
    # Per worker: `threshold` failures open its circuit (a request in flight at the start
    # counts among them), then one probe each time `reset` seconds have passed.
    bound = workers * (threshold + int(outage_s // reset) + 2)
    assert set(during) <= {"outage"}, during  # nothing but the outage answered meanwhile
    assert 0 < sent <= bound, f"{sent} requests during a {outage_s} s outage (bound {bound})"
    return {"records": records_n, "outage_s": outage_s, "pending_at_outage_start": pending,
            "requests_during_outage": sent, "bound": bound,
            "drain_after_outage_s": round(drained - ended, 1)}


@pytest.mark.postgres
@needs_postgres
def test_an_outage_opens_the_circuit_only_probes_go_out_and_the_backlog_drains(
        postgres_url: str, tmp_path: Path, counting_mock: tuple[str, CountingMock],
        new_partner: Callable[..., Partner]) -> None:
    figures = run_outage(1_000, 5.0, postgres_url, tmp_path, counting_mock, new_partner)
    print(f"\noutage (make test): {figures}")


@pytest.mark.soak
@pytest.mark.postgres
@needs_postgres
@soak_only
def test_soak_outage_of_ten_seconds_with_a_10000_record_backlog(
        postgres_url: str, tmp_path: Path, counting_mock: tuple[str, CountingMock],
        new_partner: Callable[..., Partner]) -> None:
    figures = run_outage(10_000, 10.0, postgres_url, tmp_path, counting_mock, new_partner)
    print(f"\noutage (soak): {figures}")


# -- SIGKILL the worker processing a batch file: another worker resumes it ------------------------

def run_batch_kill(n_rows: int, chunk_rows: int, db_url: str, tmp_path: Path,
                   mock: tuple[str, CountingMock], new_partner: Callable[..., Partner],
                   *, kill_after_row: int, reupload: bool) -> dict[str, Any]:
    mock_url, state = mock
    state.faults.lost_reply_rate = 0.05
    writer = make_engine(db_url)
    partner = new_partner(writer, adapter="health")
    writer.dispose()
    path, good, bad = health_file(tmp_path, n_rows)
    store = _reader(db_url)
    cluster = Cluster(_env(db_url, mock_url, tmp_path, CE_GATEWAY_DELIVERY_BATCH_SIZE="500",
                           CE_GATEWAY_BATCH_CHUNK_ROWS=str(chunk_rows),
                           CE_GATEWAY_BATCH_LEASE_SECONDS="2"), tmp_path / "logs")

    def batch() -> dict[str, Any]:
        with store.connect() as conn:
            return dict(conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                        .mappings().one())

    started = time.monotonic()
    try:
        cluster.start(replicas=1, workers=2)
        with SigningClient(cluster.replicas[0].url, partner.app_key, partner.secret,
                           timeout=300) as client:
            resp = client.upload_batch(path, adapter="health", kind="monthly",
                                       period=f"{YEAR}-03")
        assert resp.status_code == 202, resp.text  # acknowledged by a replica without workers
        batch_id = resp.json()["batch_id"]
        # Kill whichever worker holds the batch, once it is past ``kill_after_row``.
        poll(lambda: batch()["status"] == "processing"
             and int(batch()["rows_done"]) > kill_after_row + 1,
             600, interval=0.01, what=f"the batch to pass row {kill_after_row}")
        owner = batch()["lease_owner"]
        [victim] = [w for w in cluster.workers if w.owns(owner)]
        [survivor] = [w for w in cluster.workers if w is not victim]
        orphans = _children(victim.pid)
        victim.kill9()
        _kill_orphans(orphans)
        killed_at = time.monotonic()
        at_kill = batch()
        assert at_kill["status"] == "processing", "the kill came too late to test anything"
        assert 0 < int(at_kill["rows_done"]) < n_rows + 1
        assert sum(int(at_kill[k]) for k in COUNTS) == int(at_kill["rows_done"]) - 1

        # No restart: the surviving worker takes the batch over once the lease has expired.
        poll(lambda: batch()["status"] in ("done", "failed"), 600, interval=0.1,
             what="the batch to finish on the other worker")
        finished_at = time.monotonic()
        final = batch()
        assert final["status"] == "done", final["error"]
        assert int(final["rows_done"]) == n_rows + 1 and int(final["rows_total"]) == n_rows
        assert {k: int(final[k]) for k in COUNTS} == {
            "accepted": len(good), "duplicate": 0, "corrected": 0, "conflict": 0,
            "rejected": len(bad)}
        with store.connect() as conn:
            assert_each_row_once(conn, partner.partner_id, batch_id, good, bad)
            done_by = conn.execute(select(audit_events.c.actor)
                                   .where(audit_events.c.kind == "batch_done")).scalars().all()
        assert len(done_by) == 1 and survivor.owns(done_by[0])

        poll(lambda: _pending(store) == 0, 600, interval=0.2, what="every record to be delivered")
        delivered_at = time.monotonic()
        queued = _queued(store)
        assert len(queued) == len(good) and {v for _, v in queued} == {1}
        _assert_exactly_once_in_order(state, queued)

        if reupload:  # the rows again, in another export (the same bytes are a resend of the
            # batch, answered by it: tests/e2e/test_batch_crash.py): each a duplicate or rejected
            again = another_export(path)
            with SigningClient(cluster.replicas[0].url, partner.app_key, partner.secret,
                               timeout=300) as client:
                status = upload_and_wait(client, again, 600)
            assert status["counts"] == {"rows": n_rows, "accepted": 0, "duplicate": len(good),
                                        "corrected": 0, "conflict": 0, "rejected": len(bad)}
            assert _queued(store) == queued and _pending(store) == 0
        with store.connect() as conn:
            verified = audit.verify(conn)
        assert verified.ok, verified.reason
    finally:
        cluster.stop()
        store.dispose()
    return {"rows": n_rows, "killed_at_row": int(at_kill["rows_done"]) - 1,
            "kill_at_s": round(killed_at - started, 1),
            "finished_s": round(finished_at - started, 1),
            "delivered_s": round(delivered_at - started, 1), "mock": dict(state.tally())}


@pytest.mark.postgres
@needs_postgres
def test_sigkill_of_the_worker_holding_a_batch_lets_another_worker_finish_it_once(
        postgres_url: str, tmp_path: Path, counting_mock: tuple[str, CountingMock],
        new_partner: Callable[..., Partner]) -> None:
    figures = run_batch_kill(3_000, 300, postgres_url, tmp_path, counting_mock, new_partner,
                             kill_after_row=0, reupload=False)
    print(f"\nbatch kill (make test): {figures}")


@pytest.mark.soak
@pytest.mark.postgres
@needs_postgres
@soak_only
def test_soak_sigkill_mid_100000_row_batch_resumes_and_reupload_is_all_duplicates(
        postgres_url: str, tmp_path: Path, counting_mock: tuple[str, CountingMock],
        new_partner: Callable[..., Partner]) -> None:
    figures = run_batch_kill(100_000, 2000, postgres_url, tmp_path, counting_mock, new_partner,
                             kill_after_row=50_000, reupload=True)
    print(f"\nbatch kill (soak): {figures}")



def test_a_stuck_batch_processor_lets_its_lease_go(
        engine: Engine, tmp_path: Path, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings], db_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A processor that is alive but stuck lets its lease go.

    It commits no chunk for BATCH_STALL_SECONDS (a hung read, a wedged parse pool), stops
    renewing, its lease runs out and another processor resumes the batch.  The test waits for
    the heartbeat to say it gave up: on a loaded machine a renewal may land 0.2 s late, so a
    lease seen run out before that can be renewed again (the suite failed on that once).
    """
    partner = new_partner(engine, adapter="health")
    batch_id, _, _ = _health_batch(engine, tmp_path, partner, 10, seed=29)
    settings = make_settings(db_url, batch_lease_seconds=0.3, batch_stall_seconds=1.0,
                             batch_dir=tmp_path / "batches")
    stuck = BatchProcessor(engine, settings, name="proc-stuck")
    assert stuck.claim() is not None

    def lease_until() -> datetime:
        with engine.connect() as conn:
            until: datetime = conn.execute(select(batches.c.lease_until)
                                           .where(batches.c.batch_id == batch_id)).scalar_one()
        return until

    first = lease_until()
    with stuck._lease_kept(batch_id):  # noqa: SLF001 - the heartbeat alone, no chunk ever commits
        poll(lambda: lease_until() > first, 30, what="the heartbeat to renew the lease")
        poll(lambda: any("letting the lease go" in r.getMessage() for r in caplog.records), 30,
             what="the heartbeat to give up on the stuck batch")
        poll(lambda: lease_until() < datetime.now(UTC), 30, what="the stuck lease to run out")
    other = BatchProcessor(engine, settings, name="proc-other")
    claimed = other.claim()
    assert claimed is not None and claimed["batch_id"] == batch_id
