"""End to end, one test per partner family: mock partner → real gateway → mock management system.

Each test runs a real gateway (uvicorn on 127.0.0.1, delivery worker and batch processor in
process) against the mock management system (``mock_ce``) on SQLite and PostgreSQL, drives it
the way that family's partner does, and checks from the management system's side that exactly
the accepted records arrived — each version once, in order — with the hours the gateway owes:

- training base: signed native JSON pushes, per-record answers, scope by base code;
- Cadre Network College: the gateway pulls the mock college's completions pages;
- health: a GB18030 CSV monthly batch, credits × 3.6 h;
- finance: an XLSX monthly batch, credits × 1 h.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from adapters.normalize import parse_decimal
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.pull.cadre_college import pull_once
from gateway.signing import SigningClient
from gateway.store.tables import outbox
from mock_partners import cadre_college as college_mock
from mock_partners import files
from mock_partners import training_base as tb
from mock_partners.ce_system import Faults
from tests.support.reference import load_base_and_plan
from tests.support.servers import poll, uvicorn_thread

YEAR = 2026
BASE, PLAN = "QHJD-001", "PLAN-2026-001"
Pair = tuple[str, int]


# -- helpers -----------------------------------------------------------------------------------


@contextmanager
def gateway(settings: Settings) -> Iterator[str]:
    with uvicorn_thread(create_app(settings, run_worker=True)) as url:
        yield url


def family_settings(make_settings: Callable[..., Settings], db_url: str, mock_url: str,
                    tmp_path: Path, **overrides: Any) -> Settings:
    # The college pull is a scheduled job: off here, so only the test decides when it runs.
    values: dict[str, Any] = {"batch_dir": tmp_path / "batches", "pull_interval_seconds": 0,
                              "batch_parse_workers": 0}
    values.update(overrides)
    return make_settings(db_url, mock_url, **values)


def snapshot(mock_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{mock_url}/_mock/applied").json())


def applied_pairs(mock_url: str) -> list[Pair]:
    return [(a["record_id"], a["version"]) for a in snapshot(mock_url)["applied"]]


def delivered_body(mock_url: str, record_id: str) -> dict[str, Any]:
    versions = httpx.get(f"{mock_url}/_mock/applied/{record_id}").json()["versions"]
    assert len(versions) == 1, versions
    return dict(versions[0]["record"])


def outbox_rows(engine: Engine) -> dict[Pair, str]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.record_id, outbox.c.version, outbox.c.status)).all()
    return {(r.record_id, r.version): r.status for r in rows}


def wait_delivered(engine: Engine, mock_url: str, expected: int) -> list[Pair]:
    """Poll until nothing is pending and the mock applied ``expected`` versions; return them."""
    def drained() -> list[Pair] | None:
        if any(status == "pending" for status in outbox_rows(engine).values()):
            return None
        pairs = applied_pairs(mock_url)
        return pairs if len(pairs) >= expected else None

    pairs: list[Pair] = poll(drained, 60, what=f"{expected} deliveries")
    return pairs


def assert_clean(mock_url: str, engine: Engine, expected: set[Pair] | None = None) -> None:
    """No version applied twice, none out of order, one batch per key; outbox = mock."""
    mock = snapshot(mock_url)
    assert mock["double_applied"] == []
    assert mock["out_of_order"] == []
    assert mock["key_mismatch"] == []
    pairs = [(a["record_id"], a["version"]) for a in mock["applied"]]
    assert len(pairs) == len(set(pairs)), "a record version was applied twice"
    last: dict[str, int] = {}
    for record_id, version in pairs:  # the mock's log is in apply order
        assert version > last.get(record_id, 0), (record_id, version)
        last[record_id] = version
    box = outbox_rows(engine)
    assert set(box.values()) <= {"delivered"}, box
    assert set(box) == set(pairs)
    if expected is not None:
        assert set(pairs) == expected


def hours(credits: Decimal, rate: str) -> Decimal:
    return (credits * Decimal(rate)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


# -- (a) training base: signed native pushes ---------------------------------------------------


def test_training_base_push(db_url: str, engine: Engine, tmp_path: Path,
                            mock_ce: tuple[str, Faults], new_partner: Callable[..., Partner],
                            make_settings: Callable[..., Settings]) -> None:
    mock_url, _ = mock_ce
    partner = new_partner(engine, adapter="training_base", base_code=BASE)
    load_base_and_plan(engine, BASE, PLAN)  # R9: a recognised base and a plan filed in time
    rows = tb.results(random.Random(11), 30, year=YEAR, prefix="QHJD", bad_every=6)
    bad_ids = {r["result_id"] for i, r in enumerate(rows) if i % 6 == 5}
    by_id = {r["result_id"]: r for r in rows}
    settings = family_settings(make_settings, db_url, mock_url, tmp_path)

    with gateway(settings) as url, SigningClient(url, partner.app_key, partner.secret) as client:
        answers = tb.push(client, BASE, PLAN, rows, per_request=12)  # three requests
        # Another base's results: the whole request is refused, nothing is stored.
        with pytest.raises(httpx.HTTPStatusError) as refused:
            tb.push(client, "QHJD-999", PLAN, rows[:3])
        assert refused.value.response.status_code == 403
        assert refused.value.response.json()["error"]["code"] == "SCOPE_VIOLATION"
        # A resend of what was already answered is idempotent.
        resent = tb.push(client, BASE, PLAN, rows[:6])

        assert [a["source_record_id"] for a in answers] == [r["result_id"] for r in rows]
        accepted: set[Pair] = set()
        for answer in answers:
            rid = answer["source_record_id"]
            if rid in bad_ids:
                assert answer["status"] == "rejected"
                assert "ID_NUMBER_INVALID" in {e["code"] for e in answer["errors"]}
                assert all(e["message"] and e["message_zh"] for e in answer["errors"])
            elif by_id[rid]["passed"]:
                assert answer["status"] == "accepted", answer
            else:  # a failed assessment earns no hours (R9): stored at 0 h or refused
                assert answer["status"] in ("accepted", "rejected"), answer
            if answer["status"] == "accepted":
                assert answer["version"] == 1
                accepted.add((answer["record_id"], answer["version"]))
        assert len(accepted) >= 20
        for answer in resent:
            if answer["source_record_id"] in bad_ids:
                assert answer["status"] == "rejected"
            else:
                assert answer["status"] in ("duplicate", "rejected"), answer

        wait_delivered(engine, mock_url, len(accepted))
    assert_clean(mock_url, engine, accepted)
    for record_id, _ in accepted:
        body = delivered_body(mock_url, record_id)
        native = by_id[body["source"]["source_record_id"]]
        assert body["source"]["adapter"] == "training_base"
        assert body["source"]["partner_id"] == partner.partner_id
        assert (body["category"], body["activity_type"]) == ("professional", "training")
        assert (body["activity"]["provider_code"], body["activity"]["plan_id"]) == (BASE, PLAN)
        assert body["person"]["id_number"] == native["id_no"]
        if native["passed"]:
            assert Decimal(str(body["credited_hours"])) == Decimal(native["hours"])


# -- (b) Cadre Network College: the gateway pulls ---------------------------------------------


def test_cadre_college_pull(db_url: str, engine: Engine, tmp_path: Path,
                            mock_ce: tuple[str, Faults],
                            make_settings: Callable[..., Settings]) -> None:
    mock_url, _ = mock_ce
    college = college_mock.create_app(seed=3, initial=60, year=YEAR,
                                      faults=college_mock.Faults(seed=1, bad_item_every=10))
    state: college_mock.CollegeState = college.state.mock
    with uvicorn_thread(college) as college_url:
        settings = family_settings(make_settings, db_url, mock_url, tmp_path,
                                   cadre_college_url=college_url, pull_page_size=25,
                                   pull_retry_max_wait_seconds=0.2)
        with gateway(settings):
            first = pull_once(engine, settings)
            assert first.error is None and not first.has_more
            assert (first.pages, first.fetched, first.accepted, first.rejected) == (3, 60, 54, 6)
            assert httpx.post(f"{college_url}/_mock/grow", json={"n": 15}).json() == {"total": 75}
            second = pull_once(engine, settings)  # only what is new
            assert second.error is None
            assert (second.fetched, second.accepted, second.rejected) == (15, 14, 1)
            pairs = wait_delivered(engine, mock_url, 68)
        every = state.all_ids()
    assert_clean(mock_url, engine)
    assert len(pairs) == 68
    bad = {every[seq - 1] for seq in range(10, 76, 10)}  # the mock broke every tenth id
    delivered: set[str] = set()
    for record_id, _ in pairs:
        body = delivered_body(mock_url, record_id)
        assert (body["category"], body["activity_type"]) == ("public", "online_course")
        assert body["source"]["adapter"] == "cadre_college"
        assert body["activity"]["provider_code"] == "QHGBWY"
        assert Decimal(str(body["credited_hours"])) == Decimal(str(body["claimed"]["quantity"]))
        delivered.add(body["source"]["source_record_id"])
    assert delivered == set(every) - bad


# -- (c, d) health and finance: monthly batch files ---------------------------------------------


def write_health(path: Path, rows: list[dict[str, Any]]) -> Path:
    files.write_csv(path.with_suffix(".csv"), rows, files.HEALTH_HEADERS, encoding="gb18030")
    return path.with_suffix(".csv")


def write_finance(path: Path, rows: list[dict[str, Any]]) -> Path:
    files.write_xlsx(path.with_suffix(".xlsx"), rows, files.FINANCE_HEADERS)
    return path.with_suffix(".xlsx")


BATCH_FAMILIES = {
    # adapter: (rows, writer, record-id column, hours per credit)
    "health": (files.health_rows, write_health, "记录编号", "3.6"),
    "finance": (files.finance_rows, write_finance, "流水号", "1"),
}


@pytest.mark.parametrize("adapter", sorted(BATCH_FAMILIES))
def test_batch_family(adapter: str, db_url: str, engine: Engine, tmp_path: Path,
                      mock_ce: tuple[str, Faults], new_partner: Callable[..., Partner],
                      make_settings: Callable[..., Settings]) -> None:
    make_rows, write, id_column, rate = BATCH_FAMILIES[adapter]
    mock_url, _ = mock_ce
    partner = new_partner(engine, adapter=adapter)
    rows = list(make_rows(seed=21, n=40, year=YEAR, month=10, bad_ratio=0.15))
    bad = {i + 2: row[files.BAD_KEY] for i, row in enumerate(rows) if files.BAD_KEY in row}
    good = {row[id_column]: row for row in rows if files.BAD_KEY not in row}
    assert bad and len(good) >= 25
    path = write(tmp_path / f"{adapter}_2026-10", rows)
    settings = family_settings(make_settings, db_url, mock_url, tmp_path)

    with gateway(settings) as url, SigningClient(url, partner.app_key, partner.secret) as client:
        upload = client.upload_batch(path, adapter=adapter, kind="monthly", period=f"{YEAR}-10",
                                     row_count=len(rows))
        assert upload.status_code == 202, upload.text
        batch_id = upload.json()["batch_id"]

        def finished() -> dict[str, Any] | None:
            status = client.get(f"/v1/batches/{batch_id}", params={"limit": 1000})
            status.raise_for_status()
            body = dict(status.json())
            return body if body["status"] in ("done", "failed") else None

        status = poll(finished, 60, what=f"batch {batch_id}")
        assert status["status"] == "done", status
        assert status["counts"] == {"rows": len(rows), "accepted": len(good), "duplicate": 0,
                                    "corrected": 0, "conflict": 0, "rejected": len(bad)}
        found: dict[int, set[str]] = {}
        for rejected in status["rejected_rows"]:
            assert rejected["message"] and rejected["message_zh"]
            found.setdefault(rejected["row"], set()).add(rejected["code"])
        assert set(found) == set(bad)
        for row_no, (_, code) in bad.items():
            assert code in found[row_no], (row_no, found[row_no])

        pairs = wait_delivered(engine, mock_url, len(good))
    assert_clean(mock_url, engine)
    assert len(pairs) == len(good)
    delivered: set[str] = set()
    for record_id, _ in pairs:
        body = delivered_body(mock_url, record_id)
        native = good[body["source"]["source_record_id"]]
        credits = parse_decimal(native["学分"])
        assert body["source"]["adapter"] == adapter
        assert body["source"]["batch_id"] == batch_id
        assert body["claimed"]["unit"] == "credits"
        assert Decimal(str(body["claimed"]["quantity"])) == credits
        assert Decimal(str(body["credited_hours"])) == hours(credits, rate)
        assert "CREDIT_CONVERSION" in {n["code"] for n in body["rule_notes"]}
        assert body["person"]["industry"] == ("health" if adapter == "health" else "accounting")
        delivered.add(body["source"]["source_record_id"])
    assert delivered == set(good)
