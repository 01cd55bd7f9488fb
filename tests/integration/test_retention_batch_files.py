"""Retention of batch files (docs/retention-and-audit.md) on SQLite and PostgreSQL.

A file in BATCH_DIR is a partner's upload as it came: every row's identity number and name.
Real uploads through the signed API on uvicorn finish ``done`` and ``failed`` and one stays
``queued``; the prune, run at chosen "now"s, must delete exactly the finished batches' files
once RETENTION_PAYLOAD_DAYS have passed since they finished, and the leftovers of uploads killed
mid-stream, mark and audit what it removed, skip a directory that is not mounted on its host,
and leave the queued batch's file, which a worker still has to read.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from typer.testing import CliRunner

from gateway.api.app import create_app
from gateway.audit import verify
from gateway.cli import app as cli_app
from gateway.config import get_settings
from gateway.retention import prune
from gateway.store.tables import audit_events, batches
from tests.integration.test_batches_api import (
    YEAR,
    MakeSettings,
    NewPartner,
    finished,
    gateway,
    generated_health,
    signed,
    upload,
)
from tests.support.servers import uvicorn_thread


def _batch_rows(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["batch_id"]: dict(r) for r in conn.execute(select(batches)).mappings()}


def _retention_events(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [json.loads(d) for d in conn.execute(select(audit_events.c.detail).where(
            audit_events.c.kind == "retention_pruned").order_by(audit_events.c.seq)).scalars()]


def _aged(path: Path, at: datetime) -> Path:
    path.write_bytes(b"id_no,name\n630102199001011234,\xe5\xbc\xa0\n")  # what a partner sends
    os.utime(path, (at.timestamp(), at.timestamp()))
    return path


def test_finished_batches_files_and_upload_leftovers_go_once_their_age_has_passed(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner, caplog: pytest.LogCaptureFixture) -> None:
    health = new_partner(engine, adapter="health")
    batch_dir = tmp_path / "b"
    settings = make_settings(db_url, batch_dir=batch_dir)
    files = []
    for seed in range(3):
        path = tmp_path / f"health_{seed}.csv"
        generated_health(path, 90 + seed, 5, bad_ratio=0.2)
        files.append(path)
    period = f"{YEAR}-03"
    with gateway(settings) as url, signed(url, health) as client:
        done = finished(client, upload(client, files[0], "health", period=period))
        failed = finished(client, upload(client, files[1], "health", period=period, row_count=1))
    assert (done["status"], failed["status"]) == ("done", "failed")
    # A replica with no worker acknowledges the third: it waits, queued, for a worker.
    with uvicorn_thread(create_app(settings, run_worker=False)) as url, signed(url, health) as client:
        queued = upload(client, files[2], "health", period=period)
    rows = _batch_rows(engine)
    assert rows[queued]["status"] == "queued"
    path_of = {b: Path(rows[b]["file_path"]) for b in rows}
    assert all(p.exists() and p.parent == batch_dir for p in path_of.values())
    last_finished = max(rows[b]["finished_at"] for b in (done["batch_id"], failed["batch_id"]))

    # Uploads killed mid-stream leave .part files: one last written long ago, one just now.
    later = last_finished + timedelta(days=settings.retention_payload_days, minutes=1)
    stale = _aged(batch_dir / "B-killed-long-ago.part", later - timedelta(days=2))
    live = _aged(batch_dir / "B-still-streaming.part", later - timedelta(minutes=5))

    # Not yet old enough: nothing of a finished batch goes (the stale leftover does).
    young = prune(engine, settings, dry_run=True, now=later - timedelta(minutes=2))
    assert (young.batch_files, young.upload_leftovers) == (0, 1)
    dry = prune(engine, settings, dry_run=True, now=later)
    assert (dry.batch_files, dry.upload_leftovers) == (2, 1)
    assert all(p.exists() for p in [*path_of.values(), stale, live]) and _retention_events(engine) == []

    # The failed batch's directory is not mounted on the job's host: its file is left unmarked.
    elsewhere = tmp_path / "not-mounted" / path_of[failed["batch_id"]].name
    with engine.begin() as conn:
        conn.execute(update(batches).where(batches.c.batch_id == failed["batch_id"])
                     .values(file_path=str(elsewhere)))
    # The dry run counts what this host would delete, as the real run then does: 1, not 2.
    with caplog.at_level(logging.WARNING, logger="gateway.retention"):
        assert prune(engine, settings, dry_run=True, now=later).batch_files == 1
    assert any(str(elsewhere.parent) in r.getMessage() and "left for a run" in r.getMessage()
               for r in caplog.records)
    assert all(p.exists() for p in path_of.values()) and _retention_events(engine) == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.retention"):
        first = prune(engine, settings, actor="ops-lead", now=later)
    assert (first.batch_files, first.upload_leftovers) == (1, 1)
    assert any(str(elsewhere.parent) in r.getMessage() for r in caplog.records)
    assert not path_of[done["batch_id"]].exists() and not stale.exists()
    assert path_of[failed["batch_id"]].exists() and path_of[queued].exists() and live.exists()
    rows = _batch_rows(engine)
    assert rows[done["batch_id"]]["file_removed_at"] == later
    assert rows[failed["batch_id"]]["file_removed_at"] is None
    assert rows[queued]["file_removed_at"] is None

    # Mounted again: the next run removes it; the queued batch's file stays however old.
    with engine.begin() as conn:
        conn.execute(update(batches).where(batches.c.batch_id == failed["batch_id"])
                     .values(file_path=str(path_of[failed["batch_id"]])))
    much_later = later + timedelta(days=3650)
    second = prune(engine, settings, now=much_later)
    assert (second.batch_files, second.upload_leftovers) == (1, 1)  # `live` is old by now
    assert not path_of[failed["batch_id"]].exists() and not live.exists()
    assert path_of[queued].exists() and _batch_rows(engine)[queued]["file_removed_at"] is None
    again = prune(engine, settings, now=much_later)
    assert (again.batch_files, again.upload_leftovers) == (0, 0)

    events = _retention_events(engine)  # one per run that removed something, none for `again`
    assert [(e["batch_files"], e["upload_leftovers"]) for e in events] == [(1, 1), (1, 1)]
    with engine.connect() as conn:
        assert verify(conn).ok

    # The batch's status says the file is gone; its counts and rejected rows are kept.
    with uvicorn_thread(create_app(settings, run_worker=False)) as url, signed(url, health) as client:
        for before in (done, failed):
            after = client.get(f"/v1/batches/{before['batch_id']}").json()
            assert after["file_removed_at"] is not None
            assert {k: after[k] for k in ("status", "counts", "rejected_rows")} == {
                k: before[k] for k in ("status", "counts", "rejected_rows")}
        assert client.get(f"/v1/batches/{queued}").json()["file_removed_at"] is None
    assert done["file_removed_at"] is None


def test_a_crash_between_delete_and_mark_is_finished_by_the_next_run(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    """The file is deleted before the row is marked: a file already gone is marked, not an error."""
    health = new_partner(engine, adapter="health")
    settings = make_settings(db_url, batch_dir=tmp_path / "b")
    path = tmp_path / "health.csv"
    generated_health(path, 97, 3, bad_ratio=0.0)
    with gateway(settings) as url, signed(url, health) as client:
        status = finished(client, upload(client, path, "health", period=f"{YEAR}-04"))
    row = _batch_rows(engine)[status["batch_id"]]
    Path(row["file_path"]).unlink()  # what a run killed after the delete leaves
    now = row["finished_at"] + timedelta(days=settings.retention_payload_days + 1)
    result = prune(engine, settings, now=now)
    assert result.batch_files == 1
    assert _batch_rows(engine)[status["batch_id"]]["file_removed_at"] == now


def test_retention_off_keeps_every_file(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    health = new_partner(engine, adapter="health")
    settings = make_settings(db_url, batch_dir=tmp_path / "b", retention_payload_days=0)
    path = tmp_path / "health.csv"
    generated_health(path, 98, 3, bad_ratio=0.0)
    with gateway(settings) as url, signed(url, health) as client:
        status = finished(client, upload(client, path, "health", period=f"{YEAR}-05"))
    leftover = _aged(Path(settings.batch_dir) / "B-old.part", datetime(2020, 1, 1, tzinfo=UTC))
    result = prune(engine, settings, now=datetime.now(UTC) + timedelta(days=36_500))
    assert (result.cutoff, result.batch_files, result.upload_leftovers) == (None, 0, 0)
    assert Path(_batch_rows(engine)[status["batch_id"]]["file_path"]).exists() and leftover.exists()


def test_the_cli_reports_the_files(db_url: str, engine: Engine, tmp_path: Path,
                                   make_settings: MakeSettings) -> None:
    """``retention run --json`` carries the file counts; the dry run removes nothing."""
    settings = make_settings(db_url, batch_dir=tmp_path / "b")
    Path(settings.batch_dir).mkdir(parents=True)
    leftover = _aged(Path(settings.batch_dir) / "B-old.part", datetime(2020, 1, 1, tzinfo=UTC))
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_BATCH_DIR": str(settings.batch_dir)}
    get_settings.cache_clear()
    try:
        dry = CliRunner().invoke(cli_app, ["retention", "run", "--dry-run", "--json"], env=env)
        assert dry.exit_code == 0, dry.output
        assert json.loads(dry.stdout)["upload_leftovers"] == 1 and leftover.exists()
        run = CliRunner().invoke(cli_app, ["retention", "run", "--json"], env=env)
        assert run.exit_code == 0, run.output
        assert json.loads(run.stdout)["upload_leftovers"] == 1 and not leftover.exists()
    finally:
        get_settings.cache_clear()
