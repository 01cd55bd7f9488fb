"""The health commission's and finance department's journey through the signed batch API.

SPEC §2 (health / finance system), §4 (credits → hours), §5 (batch endpoints, status shape),
§7 (dedup, idempotent resends), §8 (formats); on SQLite and PostgreSQL.  A month is pushed,
pushed again (the resend after a lost 202), then the annual batch repeats, corrects,
renumbers and leaves out rows; the batch status and the reconciliation report are read as
the partner and the province read them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Engine, func, select

from gateway.accounts import Partner
from gateway.config import Settings
from gateway.signing import SigningClient
from gateway.store.tables import outbox, record_versions, records
from mock_partners.files import (
    FINANCE_HEADERS,
    HEALTH_HEADERS,
    finance_rows,
    health_rows,
    write_csv,
    write_xlsx,
)
from tests.integration.test_batches_api import finished, gateway, signed

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]


def open_ce_year() -> int:
    """A CE year still open today: R11 closes a year on 30 December, Asia/Shanghai."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return today.year if (today.month, today.day) <= (12, 30) else today.year + 1


YEAR = open_ce_year()


def push(client: SigningClient, path: Path, kind: str, period: str, adapter: str = "health",
         **totals: Any) -> dict[str, Any]:
    resp = client.upload_batch(path, adapter=adapter, kind=kind, period=period, **totals)
    assert resp.status_code == 202, resp.text
    status = finished(client, resp.json()["batch_id"])
    assert status["status"] == "done", status["failure"]
    return status


def counts(status: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in status["counts"].items() if k != "rows"}


def stored(engine: Engine, source_id: str) -> tuple[int, str]:
    """(versions made, credits claimed by the current version) of a partner's record."""
    with engine.connect() as conn:
        record_id, version = conn.execute(
            select(records.c.record_id, records.c.current_version)
            .where(records.c.source_record_id == source_id)).one()
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == record_id,
            record_versions.c.version == version)).scalar_one()
        made = conn.execute(select(func.count()).select_from(record_versions)
                            .where(record_versions.c.record_id == record_id)).scalar_one()
    claimed = (payload if isinstance(payload, dict) else json.loads(payload))["claimed"]
    return int(made), str(claimed["quantity"])


def queued(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox)).scalar_one())


# -- the year's journey, as it works today --------------------------------------------------------


def test_months_resend_and_annual_give_the_spec_outcomes_and_report(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner, new_operator: Callable[..., str]) -> None:
    """March in GB18030, its resend, then the annual in XLSX: SPEC §2, §5, §7 outcomes."""
    partner = new_partner(engine, adapter="health")
    token = new_operator(engine, "viewer")
    march = [dict(r) for r in health_rows(5, 6, YEAR, 3)]
    march_csv = tmp_path / "3月.csv"
    write_csv(march_csv, march, HEALTH_HEADERS, encoding="gb18030")
    annual = [dict(r) for r in march]
    annual[2]["学分"] = "9"  # same 记录编号, other credits → corrected
    annual[3]["记录编号"] = f"NEW-{annual[3]['记录编号']}"  # renumbered, other credits → conflict
    annual[3]["学分"] = "7"
    del annual[4]  # left out → lacking
    annual += [dict(r) for r in health_rows(6, 1, YEAR, 5)]  # May, never pushed → added
    annual_xlsx = tmp_path / "全年.xlsx"
    write_xlsx(annual_xlsx, annual, HEALTH_HEADERS)
    with gateway(make_settings(db_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, partner) as client, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as ops:
        first = push(client, march_csv, "monthly", f"{YEAR}-03", row_count=6)
        assert counts(first) == {"accepted": 6, "duplicate": 0, "corrected": 0, "conflict": 0,
                                 "rejected": 0}
        before = queued(engine)
        again = push(client, march_csv, "monthly", f"{YEAR}-03")
        assert counts(again) == {"accepted": 0, "duplicate": 6, "corrected": 0, "conflict": 0,
                                 "rejected": 0}
        assert queued(engine) == before
        year = push(client, annual_xlsx, "annual", str(YEAR))
        assert year["counts"] == {"rows": 6, "accepted": 1, "duplicate": 3, "corrected": 1,
                                  "conflict": 1, "rejected": 0}
        assert [(r["row"], r["column"], r["code"]) for r in year["rejected_rows"]] == [
            (5, "学分", "CONFLICT_WITH_EXISTING")]
        report = ops.get(f"/v1/reconciliation/health/{YEAR}").json()
    months = {m.pop("month"): m for m in report["months"]}
    assert months[f"{YEAR}-03"] == {"monthly_records": 6, "repeated": 3, "corrected": 1,
                                    "lacking": 1, "refused": 0, "withdrawn": 0, "added": 0,
                                    "conflicts": 1}
    assert months[f"{YEAR}-05"]["added"] == 1
    assert stored(engine, str(march[2]["记录编号"])) == (2, "9")


def test_finance_public_subject_rows_convert_at_one_hour_a_credit(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    """SPEC §4 R2 (finance may push 公需科目) and the 1 h/credit default; BOM CSV = XLSX."""
    partner = new_partner(engine, adapter="finance")
    rows = [dict(r) for r in finance_rows(7, 3, YEAR, 3)]
    rows[0].update({"科目类别": "公需科目", "学分": "2.5"})
    csv_path, xlsx_path = tmp_path / "f.csv", tmp_path / "f.xlsx"
    write_csv(csv_path, rows, FINANCE_HEADERS, encoding="utf-8-sig")
    write_xlsx(xlsx_path, rows, FINANCE_HEADERS)
    with gateway(make_settings(db_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, partner) as client:
        assert counts(push(client, csv_path, "monthly", f"{YEAR}-03", adapter="finance"))[
            "accepted"] == 3
        assert counts(push(client, xlsx_path, "monthly", f"{YEAR}-03", adapter="finance"))[
            "duplicate"] == 3
    with engine.connect() as conn:
        category, payload = conn.execute(
            select(records.c.category, record_versions.c.payload)
            .join(record_versions, record_versions.c.record_id == records.c.record_id)
            .where(records.c.source_record_id == str(rows[0]["流水号"]))).one()
    credited = (payload if isinstance(payload, dict) else json.loads(payload))[
        "credited_hours"]
    assert (category, Decimal(credited)) == ("public", Decimal("2.5"))


# -- findings ---------------------------------------------------------------------------------------


def test_a_late_resend_of_a_month_does_not_undo_the_annuals_corrections(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner, new_operator: Callable[..., str]) -> None:
    partner = new_partner(engine, adapter="health")
    token = new_operator(engine, "viewer")
    march = [dict(r) for r in health_rows(11, 3, YEAR, 3)]
    march_csv = tmp_path / "3月.csv"
    write_csv(march_csv, march, HEALTH_HEADERS, encoding="gb18030")
    annual = [dict(r) for r in march]
    annual[1]["学分"] = "9"
    annual_csv = tmp_path / "全年.csv"
    write_csv(annual_csv, annual, HEALTH_HEADERS, encoding="gb18030")
    changed = str(march[1]["记录编号"])
    with gateway(make_settings(db_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, partner) as client, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as ops:
        first = push(client, march_csv, "monthly", f"{YEAR}-03")
        assert counts(push(client, annual_csv, "annual", str(YEAR)))["corrected"] == 1
        assert stored(engine, changed) == (2, "9")
        before = queued(engine)
        resent = push(client, march_csv, "monthly", f"{YEAR}-03")  # the same bytes again
        report = ops.get(f"/v1/reconciliation/health/{YEAR}").json()
    assert report["totals"]["corrected"] == 1  # the report still says the annual corrected it…
    # …so the record must still hold the annual's credits, and nothing new goes downstream:
    # the same bytes are answered by the batch that took them (gateway/batch_requests.record_batch).
    assert resent["batch_id"] == first["batch_id"] and counts(resent) == counts(first)
    assert stored(engine, changed) == (2, "9")
    assert queued(engine) == before


def test_a_monthly_batch_for_a_month_not_yet_begun_is_refused(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    partner = new_partner(engine, adapter="health")
    path = tmp_path / "m.csv"
    write_csv(path, list(health_rows(12, 2, YEAR, 3)), HEALTH_HEADERS, encoding="gb18030")
    with gateway(make_settings(db_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, partner) as client:
        resp = client.upload_batch(path, adapter="health", kind="monthly", period=f"{YEAR + 2}-05")
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["field"] == "period"


@pytest.mark.parametrize(("today", "open_year", "kind", "period", "taken"), [
    ("2026-11-28", 2026, "monthly", "2026-11", True), ("2026-11-28", 2026, "monthly", "2025-12", True),
    ("2026-11-28", 2026, "annual", "2026", True), ("2026-11-28", 2026, "roster", "2026-11", True),
    ("2026-11-28", 2026, "monthly", "2027-01", False), ("2026-11-28", 2026, "annual", "2027", False),
    ("2026-11-28", 2026, "roster", "2027", False), ("2026-11-28", 2026, "monthly", "2028-05", False),
    ("2026-11-28", 2026, "monthly", "1999-12", False), ("2026-11-28", 2026, "annual", "0000", False),
    # Past the close (31 December) the next year is open; an extended close keeps the last
    # year open into January, when January has begun all the same.
    ("2026-12-31", 2027, "monthly", "2027-03", True), ("2027-01-05", 2026, "monthly", "2027-01", True),
    ("2027-01-05", 2026, "monthly", "2027-02", False)])
def test_a_period_is_of_the_open_ce_year_or_has_begun(
        today: str, open_year: int, kind: str, period: str, taken: bool) -> None:
    from datetime import date

    from gateway.batch_requests import check_batch_request
    from gateway.errors import PayloadRejected

    adapter = "training_base" if kind == "roster" else "health"
    day = date.fromisoformat(today)
    if taken:
        check_batch_request(adapter, kind, period, open_year, day)
    else:
        with pytest.raises(PayloadRejected) as refused:
            check_batch_request(adapter, kind, period, open_year, day)
        assert refused.value.field == "period" and str(open_year) in refused.value.message_zh
