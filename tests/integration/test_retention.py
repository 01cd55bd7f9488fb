"""Payload retention (issue 5 item 8) on SQLite and PostgreSQL.

Records are ingested and delivered to the mock management system with injected clocks; the
prune runs at chosen "now"s.  Delivered, old, superseded or closed-year payloads become stubs;
dead, pending, conflicted, capped and open-year current payloads stay; the readers of a stub
(ops record page, withdrawal, dedup) still answer.
"""

from __future__ import annotations

import copy
import json
import random
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, select, update
from typer.testing import CliRunner

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.cli import app as cli_app
from gateway.config import Settings, get_settings
from gateway.errors import PayloadRejected
from gateway.ops.records import resolve_conflict
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.retention import RETENTION_JOB, STUB_KEYS, prune
from gateway.scheduling import acquire, build_scheduler, release, run_job
from gateway.store.tables import audit_events, outbox, record_versions, rejections
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.support.delivery import drain_at
from tests.support.servers import uvicorn_thread

T1 = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)  # ingested and first delivered
T_LATE = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)  # B's correction delivered (young at NOW2)
NOW1 = datetime(2027, 8, 1, tzinfo=UTC)  # cutoff 2026-06-27, year 2026 kept open
NOW2 = datetime(2028, 1, 20, tzinfo=UTC)  # cutoff 2026-12-16, year 2026 closed
MakeSettings = Callable[..., Settings]


def _corrected(sub: dict[str, Any], **activity: str) -> dict[str, Any]:
    new = copy.deepcopy(sub)
    new["activity"].update(activity)
    new["claimed"]["quantity"] = str(int(new["claimed"]["quantity"]) + 1)
    return new


def _paper(person: gen.GenPerson) -> dict[str, Any]:
    return {"source_record_id": "RT-K", "year": 2026, "category": "professional",
            "activity_type": "paper",
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region},
            "activity": {"title": "高寒草甸退化机理研究", "completed_on": "2026-03-04"},
            "claimed": {"quantity": "1", "unit": "papers", "details": {"authorship": "sole"}}}


def _versions(engine: Engine) -> dict[tuple[str, int], dict[str, Any]]:
    with engine.connect() as conn:
        return {(r["record_id"], r["version"]): dict(r)
                for r in conn.execute(select(record_versions)).mappings()}


def _pruned(engine: Engine) -> set[tuple[str, int]]:
    return {k for k, v in _versions(engine).items() if v["pruned_at"] is not None}


def _retention_events(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(audit_events).where(
            audit_events.c.kind == "retention_pruned").order_by(audit_events.c.seq)).mappings()]


def test_only_old_delivered_finished_payloads_are_pruned_and_readers_still_answer(
        db_url: str, store: Engine, make_settings: MakeSettings, new_partner: Callable[..., Partner],
        new_operator: Callable[..., str], mock_ce: tuple[str, Faults]) -> None:
    partner = new_partner(store)
    ref = PartnerRef(partner.partner_id, "canonical")
    deliver = make_settings(db_url, mock_ce[0])
    rng = random.Random(7)
    subs = {name: gen.canonical_submission(rng, f"RT-{name}") for name in "ABDP"}
    subs["K"] = _paper(gen.make_person(rng))
    answers = ingest(store, ref, [*subs.values(), {"source_record_id": "RT-X1"},
                                  {"source_record_id": "RT-X2"}], now=T1)
    ids = {name: str(a.record_id) for name, a in zip(subs, answers, strict=False)}
    assert [a.status for a in answers] == ["accepted"] * 5 + ["rejected"] * 2
    drain_at(store, deliver, T1)
    # B corrected and delivered late; D corrected into a downstream rejection (dead).
    ingest(store, ref, [_corrected(subs["B"]),
                        _corrected(subs["D"], title="[REJECT] " + subs["D"]["activity"]["title"])],
           now=T1 + timedelta(hours=1))
    drain_at(store, deliver, T_LATE)
    # P corrected but not delivered yet (pending); C reports A's activity with other hours.
    conflict = _corrected(subs["A"]) | {"source_record_id": "RT-C"}
    later = ingest(store, ref, [_corrected(subs["P"]), conflict], now=T1 + timedelta(hours=2))
    assert [a.status for a in later] == ["corrected", "conflict"]
    ids["C"] = str(later[1].record_id)
    with store.begin() as conn:  # one rejection was revalidated since (closed); one is open
        conn.execute(update(rejections).where(rejections.c.source_record_id == "RT-X1")
                     .values(status="revalidated"))
        states = {(r.record_id, r.version): r.status for r in conn.execute(select(outbox))}
    assert states[(ids["D"], 2)] == "dead" and states[(ids["P"], 2)] == "pending"
    assert states[(ids["B"], 2)] == "delivered" and (ids["C"], 1) not in states
    original = _versions(store)

    # 2026 still open: only a superseded version (B v1) goes, and the closed rejection.
    open_year = make_settings(db_url, year_close_extensions={2026: date(2027, 12, 30)})
    dry = prune(store, open_year, dry_run=True, now=NOW1)
    assert (dry.versions, dry.rejections, dry.closed_years) == (1, 1, ())
    assert _pruned(store) == set() and _retention_events(store) == []
    first = prune(store, open_year, actor="ops-lead", now=NOW1, chunk_size=1)
    assert (first.versions, first.rejections) == (dry.versions, dry.rejections)
    assert _pruned(store) == {(ids["B"], 1)}

    # 2026 closed: current versions go too, unless capped (K), or too young (B v2, delivered
    # 2027-01-15), or their record is dead (D), pending (P) or a conflict (C), or a conflict
    # is held against it (A: keeping C supersedes A from its payload) until ops resolve it.
    closed = make_settings(db_url, year_close_extensions={})
    dry = prune(store, closed, dry_run=True, now=NOW2)
    assert (dry.versions, dry.rejections, dry.closed_years) == (0, 0, (2026,))
    resolve_conflict(store, closed, ids["C"], keep="existing", reason="A's hours confirmed",
                     actor="ops-li")
    dry = prune(store, closed, dry_run=True, now=NOW2)
    assert (dry.versions, dry.rejections, dry.closed_years) == (1, 0, (2026,))
    second = prune(store, closed, now=NOW2)
    assert second.versions == 1 and second.cutoff == NOW2 - timedelta(days=400)
    assert _pruned(store) == {(ids["B"], 1), (ids["A"], 1)}
    assert prune(store, closed, now=NOW2).versions == 0  # idempotent

    after = _versions(store)
    for key, row in after.items():
        if key not in _pruned(store):
            assert row == original[key]
            continue
        body = json.loads(row["payload"])
        assert set(body) == STUB_KEYS and body["pruned"] is True
        assert (body["record_id"], body["version"]) == key
        assert body["content_hash"] == row["content_hash"] == original[key]["content_hash"]
        assert datetime.fromisoformat(body["pruned_at"]) == row["pruned_at"]
        assert subs["A"]["person"]["id_number"] not in row["payload"]
    with store.connect() as conn:
        payloads = dict(conn.execute(select(rejections.c.source_record_id, rejections.c.payload)).all())
    assert orjson.loads(payloads["RT-X1"])["pruned"] is True
    assert orjson.loads(payloads["RT-X2"]) == {"source_record_id": "RT-X2"}  # open: kept

    events = _retention_events(store)  # one per run that pruned something, no payloads
    assert [(e["actor"], json.loads(e["detail"])["versions"]) for e in events] == [
        ("ops-lead", 1), ("gateway", 1)]
    assert json.loads(events[0]["detail"])["cutoff"] == (NOW1 - timedelta(days=400)).isoformat()

    # Readers of a pruned current version: withdrawal is refused with a code, the same
    # activity from another source is judged on the hours its record's row keeps (the same:
    # a duplicate, never forwarded), the ops page still answers.
    with pytest.raises(PayloadRejected) as refused:
        withdraw(store, ref, "RT-A")
    assert refused.value.code == "YEAR_CLOSED"
    [again] = ingest(store, ref, [subs["A"] | {"source_record_id": "RT-A2"}], now=T1)
    assert again.status == "duplicate"
    viewer = {"Authorization": f"Bearer {new_operator(store, role='viewer')}"}
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        for name in "AB":
            page = httpx.get(f"{url}/v1/records/{ids[name]}", headers=viewer)
            assert page.status_code == 200, page.text


def test_the_job_runs_once_cluster_wide_and_the_cli_counts_first(
        db_url: str, store: Engine, make_settings: MakeSettings, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults]) -> None:
    ref = PartnerRef(new_partner(store).partner_id, "canonical")
    sub = gen.canonical_submission(random.Random(3), "RJ-1")
    [first] = ingest(store, ref, [sub], now=T1)
    deliver = make_settings(db_url, mock_ce[0])
    drain_at(store, deliver, T1)
    ingest(store, ref, [_corrected(sub)], now=T1)
    drain_at(store, deliver, T1)
    settings = make_settings(db_url, retention_payload_days=1, retention_interval_seconds=86400)
    assert RETENTION_JOB.interval_seconds(settings) == 86400
    assert RETENTION_JOB.interval_seconds(settings.model_copy(update={"retention_payload_days": 0})) == 0
    scheduler = build_scheduler(store, settings, jobs={RETENTION_JOB.name: RETENTION_JOB})
    assert [j.id for j in scheduler.get_jobs()] == ["retention"]

    get_settings.cache_clear()
    try:
        counted = CliRunner().invoke(cli_app, ["retention", "run", "--dry-run", "--json"], env={
            "CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_RETENTION_PAYLOAD_DAYS": "1"})
    finally:
        get_settings.cache_clear()
    assert counted.exit_code == 0, counted.output
    assert json.loads(counted.stdout)["versions"] == 1 and _pruned(store) == set()

    # Another replica holds the lease: this tick does nothing; once released, it runs.
    assert acquire(store, RETENTION_JOB.name, 60, "other-replica")
    assert run_job(store, settings, RETENTION_JOB) is False
    assert _pruned(store) == set()
    release(store, RETENTION_JOB.name, "other-replica")
    assert run_job(store, settings, RETENTION_JOB) is True
    assert _pruned(store) == {(str(first.record_id), 1)}
    assert [e["actor"] for e in _retention_events(store)] == ["scheduler"]


def test_the_dry_run_counts_while_a_writer_holds_the_sqlite_lock(
        db_url: str, store: Engine, make_settings: MakeSettings) -> None:
    """The count reads the whole store; on SQLite it took the write lock and stalled ingest."""
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock (PostgreSQL readers take none)")
    writer = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # an ingest or a batch chunk mid-transaction
    counted: list[Any] = []
    dry_run = threading.Thread(target=lambda: counted.append(
        prune(store, make_settings(db_url), dry_run=True, now=NOW1)), daemon=True)
    try:
        dry_run.start()
        dry_run.join(timeout=20)  # the busy timeout is 60 s: a count that waited is still waiting
        assert counted, "the dry run waited on the writer's lock"
        assert counted[0].dry_run and counted[0].cutoff is not None, counted[0]  # it read
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        dry_run.join(timeout=90)
