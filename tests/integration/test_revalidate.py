"""Revalidation (SPEC §2 ops, §5): rejected records run the pipeline again after a fix.

A training base pushes results before its base is in the directory (R9: BASE_NOT_RECOGNIZED);
ops count them, load the base and its plan, and revalidate: the results are accepted and
queued for delivery, the rejections are marked, and the audit trail names the operator.
"""

from __future__ import annotations

import csv
import json
import random
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine, func, select

from adapters.cadre_college import item_to_row
from adapters.training_base import TrainingBaseAdapter
from gateway.accounts import Partner, add_operator, add_partner
from gateway.api.app import create_app
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.pipeline.ingest import ingest, ingest_items
from gateway.pipeline.items import Item, PartnerRef
from gateway.reference import import_csv
from gateway.revalidate import RevalidationFilter, revalidate
from gateway.secrets_box import SecretBox
from gateway.signing import SigningClient, file_sha256
from gateway.store.db import make_engine
from gateway.store.tables import audit_events, outbox, record_versions, records, rejections
from mock_partners.generators import canonical_submission, make_person
from mock_partners.training_base import plan_period
from tests.support.keys import KEYS
from tests.support.reference import load_base_and_plan
from tests.support.servers import cli, uvicorn_thread

BASE, PLAN = "QHJD-009", "PLAN-2026-009"
FILTER = {"adapter": "training_base", "error_code": "BASE_NOT_RECOGNIZED"}


def _document(rng: random.Random, n: int, failed: int = 0) -> dict[str, Any]:
    """``n`` passed results of one plan, then ``failed`` results that failed the assessment."""
    results = []
    for i in range(n + failed):
        person = make_person(rng)
        results.append({"result_id": f"TB-{i + 1}", "id_no": person.id_number,
                        "name": person.name, "region": person.region, "hours": "16",
                        "started_on": "2026-05-11", "completed_on": "2026-05-12",
                        "passed": i < n})
    return {"base_code": BASE, "plan_id": PLAN, "results": results}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def _base_relay(engine: Engine) -> PartnerRef:
    """A canonical partner registered for BASE (a partner of no base may name none)."""
    add_partner(engine, SecretBox("cli-test"), "qh-canonical", "canonical", BASE)
    return PartnerRef("qh-canonical", "canonical", BASE)


def _statuses(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(rejections.c.status).order_by(rejections.c.id)).scalars())


def test_results_from_an_unknown_base_pass_once_the_base_is_loaded(
    db_url: str, store: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner],
) -> None:
    base = new_partner(store, adapter="training_base", base_code=BASE)
    other = new_partner(store)  # a canonical partner's rejection: outside the filter
    operator_token = add_operator(store, "ops-wang", "operator")[1]
    viewer_token = add_operator(store, "ops-li", "viewer")[1]
    rng = random.Random(9)

    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url, \
            SigningClient(url, base.app_key, base.secret) as client, \
            SigningClient(url, other.app_key, other.secret) as other_client:
        pushed = client.post("/v1/partners/training_base/records",
                             content=orjson.dumps(_document(rng, 3, failed=1)),
                             headers={"Content-Type": "application/json"})
        assert pushed.status_code == 200, pushed.text
        answers = pushed.json()["results"]
        assert [a["status"] for a in answers] == ["rejected"] * 4
        for answer in answers[:3]:  # neither the base nor its plan is known yet
            assert {e["code"] for e in answer["errors"]} == {"BASE_NOT_RECOGNIZED",
                                                              "PLAN_NOT_FILED"}
        assert "ASSESSMENT_FAILED" in {e["code"] for e in answers[3]["errors"]}
        bad = other_client.submit([{"source_record_id": "C-1"}])
        assert bad.json()["results"][0]["status"] == "rejected"
        with store.connect() as conn:
            arrived = dict(conn.execute(select(rejections.c.source_record_id,
                                               rejections.c.received_at)).all())

        def revalidate(token: str, **body: Any) -> httpx.Response:
            return httpx.post(f"{url}/v1/records/revalidate", json=body,
                              headers=_bearer(token), timeout=60)

        # A dry run counts and changes nothing; viewers may ask for one.  The filter may
        # also stand at the top level.
        dry = revalidate(viewer_token, **FILTER, dry_run=True)
        assert dry.status_code == 200, dry.text
        assert dry.json()["matched"] == 4 and dry.json()["dry_run"] is True
        assert dry.json()["would_pass"] == 0 and dry.json()["accepted"] == 0
        assert _statuses(store) == ["open"] * 5
        assert _count(store, records) == 0 and _count(store, outbox) == 0
        assert _count(store, audit_events, audit_events.c.kind == "revalidation") == 0

        forbidden = revalidate(viewer_token, filter=FILTER, reason="base QHJD-009 listed")
        assert forbidden.status_code == 403, forbidden.text
        assert forbidden.json()["error"]["code"] == "FORBIDDEN"
        no_reason = revalidate(operator_token, filter=FILTER)
        assert no_reason.status_code == 422 and no_reason.json()["error"]["field"] == "reason"
        unknown = revalidate(operator_token, filter={"error_code": "BASE_NOT_RECOGNISED"},
                             dry_run=True)
        assert unknown.status_code == 422, unknown.text
        anonymous = httpx.post(f"{url}/v1/records/revalidate", json={"dry_run": True})
        assert anonymous.status_code == 401
        assert _statuses(store) == ["open"] * 5

        load_base_and_plan(store, BASE, PLAN)
        preview = revalidate(viewer_token, filter=FILTER, dry_run=True).json()
        assert (preview["matched"], preview["would_pass"]) == (4, 3)

        done = revalidate(operator_token, filter=FILTER, reason="base QHJD-009 listed")
        assert done.status_code == 200, done.text
        result = done.json()
        assert result["dry_run"] is False
        assert (result["matched"], result["accepted"], result["rejected_again"]) == (4, 3, 1)
        assert result["codes_again"] == {"ASSESSMENT_FAILED": 1}

        again = revalidate(operator_token, filter=FILTER, reason="once more")
        assert again.status_code == 200 and again.json()["matched"] == 0

    with store.connect() as conn:
        stored = conn.execute(select(records).order_by(records.c.source_record_id)).mappings().all()
        queued = conn.execute(select(outbox.c.record_id, outbox.c.version, outbox.c.status)).all()
        rows = conn.execute(select(rejections).order_by(rejections.c.id)).mappings().all()
        events = conn.execute(select(audit_events).where(
            audit_events.c.kind == "revalidation").order_by(audit_events.c.seq)).mappings().all()
    assert [r["source_record_id"] for r in stored] == ["TB-1", "TB-2", "TB-3"]
    assert {(r["status"], r["partner_id"], r["adapter"], r["credited_hours"]) for r in stored} \
        == {("accepted", base.partner_id, "training_base", "16.0")}
    assert all(r["reference_version"] != "none" for r in stored)
    assert sorted((rid, v, s) for rid, v, s in queued) == sorted(
        (r["record_id"], 1, "pending") for r in stored)

    by_source = {(r["source_record_id"], r["status"]): r for r in rows}
    assert [r["status"] for r in rows] == ["revalidated"] * 3 + ["superseded", "open", "open"]
    fresh = by_source[("TB-4", "open")]  # the failed assessment, rejected again
    assert [e["code"] for e in json.loads(fresh["errors"])] == ["ASSESSMENT_FAILED"]
    assert fresh["received_at"] == arrived["TB-4"]  # it keeps its arrival time
    assert json.loads(fresh["payload"])["base_code"] == BASE
    assert by_source[("C-1", "open")]["partner_id"] == other.partner_id  # outside the filter

    assert len(events) == 2
    first = json.loads(events[0]["detail"])
    assert events[0]["actor"] == "ops-wang"
    assert first["reason"] == "base QHJD-009 listed"
    assert first["filter"] == FILTER
    assert first["counts"]["accepted"] == 3 and first["counts"]["rejected_again"] == 1
    assert json.loads(events[1]["detail"])["counts"]["matched"] == 0


def test_cli_revalidate_dry_run_then_act(tmp_path: Path, sqlite_url: str) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": sqlite_url, "CE_GATEWAY_SECRET_KEY": "cli-test"}
    engine = make_engine(sqlite_url)
    # Registered, as a base must be: revalidation judges its records by its stored base code.
    add_partner(engine, SecretBox("cli-test"), "qh-base-009", "training_base", BASE)
    partner = PartnerRef("qh-base-009", "training_base", BASE)
    rows = TrainingBaseAdapter().parse(_document(random.Random(4), 2))
    items = [Item(raw=r.raw, submission=r.submission, errors=r.errors, warnings=r.warnings)
             for r in rows]
    assert {a.status for a in ingest_items(engine, partner, items)} == {"rejected"}
    args = ("revalidate", "--adapter", "training_base", "--error-code", "BASE_NOT_RECOGNIZED")

    dry = cli(env, *args, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert (json.loads(dry.stdout)["matched"], json.loads(dry.stdout)["dry_run"]) == (2, True)
    refused = cli(env, *args, "--json")
    assert refused.returncode == 2 and "--reason" in refused.stderr

    load_base_and_plan(engine, BASE, PLAN)
    done = cli(env, *args, "--reason", "base listed", "--actor", "ops-zhao", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["accepted"] == 2
    with engine.connect() as conn:
        actor = conn.execute(select(audit_events.c.actor).where(
            audit_events.c.kind == "revalidation")).scalar_one()
        statuses = list(conn.execute(select(rejections.c.status)).scalars())
    engine.dispose()
    assert actor == "ops-zhao"
    assert statuses == ["revalidated"] * 2


HEALTH_COLUMNS = ["记录编号", "身份证号", "姓名", "工作单位", "地区代码", "项目编号", "项目名称",
                  "学分类别", "学分", "开始日期", "完成日期", "证书编号"]


def test_a_deferral_approved_later_lets_late_records_count_next_year(
    db_url: str, store: Engine, make_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    """R11: 2025 records sent after the year closed count toward 2026 once a deferral exists.

    The records come through three adapters — a health batch (its rows parse again with the
    batch's adapter and year check), a Cadre College page item and a canonical submission.
    """
    rng = random.Random(11)
    deferred, other = make_person(rng), make_person(rng)
    rows = [["WJ-1", deferred.id_number, deferred.name, "", deferred.region, "CME-1",
             "高原医学新进展", "Ⅰ类", "5", "2025-11-18", "2025-11-20", ""],
            ["WJ-2", deferred.id_number, deferred.name, "", deferred.region, "CME-2",
             "临床医学新进展", "Ⅱ类", "2", "", "2024-06-01", ""],  # not this batch's year
            ["WJ-3", other.id_number, other.name, "", other.region, "CME-1",
             "高原医学新进展", "Ⅰ类", "5", "", "2025-11-21", ""]]  # no deferral: stays closed
    path = tmp_path / "health_2025.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([HEALTH_COLUMNS, *rows])
    batch = NewBatch(new_batch_id(), "wjw", "health", "annual", "2025", path, "csv",
                     path.stat().st_size, file_sha256(path))
    record_batch(store, batch, actor="test")
    processor = BatchProcessor(store, make_settings(db_url))
    claimed = processor.claim()
    assert claimed is not None
    processor.process(claimed)

    in_2026 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)  # 2025 closed on 30 December 2025
    item = {"xh": "GB-9", "sfzh": deferred.id_number, "xm": deferred.name,
            "dqdm": deferred.region, "kcbh": "KC-9", "kcmc": "数字经济与数字政府", "xs": 12,
            "wcsj": "2025-12-31 10:00:00"}  # completed after the close: late however pulled
    parsed = item_to_row(item)
    cadre = ingest_items(store, PartnerRef("cadre-college", "cadre_college"), [Item(
        raw=parsed.raw, submission=parsed.submission, errors=parsed.errors)], now=in_2026)
    late = canonical_submission(rng, "C-9", deferred, year=2025, hours="8")
    canonical = ingest(store, PartnerRef("qh-canonical", "canonical"), [late], now=in_2026)
    assert [a.status for a in cadre + canonical] == ["rejected", "rejected"]
    with store.connect() as conn:
        codes = {r.source_record_id: {e["code"] for e in json.loads(r.errors)}
                 for r in conn.execute(select(rejections))}
    assert codes == {"WJ-1": {"YEAR_CLOSED"}, "WJ-2": {"OUTSIDE_YEAR"}, "WJ-3": {"YEAR_CLOSED"},
                     "GB-9": {"YEAR_CLOSED"}, "C-9": {"YEAR_CLOSED"}}

    deferrals = tmp_path / "deferrals.csv"
    deferrals.write_text("id_number,from_year,reason,approved_on\n"
                         f"{deferred.id_number},2025,post_transfer,2026-01-05\n", encoding="utf-8")
    assert import_csv(store, "deferrals", deferrals, actor="test", keys=KEYS).ok

    closed = RevalidationFilter(error_code="YEAR_CLOSED")
    whole_batch = RevalidationFilter(batch_id=batch.batch_id)
    result = revalidate(store, closed, actor="ops-ma", reason="deferral approved 2026-01-05")
    assert (result.matched, result.accepted, result.rejected_again) == (4, 3, 1)
    assert result.codes_again == {"YEAR_CLOSED": 1}
    again = revalidate(store, whole_batch, actor="ops-ma", reason="the rest of the batch")
    assert (again.matched, again.accepted, again.codes_again) == (2, 0, {
        "OUTSIDE_YEAR": 1, "YEAR_CLOSED": 1})

    with store.connect() as conn:
        stored = {r.source_record_id: r for r in conn.execute(select(records))}
        notes = {r.source_record_id: [n["code"] for n in json.loads(p)["rule_notes"]]
                 for r, p in ((r, conn.execute(select(record_versions.c.payload).where(
                     record_versions.c.record_id == r.record_id)).scalar_one())
                     for r in stored.values())}
    assert sorted(stored) == ["C-9", "GB-9", "WJ-1"]
    assert {r.counts_year for r in stored.values()} == {2026}
    assert stored["WJ-1"].batch_id == batch.batch_id  # still the batch's row (reconciliation)
    assert stored["WJ-1"].credited_hours == "18.0"  # 5 CME credits × 3.6 h
    assert all("DEFERRAL" in codes for codes in notes.values())


def test_two_revalidations_at_once_take_each_rejection_once(postgres_url: str) -> None:
    """Two operators start the same revalidation at the same moment (PostgreSQL)."""
    engine = make_engine(postgres_url)
    rng = random.Random(12)
    subs = []
    for i in range(300):
        sub = canonical_submission(rng, f"S-{i}", hours="8", within=plan_period())
        sub["activity"] |= {"provider_code": BASE, "plan_id": PLAN}
        subs.append(sub)
    answers = ingest(engine, _base_relay(engine), subs)
    assert {a.status for a in answers} == {"rejected"}
    load_base_and_plan(engine, BASE, PLAN)
    barrier = threading.Barrier(2, timeout=60)
    results: list[Any] = []

    def run(actor: str) -> None:
        barrier.wait()
        results.append(revalidate(engine, RevalidationFilter(), actor=actor, reason="race",
                                  chunk_size=50))

    threads = [threading.Thread(target=run, args=(actor,)) for actor in ("ops-a", "ops-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    with engine.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(records)).scalar_one()
        marks: dict[str, int] = {row.status: row.n for row in conn.execute(
            select(rejections.c.status, func.count().label("n"))
            .group_by(rejections.c.status))}
    engine.dispose()
    assert len(results) == 2
    assert sum(r.accepted for r in results) == stored == 300
    assert sum(r.rejected_again + r.duplicate for r in results) == 0
    assert marks == {"revalidated": 300}


def test_a_dry_run_judges_while_a_writer_holds_the_sqlite_lock(sqlite_url: str) -> None:
    """Counting and judging the rejections only reads: a writer (ingest, a batch chunk) goes on.

    Each chunk was parsed and judged under ``BEGIN IMMEDIATE``: SQLite's write lock was held
    for the CPU time of the whole rule run, and a writer holding it stalled the dry run.
    """
    engine = make_engine(sqlite_url)
    rng = random.Random(13)
    subs = [canonical_submission(rng, f"D-{i}", hours="8", within=plan_period()) for i in range(20)]
    for sub in subs:
        sub["activity"] |= {"provider_code": BASE, "plan_id": PLAN}
    assert {a.status for a in ingest(engine, _base_relay(engine), subs)} == {
        "rejected"}
    load_base_and_plan(engine, BASE, PLAN)
    writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    counted: list[Any] = []
    dry_run = threading.Thread(target=lambda: counted.append(revalidate(
        engine, RevalidationFilter(), actor="ops", dry_run=True, chunk_size=5)), daemon=True)
    try:
        dry_run.start()
        dry_run.join(timeout=20)  # the busy timeout is 60 s: a run that waited is still waiting
        assert counted, "the dry run waited on the writer's lock"
        assert (counted[0].matched, counted[0].would_pass) == (20, 20), counted[0].as_dict()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        dry_run.join(timeout=90)
        engine.dispose()


def test_the_api_reads_a_revalidation_filter_as_the_console_and_cli_do(
        db_url: str, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], new_operator: Callable[..., str]) -> None:
    """An empty field means "any"; a date alone is the whole day; a time without an offset is local.

    Review 33: an empty ``partner_id`` matched no rejection, and ``"2026-03-01"`` was refused
    422, though the console and ``ce-gateway revalidate`` take both.
    """
    from zoneinfo import ZoneInfo

    from mock_partners.generators import corrupt_check_digit

    engine = make_engine(db_url)
    try:
        ref = PartnerRef(new_partner(engine).partner_id, "canonical")
        sub = canonical_submission(random.Random(35), "R-1")
        sub["person"]["id_number"] = corrupt_check_digit(sub["person"]["id_number"])
        [answer] = ingest(engine, ref, [sub])
        assert answer.status.value == "rejected"
        with engine.connect() as conn:
            received = conn.execute(select(rejections.c.received_at)).scalar_one()
        day = received.astimezone(ZoneInfo("Asia/Shanghai")).date().isoformat()
        op = {"Authorization": f"Bearer {new_operator(engine)}"}
        with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
            def matched(**flt: str) -> int:
                answer = httpx.post(f"{url}/v1/records/revalidate", headers=op,
                                    json={**flt, "dry_run": True})
                assert answer.status_code == 200, answer.text
                return int(answer.json()["matched"])

            assert matched() == 1
            assert matched(partner_id="", batch_id="", adapter="", error_code="") == 1
            assert matched(since=day, until=day) == 1  # that whole day, local
            assert matched(until=day.replace("-", "")) == 1  # 20260301: through that day too
            assert matched(since=f"{day}T00:00", until=f"{day}T00:00") == 0  # an empty moment
            assert matched(partner_id="nobody") == 0
    finally:
        engine.dispose()
