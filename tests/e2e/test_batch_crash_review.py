"""Review of batch durability: SIGKILL a real ``ce-gateway worker`` mid-XLSX, compare with a clean run.

The in-process differentials (tests/integration/test_batch_crash_review.py) stop a processor
at a chunk boundary by raising; here the processor is a real process, parsing in a real parse
worker child, killed with SIGKILL wherever it happens to be once the checkpoint has passed a
row.  A second worker resumes the batch.  The crashed store must hold what a clean in-process
run of the same file holds (modulo record ids and timestamps), with row numbers of the XLSX
sheet kept right across the resume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from gateway.accounts import Partner
from gateway.config import Settings
from tests.conftest import SECRET_KEY
from tests.e2e.test_batch_crash import _children, _kill_orphans
from tests.integration.test_batch_crash_review import (  # noqa: F401 - the fixture closes stores
    BATCH_ID,
    _dispose_stores,
    batch_row,
    health_file,
    new_store,
    outcome,
    process_clean,
    register,
    settings_for,
)
from tests.support.servers import WorkerProcess, poll


@pytest.mark.slow
@pytest.mark.parametrize("kill_past_row", [150, 700])
def test_sigkill_of_a_real_processor_mid_xlsx_leaves_what_a_clean_run_leaves(
        kill_past_row: int, tmp_path: Path, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner]) -> None:
    path = tmp_path / "health.xlsx"
    good, bad = health_file(path, 1000, "xlsx", seed=53)
    clean_url = f"sqlite:///{tmp_path / 'clean.sqlite3'}"
    crash_url = f"sqlite:///{tmp_path / 'crash.sqlite3'}"
    clean, crashed = new_store(clean_url, new_partner), new_store(crash_url, new_partner)
    register(clean, path)
    register(crashed, path)
    process_clean(clean, settings_for(make_settings, clean_url, tmp_path, batch_chunk_rows=100))

    env = {"CE_GATEWAY_DATABASE_URL": crash_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_BATCH_DIR": str(tmp_path / "batches"), "CE_GATEWAY_BATCH_CHUNK_ROWS": "100",
           "CE_GATEWAY_BATCH_LEASE_SECONDS": "2", "CE_GATEWAY_BATCH_PARSE_MIN_BYTES": "0",
           "CE_GATEWAY_BATCH_PARSE_WORKERS": "1",
           # nothing is delivered: the outbox rows stay as the chunks queued them
           "CE_GATEWAY_DOWNSTREAM_URL": "http://127.0.0.1:9",
           "CE_GATEWAY_DELIVERY_POLL_SECONDS": "3600", "CE_GATEWAY_PULL_INTERVAL_SECONDS": "0",
           "CE_GATEWAY_REFERENCE_SYNC_INTERVAL_SECONDS": "0",
           "CE_GATEWAY_RETENTION_INTERVAL_SECONDS": "0", "CE_GATEWAY_ALERT_INTERVAL_SECONDS": "0"}
    log = tmp_path / "worker.log"
    orphans: list[int] = []
    worker = WorkerProcess(env, log).start()
    try:
        def past_kill_point() -> bool:
            row = batch_row(crashed)
            assert row["status"] != "done", "the batch ended before the kill: nothing was tested"
            return int(row["rows_done"]) >= kill_past_row

        poll(past_kill_point, 120, interval=0.01, what="the checkpoint to pass the kill point")
        orphans = _children(worker.pid)
        worker.kill9()
        _kill_orphans(orphans)
        at_kill = batch_row(crashed)
        assert at_kill["status"] == "processing"  # the kill came before _finish, if after every chunk

        worker = WorkerProcess(env, log).start()
        poll(lambda: batch_row(crashed)["status"] in ("done", "failed"), 120, interval=0.1,
             what="the batch to end after the restart")
    finally:
        if worker.proc is not None:
            orphans += _children(worker.pid)
        worker.stop()
        _kill_orphans(orphans)

    want, got = _compare(clean), _compare(crashed)
    assert want["batch"]["status"] == "done"
    assert (want["batch"]["accepted"], want["batch"]["rejected"]) == (len(good), len(bad))
    assert sorted({(e[0], e[1], e[2]) for e in want["errors"]}) == sorted(
        (row, column, code) for row, (column, code) in bad.items())
    for key in ("batch", "records", "duplicate_of", "versions", "outbox", "errors", "rejections"):
        assert got[key] == want[key], key
    assert {k: got["audit"][k] for k in want["audit"]} == want["audit"]


def _compare(engine: Engine) -> dict[str, Any]:
    found = outcome(engine, BATCH_ID)
    found["outbox"] = [(source, version) for source, version, _status in found["outbox"]]
    return found
