"""Review of session 16's batch changes: put back after a transient failure, attempts, the file check.

Also the surrogate / huge-integer handling of the same day, attacked on the batch (NDJSON) path
and the Cadre College pull.  Helpers come from the batch crash review.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from alembic import command
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

import gateway.batches as batches_module
import gateway.cli as cli_module
import gateway.cli.intake as cli_intake
from gateway import audit
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.pull.cadre_college import pull_once, read_state
from gateway.store.db import alembic_config, make_engine, upgrade
from gateway.store.tables import batches, outbox, record_versions, records, rejections
from tests.integration.test_batch_crash_review import (
    COUNTS,
    MakeSettings,
    NewPartner,
    batch_row,
    health_file,
    new_store,
    register,
    settings_for,
)
from tests.integration.test_cadre_pull_review import (
    Scripted,
    completions,
    page,
    pull_settings,
    source_ids,
)
from tests.support.servers import poll, uvicorn_thread

BEIJING = ZoneInfo("Asia/Shanghai")


@pytest.fixture
def serve_app() -> Iterator[Callable[[Any], str]]:
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(uvicorn_thread(app))


def _counts(row: dict[str, Any]) -> dict[str, int]:
    return {k: int(row[k]) for k in COUNTS}


def _expected(good: set[str], bad: dict[int, Any]) -> dict[str, int]:
    return {"accepted": len(good), "duplicate": 0, "corrected": 0, "conflict": 0,
            "rejected": len(bad)}


def _store_holds_each_good_row_once(engine: Engine, good: set[str]) -> None:
    with engine.connect() as conn:
        sources = list(conn.execute(select(records.c.source_record_id)).scalars())
        versions = int(conn.execute(select(text("count(*)")).select_from(record_versions)).scalar_one())
        queued = int(conn.execute(select(text("count(*)")).select_from(outbox)).scalar_one())
        verified = audit.verify(conn)
    assert sorted(sources) == sorted(good)
    assert versions == len(good) and queued == len(good)
    assert verified.ok, verified.reason


def _flaky_ingest(monkeypatch: pytest.MonkeyPatch, fails: Callable[[int], bool]) -> list[int]:
    """ingest_items raises a store error on the calls ``fails`` picks (1-based), before writing."""
    real = batches_module.ingest_items  # type: ignore[attr-defined]
    calls = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if fails(calls[0]):
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(batches_module, "ingest_items", flaky)
    return calls


def _run_until_ended(engine: Engine, settings: Settings, timeout: float = 25) -> dict[str, Any]:
    processor = BatchProcessor(engine, settings, name="proc-b")

    def ended() -> dict[str, Any] | None:
        processor.run_once()
        row = batch_row(engine)
        return row if row["status"] in ("done", "failed") else None

    result: dict[str, Any] = poll(ended, timeout, interval=0.05, what="the batch to end")
    return result


# -- findings ---------------------------------------------------------------------------------


def test_local_ingest_resumes_its_own_batch_after_a_transient_store_error(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "health.csv"
    good, bad = health_file(path, 120, "utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    settings = settings_for(make_settings, url, tmp_path)
    monkeypatch.setattr(cli_intake, "_settings", lambda: settings)
    _flaky_ingest(monkeypatch, lambda n: n == 2)  # one blip after the first chunk

    result = CliRunner().invoke(cli_module.app, [
        "ingest", str(path), "--adapter", "health", "--kind", "monthly", "--period", "2026-03",
        "--partner-id", "health-review", "--json"])

    with engine.connect() as conn:
        [row] = [dict(r) for r in conn.execute(select(batches)).mappings()]
    assert row["status"] == "done", (row["status"], result.exit_code, result.output[-300:])
    assert _counts(row) == _expected(good, bad)
    assert result.exit_code == 0


def _ndjson_with_numeric_ids(path: Path, ids: list[str]) -> None:
    """An NDJSON health file whose 记录编号 are JSON numbers (digits as written in ``ids``)."""
    health_file(path, len(ids), "ndjson", bad_ratio=0)
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    out = []
    for line, number in zip(lines, ids, strict=True):
        body = orjson.dumps({**orjson.loads(line), "记录编号": "PLACEHOLDER"})
        out.append(body.replace(b'"PLACEHOLDER"', number.encode()))
    path.write_bytes(b"\n".join(out) + b"\n")


def test_ndjson_record_numbers_beyond_64_bits_stay_distinct_records(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    ids = [f"2026032700000000000{i}" for i in range(4)]  # 20 digits, above 2**64
    path = tmp_path / "health.ndjson"
    _ndjson_with_numeric_ids(path, ids)
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)
    processor = BatchProcessor(engine, settings_for(make_settings, url, tmp_path), name="p")
    claimed = processor.claim()
    assert claimed is not None and processor.run(claimed) is None
    row = batch_row(engine)
    with engine.connect() as conn:
        sources = sorted(conn.execute(select(records.c.source_record_id)).scalars())
    # Never one record standing for four: each is its own record, or refused on its own.
    assert int(row["corrected"]) == 0 and int(row["duplicate"]) == 0, _counts(row)
    assert sources in (ids, [])


def test_ndjson_record_numbers_within_64_bits_are_read_exactly(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    ids = [f"1844674407370955160{i}" for i in range(4)]  # 19 digits, just below 2**64
    path = tmp_path / "health.ndjson"
    _ndjson_with_numeric_ids(path, ids)
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)
    processor = BatchProcessor(engine, settings_for(make_settings, url, tmp_path), name="p")
    claimed = processor.claim()
    assert claimed is not None and processor.run(claimed) is None
    with engine.connect() as conn:
        sources = sorted(conn.execute(select(records.c.source_record_id)).scalars())
    assert sources == ids


def _xh_with_lone_surrogate(item: dict[str, Any]) -> str:
    # The college's serial number cut inside a surrogate pair, as the name/title cases are.
    body = orjson.dumps({**item, "xh": "PLACEHOLDER"}).decode()
    return body.replace("PLACEHOLDER", "GB2026\\ud840")


def _rejected_with_deep_nesting(item: dict[str, Any]) -> str:
    # A broken id number (so the item is rejected and its raw item filed) and an extra key
    # nested 300 deep: Python's json reads it, orjson writes at most 254 levels.
    body = orjson.dumps({**item, "sfzh": item["sfzh"][:-1] + "0", "ext": "PLACEHOLDER"}).decode()
    return body.replace('"PLACEHOLDER"', "[" * 300 + "]" * 300)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_lone_surrogate_in_the_college_serial_number_does_not_stop_the_pull(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    _one_odd_item_is_filed_alone(_xh_with_lone_surrogate, db_url, engine, serve_app, make_settings)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_deeply_nested_rejected_college_item_does_not_stop_the_pull(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    _one_odd_item_is_filed_alone(_rejected_with_deep_nesting, db_url, engine, serve_app,
                                 make_settings)


def _one_odd_item_is_filed_alone(bad: Callable[[dict[str, Any]], str], db_url: str,
                                 engine: Engine, serve_app: Callable[[Any], str],
                                 make_settings: Callable[..., Settings]) -> None:
    good = completions(4)
    data = f"[{orjson.dumps(good[0]).decode()}, {bad(good[1])}, {orjson.dumps(good[2]).decode()}]"
    college = Scripted({"": page(data, "c1", True), "c1": page([good[3]], "c2", False)})
    settings = pull_settings(make_settings, db_url, serve_app(college.app))
    result = None
    try:
        result = pull_once(engine, settings)
    finally:
        state = read_state(engine)
        ids = source_ids(engine)
    assert result is not None and result.error is None
    assert result.accepted == 3 and result.rejected == 1
    assert state is not None and state.cursor == "c2"
    assert {good[0]["xh"], good[2]["xh"], good[3]["xh"]} == set(ids)
    with engine.connect() as conn:
        assert len(list(conn.execute(select(rejections.c.id)))) == 1



@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_college_correction_pulled_after_the_year_close_is_year_closed(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    today = datetime.now(BEIJING).date()
    done = today - timedelta(days=2)
    [item] = completions(1)
    item = {**item, "wcsj": f"{done.isoformat()} 10:00:00", "xs": 2,
            "zsbh": f"QHGBWY{done.year}00000001"}
    college = Scripted({"": page([item], "c1", False), "c1": page([{**item, "xs": 20}], "c2", False)})
    url = serve_app(college.app)
    open_ = pull_settings(make_settings, db_url, url, year_close_extensions={done.year: today})
    first = pull_once(engine, open_)
    assert (first.error, first.accepted) == (None, 1)
    closed = pull_settings(make_settings, db_url, url,
                           year_close_extensions={done.year: today - timedelta(days=1)})
    later = pull_once(engine, closed)
    with engine.connect() as conn:
        codes = [e["code"] for raw in conn.execute(select(rejections.c.errors)).scalars()
                 for e in orjson.loads(raw)]
    assert later.corrected == 0 and codes == ["YEAR_CLOSED"], (later, codes)

# -- probes that held ---------------------------------------------------------------------------


def test_one_run_forever_worker_resumes_a_batch_it_put_back(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A single ``ce-gateway worker``: the put-back batch is taken again after its pause."""
    path = tmp_path / "health.csv"
    good, bad = health_file(path, 160, "utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)
    settings = settings_for(make_settings, url, tmp_path)
    _flaky_ingest(monkeypatch, lambda n: n in (2, 3))  # twice in a row: pauses of 1 s, 2 s
    worker = BatchProcessor(engine, settings, name="only")
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_seconds": 0.05},
                              daemon=True)
    thread.start()
    try:
        final = poll(lambda: (lambda r: r if r["status"] in ("done", "failed") else None)(
            batch_row(engine)), 25, interval=0.1, what="the batch to end")
    finally:
        worker.stop()
        thread.join(10)
    assert final["status"] == "done", (final["error_code"], final["error"])
    assert _counts(final) == _expected(good, bad)
    _store_holds_each_good_row_once(engine, good)


def test_a_batch_that_progresses_between_store_errors_is_never_failed_for_attempts(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each claim commits one chunk and then meets a store error: attempts reset at each chunk."""
    path = tmp_path / "health.csv"
    good, bad = health_file(path, 200, "utf-8")  # 5 chunks of 40
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)
    settings = settings_for(make_settings, url, tmp_path, batch_max_attempts=1)
    calls = _flaky_ingest(monkeypatch, lambda n: n % 2 == 0)
    final = _run_until_ended(engine, settings)
    assert final["status"] == "done", (final["error_code"], final["error"])
    assert _counts(final) == _expected(good, bad) and int(final["attempts"]) == 0
    assert calls[0] >= 9  # it really was put back after every chunk
    _store_holds_each_good_row_once(engine, good)


def test_a_batch_that_never_commits_a_chunk_is_failed_after_the_attempts(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "health.csv"
    health_file(path, 80, "utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)
    settings = settings_for(make_settings, url, tmp_path, batch_max_attempts=2)
    calls = _flaky_ingest(monkeypatch, lambda n: True)
    final = _run_until_ended(engine, settings)
    assert (final["status"], final["error_code"]) == ("failed", "BATCH_FAILED")
    assert calls[0] == 2 and "BATCH_MAX_ATTEMPTS" in final["error"]
    assert sum(_counts(final).values()) == 0 and int(final["rows_done"]) == 0


def test_a_store_error_while_finishing_ends_done_without_counting_twice(
        tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "health.csv"
    good, bad = health_file(path, 120, "utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = new_store(url, new_partner)
    register(engine, path)
    settings = settings_for(make_settings, url, tmp_path)
    real = BatchProcessor._finish
    blips = [0]

    def finish(self: BatchProcessor, batch_id: str, status: str, failure: Any) -> None:
        if status == "done" and not blips[0]:
            blips[0] += 1
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        real(self, batch_id, status, failure)

    monkeypatch.setattr(BatchProcessor, "_finish", finish)
    a = BatchProcessor(engine, settings, name="proc-a")
    claimed = a.claim()
    assert claimed is not None
    assert isinstance(a.run(claimed), OperationalError)
    final = _run_until_ended(engine, settings)
    assert blips[0] == 1 and final["status"] == "done"
    assert _counts(final) == _expected(good, bad)
    assert int(final["rows_total"]) == len(good) + len(bad)
    _store_holds_each_good_row_once(engine, good)


@pytest.mark.postgres
def test_a_postgresql_backend_terminated_mid_chunk_resumes_without_loss_or_double(
        postgres_url: str, tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pg_terminate_backend from another connection inside chunk 2's transaction."""
    path = tmp_path / "health.csv"
    good, bad = health_file(path, 200, "utf-8")
    engine = new_store(postgres_url, new_partner)
    register(engine, path)
    settings = settings_for(make_settings, postgres_url, tmp_path)
    real = batches_module.ingest_items  # type: ignore[attr-defined]
    calls, killed = [0], []

    def ingest_items(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            checkpoint = kwargs["in_tx"]

            def terminated(conn: Any, answers: Any) -> None:
                pid = conn.execute(text("select pg_backend_pid()")).scalar_one()
                with engine.connect() as other:
                    killed.append(other.execute(text("select pg_terminate_backend(:p)"),
                                                {"p": pid}).scalar_one())
                checkpoint(conn, answers)  # its first statement meets the dead connection

            kwargs["in_tx"] = terminated
        return real(*args, **kwargs)

    monkeypatch.setattr(batches_module, "ingest_items", ingest_items)
    a = BatchProcessor(engine, settings, name="proc-a")
    claimed = a.claim()
    assert claimed is not None
    assert isinstance(a.run(claimed), OperationalError)
    assert killed == [True]
    after = batch_row(engine)
    assert (after["status"], after["lease_owner"], int(after["rows_done"])) == ("processing", None, 41)
    final = _run_until_ended(engine, settings)
    assert final["status"] == "done", (final["error_code"], final["error"])
    assert _counts(final) == _expected(good, bad)
    _store_holds_each_good_row_once(engine, good)



# -- migration 0018 on a store with batches ----------------------------------------------------


def _store_at_0017_with_batches(url: str) -> None:
    """The store as 0017 left it, holding a queued, a processing (leased) and a done batch."""
    command.downgrade(alembic_config(url), "0017")
    engine = make_engine(url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "insert into partners (partner_id, adapter, app_key, secret_enc, active, created_at)"
                " values ('p-mig', 'health', 'k-mig', 's', true, :now)"), {"now": now})
            for n, status in enumerate(("queued", "processing", "done")):
                conn.execute(text(
                    "insert into batches (batch_id, partner_id, adapter, kind, period, status, "
                    "file_path, file_format, file_size, sha256, rows_done, accepted, duplicate, "
                    "corrected, conflict, rejected, credits_total, created_at, lease_owner, "
                    "lease_until) values (:id, 'p-mig', 'health', 'monthly', '2026-03', :status, "
                    "'/nowhere.csv', 'csv', 10, 'ab', 5, 4, 0, 0, 0, 0, '12.5', :now, :owner, :now)"),
                    {"id": f"B-mig-{n}", "status": status, "now": now,
                     "owner": "w1" if status == "processing" else None})
    finally:
        engine.dispose()


def _batches_as_stored(url: str) -> list[tuple[Any, ...]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(
                batches.c.batch_id, batches.c.status, batches.c.lease_owner, batches.c.rows_done,
                batches.c.credits_total, batches.c.attempts).order_by(batches.c.batch_id))]
    finally:
        engine.dispose()


def test_0018_keeps_existing_batches_and_survives_a_downgrade_and_upgrade(db_url: str) -> None:
    _store_at_0017_with_batches(db_url)
    upgrade(db_url)
    expected = [("B-mig-0", "queued", None, 5, "12.5", 0),
                ("B-mig-1", "processing", "w1", 5, "12.5", 0),
                ("B-mig-2", "done", None, 5, "12.5", 0)]
    assert _batches_as_stored(db_url) == expected
    command.downgrade(alembic_config(db_url), "0017")
    upgrade(db_url)
    assert _batches_as_stored(db_url) == expected


@pytest.mark.postgres
def test_0018_downgrade_on_postgresql_with_a_long_credits_total(postgres_url: str) -> None:
    _store_at_0017_with_batches(postgres_url)
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("update batches set credits_total = :v where batch_id = 'B-mig-2'"),
                         {"v": "1.000000000000000000000000000E+40"})
    finally:
        engine.dispose()
    command.downgrade(alembic_config(postgres_url), "0017")
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("select count(*) from batches")).scalar_one() == 3
    finally:
        engine.dispose()
