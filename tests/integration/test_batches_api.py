"""Batch uploads over HTTP (SPEC §2 health/finance, §5 batches, §7, §8) on SQLite and PostgreSQL.

A real gateway (uvicorn, with its batch processor, delivery worker and scheduler) takes the
committed golden files of ``tests/fixtures/`` from a signed partner; the batch status must give
exactly the per-row answers the adapters' contract test lists for those files, the accepted
rows must reach the mock management system with their converted hours, and a resend must be
all duplicates.  Also: paging, scope, signatures, control totals, size limit, rosters and the
``ingest`` CLI.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Engine, func, select

from adapters.normalize import parse_decimal
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.ops.common import encode_cursor
from gateway.reference import import_csv
from gateway.signing import SigningClient, file_sha256, sign_digest
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
from tests.contract.test_health_finance_adapters import FINANCE_GOLDEN, HEALTH_GOLDEN
from tests.fixtures import make_golden
from tests.support.keys import KEYS
from tests.support.servers import cli, poll, uvicorn_thread

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]
NewOperator = Callable[..., str]
Expected = list[tuple[int, Any]]  # (row, "hours" | [(column, code), ...]) as in the contract test


@dataclass(frozen=True)
class Golden:
    path: Path
    adapter: str
    expected: Expected
    rows: Callable[[], list[dict[str, object]]]  # the rows the file was written from
    first_row: int  # the row number of rows()[0]: 2 after a header line, 1 in NDJSON
    hours_per_credit: Decimal
    id_column: str


# NDJSON: row number = line; the first four rows, a blank line, then two broken lines
# (exactly as test_finance_golden_files derives it).
NDJSON_GOLDEN: Expected = [(row - 1, result) for row, result in FINANCE_GOLDEN[:4]] + [
    (6, [(None, "SCHEMA")]), (7, [(None, "SCHEMA")])]

GOLDEN = {
    "health_gb18030_csv": Golden(make_golden.HEALTH_CSV, "health", HEALTH_GOLDEN,
                                 make_golden.golden_health_rows, 2, Decimal("3.6"), "记录编号"),
    "health_xlsx": Golden(make_golden.HEALTH_XLSX, "health", HEALTH_GOLDEN,
                          make_golden.golden_health_rows, 2, Decimal("3.6"), "记录编号"),
    "finance_utf8bom_csv": Golden(make_golden.FINANCE_CSV, "finance", FINANCE_GOLDEN,
                                  make_golden.golden_finance_rows, 2, Decimal(1), "流水号"),
    "finance_ndjson": Golden(make_golden.FINANCE_NDJSON, "finance", NDJSON_GOLDEN,
                             lambda: make_golden.golden_finance_rows()[:4], 1, Decimal(1), "流水号"),
}


def open_ce_year() -> int:
    """A CE year still open today: R11 closes a year on 30 December, Asia/Shanghai."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return today.year if (today.month, today.day) <= (12, 30) else today.year + 1


YEAR = open_ce_year()  # for generated files (the golden files are of 2026)


def generated_health(path: Path, seed: int, n: int, bad_ratio: float) -> Expected:
    """A GB18030 health file of ``YEAR``-03 and its per-row answers, as the golden lists give."""
    rows = list(health_rows(seed, n, YEAR, 3, bad_ratio=bad_ratio))
    write_csv(path, rows, HEALTH_HEADERS, encoding="gb18030")
    return [(i + 2, [row[BAD_KEY]] if BAD_KEY in row else str(converted(row["学分"], Decimal("3.6"))))
            for i, row in enumerate(rows)]


def expected_counts(expected: Expected) -> dict[str, int]:
    accepted = sum(isinstance(result, str) for _, result in expected)
    rejected = len(expected) - accepted
    return {"rows": len(expected), "accepted": accepted, "duplicate": 0, "corrected": 0,
            "conflict": 0, "rejected": rejected}


def expected_rejections(expected: Expected) -> list[tuple[int, str | None, str]]:
    return [(row, column, code) for row, result in expected if not isinstance(result, str)
            for column, code in result]


def triples(status: dict[str, Any]) -> list[tuple[int, str | None, str]]:
    return [(r["row"], r["column"], r["code"]) for r in status["rejected_rows"]]


def walk(client: httpx.Client, batch_id: str) -> tuple[list[list[Any]], list[str]]:
    """Every page of a batch's rejected rows, 5 a page: the pages' triples and the cursors."""
    pages: list[list[Any]] = []
    cursors: list[str] = []
    cursor = None
    while True:
        resp = client.get(f"/v1/batches/{batch_id}",
                          params={"limit": 5, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages.append(triples(page))
        cursor = page["next"]
        if cursor is None:
            return pages, cursors
        cursors.append(cursor)
        assert len(pages) < 10, "paging never ends"


def file_rows(golden: Golden) -> dict[int, dict[str, object]]:
    return {golden.first_row + i: row for i, row in enumerate(golden.rows())}


def converted(credits: object, rate: Decimal) -> Decimal:
    return (parse_decimal(str(credits)) * rate).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


# -- plumbing -----------------------------------------------------------------------------------


@contextmanager
def gateway(settings: Settings) -> Iterator[str]:
    with uvicorn_thread(create_app(settings, run_worker=True)) as url:
        yield url


def signed(url: str, partner: Partner) -> SigningClient:
    return SigningClient(url, partner.app_key, partner.secret, timeout=30)


def upload(client: SigningClient, path: Path, adapter: str, kind: str = "monthly",
           period: str = "2026-03", **totals: Any) -> str:
    resp = client.upload_batch(path, adapter=adapter, kind=kind, period=period, **totals)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "queued" and body["bytes"] == path.stat().st_size
    batch_id: str = body["batch_id"]
    return batch_id


def finished(client: httpx.Client, batch_id: str, timeout: float = 60) -> dict[str, Any]:
    """Poll GET /v1/batches/{id} until the batch is done or failed."""
    def check() -> dict[str, Any] | None:
        resp = client.get(f"/v1/batches/{batch_id}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body if body["status"] in ("done", "failed") else None

    result: dict[str, Any] = poll(check, timeout, interval=0.1, what=f"batch {batch_id} to finish")
    return result


def assert_coded(resp: httpx.Response, status: int, code: str,
                 field: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code
    assert field is None or error["field"] == field, error
    assert error["message"] and error["message_zh"]
    return error


def count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def applied(mock_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{mock_url}/_mock/applied").json())


def applied_body(mock_url: str, record_id: str) -> list[dict[str, Any]]:
    versions: list[dict[str, Any]] = httpx.get(f"{mock_url}/_mock/applied/{record_id}",
                                               timeout=10).json()["versions"]
    return versions


def batch_files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


# -- the golden files, end to end ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_file_gives_the_contract_answers_and_reaches_the_management_system(
        name: str, db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner, new_operator: NewOperator, mock_ce: tuple[str, Faults]) -> None:
    golden = GOLDEN[name]
    mock_url, _ = mock_ce
    owner = new_partner(engine, adapter=golden.adapter)
    stranger = new_partner(engine, adapter=golden.adapter)
    token = new_operator(engine, "viewer")
    batch_dir = tmp_path / "batches"
    settings = make_settings(db_url, mock_url, batch_dir=batch_dir)

    with gateway(settings) as url, signed(url, owner) as client, signed(url, stranger) as other, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                         timeout=30) as ops:
        batch_id = upload(client, golden.path, golden.adapter)
        # Acknowledged means durable: the row is committed and the stored file is the upload.
        with engine.connect() as conn:
            row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).mappings().one()
        assert row["partner_id"] == owner.partner_id and row["sha256"] == file_sha256(golden.path)
        assert Path(row["file_path"]).read_bytes() == golden.path.read_bytes()

        status = finished(client, batch_id)
        assert status["status"] == "done", status["error"]
        assert (status["batch_id"], status["adapter"], status["kind"], status["period"]) == (
            batch_id, golden.adapter, "monthly", "2026-03")
        assert status["counts"] == expected_counts(golden.expected)
        assert triples(status) == expected_rejections(golden.expected)
        assert all(r["message"] and r["message_zh"] for r in status["rejected_rows"])
        assert status["next"] is None
        # The operator sees the same; another partner of the same adapter does not see it at all.
        as_operator = ops.get(f"/v1/batches/{batch_id}")
        assert as_operator.status_code == 200 and as_operator.json() == status
        assert_coded(other.get(f"/v1/batches/{batch_id}"), 404, "NOT_FOUND")

        # Every accepted row is forwarded once, worth its credits × the configured rate.
        rows = file_rows(golden)
        hours = {str(rows[row][golden.id_column]): Decimal(result)
                 for row, result in golden.expected if isinstance(result, str)}
        with engine.connect() as conn:
            stored = dict(conn.execute(select(records.c.source_record_id, records.c.record_id)
                                       .where(records.c.batch_id == batch_id)).all())
        assert set(stored) == set(hours)
        poll(lambda: set(stored.values()) <= {a["record_id"] for a in applied(mock_url)["applied"]},
             30, interval=0.1, what="the accepted rows to reach the mock")
        for source_id, record_id in stored.items():
            [version] = applied_body(mock_url, record_id)
            record = version["record"]
            assert record["source"]["batch_id"] == batch_id
            assert record["source"]["source_record_id"] == source_id
            assert Decimal(record["credited_hours"]) == hours[source_id]
            credits = next(r["学分"] for r in rows.values() if r.get(golden.id_column) == source_id)
            assert Decimal(record["credited_hours"]) == converted(credits, golden.hours_per_credit)
            assert Decimal(record["claimed"]["quantity"]) == parse_decimal(str(credits))
        outbox_before = count(engine, outbox)
        applied_before = len(applied(mock_url)["applied"])

        # The same file again (the resend after a lost 202): the batch that took it answers.
        resend = client.upload_batch(golden.path, adapter=golden.adapter, kind="monthly",
                                     period="2026-03")
        assert resend.status_code == 202, resend.text
        assert (resend.json()["batch_id"], resend.json()["resent"]) == (batch_id, True)
        assert resend.json()["status"] == "done"
        # Its rows again, in the annual batch: every stored row is a duplicate, nothing new is
        # queued or sent.
        again = upload(client, golden.path, golden.adapter, kind="annual", period="2026")
        assert again != batch_id
        resent = finished(client, again)
        assert resent["status"] == "done", resent["error"]
        counts = expected_counts(golden.expected)
        assert resent["counts"] == {**counts, "accepted": 0, "duplicate": counts["accepted"]}
        assert triples(resent) == expected_rejections(golden.expected)
        assert count(engine, outbox) == outbox_before == counts["accepted"]
        assert count(engine, record_versions) == counts["accepted"]
    mock = applied(mock_url)
    assert len(mock["applied"]) == applied_before == counts["accepted"]
    assert mock["double_applied"] == []
    assert batch_files(batch_dir) and not [p for p in batch_files(batch_dir) if p.suffix == ".part"]


# -- paging, scope and signatures ---------------------------------------------------------------


def test_rejected_rows_are_paged_and_batches_are_private(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner, new_operator: NewOperator) -> None:
    health = new_partner(engine, adapter="health")
    finance = new_partner(engine, adapter="finance")
    token = new_operator(engine, "viewer")
    path = tmp_path / "health.csv"
    expected = generated_health(path, 44, 60, bad_ratio=0.25)
    want = expected_rejections(expected)
    assert 11 <= len(want) <= 30 and len(want) % 5  # a short last page
    with gateway(make_settings(db_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, health) as client, signed(url, finance) as other:
        batch_id = upload(client, path, "health", period=f"{YEAR}-03")
        status = finished(client, batch_id)
        assert status["status"] == "done", status["error"]
        assert status["counts"] == expected_counts(expected)

        pages, cursors = walk(client, batch_id)
        assert [len(p) for p in pages] == [5] * (len(want) // 5) + [len(want) % 5]
        assert [t for p in pages for t in p] == want
        exact = client.get(f"/v1/batches/{batch_id}?limit={len(want)}").json()
        assert triples(exact) == want and exact["next"] is None
        assert_coded(client.get(f"/v1/batches/{batch_id}?limit=0"), 422, "SCHEMA")

        # The same file again as the annual batch: the same rows rejected, in a second batch.
        # Each batch's cursors page that batch only: another batch's is refused, not read as a
        # place in this one (it once was a bare row id, taken by any batch).
        second = upload(client, path, "health", kind="annual", period=str(YEAR))
        assert second != batch_id and finished(client, second)["status"] == "done"
        second_pages, second_cursors = walk(client, second)
        assert [t for p in second_pages for t in p] == want
        assert not set(cursors) & set(second_cursors)
        for mine, theirs in ((batch_id, second_cursors), (second, cursors)):
            for cursor in theirs:
                assert_coded(client.get(f"/v1/batches/{mine}", params={"cursor": cursor}),
                             422, "SCHEMA", field="cursor")
        # A bare row id (as cursors were), one past every row (beyond 64-bit integers too:
        # schemathesis found 2**80 overflowing the driver), a garbled or forged one: all 422.
        with engine.connect() as conn:
            last_id = conn.execute(select(func.max(batch_errors.c.id))
                                   .where(batch_errors.c.batch_id == batch_id)).scalar_one()
        forged = [str(last_id), str(2**63), str(2**80), cursors[0][:-2], cursors[0] + "x",
                  "abc", encode_cursor("batch_rows", batch_id, -1),
                  base64.urlsafe_b64encode(f'["batch_rows","{batch_id}",{2**80}]'.encode()).decode(),
                  encode_cursor("batch_rows", batch_id, "1"),
                  encode_cursor("batch_rows", batch_id, True),
                  encode_cursor("batch_rows", 1, 1),
                  encode_cursor("batch_rows", batch_id),
                  encode_cursor("rejections", batch_id, 1),
                  encode_cursor("rejections", 1)]
        for cursor in forged:
            assert_coded(client.get(f"/v1/batches/{batch_id}", params={"cursor": cursor}),
                         422, "SCHEMA", field="cursor")
        # A cursor this batch gave, past its last row's id: an empty page, not a 500.
        beyond = client.get(f"/v1/batches/{batch_id}", params={
            "cursor": encode_cursor("batch_rows", batch_id, 2**63 - 1)})
        assert beyond.status_code == 200, beyond.text
        assert (beyond.json()["rejected_rows"], beyond.json()["next"]) == ([], None)
        assert beyond.json()["counts"] == status["counts"]

        # Another partner (another adapter too) cannot tell the batch exists; nor guess one.
        assert_coded(other.get(f"/v1/batches/{batch_id}"), 404, "NOT_FOUND")
        assert_coded(client.get("/v1/batches/B000000000000000000000000"), 404, "NOT_FOUND")
        # Unsigned, or with a token nobody holds: 401.
        assert_coded(httpx.get(f"{url}/v1/batches/{batch_id}"), 401, "UNAUTHENTICATED")
        assert_coded(httpx.get(f"{url}/v1/batches/{batch_id}",
                               headers={"Authorization": "Bearer not-a-token"}),
                     401, "UNAUTHENTICATED")
        good = httpx.get(f"{url}/v1/batches/{batch_id}", headers={"Authorization": f"Bearer {token}"})
        assert good.status_code == 200 and triples(good.json()) == want


def test_uploads_outside_scope_unsigned_or_malformed_are_refused_and_leave_nothing(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    health = new_partner(engine, adapter="health")
    batch_dir = tmp_path / "b"
    path = make_golden.HEALTH_CSV
    body = path.read_bytes()
    with gateway(make_settings(db_url, batch_dir=batch_dir)) as url, signed(url, health) as client:
        # Another partner's adapter, or the roster kind of the training bases: 403.
        for adapter, kind, period in (("finance", "monthly", "2026-03"),
                                      ("training_base", "roster", "2026")):
            resp = client.upload_batch(path, adapter=adapter, kind=kind, period=period)
            assert_coded(resp, 403, "SCOPE_VIOLATION")
        # A period that does not fit the kind, or a kind the adapter does not have: 422.
        for kind, period, field in (("monthly", "2026-13", "period"), ("monthly", "2026", "period"),
                                    ("annual", "2026-03", "period"), ("monthly", "", "period"),
                                    ("weekly", "2026-03", "adapter")):
            resp = client.upload_batch(path, adapter="health", kind=kind, period=period)
            assert assert_coded(resp, 422, "SCHEMA")["field"] == field, (kind, period)
        # Unsigned: 401.
        assert_coded(httpx.post(f"{url}/v1/batches?adapter=health&kind=monthly&period=2026-03",
                                content=body), 401, "UNAUTHENTICATED")
        # Signed, but over another body's hash (the signature covers the SHA-256 of the file).
        target = "/v1/batches?adapter=health&kind=monthly&period=2026-03"
        ts, nonce = str(int(time.time())), secrets.token_hex(16)
        other_hash = hashlib.sha256(body + b"tampered").hexdigest()
        headers = {"X-CE-App-Key": health.app_key, "X-CE-Timestamp": ts, "X-CE-Nonce": nonce,
                   "X-CE-Signature": sign_digest(health.secret, "POST", target, ts, nonce, other_hash)}
        assert_coded(httpx.post(f"{url}{target}", content=body, headers=headers),
                     401, "UNAUTHENTICATED")
        # The real body's hash, but a replayed nonce: refused too.
        headers["X-CE-Signature"] = sign_digest(health.secret, "POST", target, ts, nonce,
                                                hashlib.sha256(body).hexdigest())
        first = httpx.post(f"{url}{target}", content=body, headers=headers)
        assert first.status_code == 202, first.text
        assert_coded(httpx.post(f"{url}{target}", content=body, headers=headers), 401, "REPLAYED")
        # An empty file.
        empty = tmp_path / "empty.csv"
        empty.write_bytes(b"")
        assert_coded(client.upload_batch(empty, adapter="health", kind="monthly", period="2026-03"),
                     422, "SCHEMA")
    # Only the one good upload left a batch and a file behind.
    with engine.connect() as conn:
        ids = list(conn.execute(select(batches.c.batch_id)).scalars())
    assert ids == [first.json()["batch_id"]]
    assert [p.name for p in batch_files(batch_dir)] == [f"{ids[0]}.csv"]


def test_file_over_max_batch_bytes_is_413_and_leaves_no_batch(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    health = new_partner(engine, adapter="health")
    batch_dir = tmp_path / "b"
    big = tmp_path / "big.csv"
    write_csv(big, health_rows(3, 1500, YEAR, 3), HEALTH_HEADERS)
    limit = 64 * 1024
    assert big.stat().st_size > 3 * limit
    settings = make_settings(db_url, batch_dir=batch_dir, max_batch_bytes=limit)
    with gateway(settings) as url, signed(url, health) as client:
        resp = client.upload_batch(big, adapter="health", kind="monthly", period="2026-03")
        assert_coded(resp, 413, "PAYLOAD_TOO_LARGE")
        # A file within the limit still goes through on the same gateway.
        done = finished(client, upload(client, make_golden.HEALTH_CSV, "health"))
        assert done["status"] == "done", done["error"]
    with engine.connect() as conn:
        assert list(conn.execute(select(batches.c.file_size)).scalars()) == [
            make_golden.HEALTH_CSV.stat().st_size]
    assert len(batch_files(batch_dir)) == 1


# -- control totals -----------------------------------------------------------------------------


def _file_totals(path: Path) -> tuple[int, Decimal]:
    """Data rows and the sum of every readable 学分 cell, read independently of the gateway."""
    with path.open(encoding="gb18030", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [r for r in reader if any(v.strip() for v in r.values() if v)]
    total = Decimal(0)
    for r in rows:
        try:
            total += parse_decimal(r["学分"])
        except ValueError:
            pass  # "两学分": the row is rejected, its credits count for nothing
    return len(rows), total


def test_control_totals_fail_a_wrong_file_whole_and_pass_a_right_one(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    health = new_partner(engine, adapter="health")
    path = tmp_path / "卫健委_健康.csv"  # partners' files have Chinese names (sent percent-encoded)
    expected = generated_health(path, 45, 40, bad_ratio=0.2)
    rows, credits = _file_totals(path)
    assert rows == len(expected) == 40
    period = f"{YEAR}-03"
    with gateway(make_settings(db_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, health) as client:
        wrong_rows = finished(client, upload(client, path, "health", period=period,
                                             row_count=rows + 1))
        wrong_credits = finished(client, upload(client, path, "health", period=period,
                                                row_count=rows,
                                                total_credits=str(credits + Decimal("0.5"))))
        for status, header in ((wrong_rows, "X-CE-Row-Count"), (wrong_credits, "X-CE-Total-Credits")):
            assert status["status"] == "failed"
            assert header in status["error"]
            # Coded as every error is (SPEC §6), in Chinese too.
            failure = status["failure"]
            assert failure["code"] == "CONTROL_TOTALS_MISMATCH" and header in failure["message"]
            assert "控制总数" in failure["message_zh"] and "申报" in failure["message_zh"]
            assert status["counts"] == {"rows": 0, "accepted": 0, "duplicate": 0, "corrected": 0,
                                        "conflict": 0, "rejected": 0}
            assert status["rejected_rows"] == [] and status["rows_done"] == 0
        assert str(rows + 1) in wrong_rows["error"] and str(rows) in wrong_rows["error"]
        assert str(credits) in wrong_credits["error"]
        # Nothing of either failed file was ingested, queued or even rejected row by row.
        for table in (records, record_versions, outbox, rejections, batch_errors):
            assert count(engine, table) == 0, table.name

        right = finished(client, upload(client, path, "health", period=period, row_count=rows,
                                        total_credits=str(credits)))
        assert right["status"] == "done", right["error"]
        assert right["declared"] == {"rows": rows, "credits": str(credits)}
        assert right["counts"] == expected_counts(expected)
        assert triples(right) == expected_rejections(expected)
        assert Decimal(right["credits_total"]) == credits
        # Totals that are not numbers are refused at once, naming the header at fault.
        for rows_header, credits_header, field in (
                ("lots", None, "X-CE-Row-Count"), ("-1", None, "X-CE-Row-Count"),
                (None, "lots", "X-CE-Total-Credits"), (str(rows), "NaN", "X-CE-Total-Credits"),
                # Numbers no file has, which would overflow their columns (a 500 before).
                ("9" * 19, None, "X-CE-Row-Count"), (None, "9" * 40, "X-CE-Total-Credits")):
            headers = {k: v for k, v in (("X-CE-Row-Count", rows_header),
                                         ("X-CE-Total-Credits", credits_header)) if v is not None}
            resp = client.post(f"/v1/batches?adapter=health&kind=monthly&period={period}",
                               content=path.read_bytes(), headers=headers)
            assert assert_coded(resp, 422, "SCHEMA")["field"] == field, headers
    assert count(engine, records) == expected_counts(expected)["accepted"]


# -- training-base rosters ----------------------------------------------------------------------


ROSTER_HEADERS = ("result_id", "id_no", "name", "employer", "region", "hours", "started_on",
                  "completed_on", "passed", "certificate_no", "base_code", "plan_id")


def _roster(path: Path) -> list[dict[str, str]]:
    people = list(health_rows(21, 3, YEAR, 5))
    rows = []
    for i, (person, base) in enumerate(zip(people, ("QHJD-001", "QHJD-001", "QHJD-002"),
                                           strict=True)):
        rows.append({"result_id": f"R-{i + 1}", "id_no": str(person["身份证号"]).replace(" ", ""),
                     "name": str(person["姓名"]), "employer": "海东市平安区第一中学",
                     "region": "630200", "hours": str(8 * (i + 1)), "started_on": f"{YEAR}-05-10",
                     "completed_on": f"{YEAR}-05-13", "passed": "是", "certificate_no": f"JD{i:06d}",
                     "base_code": base, "plan_id": f"{base}-{YEAR}-01"})
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, ROSTER_HEADERS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _directory(engine: Engine, tmp_path: Path) -> None:
    """Both bases assessed and active, each with a plan filed in time (R9 passes for both)."""
    bases, plans = tmp_path / "bases.csv", tmp_path / "plans.csv"
    bases.write_text("code,name,level,status,assessed_on\n"
                     "QHJD-001,青海省继续教育基地（海东）,provincial,active,2024-06-01\n"
                     "QHJD-002,青海省继续教育基地（海西）,provincial,active,2024-06-01\n",
                     encoding="utf-8")
    plans.write_text("plan_id,base_code,title,category,hours,starts_on,ends_on,filed_on\n"
                     + "".join(f"{code}-{YEAR}-01,{code},高原生态修复技术研修班,professional,40,"
                               f"{YEAR}-05-01,{YEAR}-05-31,{YEAR}-03-01\n"
                               for code in ("QHJD-001", "QHJD-002")), encoding="utf-8")
    for kind, path in (("bases", bases), ("plans", plans)):
        result = import_csv(engine, kind, path, actor="test", keys=KEYS)
        assert result.ok and result.inserted == 2, result.as_dict()


def test_training_base_roster_rejects_another_bases_rows(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner, mock_ce: tuple[str, Faults]) -> None:
    mock_url, _ = mock_ce
    base = new_partner(engine, adapter="training_base", base_code="QHJD-001")
    _directory(engine, tmp_path)
    path = tmp_path / "roster.csv"
    rows = _roster(path)
    with gateway(make_settings(db_url, mock_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, base) as client:
        assert_coded(client.upload_batch(path, adapter="training_base", kind="monthly",
                                         period=f"{YEAR}-05"), 422, "SCHEMA")
        status = finished(client, upload(client, path, "training_base", kind="roster",
                                         period=str(YEAR)))
        assert status["status"] == "done", status["error"]
        assert status["counts"] == {"rows": 3, "accepted": 2, "duplicate": 0, "corrected": 0,
                                    "conflict": 0, "rejected": 1}
        # The row is named by its number and by the roster's own column, not a canonical path.
        assert triples(status) == [(4, "base_code", "SCOPE_VIOLATION")]
        with engine.connect() as conn:
            stored = dict(conn.execute(select(records.c.source_record_id, records.c.record_id)
                                       .where(records.c.partner_id == base.partner_id)).all())
        assert set(stored) == {"R-1", "R-2"}
        poll(lambda: set(stored.values()) <= {a["record_id"] for a in applied(mock_url)["applied"]},
             30, interval=0.1, what="roster rows to reach the mock")
        for source_id, record_id in stored.items():
            [version] = applied_body(mock_url, record_id)
            record = version["record"]
            wanted = next(r for r in rows if r["result_id"] == source_id)
            assert Decimal(record["credited_hours"]) == Decimal(wanted["hours"])
            assert record["activity"]["provider_code"] == "QHJD-001"
            assert record["activity"]["plan_id"] == f"QHJD-001-{YEAR}-01"


# -- the ingest CLI -----------------------------------------------------------------------------


def test_ingest_cli_gives_the_same_answers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    env = {"CE_GATEWAY_DATABASE_URL": url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_BATCH_DIR": str(tmp_path / "b")}
    result = cli(env, "ingest", str(make_golden.HEALTH_CSV), "--adapter", "health", "--kind",
                 "monthly", "--period", "2026-03", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["status"] == "done", status["error"]
    assert status["counts"] == expected_counts(HEALTH_GOLDEN)
    assert triples(status) == expected_rejections(HEALTH_GOLDEN)
    refused = cli(env, "ingest", str(make_golden.HEALTH_CSV), "--adapter", "health", "--kind",
                  "monthly", "--period", "2026-3", "--json")
    assert refused.returncode == 2 and refused.stdout == ""


def test_the_same_file_again_is_its_batch_unless_that_batch_failed(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    """A resend after a lost 202 is answered by the batch that took the file (SPEC §2)."""
    health, other = new_partner(engine, adapter="health"), new_partner(engine, adapter="health")
    path = tmp_path / "3月.csv"
    generated_health(path, 46, 12, bad_ratio=0.0)
    rows, credits = _file_totals(path)
    period = f"{YEAR}-03"
    with gateway(make_settings(db_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, health) as client, signed(url, other) as neighbour:
        wrong = finished(client, upload(client, path, "health", period=period, row_count=rows + 1))
        assert wrong["status"] == "failed"
        # The failed batch took nothing: the same bytes with right totals are a batch of their own…
        taken = upload(client, path, "health", period=period, row_count=rows)
        assert taken != wrong["batch_id"] and finished(client, taken)["status"] == "done"
        # …and those bytes and totals again are that batch, answered at once, nothing recorded.
        again = client.upload_batch(path, adapter="health", kind="monthly", period=period,
                                    row_count=rows)
        assert again.status_code == 202, again.text
        assert (again.json()["batch_id"], again.json()["resent"], again.json()["status"]) == (
            taken, True, "done")
        # Other totals, another period or another partner: not the same upload.
        for sender, kwargs in ((client, {"period": period, "total_credits": str(credits)}),
                               (client, {"period": f"{YEAR}-04"}),
                               (neighbour, {"period": period})):
            fresh = sender.upload_batch(path, adapter="health", kind="monthly", **kwargs)
            assert fresh.status_code == 202 and fresh.json()["resent"] is False, fresh.text
            assert fresh.json()["batch_id"] not in (taken, wrong["batch_id"])
    with engine.connect() as conn:
        mine = conn.execute(select(batches.c.batch_id).where(
            batches.c.partner_id == health.partner_id)).scalars().all()
        resent = conn.execute(select(audit_events.c.detail).where(
            audit_events.c.kind == "batch_resent")).scalars().all()
    assert len(mine) == 4  # the failed one, the taken one and the two other uploads
    assert [json.loads(d)["batch_id"] for d in resent] == [taken]
    with engine.connect() as conn:
        every = set(conn.execute(select(batches.c.batch_id)).scalars())
    # The resend's copy is not kept: every stored file is a batch's.
    assert {p.stem for p in batch_files(tmp_path / "b")} <= every
