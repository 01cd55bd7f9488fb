"""Journey review: one CE year's life from the ops team's and the partners' side (SPEC §2, §4 R11, §7).

A canonical partner and the health commission deliver 2026's records to the mock management
system; corrections and withdrawals come before the close; the close passes (YEAR_CLOSE, no
extension); late submissions, a late correction, December's monthly batch and the annual batch
arrive in January; the retention job prunes; then the ops views (record page API and CLI,
compliance, reconciliation, reprocess of a dead letter, audit verify) must still answer the same.
Clocks are moved as tests/integration/test_retention.py moves them (``now=`` on ingest and
prune, ``drain_at`` for the worker, ``created_at`` of a batch for its arrival).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from gateway import audit, compliance, reconcile
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.errors import PayloadRejected
from gateway.ops.common import OpsConflict
from gateway.ops.deliveries import DeliveryFilter, reprocess
from gateway.ops.records import resolve_conflict
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.rules_tables import DeferralInfo, EmptyReference, RulesConfig
from gateway.pipeline.withdraw import withdraw
from gateway.reference import StoreReference
from gateway.retention import prune
from gateway.store.tables import outbox, record_versions, records
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from mock_partners.files import HEALTH_HEADERS, write_csv, year_dataset
from tests.integration.test_reconciliation import _ingest as ingest_batch
from tests.support.delivery import drain_at
from tests.support.keys import KEYS
from tests.support.servers import cli, uvicorn_thread

MakeSettings = Callable[..., Settings]
YEAR = 2026
IN_YEAR = datetime(2026, 6, 1, 8, tzinfo=UTC)
BEFORE_CLOSE = datetime(2026, 9, 1, 8, tzinfo=UTC)
DELIVERED = datetime(2026, 12, 1, 8, tzinfo=UTC)
AFTER_CLOSE = datetime(2027, 1, 10, 8, tzinfo=UTC)  # 30 Dec 2026 has passed in Asia/Shanghai
JANUARY_DRAIN = datetime(2027, 1, 16, 8, tzinfo=UTC)
PRUNE_AT = datetime(2028, 3, 1, tzinfo=UTC)  # cutoff 2027-01-26: every delivery above is older


def _closed(make_settings: MakeSettings, db_url: str, url: str, tmp_path: Path) -> Settings:
    """The notice's close (30 December), no extension: the suite's 2099 one is taken away."""
    return make_settings(db_url, url, year_close_extensions={}, batch_dir=tmp_path / "batches")


def _rules(settings: Settings) -> RulesContext:
    return RulesContext(EmptyReference(), RulesConfig.from_settings(settings))


def _changed(sub: dict[str, Any], quantity: str) -> dict[str, Any]:
    new = copy.deepcopy(sub)
    new["claimed"]["quantity"] = quantity
    return new


def _reports(engine: Engine, people: list[str]) -> dict[str, Any]:
    with engine.connect() as conn:
        return {p: compliance.report(conn, p, YEAR, keys=KEYS) for p in people}


def _pruned(engine: Engine) -> set[tuple[str, int]]:
    with engine.connect() as conn:
        return {(r.record_id, int(r.version)) for r in conn.execute(
            select(record_versions.c.record_id, record_versions.c.version)
            .where(record_versions.c.pruned_at.is_not(None)))}


def test_a_year_lived_closed_and_pruned_leaves_every_ops_view_answering_the_same(
        db_url: str, store: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], new_operator: Callable[..., str],
        mock_ce: tuple[str, Faults], tmp_path: Path) -> None:
    url, _ = mock_ce
    settings = _closed(make_settings, db_url, url, tmp_path)
    rules = _rules(settings)
    base = new_partner(store)
    ref = PartnerRef(base.partner_id, "canonical")
    health = new_partner(store, adapter="health")
    rng = random.Random(2026)
    person = gen.make_person(rng)
    subs = {n: gen.canonical_submission(rng, f"YL-{n}", person=person, hours="12")
            for n in ("A", "C", "W", "L")}
    dead = gen.canonical_submission(rng, "YL-D", person=person, hours="6")
    dead["activity"]["title"] = "[REJECT] " + dead["activity"]["title"]  # refused downstream

    # In the year: the base's results, a correction and a withdrawal before the close.
    first = ingest(store, ref, [*subs.values(), dead], now=IN_YEAR, rules=rules)
    assert [a.status.value for a in first] == ["accepted"] * 5, first
    ids = {a.source_record_id: str(a.record_id) for a in first}
    drain_at(store, settings, IN_YEAR)
    assert ingest(store, ref, [_changed(subs["C"], "14")], now=BEFORE_CLOSE,
                  rules=rules)[0].status.value == "corrected"
    assert withdraw(store, ref, "YL-W", now=BEFORE_CLOSE, config=rules.config) is not None

    # The health commission's months, pushed by the 3rd of the next month; December's and the
    # annual batch arrive in January, after the close (docs/operations.md, December's batches).
    monthly, annual, manifest = year_dataset(41, YEAR, people=6, per_month=2, adapter="health")
    for m, rows in enumerate(monthly, start=1):
        if rows:
            path = tmp_path / f"health_{YEAR}-{m:02d}.csv"
            write_csv(path, rows, HEALTH_HEADERS)
            arrives = datetime(YEAR + (m == 12), m % 12 + 1, 3, 2, tzinfo=UTC)
            ingest_batch(store, settings, health, path, "monthly", f"{YEAR}-{m:02d}", arrives)
    drain_at(store, settings, DELIVERED)

    # After the close: a new result, a correction and December's rows are YEAR_CLOSED.
    late = ingest(store, ref, [gen.canonical_submission(rng, "YL-N", person=person, hours="8"),
                               _changed(subs["A"], "13"), subs["L"]], now=AFTER_CLOSE, rules=rules)
    assert [(a.status.value, [e.code for e in a.errors]) for a in late] == [
        ("rejected", ["YEAR_CLOSED"]), ("rejected", ["YEAR_CLOSED"]), ("duplicate", [])]
    annual_path = tmp_path / f"health_{YEAR}.csv"
    write_csv(annual_path, annual, HEALTH_HEADERS)
    ingest_batch(store, settings, health, annual_path, "annual", str(YEAR),
                 datetime(2027, 1, 15, 2, tzinfo=UTC))
    drain_at(store, settings, JANUARY_DRAIN)
    with store.connect() as conn:
        assert conn.execute(select(outbox.c.status).where(
            outbox.c.record_id == ids["YL-D"])).scalar_one() == "dead"
        health_people = sorted({str(r["身份证号"]) for r in annual})
    people = [person.id_number, *health_people]

    with store.connect() as conn:
        recon_before = reconcile.report(conn, "health", YEAR, today=PRUNE_AT)
    before = _reports(store, people)
    assert before[person.id_number]["credited"]["professional"] == "38.0"  # A 12 + C 14 + L 12

    # The retention job prunes the closed year's delivered payloads.
    result = prune(store, settings, now=PRUNE_AT, actor="ops-lead")
    assert result.closed_years == (YEAR,) and result.versions > 0
    assert (ids["YL-A"], 1) in _pruned(store)
    assert not any(rid == ids["YL-D"] for rid, _ in _pruned(store))  # dead: kept

    # Compliance per person and the reconciliation report are the same after the prune.
    assert _reports(store, people) == before
    with store.connect() as conn:
        assert reconcile.report(conn, "health", YEAR, today=PRUNE_AT) == recon_before
        assert not any(p in json.dumps(recon_before, ensure_ascii=False) for p in people)
        assert audit.verify(conn).ok

    # The old dead letter is reprocessed: counted, then requeued (and refused again).
    flt = DeliveryFilter(status="dead", partner_id=base.partner_id)
    assert reprocess(store, flt, dry_run=True, reason=None, actor="ops-li").matched == 1
    assert reprocess(store, flt, dry_run=False, reason="annual review", actor="ops-li").matched == 1
    drain_at(store, settings, PRUNE_AT)

    # The record page (API and CLI) still answers on a pruned record, numbers masked.
    viewer = {"Authorization": f"Bearer {new_operator(store, role='viewer')}"}
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_YEAR_CLOSE_EXTENSIONS": ""}
    with uvicorn_thread(create_app(settings, run_worker=False)) as api:
        page = httpx.get(f"{api}/v1/records/{ids['YL-A']}", headers=viewer)
        assert page.status_code == 200, page.text
        assert page.json()["payload_pruned"] is True
        assert person.id_number not in page.text
        got = httpx.get(f"{api}/v1/compliance/{person.id_number}/{YEAR}", headers=viewer)
        assert got.status_code == 200, got.text
        assert got.json()["credited"] == before[person.id_number]["credited"]
        recon = httpx.get(f"{api}/v1/reconciliation/health/{YEAR}", headers=viewer)
        assert recon.status_code == 200, recon.text
        verified = httpx.get(f"{api}/v1/audit/verify", headers=viewer, timeout=30)
        assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text
    shown = cli(env, "records", "show", ids["YL-A"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["payload_pruned"] is True
    assert person.id_number not in shown.stdout
    assert cli(env, "audit", "verify").returncode == 0

    with store.connect() as conn:
        assert conn.execute(select(records.c.withdrawn).where(
            records.c.record_id == ids["YL-W"])).scalar_one() is True


def test_a_withdrawal_after_the_close_is_refused_as_a_correction_is(
        db_url: str, store: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults], tmp_path: Path) -> None:
    """R11 and the notice close the year; a DELETE after the close must not change its hours.

    SPEC §4 R11 (a record for year Y arriving after the close -> YEAR_CLOSED); the notice
    七(四)4 ("未按规定在当年 12 月 30 日前提交学时申请的，系统将无法提交并审验 … 学时审验工作不得
    结转到下一年"); docs/retention-and-audit.md ("only while the year is open can the current
    version change"; a withdrawal of a pruned closed-year record is refused 422 YEAR_CLOSED).
    A correction after the close is refused YEAR_CLOSED, and so is a withdrawal once retention
    pruned the record (withdraw._withdraw), but the same DELETE a day before the prune is
    accepted, queued downstream, and takes the hours out of the closed year's compliance.
    """
    settings = _closed(make_settings, db_url, mock_ce[0], tmp_path)
    rules = _rules(settings)
    ref = PartnerRef(new_partner(store).partner_id, "canonical")
    rng = random.Random(31)
    person = gen.make_person(rng)
    sub = gen.canonical_submission(rng, "YL-W", person=person, hours="12")
    assert ingest(store, ref, [sub], now=IN_YEAR, rules=rules)[0].status.value == "accepted"
    drain_at(store, settings, IN_YEAR)
    [late] = ingest(store, ref, [_changed(sub, "13")], now=AFTER_CLOSE, rules=rules)
    assert [e.code for e in late.errors] == ["YEAR_CLOSED"]  # the correction is refused
    with pytest.raises(PayloadRejected) as refused:
        withdraw(store, ref, "YL-W", now=AFTER_CLOSE, config=rules.config)
    assert refused.value.code == "YEAR_CLOSED"
    with store.connect() as conn:
        assert compliance.report(conn, person.id_number, YEAR, keys=KEYS)["credited"][
            "professional"] == "12.0"



def test_a_conflict_held_against_a_pruned_record_is_refused_keep_this_and_resolved_keep_existing(
        db_url: str, store: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults], tmp_path: Path) -> None:
    """SPEC §7 Dedup (same key, other hours -> conflict, *held for ops*) and §2 Ops team.

    docs/retention-and-audit.md says a report of a pruned record's activity is judged on the
    hours its row keeps, "other hours a conflict held for ops", and lists withdrawal and dedup
    as the only readers of a closed year's pruned payload.  Keeping the new report would
    withdraw the holder, whose withdrawal is built from its payload, gone with its closed
    year (ops/records._keep_this): that is refused YEAR_CLOSED on ``keep`` (409), saying to keep
    the existing record - which resolves it (it once answered NOT_EDITABLE with the editing
    message, which is not what the operator tried).  Here the second report arrives after the
    close for a person with approved deferrals of 2026 and 2027 (七(二)), counted in 2027.
    """
    settings = _closed(make_settings, db_url, mock_ce[0], tmp_path)
    rules = _rules(settings)
    one = PartnerRef(new_partner(store).partner_id, "canonical")
    two = PartnerRef(new_partner(store).partner_id, "canonical")
    rng = random.Random(32)
    person = gen.make_person(rng)
    sub = gen.canonical_submission(rng, "YL-H", person=person, hours="12")
    [held] = ingest(store, one, [sub], now=IN_YEAR, rules=rules)
    drain_at(store, settings, IN_YEAR)
    assert prune(store, settings, now=PRUNE_AT).versions == 1
    # 2027 deferred in turn: after 2027's close too, only a chain of deferrals takes a 2026
    # report (R11, since session 30), counted in 2027 all the same.
    deferred = RulesContext(StoreReference.of(KEYS, deferrals=[
        (person.id_number, DeferralInfo(YEAR, "illness", date(2026, 12, 1))),
        (person.id_number, DeferralInfo(YEAR + 1, "illness", date(2027, 12, 1)))]), rules.config)
    [other] = ingest(store, two, [_changed(sub, "16") | {"source_record_id": "YL-C2"}],
                     now=PRUNE_AT, rules=deferred)
    assert other.status.value == "conflict", other
    with pytest.raises(OpsConflict) as refused:
        resolve_conflict(store, settings, str(other.record_id), keep="this",
                         reason="the base's certificate shows 16 h", actor="ops-li")
    assert (refused.value.code, refused.value.field, refused.value.status_code) == (
        "YEAR_CLOSED", "keep", 409)
    assert str(held.record_id) in refused.value.message and "keep=existing" in refused.value.message
    assert "保留原有记录" in refused.value.message_zh
    resolved = resolve_conflict(store, settings, str(other.record_id), keep="existing",
                                reason="the 2026 record stands", actor="ops-li")
    assert (resolved["status"], resolved["kept"]) == ("duplicate", str(held.record_id))
