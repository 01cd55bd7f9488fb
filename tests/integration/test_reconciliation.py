"""Annual vs monthly reconciliation (SPEC §2 health/finance users) on SQLite and PostgreSQL.

A year of pushes from :func:`mock_partners.files.year_dataset` is ingested the way the batch
processor ingests uploads; the report (Python, ``GET /v1/reconciliation/{adapter}/{year}`` and
``ce-gateway reconcile --json``) must name exactly what the generator's manifest says the
annual batch repeats, corrects, lacks, adds and conflicts with, month by month.  The store must
agree: the annual's repeats made no new versions and queued nothing, each correction made one
queued version, conflicts are held.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from alembic import command
from sqlalchemy import Engine, func, select, update

from adapters.normalize import parse_date
from gateway import reconcile
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.batch_status import batch_status
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.signing import file_sha256
from gateway.store.db import upgrade
from gateway.store.tables import batch_repeats, batches, outbox, record_versions, records
from mock_partners.files import FINANCE_HEADERS, HEALTH_HEADERS, write_csv, year_dataset
from tests.conftest import SECRET_KEY
from tests.support.files import another_export
from tests.support.keys import unsafe_downgrade_config
from tests.support.servers import cli, uvicorn_thread

MakeSettings = Callable[..., Settings]


def open_ce_year() -> int:
    """A CE year still open today: R11 closes a year on 30 December, Asia/Shanghai."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return today.year if (today.month, today.day) <= (12, 30) else today.year + 1


YEAR = open_ce_year()
AFTER_THE_YEAR = datetime(YEAR + 1, 1, 15, 9, 0, tzinfo=UTC)

# adapter → (seed, people, rows per month): finance gets the smaller year.
DATASETS = {"health": (31, 200, 40), "finance": (32, 80, 15)}


def _ingest(engine: Engine, settings: Settings, partner: Partner, path: Path, kind: str,
            period: str, uploaded_at: datetime | None = None) -> str:
    """Record the batch as an upload would, then run the processor until nothing is left.

    ``uploaded_at``: when the upload arrived, as the rules see it (R11 judges a batch's rows
    at its arrival), if not now.
    """
    batch = NewBatch(new_batch_id(), partner.partner_id, partner.adapter, kind, period, path,
                     "csv", path.stat().st_size, file_sha256(path))
    taken = record_batch(engine, batch, actor=partner.partner_id)
    if taken.resent:  # the same file again: the batch that took it answers, nothing runs
        return taken.batch_id
    if uploaded_at is not None:
        with engine.begin() as conn:
            conn.execute(update(batches).where(batches.c.batch_id == batch.batch_id)
                         .values(created_at=uploaded_at))
    processor = BatchProcessor(engine, settings, name="test-processor")
    for _ in range(5):
        if not processor.run_once():
            break
    else:
        raise AssertionError("the processor kept finding batches")
    with engine.connect() as conn:
        row = conn.execute(select(batches).where(batches.c.batch_id == batch.batch_id)).mappings().one()
    assert row["status"] == "done", row["error"]
    return batch.batch_id


def _count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def _expected(monthly: list[list[dict[str, Any]]], annual: list[dict[str, Any]],
              manifest: dict[str, Any]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per month and in total, what the report must say, from the manifest alone."""
    id_column = manifest["id_column"]
    month_of: dict[str, str] = {}
    for m, rows in enumerate(monthly, start=1):
        for row in rows:
            month_of[row[id_column]] = f"{YEAR}-{m:02d}"
    for row in annual:  # added and conflicting rows fall in the month they were completed
        month_of.setdefault(row[id_column], f"{parse_date(row['完成日期']):%Y-%m}")
    categories = {"repeated": "unchanged", "corrected": "changed", "lacking": "missing",
                  "added": "added", "conflicts": "conflict"}
    # The generator refuses and withdraws nothing: those categories stay 0.
    every = reconcile.CATEGORIES
    months: dict[str, dict[str, int]] = {}
    for category, key in categories.items():
        for month, n in Counter(month_of[rid] for rid in manifest[key]).items():
            months.setdefault(month, dict.fromkeys(every, 0))[category] = n
    for m, n in enumerate(manifest["monthly_counts"], start=1):
        if n:
            months.setdefault(f"{YEAR}-{m:02d}", dict.fromkeys(every, 0))
            months[f"{YEAR}-{m:02d}"]["monthly_records"] = n
    totals = {c: sum(m[c] for m in months.values()) for c in every}
    return months, totals


def _as_months(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {m["month"]: {k: v for k, v in m.items() if k != "month"} for m in report["months"]}


@pytest.mark.parametrize("adapter", sorted(DATASETS))
def test_annual_batch_is_reconciled_against_the_months_exactly(
        adapter: str, db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], new_operator: Callable[..., str]) -> None:
    seed, people, per_month = DATASETS[adapter]
    monthly, annual, manifest = year_dataset(seed, YEAR, people=people, per_month=per_month,
                                             adapter=adapter)  # type: ignore[arg-type]
    headers = HEALTH_HEADERS if adapter == "health" else FINANCE_HEADERS
    partner = new_partner(engine, adapter=adapter)
    settings = make_settings(db_url, batch_dir=tmp_path / "batches")

    monthly_ids = {}
    for m, rows in enumerate(monthly, start=1):
        if not rows:
            continue  # a month never pushed
        path = tmp_path / f"{adapter}_{YEAR}-{m:02d}.csv"
        write_csv(path, rows, headers, encoding="gb18030" if m % 2 else "utf-8-sig")
        monthly_ids[m] = _ingest(engine, settings, partner, path, "monthly", f"{YEAR}-{m:02d}")
    pushed = sum(manifest["monthly_counts"])
    assert _count(engine, records) == _count(engine, outbox) == pushed

    versions_before = _count(engine, record_versions)
    outbox_before = _count(engine, outbox)
    annual_path = tmp_path / f"{adapter}_{YEAR}.csv"
    write_csv(annual_path, annual, headers)
    annual_id = _ingest(engine, settings, partner, annual_path, "annual", str(YEAR))

    # -- the store: what the annual batch did ----------------------------------------------
    changed, unchanged = set(manifest["changed"]), set(manifest["unchanged"])
    added, conflicts = set(manifest["added"]), set(manifest["conflict"])
    with engine.connect() as conn:
        batch = conn.execute(select(batches).where(batches.c.batch_id == annual_id)).mappings().one()
        recs = {r.source_record_id: r for r in conn.execute(
            select(records).where(records.c.partner_id == partner.partner_id))}
        new_versions = conn.execute(
            select(record_versions.c.record_id, record_versions.c.version)
            .where(record_versions.c.batch_id == annual_id)
        ).all()
        queued = {(r.record_id, r.version)
                  for r in conn.execute(select(outbox.c.record_id, outbox.c.version))}
    assert {k: batch[k] for k in ("accepted", "duplicate", "corrected", "conflict", "rejected")} == {
        "accepted": len(added), "duplicate": len(unchanged), "corrected": len(changed),
        "conflict": len(conflicts), "rejected": 0}
    by_record = {r.record_id: sid for sid, r in recs.items()}
    # Repeats made no version and queued nothing; each correction made exactly one version 2,
    # queued; each added row one version 1, queued; each conflict one version 1, held.
    assert Counter((by_record[rid], v) for rid, v in new_versions) == Counter(
        [(sid, 2) for sid in changed] + [(sid, 1) for sid in added | conflicts])
    assert _count(engine, record_versions) - versions_before == len(new_versions)
    assert _count(engine, outbox) - outbox_before == len(changed) + len(added)
    for sid in unchanged:
        assert recs[sid].current_version == 1 and recs[sid].status == "accepted"
        assert recs[sid].last_batch_id == annual_id
    for sid in changed:
        assert recs[sid].current_version == 2 and (recs[sid].record_id, 2) in queued
    for sid in manifest["missing"]:
        assert recs[sid].current_version == 1 and recs[sid].last_batch_id != annual_id
    for sid in added:
        assert recs[sid].status == "accepted" and (recs[sid].record_id, 1) in queued
    for twin, original in manifest["conflict_with"].items():
        held = recs[twin]
        assert held.status == "conflict" and held.duplicate_of == recs[original].record_id
        assert not any(rid == held.record_id for rid, _ in queued)

    # -- the report --------------------------------------------------------------------------
    months, totals = _expected(monthly, annual, manifest)
    never = [f"{YEAR}-{m:02d}" for m in manifest["empty_months"]]
    with engine.connect() as conn:
        report = reconcile.report(conn, adapter, YEAR, today=AFTER_THE_YEAR)
    assert report["adapter"] == adapter and report["year"] == YEAR
    assert report["annual_batch_id"] == annual_id
    assert [b["batch_id"] for b in report["monthly_batches"]] == list(monthly_ids.values())
    assert [b["period"] for b in report["monthly_batches"]] == [f"{YEAR}-{m:02d}" for m in monthly_ids]
    assert _as_months(report) == months
    assert report["totals"] == totals
    assert report["months_never_pushed"] == never
    assert report["note"] is None
    samples = report["samples"]
    assert sorted(samples["corrected"]) == sorted(changed)[:reconcile.SAMPLE]
    assert set(samples["lacking"]) <= set(manifest["missing"]) and samples["lacking"]
    assert set(samples["added"]) <= added and set(samples["conflicts"]) == conflicts
    # A report asked for during the year only misses the months that have already ended.
    with engine.connect() as conn:
        midyear = reconcile.report(conn, adapter, YEAR, today=datetime(YEAR, 7, 3, tzinfo=UTC))
    assert midyear["months_never_pushed"] == [m for m in never if m < f"{YEAR}-07"]
    assert midyear["totals"] == totals

    # -- the same over HTTP (operator token) and through the CLI -------------------------------
    now = datetime.now(UTC)
    ended = [f"{YEAR}-{m:02d}" for m in range(1, 13)
             if (YEAR, m) < (now.year, now.month)]
    token = new_operator(engine, "viewer")
    with uvicorn_thread(create_app(settings, run_worker=False)) as url:
        resp = httpx.get(f"{url}/v1/reconciliation/{adapter}/{YEAR}",
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
        unauthenticated = httpx.get(f"{url}/v1/reconciliation/{adapter}/{YEAR}", timeout=30)
        unknown = httpx.get(f"{url}/v1/reconciliation/cadre_college/{YEAR}",
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    over_http = resp.json()
    assert _as_months(over_http) == months and over_http["totals"] == totals
    assert over_http["annual_batch_id"] == annual_id
    assert over_http["months_never_pushed"] == [m for m in never if m in ended]
    assert unauthenticated.status_code == 401 and unknown.status_code == 404

    result = cli({"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY},
                 "reconcile", adapter, str(YEAR), "--json")
    assert result.returncode == 0, result.stderr
    from_cli = json.loads(result.stdout)
    assert _as_months(from_cli) == months and from_cli["totals"] == totals
    assert from_cli["annual_batch_id"] == annual_id
    assert from_cli["months_never_pushed"] == over_http["months_never_pushed"]


def test_without_an_annual_batch_nothing_is_reconciled(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    monthly, _, manifest = year_dataset(5, YEAR, people=40, per_month=10)
    partner = new_partner(engine, adapter="health")
    settings = make_settings(db_url, batch_dir=tmp_path / "batches")
    first = next(m for m in range(1, 13) if monthly[m - 1])
    path = tmp_path / "one_month.csv"
    write_csv(path, monthly[first - 1], HEALTH_HEADERS)
    batch_id = _ingest(engine, settings, partner, path, "monthly", f"{YEAR}-{first:02d}")
    with engine.connect() as conn:
        report = reconcile.report(conn, "health", YEAR, today=AFTER_THE_YEAR)
        finance = reconcile.report(conn, "finance", YEAR, today=AFTER_THE_YEAR)
    assert report["annual_batch_id"] is None and report["note"]
    assert report["monthly_batches"] == [{"batch_id": batch_id, "period": f"{YEAR}-{first:02d}",
                                          "status": "done"}]
    assert report["totals"] == {**dict.fromkeys(reconcile.CATEGORIES, 0),
                                "monthly_records": manifest["monthly_counts"][first - 1]}
    assert report["months_never_pushed"] == [f"{YEAR}-{m:02d}" for m in range(1, 13) if m != first]
    assert finance["monthly_batches"] == [] and finance["months"] == []


def test_an_annual_batch_after_the_year_closed_repeats_its_months_as_duplicates(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    """An annual batch after the year closed: repeated rows are duplicates, new ones refused.

    It is due by year end, after R11 closed the year on 30 December: the rows it repeats must
    not become YEAR_CLOSED rejections.
    """
    monthly, _, _ = year_dataset(7, YEAR, people=30, per_month=8)
    partner = new_partner(engine, adapter="health")
    settings = make_settings(db_url, batch_dir=tmp_path / "batches", year_close_extensions={})
    first = next(m for m in range(1, 13) if monthly[m - 1])
    rows = monthly[first - 1]
    path = tmp_path / "month.csv"
    write_csv(path, rows, HEALTH_HEADERS)
    in_the_year = datetime(YEAR, first, 28, 2, tzinfo=UTC)
    _ingest(engine, settings, partner, path, "monthly", f"{YEAR}-{first:02d}", in_the_year)
    assert _count(engine, records) == _count(engine, outbox) == len(rows)

    late = dict(rows[0])
    late[HEALTH_HEADERS[0]] = "LATE-0001"  # a row the months never had
    annual_path = tmp_path / "annual.csv"
    write_csv(annual_path, [*rows, late], HEALTH_HEADERS)
    year_end = datetime(YEAR, 12, 31, 2, tzinfo=UTC)  # 10:00 on 31 December in Xining
    annual_id = _ingest(engine, settings, partner, annual_path, "annual", str(YEAR), year_end)
    with engine.connect() as conn:
        batch = conn.execute(select(batches).where(batches.c.batch_id == annual_id)).mappings().one()
    assert (batch["duplicate"], batch["accepted"], batch["rejected"]) == (len(rows), 0, 1)
    assert _count(engine, records) == _count(engine, outbox) == len(rows)  # nothing new sent


def _small_year(engine: Engine, db_url: str, tmp_path: Path, make_settings: MakeSettings,
                new_partner: Callable[..., Partner]) -> tuple[Settings, Partner, dict[int, Path],
                                                              Path, dict[str, Any]]:
    """A small year of health pushes, ingested: the monthly files, then the annual."""
    monthly, annual, manifest = year_dataset(11, YEAR, people=30, per_month=8)
    partner = new_partner(engine, adapter="health")
    settings = make_settings(db_url, batch_dir=tmp_path / "batches")
    paths = {}
    for m, rows in enumerate(monthly, start=1):
        if rows:
            paths[m] = tmp_path / f"m{m:02d}.csv"
            write_csv(paths[m], rows, HEALTH_HEADERS)
            _ingest(engine, settings, partner, paths[m], "monthly", f"{YEAR}-{m:02d}")
    annual_path = tmp_path / "annual.csv"
    write_csv(annual_path, annual, HEALTH_HEADERS)
    _ingest(engine, settings, partner, annual_path, "annual", str(YEAR))
    return settings, partner, paths, annual_path, manifest


def test_sending_the_annual_or_a_month_again_leaves_the_report_as_it_was(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    """The report is of what the batches carried, not of which batch carried a record last."""
    settings, partner, paths, annual_path, manifest = _small_year(
        engine, db_url, tmp_path, make_settings, new_partner)
    with engine.connect() as conn:
        first = reconcile.report(conn, "health", YEAR, today=AFTER_THE_YEAR)
    assert first["totals"]["repeated"] == len(manifest["unchanged"])
    assert first["totals"]["corrected"] == len(manifest["changed"]) > 0
    assert first["totals"]["lacking"] == len(manifest["missing"]) > 0
    # Other exports of the same rows (a byte-identical file is a resend of its batch).
    month, path = next(iter(paths.items()))
    annual_again, month_again = another_export(annual_path), another_export(path)
    again = _ingest(engine, settings, partner, annual_again, "annual", str(YEAR))
    _ingest(engine, settings, partner, month_again, "monthly", f"{YEAR}-{month:02d}")
    with engine.connect() as conn:
        later = reconcile.report(conn, "health", YEAR, today=AFTER_THE_YEAR)
    assert _as_months(later) == _as_months(first) and later["totals"] == first["totals"]
    assert later["samples"] == first["samples"]
    assert later["annual_batches"] == [first["annual_batch_id"], again]


def test_an_activity_the_annual_carries_under_another_record_number_is_not_lacking(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    """Same claim under a new number: repeated (its duplicate); other credits: a conflict only."""
    monthly, _, _ = year_dataset(13, YEAR, people=20, per_month=6)
    partner = new_partner(engine, adapter="health")
    settings = make_settings(db_url, batch_dir=tmp_path / "batches")
    m = next(m for m in range(1, 13) if len(monthly[m - 1]) >= 3)
    rows = monthly[m - 1][:3]
    path = tmp_path / "month.csv"
    write_csv(path, rows, HEALTH_HEADERS)
    _ingest(engine, settings, partner, path, "monthly", f"{YEAR}-{m:02d}")
    same = {**rows[1], "记录编号": "RENUMBERED-1"}
    other = {**rows[2], "记录编号": "RENUMBERED-2", "学分": str(Decimal(rows[2]["学分"]) + 2)}
    annual_path = tmp_path / "annual.csv"
    write_csv(annual_path, [rows[0], same, other], HEALTH_HEADERS)
    annual_id = _ingest(engine, settings, partner, annual_path, "annual", str(YEAR))
    with engine.connect() as conn:
        report = reconcile.report(conn, "health", YEAR, today=AFTER_THE_YEAR)
        status = batch_status(conn, annual_id)
    assert status is not None
    # The conflict's row error names the partner's own column, the credits that differ.
    assert [(r["row"], r["code"], r["column"]) for r in status["rejected_rows"]] == [
        (4, "CONFLICT_WITH_EXISTING", "学分")]
    assert report["totals"] == {"monthly_records": 3, "repeated": 2, "corrected": 0,
                                "lacking": 0, "refused": 0, "withdrawn": 0, "added": 0, "conflicts": 1}
    assert report["samples"]["conflicts"] == ["RENUMBERED-2"] and report["samples"]["lacking"] == []


def test_0014_backfills_the_last_repeat_of_each_record(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    _small_year(engine, db_url, tmp_path, make_settings, new_partner)
    with engine.connect() as conn:
        before = set(conn.execute(select(batch_repeats.c.batch_id, batch_repeats.c.record_id)).all())
        report = reconcile.report(conn, "health", YEAR, today=AFTER_THE_YEAR)
    assert len(before) == report["totals"]["repeated"] > 0
    command.downgrade(unsafe_downgrade_config(db_url), "0013")  # drops the table
    upgrade(db_url)
    with engine.connect() as conn:
        after = set(conn.execute(select(batch_repeats.c.batch_id, batch_repeats.c.record_id)).all())
        again = reconcile.report(conn, "health", YEAR, today=AFTER_THE_YEAR)
    assert after == before and again["totals"] == report["totals"]


def test_a_monthly_duplicate_of_another_partners_record_renumbered_in_the_annual_is_repeated(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    """The annual row is linked to the activity's holder (the other partner's), not to ours."""
    monthly, _, _ = year_dataset(13, YEAR, people=20, per_month=6)
    first, second = new_partner(engine, adapter="health"), new_partner(engine, adapter="health")
    settings = make_settings(db_url, batch_dir=tmp_path / "batches")
    m = next(m for m in range(1, 13) if len(monthly[m - 1]) >= 2)
    rows = monthly[m - 1][:2]
    for partner, name, carried, kind, period in (
            (first, "first_month", rows[:1], "monthly", f"{YEAR}-{m:02d}"),
            (second, "second_month", rows, "monthly", f"{YEAR}-{m:02d}"),
            (first, "first_annual", rows[:1], "annual", str(YEAR)),
            (second, "second_annual", [{**rows[0], "记录编号": "RENUMBERED-1"}, rows[1]], "annual",
             str(YEAR))):
        path = tmp_path / f"{name}.csv"
        write_csv(path, carried, HEALTH_HEADERS)
        _ingest(engine, settings, partner, path, kind, period)
    with engine.connect() as conn:
        report = reconcile.report(conn, "health", YEAR, today=AFTER_THE_YEAR)
    assert report["totals"] == {"monthly_records": 3, "repeated": 3, "corrected": 0,
                                "lacking": 0, "refused": 0, "withdrawn": 0, "added": 0, "conflicts": 0}
