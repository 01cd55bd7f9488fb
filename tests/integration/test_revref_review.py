"""Review of revalidation, reference data and retention (SPEC §2 ops, §4, §5, §7).

The review (session 21) wrote nine of these as strict xfails on the code of 3105932, each failing
on the bug it describes: revalidation replayed an old rejection over the partner's later word, out
of arrival order, with the rerun's time as arrival, and audited only a finished run; retention
pruned what a held conflict and a possible successor need; a quiet reference sync reverted an ops
import; a spaced identity number showed whole.  All are fixed; the plain tests pin behaviour
that was right and is easy to break.  Everything
runs against the real store (SQLite and, where it matters, PostgreSQL), the real pipeline and,
for deliveries, the mock management system on a real uvicorn.
"""

from __future__ import annotations

import copy
import csv
import json
import random
import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, func, select

from adapters.registry import get_adapter
from adapters.training_base import TrainingBaseAdapter
from gateway.accounts import Partner
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.ops.records import list_rejections, resolve_conflict
from gateway.pipeline.ingest import ingest, ingest_items
from gateway.pipeline.items import Item, PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.reference import import_csv, sync
from gateway.retention import prune
from gateway.revalidate import RevalidationFilter, default_rules, revalidate
from gateway.signing import file_sha256
from gateway.store.tables import (
    audit_events,
    outbox,
    record_versions,
    records,
    reference_bases,
    rejections,
)
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, canonical_submission, make_person
from mock_partners.training_base import plan_period
from tests.support.delivery import drain_at
from tests.support.keys import KEYS
from tests.support.reference import load_base_and_plan

BASE, PLAN, LATE_PLAN = "QHJD-031", "PLAN-2026-031", "PLAN-2026-032"
MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]


def _relay(new_partner: NewPartner, engine: Engine) -> PartnerRef:
    """A canonical partner registered for BASE (it may then name BASE and its plans)."""
    partner = new_partner(engine, base_code=BASE)
    return PartnerRef(partner.partner_id, "canonical", BASE)


def _training(rng: random.Random, source_id: str, plan: str, hours: str,
              person: GenPerson | None = None, year: int = 2026) -> dict[str, Any]:
    sub = canonical_submission(rng, source_id, person, year=year, hours=hours,
                               within=plan_period(year))
    sub["activity"] |= {"provider_code": BASE, "plan_id": plan}
    return sub


def _record(engine: Engine, source_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(records).where(
            records.c.source_record_id == source_id)).mappings().one())


def _queued_versions(engine: Engine, record_id: str) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(outbox.c.version).where(
            outbox.c.record_id == record_id)).scalars())


def _payload(engine: Engine, record_id: str, version: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(orjson.loads(conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == record_id,
            record_versions.c.version == version)).scalar_one()))


def _count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


# -- 1. revalidation applies stale submissions over the partner's later word ------------------


def test_a_stale_rejected_correction_does_not_overwrite_the_partners_later_correction(
        store: Engine, new_partner: NewPartner) -> None:
    relay = _relay(new_partner, store)
    load_base_and_plan(store, BASE, PLAN)
    rng = random.Random(31)
    first = _training(rng, "S-1", PLAN, "8")
    # v1 accepted; then a correction naming a plan not filed yet (rejected); then the base's
    # real correction (16 h, the filed plan), accepted as v2 — the partner's last word.
    stale = copy.deepcopy(first)
    stale["activity"]["plan_id"], stale["claimed"]["quantity"] = LATE_PLAN, "12"
    latest = copy.deepcopy(first)
    latest["claimed"]["quantity"] = "16"
    statuses = [ingest(store, relay, [sub], rules=default_rules(store))[0].status
                for sub in (first, stale, latest)]
    assert statuses == ["accepted", "rejected", "corrected"]
    load_base_and_plan(store, BASE, LATE_PLAN)  # the other plan is filed afterwards

    revalidate(store, RevalidationFilter(error_code="PLAN_NOT_FILED"), actor="ops-wang",
               reason="plan 032 filed")

    rec = _record(store, "S-1")
    assert (rec["hours"], rec["current_version"]) == ("16.0", 2), rec
    assert _queued_versions(store, rec["record_id"]) == [1, 2]


def test_revalidation_does_not_resurrect_a_record_its_partner_withdrew(
        store: Engine, new_partner: NewPartner) -> None:
    relay = _relay(new_partner, store)
    load_base_and_plan(store, BASE, PLAN)
    rng = random.Random(32)
    first = _training(rng, "S-2", PLAN, "8")
    stale = copy.deepcopy(first)
    stale["activity"]["plan_id"] = LATE_PLAN
    statuses = [ingest(store, relay, [sub], rules=default_rules(store))[0].status
                for sub in (first, stale)]
    assert statuses == ["accepted", "rejected"]
    assert withdraw(store, relay, "S-2") is not None  # DELETE /v1/records/S-2
    load_base_and_plan(store, BASE, LATE_PLAN)

    revalidate(store, RevalidationFilter(), actor="ops-wang", reason="plan 032 filed")

    rec = _record(store, "S-2")
    assert bool(rec["withdrawn"]), rec
    assert _queued_versions(store, rec["record_id"]) == [1, 2]  # v1 and its withdrawal only


ROSTER_COLUMNS = ["base_code", "plan_id", "result_id", "id_no", "name", "region", "hours",
                  "started_on", "completed_on", "passed"]


def test_revalidation_keeps_the_order_a_partner_sent_one_result_in(
        db_url: str, store: Engine, new_partner: NewPartner, make_settings: MakeSettings,
        tmp_path: Path) -> None:
    base = new_partner(store, adapter="training_base", base_code=BASE)
    ref = PartnerRef(base.partner_id, "training_base", BASE)
    person = make_person(random.Random(33))

    def result(hours: str) -> dict[str, Any]:
        return {"result_id": "TB-7", "id_no": person.id_number, "name": person.name,
                "region": person.region, "hours": hours, "started_on": "2026-05-11",
                "completed_on": "2026-05-12", "passed": True}

    def push(hours: str) -> str:
        [row] = TrainingBaseAdapter().parse({"base_code": BASE, "plan_id": PLAN,
                                             "results": [result(hours)]})
        item = Item(raw=row.raw, submission=row.submission, errors=row.errors)
        return ingest_items(store, ref, [item], rules=default_rules(store))[0].status

    # Before the base is in the directory: a push (8 h), a roster file (12 h), a push (16 h).
    assert push("8") == "rejected"
    path = tmp_path / "roster.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        cells = result("12")
        csv.writer(handle).writerows([ROSTER_COLUMNS, [BASE, PLAN, *(
            str(cells[k]) for k in ROSTER_COLUMNS[2:])]])
    batch = NewBatch(new_batch_id(), base.partner_id, "training_base", "roster", "2026", path,
                     "csv", path.stat().st_size, file_sha256(path))
    record_batch(store, batch, actor="test")
    processor = BatchProcessor(store, make_settings(db_url))
    claimed = processor.claim()
    assert claimed is not None
    processor.process(claimed)
    assert push("16") == "rejected"
    assert _count(store, rejections, rejections.c.status == "open") == 3

    load_base_and_plan(store, BASE, PLAN)
    revalidate(store, RevalidationFilter(partner_id=base.partner_id), actor="ops-wang",
               reason="base listed")

    assert _record(store, "TB-7")["hours"] == "16.0"  # the base's last word


def test_a_failed_result_refused_with_another_error_takes_the_hours_back_once_fixed(
        store: Engine, new_partner: NewPartner) -> None:
    base = new_partner(store, adapter="training_base", base_code=BASE)
    ref = PartnerRef(base.partner_id, "training_base", BASE)
    load_base_and_plan(store, BASE, PLAN)
    person = make_person(random.Random(39))

    def push(plan: str, passed: bool) -> list[str]:
        [row] = TrainingBaseAdapter().parse({"base_code": BASE, "plan_id": plan, "results": [{
            "result_id": "TB-F", "id_no": person.id_number, "name": person.name,
            "region": person.region, "hours": "16", "started_on": "2026-05-11",
            "completed_on": "2026-05-12", "passed": passed}]})
        item = Item(raw=row.raw, submission=row.submission, errors=row.errors)
        [answer] = ingest_items(store, ref, [item], rules=default_rules(store))
        return [answer.status, *sorted(e.code for e in answer.errors)]

    assert push(PLAN, True) == ["accepted"]
    # The base moves the result to its other plan and reports the trainee failed.
    assert push(LATE_PLAN, False) == ["rejected", "ASSESSMENT_FAILED", "PLAN_NOT_FILED"]
    assert not _record(store, "TB-F")["withdrawn"]  # refused for the plan: nothing changed yet
    load_base_and_plan(store, BASE, LATE_PLAN)

    revalidate(store, RevalidationFilter(error_code="PLAN_NOT_FILED"), actor="ops-wang",
               reason="plan 032 filed")

    rec = _record(store, "TB-F")
    assert bool(rec["withdrawn"]) and rec["credited_hours"] == "0", rec
    assert _queued_versions(store, rec["record_id"]) == [1, 2]


# -- 2. an interrupted revalidation is not audited --------------------------------------------


class _Interrupted(Exception):
    """Stands for Ctrl-C in the CLI's progress bar, or a store error in a later chunk."""


def test_a_revalidation_stopped_part_way_still_audits_what_it_did(
        store: Engine, new_partner: NewPartner) -> None:
    relay = _relay(new_partner, store)
    rng = random.Random(34)
    subs = [_training(rng, f"S-{i}", PLAN, "8") for i in range(6)]
    assert {a.status for a in ingest(store, relay, subs, rules=default_rules(store))} == {
        "rejected"}
    load_base_and_plan(store, BASE, PLAN)
    calls: list[int] = []

    def progress(done: int, matched: int) -> None:
        calls.append(done)
        if done > 0:  # after the first chunk committed
            raise _Interrupted

    with pytest.raises(_Interrupted):
        revalidate(store, RevalidationFilter(), actor="ops-zhao", reason="plan filed",
                   chunk_size=2, progress=progress)

    assert _count(store, records) == 2  # the first chunk's records were accepted and queued
    assert _count(store, outbox) == 2
    with store.connect() as conn:
        events = conn.execute(select(audit_events.c.actor, audit_events.c.detail).where(
            audit_events.c.kind == "revalidation")).all()
    assert len(events) == 1
    assert events[0].actor == "ops-zhao"
    assert json.loads(events[0].detail)["reason"] == "plan filed"


# -- 3. retention prunes what ops still need to resolve a conflict -----------------------------

T_SENT = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
T_PRUNE = datetime(2028, 1, 20, tzinfo=UTC)  # 2026 closed, cutoff 2026-12-16


def test_retention_keeps_what_ops_need_to_resolve_a_held_conflict(
        db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
        mock_ce: tuple[str, Faults]) -> None:
    first, second = new_partner(store), new_partner(store)
    rng = random.Random(35)
    sub = canonical_submission(rng, "H-1", hours="8")
    [held] = ingest(store, PartnerRef(first.partner_id, "canonical"), [sub], now=T_SENT)
    assert held.status == "accepted"
    drain_at(store, make_settings(db_url, mock_ce[0]), T_SENT)
    assert _queued_versions(store, str(held.record_id)) == [1]
    # Another source reports the same activity with other hours: held for ops.
    other = copy.deepcopy(sub) | {"source_record_id": "H-OTHER"}
    other["claimed"]["quantity"] = "12"
    [conflict] = ingest(store, PartnerRef(second.partner_id, "canonical"), [other], now=T_SENT)
    assert conflict.status == "conflict"

    closed = make_settings(db_url, year_close_extensions={})
    prune(store, closed, now=T_PRUNE)

    try:
        answer = resolve_conflict(store, closed, str(conflict.record_id), keep="this",
                                  reason="the department confirmed 12 h", actor="ops-li")
    except GatewayError as exc:
        pytest.fail(f"the held conflict can no longer be resolved: {exc}")
    assert answer["status"] == "accepted"
    assert _queued_versions(store, str(held.record_id)) == [1, 2]  # its withdrawal is sent


T_LATE = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)  # delivered young at T_PRUNE


def test_retention_keeps_the_payload_of_a_duplicate_that_may_still_take_over(
        db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
        mock_ce: tuple[str, Faults]) -> None:
    first = PartnerRef(new_partner(store).partner_id, "canonical")
    second = PartnerRef(new_partner(store).partner_id, "canonical")
    deliver = make_settings(db_url, mock_ce[0])
    rng = random.Random(40)
    person = make_person(rng)
    holder = canonical_submission(rng, "H-2", person, hours="8")
    other = canonical_submission(rng, "D-2", person, hours="8")
    [h, d] = [ingest(store, p, [s], now=T_SENT)[0] for p, s in ((first, holder), (second, other))]
    assert (h.status, d.status) == ("accepted", "accepted")
    drain_at(store, deliver, T_SENT)
    # The second source corrects its report into the first one's activity: a repeat, sent
    # downstream with 0 hours (NOT_COUNTED) so the management system stops counting it.
    repeat = copy.deepcopy(holder) | {"source_record_id": "D-2"}
    [again] = ingest(store, second, [repeat], now=T_SENT)
    assert again.status == "duplicate"
    drain_at(store, deliver, T_SENT)
    # The first source fixes a certificate number later (same activity, same hours).
    fixed = copy.deepcopy(holder)
    fixed["evidence"]["certificate_no"] = "QH2026999999"
    assert ingest(store, first, [fixed], now=T_LATE)[0].status == "corrected"
    drain_at(store, deliver, T_LATE)

    prune(store, make_settings(db_url, year_close_extensions={}), now=T_PRUNE)
    assert withdraw(store, first, "H-2") is not None  # its payload was young: allowed

    rec = _record(store, "D-2")
    assert rec["status"] == "accepted", rec  # it took the activity over
    assert rec["credited_hours"] == "8.0"
    assert _queued_versions(store, rec["record_id"])[-1] > 2  # and was sent counting


# -- 4. what the management system is told about a revalidated record --------------------------

ARRIVED = datetime(2025, 12, 1, 2, 0, tzinfo=UTC)  # 2025 still open (it closed on 30 Dec)


def test_a_revalidated_record_keeps_its_arrival_time(
        store: Engine, new_partner: NewPartner) -> None:
    relay = _relay(new_partner, store)
    sub = _training(random.Random(36), "S-25", "PLAN-2025-031", "8", year=2025)
    [answer] = ingest(store, relay, [sub], now=ARRIVED, rules=default_rules(store))
    assert answer.status == "rejected"
    load_base_and_plan(store, BASE, "PLAN-2025-031", year=2025)

    result = revalidate(store, RevalidationFilter(), actor="ops-wang", reason="base listed")
    assert result.accepted == 1  # in time: it reached the gateway before 2025 closed

    rec = _record(store, "S-25")
    sent = _payload(store, rec["record_id"], 1)
    assert datetime.fromisoformat(sent["source"]["received_at"]) == ARRIVED


# -- pins: right today, easy to break ---------------------------------------------------------


def test_a_base_revoked_meanwhile_keeps_its_results_rejected_on_revalidation(
        store: Engine, new_partner: NewPartner, tmp_path: Path) -> None:
    """R9: revalidation judges with today's directory, so a revoked base's results stay out."""
    relay = _relay(new_partner, store)
    rng = random.Random(37)
    sub = _training(rng, "S-R", PLAN, "8")
    sub["activity"]["plan_id"] = LATE_PLAN
    [answer] = ingest(store, relay, [sub], rules=default_rules(store))
    assert answer.status == "rejected"  # neither base nor plan known
    load_base_and_plan(store, BASE, LATE_PLAN)
    revoked = tmp_path / "bases.csv"
    revoked.write_text("code,name,level,status,assessed_on\n"
                       f"{BASE},测试基地,provincial,revoked,2025-06-01\n", encoding="utf-8")
    assert import_csv(store, "bases", revoked, actor="ops", keys=KEYS).ok

    dry = revalidate(store, RevalidationFilter(), actor="ops", dry_run=True)
    done = revalidate(store, RevalidationFilter(), actor="ops", reason="plan filed")

    assert (dry.matched, dry.would_pass) == (1, 0)
    assert (done.accepted, done.codes_again) == (0, {"BASE_NOT_RECOGNIZED": 1})
    assert _count(store, records) == 0 and _count(store, outbox) == 0


def test_a_plan_filed_after_31_july_still_refuses_its_results_on_revalidation(
        store: Engine, new_partner: NewPartner, tmp_path: Path) -> None:
    """R9 (六(五) 7 月底前备案): filing late does not make the rejected results count."""
    relay = _relay(new_partner, store)
    sub = _training(random.Random(38), "S-P", LATE_PLAN, "8")
    [answer] = ingest(store, relay, [sub], rules=default_rules(store))
    assert answer.status == "rejected"
    load_base_and_plan(store, BASE, PLAN)  # the base, and another plan
    starts_on, ends_on = plan_period()
    plans = tmp_path / "plans.csv"
    plans.write_text("plan_id,base_code,title,category,hours,starts_on,ends_on,filed_on\n"
                     f"{LATE_PLAN},{BASE},研修班,professional,40,{starts_on},{ends_on},"
                     "2026-08-01\n", encoding="utf-8")
    assert import_csv(store, "plans", plans, actor="ops", keys=KEYS).ok

    done = revalidate(store, RevalidationFilter(), actor="ops", reason="plan filed")

    assert (done.accepted, done.codes_again) == (0, {"PLAN_NOT_FILED": 1})
    assert _count(store, records) == 0


# -- 5. reference data: a quiet sync undoes what ops imported ---------------------------------

T1, T2 = "2026-01-01T08:00:00+08:00", "2026-02-01T08:00:00+08:00"
DIRECTORY_BASE = {"code": BASE, "name": "青海省测试继续教育基地", "level": "provincial",
                  "status": "active", "assessed_on": "2025-06-01"}


def _mock_reference(url: str, kind: str, items: list[dict[str, Any]]) -> None:
    response = httpx.post(f"{url}/_mock/reference/{kind}", json={"items": items})
    assert response.status_code == 200, response.text


def test_a_sync_with_nothing_new_upstream_does_not_undo_an_ops_import(
        db_url: str, store: Engine, make_settings: MakeSettings, mock_ce: tuple[str, Faults],
        tmp_path: Path) -> None:
    url, _ = mock_ce
    settings = make_settings(db_url, url, pull_retries=2, pull_retry_max_wait_seconds=0.01)
    _mock_reference(url, "bases", [DIRECTORY_BASE | {"updated_at": T1}])
    assert sync(store, settings).ok
    _mock_reference(url, "bases", [DIRECTORY_BASE | {"status": "revoked", "updated_at": T2}])
    assert sync(store, settings).ok
    # Ops learn the revocation was entered in error and re-list the base from a CSV file.
    fixed = tmp_path / "bases.csv"
    fixed.write_text("code,name,level,status,assessed_on\n"
                     f"{BASE},{DIRECTORY_BASE['name']},provincial,active,2025-06-01\n",
                     encoding="utf-8")
    imported = import_csv(store, "bases", fixed, actor="ops-ma", keys=KEYS)
    assert imported.ok and imported.updated == 1

    quiet = sync(store, settings)  # nothing changed upstream since the last sync

    assert quiet.ok
    assert quiet.version is None, quiet.as_dict()
    with store.connect() as conn:
        status = conn.execute(select(reference_bases.c.status).where(
            reference_bases.c.code == BASE)).scalar_one()
    assert status == "active"


# -- 6. identity numbers in the rejections ops browse before revalidating ----------------------

HEALTH_ROW = {"记录编号": "WJ-S", "姓名": "赵伟", "工作单位": "", "地区代码": "630100",
              "项目编号": "CME-1", "项目名称": "高原医学新进展", "学分类别": "Ⅰ类", "学分": "5",
              "开始日期": "", "完成日期": "2025-11-20", "证书编号": ""}


@pytest.mark.parametrize("written", [
    "630102 1987 0413 9126", "６３０１０２ １９８７０４１３ ９１２６",
    # the session-21 diff review's cases: the adapters fold any white space, the JSON text
    # the list once masked wrote a tab or line break as an escape
    "630102\t1987\t0413\t9126", "630102     19870413 9126", "630102\n19870413 9126"],
    ids=["ascii", "full-width", "tabs", "five-spaces", "line-break"])
def test_the_rejection_list_masks_an_identity_number_written_with_spaces(
        store: Engine, new_partner: NewPartner, written: str) -> None:
    partner = new_partner(store, adapter="health")
    [row] = get_adapter("health").parse((2, HEALTH_ROW | {"身份证号": written}))
    assert row.submission is not None and not row.errors  # the adapter reads it
    assert row.submission.person.id_number == "630102198704139126"
    in_2026 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)  # 2025 closed: refused YEAR_CLOSED
    [answer] = ingest_items(store, PartnerRef(partner.partner_id, "health"), [Item(
        raw=row.raw, submission=row.submission, errors=row.errors)], now=in_2026)
    assert answer.status == "rejected"

    with store.connect() as conn:
        listing = list_rejections(conn)
    assert listing["total"] == 1
    for text in _strings(listing):
        assert "630102198704139126" not in re.sub(r"\s", "", unicodedata.normalize("NFKC", text))
    shown = unicodedata.normalize("NFKC", json.dumps(listing, ensure_ascii=False))
    assert "19870413" not in re.sub(r"\s|\\[tn]", "", shown)


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [str(value)]
