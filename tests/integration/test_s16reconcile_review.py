"""Review of 83e3bd2: the reconciliation report counts every batch for what it committed.

Constructed cases beyond tests/integration/test_reconciliation_review.py, with its Pusher (real
BatchProcessor over CSV files), on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

from gateway.accounts import Partner
from tests.integration.test_reconciliation_review import (
    YEAR,
    ZERO,
    MakeSettings,
    Pusher,
    chunk_fails,
    months_of,
    some_rows,
)


@pytest.fixture
def pusher(engine: Engine, db_url: str, tmp_path: Path, make_settings: MakeSettings) -> Pusher:
    return Pusher(engine, make_settings(db_url, batch_dir=tmp_path / "batches"), tmp_path)


def test_a_monthly_renumbered_twin_the_annual_carries_under_the_first_number_is_not_lacking(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    rows = some_rows()[0][:3]
    pusher.push(partner, rows, "monthly", f"{YEAR}-01")
    twin = {**rows[0], "记录编号": "TWIN-FEB"}  # January's first row again, renumbered
    feb = pusher.push(partner, [twin], "monthly", f"{YEAR}-02")
    assert pusher.batch(feb)["duplicate"] == 1
    pusher.push(partner, rows, "annual", str(YEAR))
    report = pusher.report()
    assert report["samples"]["lacking"] == []
    assert months_of(report)[f"{YEAR}-02"] == {**ZERO, "monthly_records": 1, "repeated": 1}


def test_a_month_that_failed_part_way_is_not_never_pushed_in_the_report_that_counts_it(
        pusher: Pusher, new_partner: Callable[..., Partner], engine: Engine) -> None:
    partner = new_partner(engine, adapter="health")
    rows = some_rows()[0][:6]
    with chunk_fails(pusher, 2):
        failed = pusher.push(partner, rows, "monthly", f"{YEAR}-01")
    assert (pusher.batch(failed)["status"], pusher.batch(failed)["accepted"]) == ("failed", 2)
    pusher.push(partner, rows[:2], "annual", str(YEAR))
    report = pusher.report()
    assert months_of(report)[f"{YEAR}-01"]["monthly_records"] == 2
    assert f"{YEAR}-01" not in report["months_never_pushed"]
