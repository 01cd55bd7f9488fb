"""SIGKILL a real gateway in the middle of a 30,000-row batch; the restart finishes it exactly once.

SPEC §7 "durable acknowledgement" for batch files: the 202 means the file is committed, and
processing commits each chunk together with the batch's checkpoint, so a crash resumes after
the last committed chunk.  Afterwards every record number of the file is stored exactly once
(or rejected exactly once, with its row error recorded once), the counts add up, the audit
chain verifies, and a resend of the file is all duplicates.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Connection, Engine, create_engine, func, select

from gateway import audit
from gateway.accounts import Partner
from gateway.signing import SigningClient
from gateway.store.db import make_engine, normalize_url
from gateway.store.tables import (
    audit_events,
    batch_errors,
    batches,
    outbox,
    record_versions,
    records,
    rejections,
)
from mock_partners.ce_system import Faults
from mock_partners.files import BAD_KEY, HEALTH_HEADERS, health_rows, write_csv
from tests.conftest import SECRET_KEY
from tests.support.files import another_export
from tests.support.servers import GatewayProcess, poll

ROWS = 3_000  # 12 chunks of 250: the kill lands after the first, well before the last


def open_ce_year() -> int:
    """A CE year still open today: R11 closes a year on 30 December, Asia/Shanghai."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return today.year if (today.month, today.day) <= (12, 30) else today.year + 1


YEAR = open_ce_year()
COUNTS = ("accepted", "duplicate", "corrected", "conflict", "rejected")


def health_file(tmp_path: Path, n_rows: int, seed: int = 7, bad_ratio: float = 0.01,
                ) -> tuple[Path, set[str], dict[int, tuple[str, str]]]:
    """A health CSV for March of :data:`YEAR`.

    Returns its path, the good rows' record numbers, and the bad rows' file row numbers (row 1
    is the header) with what is wrong with each.
    """
    rows = list(health_rows(seed, n_rows, YEAR, 3, bad_ratio=bad_ratio))
    path = tmp_path / f"health_{YEAR}-03_{seed}.csv"
    assert write_csv(path, rows, HEALTH_HEADERS) == n_rows
    good = {str(r["记录编号"]) for r in rows if BAD_KEY not in r}
    bad = {i + 2: r[BAD_KEY] for i, r in enumerate(rows) if BAD_KEY in r}
    return path, good, bad


def upload_and_wait(client: SigningClient, path: Path, timeout: float) -> dict[str, Any]:
    """Upload ``path`` as the March health batch and poll its status until it has ended."""
    resp = client.upload_batch(path, adapter="health", kind="monthly", period=f"{YEAR}-03")
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["batch_id"]

    def ended() -> dict[str, Any] | None:
        status: dict[str, Any] = client.get(f"/v1/batches/{batch_id}?limit=1").json()
        return status if status["status"] in ("done", "failed") else None

    ended_status: dict[str, Any] = poll(ended, timeout, interval=0.2, what="the batch to end")
    return ended_status


@pytest.fixture
def store(db_url: str) -> Iterator[Engine]:
    """The test's reader: plain reads that take no write lock.

    The gateway's engine begins every SQLite transaction IMMEDIATE; polling through one would
    queue behind (and ahead of) every chunk.
    """
    engine = create_engine(normalize_url(db_url))
    yield engine
    engine.dispose()


def _batch(engine: Engine, batch_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                    .mappings().one())


def assert_each_row_once(conn: Connection, partner_id: str, batch_id: str, good: set[str],
                         bad: dict[int, tuple[str, str]]) -> None:
    """Every good row stored once and every bad row coded once, whatever crashed in between."""
    stored = Counter(conn.execute(select(records.c.source_record_id)
                                  .where(records.c.partner_id == partner_id)).scalars())
    errors = Counter((int(e.row_no), e.column_name, e.code) for e in conn.execute(
        select(batch_errors).where(batch_errors.c.batch_id == batch_id)))
    assert [sid for sid, n in stored.items() if n > 1] == []
    assert set(stored) == good
    assert [key for key, n in errors.items() if n > 1] == []
    assert set(errors) == {(row, column, code) for row, (column, code) in bad.items()}


def _count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the gateway's parse workers), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _kill_orphans(pids: list[int]) -> None:
    # A SIGKILLed parent cannot stop its parse worker processes: they would wait forever
    # on their task queue.  They are ours (the gateway we started spawned them): end them.
    for pid in pids:
        try:
            if b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a reused pid
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError):
            pass


@pytest.mark.slow
def test_sigkill_mid_batch_resumes_after_the_last_chunk_exactly_once(
        db_url: str, store: Engine, tmp_path: Path, mock_ce: tuple[str, Faults],
        new_partner: Callable[..., Partner]) -> None:
    mock_url, _ = mock_ce
    writer = make_engine(db_url)
    partner = new_partner(writer, adapter="health")
    writer.dispose()
    path, good, bad = health_file(tmp_path, ROWS)
    assert len(good) + len(bad) == ROWS and ROWS // 200 < len(bad) < ROWS // 40  # ~1 % bad

    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_BATCH_DIR": str(tmp_path / "batches"),
           "CE_GATEWAY_BATCH_CHUNK_ROWS": "250", "CE_GATEWAY_BATCH_LEASE_SECONDS": "2",
           # parse in worker processes, as a large file would (and they must not outlive a kill)
           "CE_GATEWAY_BATCH_PARSE_MIN_BYTES": "0",
           "CE_GATEWAY_DOWNSTREAM_URL": mock_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_DELIVERY_POLL_SECONDS": "0.1", "CE_GATEWAY_RETRY_SCHEDULE": "1"}
    log = tmp_path / "gateway.log"
    orphans: list[int] = []
    gw = GatewayProcess(env, log).start()
    try:
        with SigningClient(gw.url, partner.app_key, partner.secret) as client:
            resp = client.upload_batch(path, adapter="health", kind="monthly", period=f"{YEAR}-03")
        assert resp.status_code == 202, resp.text
        batch_id = resp.json()["batch_id"]

        def first_chunk() -> bool:
            b = _batch(store, batch_id)
            return b["status"] == "processing" and int(b["rows_done"]) > 0

        poll(first_chunk, 120, interval=0.01, what="the first chunk to commit")
        assert gw.proc is not None
        orphans = _children(gw.proc.pid)
        gw.kill9()
        _kill_orphans(orphans)

        at_kill = _batch(store, batch_id)
        assert at_kill["status"] == "processing", "the kill came too late to test anything"
        assert 0 < int(at_kill["rows_done"]) < ROWS + 1
        # The checkpoint and the chunks it covers were committed together.
        done_rows = int(at_kill["rows_done"]) - 1
        assert sum(int(at_kill[k]) for k in COUNTS) == done_rows
        assert _count(store, records, records.c.batch_id == batch_id) == int(at_kill["accepted"])
        assert _count(store, batch_errors, batch_errors.c.batch_id == batch_id) == int(
            at_kill["rejected"])

        gw = GatewayProcess(env, log).start()
        poll(lambda: _batch(store, batch_id)["status"] in ("done", "failed"), 180, interval=0.1,
             what="the batch to finish after the restart")
        final = _batch(store, batch_id)
        assert final["status"] == "done", final["error"]
        assert int(final["rows_done"]) == ROWS + 1
        assert {k: int(final[k]) for k in COUNTS} == {
            "accepted": len(good), "duplicate": 0, "corrected": 0, "conflict": 0,
            "rejected": len(bad)}
        assert int(final["rows_total"]) == ROWS

        with store.connect() as conn:
            assert_each_row_once(conn, partner.partner_id, batch_id, good, bad)
            versions = int(conn.execute(select(func.count()).select_from(
                record_versions.join(records, record_versions.c.record_id == records.c.record_id))
                .where(records.c.partner_id == partner.partner_id)).scalar_one())
            received = int(conn.execute(select(func.count()).select_from(audit_events)
                                        .where(audit_events.c.kind == "received")).scalar_one())
            verified = audit.verify(conn)
        assert _count(store, rejections, rejections.c.batch_id == batch_id) == len(bad)
        assert versions == len(good) and received == len(good)
        assert _count(store, outbox) == len(good)
        assert verified.ok, verified.reason

        # The same file again, after the crash: the batch that took it answers (a resend) …
        again = another_export(path)  # … and another export of the same rows is taken anew:
        with SigningClient(gw.url, partner.app_key, partner.secret) as client:
            resend = client.upload_batch(path, adapter="health", kind="monthly",
                                         period=f"{YEAR}-03")
            assert resend.status_code == 202, resend.text
            assert (resend.json()["batch_id"], resend.json()["resent"]) == (batch_id, True)
            status = upload_and_wait(client, again, 180)  # every row a duplicate or rejected again
        assert status["status"] == "done", status["error"]
        assert status["counts"] == {"rows": ROWS, "accepted": 0, "duplicate": len(good),
                                    "corrected": 0, "conflict": 0, "rejected": len(bad)}
        assert _count(store, records) == len(good) and _count(store, outbox) == len(good)
    finally:
        if gw.proc is not None:
            orphans += _children(gw.proc.pid)
        gw.stop()
        _kill_orphans(orphans)
