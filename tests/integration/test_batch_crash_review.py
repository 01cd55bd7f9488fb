"""Review of batch durability (SPEC §5 batches, §7 durable acknowledgement): crash differentials.

The same file is processed cleanly into one store and, into another, by a processor that
"dies" after (or inside) chunk k and a second processor that takes the expired lease over and
resumes.  Both stores must then hold the same outcome modulo record ids and timestamps: the
same counts, the same rejected rows (row numbers included), the same records, versions,
outbox rows and rejections, and an audit chain that verifies.  The batch id is chosen by the
test, so it is the same in both stores.

Also: transient faults during processing (a store error, a parse worker killed), a file that
changed on disk after the 202, and the declared control totals across a resume.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import OperationalError

import gateway.batches as batches_module
from gateway import audit
from gateway.accounts import Partner
from gateway.batch_requests import NewBatch, record_batch
from gateway.batch_status import batch_status
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.signing import file_sha256
from gateway.store.db import make_engine, upgrade
from gateway.store.tables import (
    audit_events,
    batch_errors,
    batches,
    outbox,
    record_versions,
    records,
    rejections,
)
from mock_partners.files import (
    BAD_KEY,
    HEALTH_HEADERS,
    health_rows,
    write_csv,
    write_ndjson,
    write_xlsx,
)
from tests.support.files import another_export
from tests.support.servers import poll

YEAR = 2026  # kept open by tests/conftest.py (CE_GATEWAY_YEAR_CLOSE_EXTENSIONS)
PERIOD = f"{YEAR}-03"
BATCH_ID = "B" + "c" * 24
PARTNER_ID = "health-review"
COUNTS = ("accepted", "duplicate", "corrected", "conflict", "rejected")
RECORD_ID = re.compile(r"R[0-9a-f]{24}")

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]


class Crash(BaseException):
    """Stands for the process dying: nothing of ours runs after it (not ``run``'s except)."""


# -- files and stores ---------------------------------------------------------------------------


def health_file(path: Path, n: int, fmt: str, seed: int = 31, bad_ratio: float = 0.05,
                ) -> tuple[set[str], dict[int, tuple[str, str]]]:
    """A March health file; its good record numbers and bad rows (row number → (column, code))."""
    rows = list(health_rows(seed, n, YEAR, 3, bad_ratio=bad_ratio))
    if fmt == "xlsx":
        assert write_xlsx(path, rows, HEALTH_HEADERS) == n
    elif fmt == "ndjson":  # no header line: row number = line number
        assert write_ndjson(path, rows, HEALTH_HEADERS) == n
        return good_and_bad(rows, first_row=1)
    else:
        assert write_csv(path, rows, HEALTH_HEADERS, encoding=fmt) == n  # type: ignore[arg-type]
    return good_and_bad(rows, first_row=2)


def good_and_bad(rows: list[dict[str, Any]], first_row: int,
                 ) -> tuple[set[str], dict[int, tuple[str, str]]]:
    good = {str(r["记录编号"]) for r in rows if BAD_KEY not in r}
    bad = {i + first_row: r[BAD_KEY] for i, r in enumerate(rows) if BAD_KEY in r}
    return good, bad


_OPEN: list[Engine] = []


@pytest.fixture(autouse=True)
def _dispose_stores() -> Iterator[None]:
    """Every store a test opened is closed after it, failed or not (no leaked connections)."""
    yield
    while _OPEN:
        _OPEN.pop().dispose()


def new_store(url: str, partner: NewPartner) -> Engine:
    upgrade(url)
    engine = make_engine(url)
    _OPEN.append(engine)
    partner(engine, partner_id=PARTNER_ID, adapter="health")
    return engine


def register(engine: Engine, path: Path, batch_id: str = BATCH_ID, **declared: Any) -> str:
    fmt = {".xlsx": "xlsx", ".ndjson": "ndjson"}.get(path.suffix, "csv")
    taken = record_batch(engine, NewBatch(batch_id, PARTNER_ID, "health", "monthly", PERIOD, path,
                                          fmt, path.stat().st_size, file_sha256(path), **declared),
                         "test")
    assert not taken.resent, "the same bytes again are a resend of their batch, not a new one"
    return batch_id


def settings_for(make_settings: MakeSettings, url: str, tmp_path: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {"batch_chunk_rows": 40, "batch_parse_workers": 0,
                              "batch_lease_seconds": 30, "batch_dir": tmp_path / "batches"}
    values.update(extra)
    return make_settings(url, **values)


def expire_lease(engine: Engine, batch_id: str = BATCH_ID) -> None:
    """Time passes after a crash: the dead processor's lease runs out."""
    with engine.begin() as conn:
        conn.execute(update(batches).where(batches.c.batch_id == batch_id)
                     .values(lease_until=datetime.now(UTC) - timedelta(seconds=1)))


def batch_row(engine: Engine, batch_id: str = BATCH_ID) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                    .mappings().one())


def process_clean(engine: Engine, settings: Settings) -> None:
    processor = BatchProcessor(engine, settings, name="clean")
    claimed = processor.claim()
    assert claimed is not None
    assert processor.run(claimed) is None


def crash_after(engine: Engine, settings: Settings, chunks: int, *, inside: bool = False,
                monkeypatch: pytest.MonkeyPatch) -> None:
    """Processor A dies right after chunk ``chunks`` commits, or inside that chunk's transaction."""
    committed = [0]

    def progress(_row: int) -> None:
        committed[0] += 1
        if not inside and committed[0] == chunks:
            raise Crash

    real = batches_module.ingest_items  # type: ignore[attr-defined]

    def ingest_items(*args: Any, **kwargs: Any) -> Any:
        if inside and committed[0] == chunks - 1:
            checkpoint = kwargs["in_tx"]

            def dying(conn: Any, answers: Any) -> None:
                checkpoint(conn, answers)
                raise Crash  # after the checkpoint's writes, before the commit

            kwargs["in_tx"] = dying
        return real(*args, **kwargs)

    monkeypatch.setattr(batches_module, "ingest_items", ingest_items)
    a = BatchProcessor(engine, settings, name="proc-a", progress=progress)
    claimed = a.claim()
    assert claimed is not None
    with pytest.raises(Crash):
        a.process(claimed)
    monkeypatch.setattr(batches_module, "ingest_items", real)
    at_crash = batch_row(engine)
    assert at_crash["status"] == "processing" and at_crash["lease_owner"] == "proc-a"
    done = chunks - 1 if inside else chunks  # chunks committed before the crash
    size = settings.batch_chunk_rows
    header = 0 if at_crash["file_format"] == "ndjson" else 1  # NDJSON has no header line
    assert int(at_crash["rows_done"]) == (size * done + header if done else 0)


def resume(engine: Engine, settings: Settings) -> Exception | None:
    """Another processor takes the batch over after the crash; what its run returned."""
    expire_lease(engine)
    b = BatchProcessor(engine, settings, name="proc-b")
    claimed = b.claim()
    assert claimed is not None and claimed["batch_id"] == BATCH_ID
    return b.run(claimed)


def outcome(engine: Engine, batch_id: str = BATCH_ID) -> dict[str, Any]:
    """What a batch left in a store, with record ids replaced by the partner's record numbers."""
    with engine.connect() as conn:
        b = dict(conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                 .mappings().one())
        recs = [dict(r) for r in conn.execute(select(records)).mappings()]
        source_of = {r["record_id"]: r["source_record_id"] for r in recs}
        versions = sorted((source_of[v.record_id], v.version, v.content_hash, v.batch_id)
                          for v in conn.execute(select(record_versions)))
        queued = sorted((source_of[o.record_id], o.version, o.status)
                        for o in conn.execute(select(outbox)))

        def named(text: str) -> str:  # a record id in a message, as the record's number
            return RECORD_ID.sub(lambda m: f"<{source_of.get(m.group(0), '?')}>", text)

        errors = sorted((e.row_no, e.column_name, e.code, named(e.message), e.message_zh)
                        for e in conn.execute(select(batch_errors)
                                              .where(batch_errors.c.batch_id == batch_id)))
        refused = sorted((r.source_record_id or "", r.payload, named(r.errors))
                         for r in conn.execute(select(rejections)))
        kinds = Counter(conn.execute(select(audit_events.c.kind)).scalars())
        verified = audit.verify(conn)
    assert verified.ok, verified.reason
    skip = {"record_id", "created_at", "updated_at", "duplicate_of"}
    return {
        "batch": {k: b[k] for k in (*COUNTS, "status", "error", "error_code", "rows_done",
                                    "rows_total", "credits_total")},
        "records": sorted(tuple(sorted((k, str(v)) for k, v in r.items() if k not in skip))
                          for r in recs),
        "duplicate_of": sorted((r["source_record_id"], source_of.get(r["duplicate_of"]))
                               for r in recs),
        "versions": versions, "outbox": queued, "errors": errors, "rejections": refused,
        "audit": kinds,
    }


# -- the differential: crash at chunk k, resume, compare with a clean run ------------------------


@pytest.mark.parametrize(("fmt", "chunks", "inside"), [
    ("gb18030", 1, False), ("gb18030", 3, True), ("gb18030", 5, False),
    ("xlsx", 1, True), ("xlsx", 2, False), ("xlsx", 5, True), ("ndjson", 3, False),
])
def test_a_crash_at_chunk_k_and_a_resume_leave_what_a_clean_run_leaves(
        fmt: str, chunks: int, inside: bool, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"health.{fmt if fmt in ('xlsx', 'ndjson') else 'csv'}"
    good, bad = health_file(path, 230, fmt)  # 6 chunks of 40
    assert bad, "the file should hold rejected rows"
    clean_url = f"sqlite:///{tmp_path / 'clean.sqlite3'}"
    crash_url = f"sqlite:///{tmp_path / 'crash.sqlite3'}"
    clean, crashed = new_store(clean_url, new_partner), new_store(crash_url, new_partner)
    register(clean, path)
    register(crashed, path)
    process_clean(clean, settings_for(make_settings, clean_url, tmp_path))
    settings = settings_for(make_settings, crash_url, tmp_path)
    crash_after(crashed, settings, chunks, inside=inside, monkeypatch=monkeypatch)
    resume(crashed, settings)

    want, got = outcome(clean), outcome(crashed)
    assert want["batch"]["status"] == "done"
    assert {k: want["batch"][k] for k in ("accepted", "rejected")} == {
        "accepted": len(good), "rejected": len(bad)}
    assert sorted({(e[0], e[1], e[2]) for e in want["errors"]}) == sorted(
        (row, column, code) for row, (column, code) in bad.items())
    for key in ("batch", "records", "duplicate_of", "versions", "outbox", "errors",
                "rejections", "audit"):
        assert got[key] == want[key], key


# -- transient faults during processing ----------------------------------------------------------


def finish(engine: Engine, settings: Settings, timeout: float = 20) -> dict[str, Any]:
    """Run processors as ``run_forever`` would (claim whatever is free) until the batch has ended."""
    processor = BatchProcessor(engine, settings, name="proc-b")

    def ended() -> dict[str, Any] | None:
        processor.run_once()
        row = batch_row(engine)
        return row if row["status"] in ("done", "failed") else None

    result: dict[str, Any] = poll(ended, timeout, interval=0.1, what="the batch to end")
    return result


def test_a_store_error_in_one_chunk_does_not_fail_an_acknowledged_batch_for_good(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "health.csv"
    good, bad = health_file(path, 200, "utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)
    settings = settings_for(make_settings, url, tmp_path, batch_lease_seconds=1)
    real = batches_module.ingest_items  # type: ignore[attr-defined]
    calls = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:  # one blip: SQLite's busy timeout ran out, a PostgreSQL failover
            raise OperationalError("COMMIT", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    monkeypatch.setattr(batches_module, "ingest_items", flaky)
    a = BatchProcessor(engine, settings, name="proc-a")
    claimed = a.claim()
    assert claimed is not None
    a.run(claimed)
    final = finish(engine, settings)
    assert final["status"] == "done", (final["error_code"], final["error"])
    assert {k: int(final[k]) for k in COUNTS} == {
        "accepted": len(good), "duplicate": 0, "corrected": 0, "conflict": 0, "rejected": len(bad)}


def _parse_workers() -> list[int]:
    """Spawned parse worker processes of the test process, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _stopped_outside_a_write(pids: list[int], store: Path) -> bool:
    """SIGSTOP ``pids``; keep them stopped only if the store's write lock is still free.

    A parse worker reads the reference data once a chunk, and on SQLite that read holds the
    write lock (test_flakes_review.py, a strict xfail): stopped there, it stops every writer,
    the processor's next chunk commit included ('database is locked' after the 60 s busy
    timeout), which is that bug, not the hang in parsing this test is about.  Stopped there,
    the worker is let go on and stopped again.
    """
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    poll(lambda: all(_stopped(pid) for pid in pids), 30, interval=0.005,
         what="the parse worker to stop")
    probe = sqlite3.connect(str(store), timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:  # locked: by the stopped worker, or a lease renewal
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        return False
    finally:
        probe.close()


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (state ``T`` in /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def _parse_worker_signalled(tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
                            sig: signal.Signals, rows: int, **extra: Any,
                            ) -> tuple[Exception | None, dict[str, Any]]:
    """Signal the parse worker after the first chunk; what ``run`` returned, and the end.

    The end: how the batch ended once processors took it again (``finish``), every row taken
    once.
    """
    path = tmp_path / "health.csv"
    good, bad = health_file(path, rows, "utf-8")
    store = tmp_path / "store.sqlite3"
    url = f"sqlite:///{store}"
    engine = new_store(url, new_partner)
    register(engine, path)
    settings = settings_for(make_settings, url, tmp_path, batch_parse_workers=1,
                            batch_parse_min_bytes=0, batch_lease_seconds=1, **extra)
    signalled: list[int] = []

    def progress(_row: int) -> None:
        if not signalled:
            signalled.extend(_parse_workers())
            assert signalled, "no parse worker process to signal"
            if sig == signal.SIGSTOP:
                poll(lambda: _stopped_outside_a_write(signalled, store), 30, interval=0.01,
                     what="the parse worker stopped outside its reference read")
                return
            for pid in signalled:
                os.kill(pid, sig)

    a = BatchProcessor(engine, settings, name="proc-a", progress=progress)
    claimed = a.claim()
    assert claimed is not None
    returned = a.run(claimed)
    assert signalled, "no chunk committed before the stall timeout: the worker was never signalled"
    final = finish(engine, settings, timeout=180)
    assert final["status"] == "done", (final["error_code"], final["error"])
    assert {k: int(final[k]) for k in COUNTS} == {
        "accepted": len(good), "duplicate": 0, "corrected": 0, "conflict": 0, "rejected": len(bad)}
    return returned, final


def test_a_killed_parse_worker_does_not_fail_the_batch_for_good(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    # The OOM killer takes the parse worker after the first chunk.
    returned, _ = _parse_worker_signalled(tmp_path, make_settings, new_partner, signal.SIGKILL, 600)
    assert isinstance(returned, BrokenProcessPool)


def test_a_hung_parse_worker_is_given_up_on_and_the_batch_resumes(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    """A parse worker that stops answering (SIGSTOP: a hang) must not hang its processor.

    After BATCH_STALL_SECONDS without a chunk the processor kills the pool, puts the batch back
    and resumes it with a fresh worker: the batch ends done, every row taken once.  Chunks of 5
    rows: a worker's answer is then one write to its pipe, so the stop never cuts one in half
    (a half-written answer hangs the pool's reader thread: not a hang in parsing, which is what
    this stands for).  The stall clock of a chunk runs from the pool's start for the first one:
    a spawned worker's start (its imports) took 2-3 s on a loaded 2-core machine, and a 2 s stall
    then timed out before the first chunk (nothing signalled) and in every resume (the batch
    failed after BATCH_MAX_ATTEMPTS).  10 s covered the start here but not on the CI machine,
    which runs the suite about four times slower (the same failure, 2026-11-28); 30 s covers
    it there, and the hang still has to be noticed (the default is 900 s).
    """
    returned, _ = _parse_worker_signalled(tmp_path, make_settings, new_partner, signal.SIGSTOP,
                                          200, batch_stall_seconds=30, batch_chunk_rows=5)
    assert isinstance(returned, TimeoutError)  # returned: the processor was free again


# -- the stored file changed after the 202 -------------------------------------------------------


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_file_truncated_on_disk_after_the_202_is_not_reported_done(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    path = tmp_path / "health.csv"
    health_file(path, 200, "utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)  # acknowledged: its size and SHA-256 are in the batch row
    _truncate(path, 0.5)  # a disk fault, a bad restore of BATCH_DIR
    processor = BatchProcessor(engine, settings_for(make_settings, url, tmp_path), name="p")
    claimed = processor.claim()
    assert claimed is not None
    assert isinstance(processor.run(claimed), batches_module.FileChanged)
    final = batch_row(engine)
    judged = sum(int(final[k]) for k in COUNTS)
    # The partner was told 200 rows were durable; "done" with ~100 says they all were taken.
    # The file is checked before a row is read: nothing of the truncated file is taken.
    assert (final["status"], final["error_code"], judged) == ("failed", "BATCH_FAILED", 0)
    assert "SHA-256" in final["error"] and final["error_zh"]


def test_a_resume_after_the_file_was_truncated_does_not_end_done_short_of_the_declared_rows(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "health.csv"
    health_file(path, 200, "utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path, declared_rows=200)  # X-CE-Row-Count: exactly to catch a short file
    settings = settings_for(make_settings, url, tmp_path)
    crash_after(engine, settings, 1, monkeypatch=monkeypatch)  # totals checked, one chunk in
    _truncate(path, 0.6)
    assert isinstance(resume(engine, settings), batches_module.FileChanged)
    final = batch_row(engine)
    judged = sum(int(final[k]) for k in COUNTS)
    # A batch that declared 200 rows must not end "done" having judged fewer: the resume
    # checks the file again and takes nothing more of it.
    assert (final["status"], judged) == ("failed", 40), (final["status"], judged)


def test_a_file_deleted_after_the_202_fails_the_batch_coded_and_takes_nothing(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    path = tmp_path / "health.csv"
    health_file(path, 50, "utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)
    path.unlink()
    processor = BatchProcessor(engine, settings_for(make_settings, url, tmp_path), name="p")
    claimed = processor.claim()
    assert claimed is not None
    processor.run(claimed)
    with engine.connect() as conn:
        status = batch_status(conn, BATCH_ID)
    assert status is not None and status["status"] == "failed"
    assert status["failure"]["code"] and status["failure"]["message_zh"]
    assert status["counts"]["rows"] == 0


# -- one row must not fail its neighbours (SPEC §5) ---------------------------------------------


@pytest.mark.postgres
def test_a_row_with_an_absurd_credits_value_is_rejected_alone_on_postgresql(
        postgres_url: str, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    rows = list(health_rows(41, 100, YEAR, 3))
    rows[60] = {**rows[60], "学分": "9" * 40}  # a stray paste into the credits column
    path = tmp_path / "health.csv"
    write_csv(path, rows, HEALTH_HEADERS)
    engine = new_store(postgres_url, new_partner)
    register(engine, path)
    process_clean_or_fail = BatchProcessor(engine, settings_for(make_settings, postgres_url,
                                                                tmp_path), name="p")
    claimed = process_clean_or_fail.claim()
    assert claimed is not None
    process_clean_or_fail.run(claimed)
    final = batch_row(engine)
    assert final["status"] == "done", (final["error_code"], final["error"])
    assert (int(final["accepted"]), int(final["rejected"])) == (99, 1)
    with engine.connect() as conn:
        assert [(e.row_no, e.column_name, e.code) for e in conn.execute(select(batch_errors))] == [
            (62, "学分", "SCHEMA")]


# -- the same rows twice, processed at once (two exports of one file, or two uploads racing past
# record_batch's resend check on two replicas) ---------------------------------------------------


def test_the_same_file_processed_twice_at_once_takes_each_row_once(
        db_url: str, tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    import threading

    path = tmp_path / "health.csv"
    good, bad = health_file(path, 600, "utf-8", seed=43)
    engine = new_store(db_url, new_partner)
    again = another_export(path)
    first, second = register(engine, path, "B" + "1" * 24), register(engine, again, "B" + "2" * 24)
    settings = settings_for(make_settings, db_url, tmp_path)
    errors: list[BaseException | None] = []
    both = threading.Barrier(2, timeout=30)

    def run(batch_id: str, name: str) -> None:
        own = make_engine(db_url)
        try:
            processor = BatchProcessor(own, settings, name=name)
            both.wait()
            claimed = processor.claim(batch_id)
            assert claimed is not None
            errors.append(processor.run(claimed))
        finally:
            own.dispose()

    threads = [threading.Thread(target=run, args=(b, f"proc-{i}"))
               for i, b in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [None, None]
    one, two = batch_row(engine, first), batch_row(engine, second)
    assert one["status"] == two["status"] == "done", (one["error"], two["error"])
    for b in (one, two):
        assert int(b["accepted"]) + int(b["duplicate"]) == len(good)
        assert int(b["rejected"]) == len(bad) and int(b["conflict"]) == int(b["corrected"]) == 0
    assert int(one["accepted"]) + int(two["accepted"]) == len(good)
    with engine.connect() as conn:
        stored = Counter(conn.execute(select(records.c.source_record_id)).scalars())
        queued = Counter(conn.execute(select(outbox.c.record_id)).scalars())
        assert audit.verify(conn).ok
    assert set(stored) == good and max(stored.values()) == 1
    assert len(queued) == len(good) and max(queued.values()) == 1


def test_control_totals_checked_before_a_crash_are_not_needed_again_to_finish_right(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "health.csv"
    good, bad = health_file(path, 200, "gb18030", seed=47)
    clean_url = f"sqlite:///{tmp_path / 'clean.sqlite3'}"
    crash_url = f"sqlite:///{tmp_path / 'crash.sqlite3'}"
    clean, crashed = new_store(clean_url, new_partner), new_store(crash_url, new_partner)
    register(clean, path)  # no totals: the clean run's credits_total is the file's sum
    process_clean(clean, settings_for(make_settings, clean_url, tmp_path))
    want = outcome(clean)
    total = want["batch"]["credits_total"]
    register(crashed, path, declared_rows=200, declared_credits=total)
    settings = settings_for(make_settings, crash_url, tmp_path)
    crash_after(crashed, settings, 2, monkeypatch=monkeypatch)
    resume(crashed, settings)
    got = outcome(crashed)
    assert got["batch"]["status"] == "done", got["batch"]["error"]
    assert (got["batch"]["accepted"], got["batch"]["rejected"]) == (len(good), len(bad))
    for key in ("batch", "records", "versions", "outbox", "errors", "rejections", "audit"):
        assert got[key] == want[key], key


def _tangled_file(path: Path) -> dict[str, int]:
    """A file whose later rows refer to earlier ones across chunk boundaries (chunks of 40).

    Resends, corrections, another record number for the same activity, the same activity with
    other credits, and one person's trainings piling up on one day (R14).  Returns the counts
    a clean run must give.
    """
    rows: list[dict[str, Any]] = [dict(r) for r in health_rows(59, 150, YEAR, 3)]
    base = [dict(r) for r in rows[:40]]
    extra: list[dict[str, Any]] = []
    for i, r in enumerate(base[:6]):
        extra.append(dict(r))  # the same row again: duplicate
        fixed = dict(r)
        fixed["学分"] = str(int(float(str(r["学分"]))) + 1)  # new credits, same id: corrected
        extra.append(fixed)
        twin = dict(r)
        twin["记录编号"] = f"{r['记录编号']}-T{i}"  # same activity, another id: duplicate
        extra.append(twin)
    for i, r in enumerate(base[10:14]):
        clash = dict(r)
        clash["记录编号"] = f"{r['记录编号']}-C{i}"
        clash["学分"] = str(int(float(str(r["学分"]))) + 5)  # same activity, other hours: conflict
        extra.append(clash)
    person = base[20]
    for i in range(8):  # eight long trainings by one person on one day: R14 flags them
        extra.append({**person, "记录编号": f"DAY-{i}", "项目名称": f"集中培训第{i + 1}期",
                      "项目编号": "", "学分": "3", "开始日期": "", "完成日期": f"{YEAR}-03-25"})
    # interleave: the extras land in chunks 2..6, some right at chunk edges
    out = rows[:40]
    rest = rows[40:]
    for j, row in enumerate(extra):
        out.append(row)
        out.extend(rest[j * 4:(j + 1) * 4])
    out.extend(rest[len(extra) * 4:])
    write_csv(path, out, HEALTH_HEADERS, encoding="gb18030")
    return {"rows": len(out)}


@pytest.mark.parametrize("chunks", [2, 4])
def test_a_crash_between_rows_that_refer_to_each_other_changes_no_answer(
        chunks: int, tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "health.csv"
    expected = _tangled_file(path)
    clean_url = f"sqlite:///{tmp_path / 'clean.sqlite3'}"
    crash_url = f"sqlite:///{tmp_path / 'crash.sqlite3'}"
    clean, crashed = new_store(clean_url, new_partner), new_store(crash_url, new_partner)
    register(clean, path)
    register(crashed, path)
    process_clean(clean, settings_for(make_settings, clean_url, tmp_path))
    settings = settings_for(make_settings, crash_url, tmp_path)
    crash_after(crashed, settings, chunks, monkeypatch=monkeypatch)
    resume(crashed, settings)
    want, got = outcome(clean), outcome(crashed)
    b = want["batch"]
    assert sum(int(b[k]) for k in COUNTS) == expected["rows"]
    assert min(int(b[k]) for k in ("duplicate", "corrected", "conflict")) > 0, b
    for key in ("batch", "records", "duplicate_of", "versions", "outbox", "errors",
                "rejections", "audit"):
        assert got[key] == want[key], key


def test_a_processor_stopped_mid_batch_hands_it_over_at_once_and_the_outcome_is_unchanged(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    path = tmp_path / "health.xlsx"
    health_file(path, 200, "xlsx", seed=61)
    clean_url = f"sqlite:///{tmp_path / 'clean.sqlite3'}"
    stop_url = f"sqlite:///{tmp_path / 'stop.sqlite3'}"
    clean, stopped = new_store(clean_url, new_partner), new_store(stop_url, new_partner)
    register(clean, path)
    register(stopped, path)
    process_clean(clean, settings_for(make_settings, clean_url, tmp_path))
    settings = settings_for(make_settings, stop_url, tmp_path)
    a = BatchProcessor(stopped, settings, name="proc-a", progress=lambda _row: a.stop())
    claimed = a.claim()
    assert claimed is not None
    assert a.run(claimed) is None  # a shutdown (SIGTERM): the chunk in hand commits, then it stops
    at_stop = batch_row(stopped)
    assert at_stop["status"] == "processing" and int(at_stop["rows_done"]) == 41
    b = BatchProcessor(stopped, settings, name="proc-b")
    taken = b.claim()  # no waiting for the lease to run out
    assert taken is not None and taken["batch_id"] == BATCH_ID
    assert b.run(taken) is None
    want, got = outcome(clean), outcome(stopped)
    for key in ("batch", "records", "versions", "outbox", "errors", "rejections", "audit"):
        assert got[key] == want[key], key


@pytest.mark.postgres
def test_a_long_declared_credits_total_is_answered_not_a_500_on_postgresql(
        postgres_url: str, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    from gateway.api.app import create_app
    from gateway.signing import SigningClient
    from tests.support.servers import uvicorn_thread

    engine = new_store(postgres_url, new_partner)
    partner = new_partner(engine, adapter="health")
    path = tmp_path / "health.csv"
    health_file(path, 10, "utf-8")
    batch_dir = tmp_path / "batches"
    settings = make_settings(postgres_url, batch_dir=batch_dir)
    with uvicorn_thread(create_app(settings, run_worker=False)) as url, \
            SigningClient(url, partner.app_key, partner.secret, timeout=30) as client:
        resp = client.upload_batch(path, adapter="health", kind="monthly", period=PERIOD,
                                   row_count=10, total_credits="9" * 40)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["field"]) == ("SCHEMA", "X-CE-Total-Credits") and error["message_zh"]
    with engine.connect() as conn:
        owned = {Path(p).name for p in conn.execute(select(batches.c.file_path)).scalars()}
    left = {p.name for p in batch_dir.iterdir()} if batch_dir.exists() else set()
    assert left <= owned  # no file without a batch naming it


# -- a file that kills its processor every time --------------------------------------------------


def test_a_batch_that_kills_its_processor_every_time_does_not_block_the_queue_forever(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    poison, later = tmp_path / "poison.csv", tmp_path / "later.csv"
    health_file(poison, 100, "utf-8", seed=67)
    health_file(later, 20, "utf-8", seed=71)
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, poison)
    later_id = register(engine, later, "B" + "d" * 24)
    settings = settings_for(make_settings, url, tmp_path)
    real = batches_module.ingest_items  # type: ignore[attr-defined]

    def dies_on_the_poison(engine_: Engine, partner: Any, items: Any, **kwargs: Any) -> Any:
        if kwargs.get("batch_id") == BATCH_ID:
            raise Crash  # the process dies inside the poison file's first chunk, every time
        return real(engine_, partner, items, **kwargs)

    monkeypatch.setattr(batches_module, "ingest_items", dies_on_the_poison)
    claimed_ids = []
    for restart in range(12):  # a supervisor restarts the dead gateway, again and again
        processor = BatchProcessor(engine, settings, name=f"proc-{restart}")
        claimed = processor.claim()
        if claimed is None:
            break
        claimed_ids.append(claimed["batch_id"])
        try:
            processor.run(claimed)
        except Crash:
            expire_lease(engine)
    assert batch_row(engine, later_id)["status"] == "done", Counter(claimed_ids)
