"""Ops API (issue 5): dead deliveries listed, reprocessed and edited; conflicts; rejections.

Dead letters are made the real way — a delivery worker (driven with ``run_once`` and a hand
clock) against the mock management system with its faults — and everything after goes
through the HTTP API of a real gateway on SQLite and PostgreSQL.  What the management system
applied is read back from the mock: a reprocess never applies a record version twice.
"""

from __future__ import annotations

import copy
import random
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, select

from gateway.accounts import Partner, add_operator
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.ops import deliveries
from gateway.ops.deliveries import DeliveryFilter
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.db import make_engine
from gateway.store.tables import audit_events, natural_keys, outbox, records, rejections
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission, corrupt_check_digit, make_person
from tests.support.servers import uvicorn_thread

MakeSettings = Callable[..., Settings]
T0 = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def worker_for(db_url: str, mock_ce: tuple[str, Faults],
               make_settings: MakeSettings) -> Iterator[Callable[[Clock], DeliveryWorker]]:
    made: list[DeliveryWorker] = []

    def build(clock: Clock) -> DeliveryWorker:
        # One try per cycle and two attempts in all: dead letters in two cycles.
        worker = DeliveryWorker(make_engine(db_url), make_settings(
            db_url, mock_ce[0], inline_retries=1, retry_schedule=(1,), delivery_max_attempts=2),
            clock=clock)
        made.append(worker)
        return worker

    yield build
    for worker in made:
        worker.close()
        worker.engine.dispose()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _coded(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code and error["message"] and error["message_zh"], error
    # SPEC §6: the Chinese message is Chinese, not pydantic's English copied into it.
    assert not re.search(r"Input should|should have|valid |unable to", error["message_zh"]), error
    return error


def _drain(worker: DeliveryWorker) -> None:
    for _ in range(20):
        if worker.run_once() == 0:
            return
    raise AssertionError("worker still busy")


def _events(engine: Engine, kind: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(audit_events).where(audit_events.c.kind == kind)
                            .order_by(audit_events.c.seq)).mappings().all()
    return [{**r, "detail": orjson.loads(r["detail"])} for r in rows]


def _outbox(engine: Engine) -> dict[tuple[str, int], dict[str, Any]]:
    with engine.connect() as conn:
        return {(r["record_id"], r["version"]): dict(r)
                for r in conn.execute(select(outbox)).mappings()}


def test_dead_deliveries_are_listed_reprocessed_and_edited_without_a_second_apply(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: Callable[..., Partner],
    new_operator: Callable[..., str], mock_ce: tuple[str, Faults],
    worker_for: Callable[[Clock], DeliveryWorker],
) -> None:
    mock_url, faults = mock_ce
    partner = new_partner(store)
    ref = PartnerRef(partner.partner_id, "canonical")
    rng = random.Random(5)
    subs = [canonical_submission(rng, f"D-{i}") for i in range(4)]
    subs[2]["activity"]["title"] = "[REJECT] 高原医学专题讲座"
    clock = Clock()
    worker = worker_for(clock)

    # r0, r1: applied downstream but the reply was lost, then an outage: dead, although applied.
    r0, r1 = (a.record_id for a in ingest(store, ref, subs[:2]))
    faults.lost_reply_rate = 1.0
    assert worker.run_once() == 2
    faults.lost_reply_rate = 0.0
    faults.start_outage()
    clock.advance(1)
    assert worker.run_once() == 2
    faults.stop_outage()
    # r2 refused by the management system (dead, DOWNSTREAM_REJECTED); r3 delivered.
    r2, r3 = (a.record_id for a in ingest(store, ref, subs[2:]))
    assert worker.run_once() == 2
    first = _outbox(store)
    assert first[(r0, 1)]["status"] == first[(r1, 1)]["status"] == "dead"
    assert (first[(r2, 1)]["status"], first[(r3, 1)]["status"]) == ("dead", "delivered")
    assert len(httpx.get(f"{mock_url}/_mock/applied").json()["applied"]) == 3  # r0, r1, r3

    viewer = _bearer(new_operator(store, role="viewer"))
    acting, token = add_operator(store, "wang-ops", "operator")
    op = _bearer(token)
    settings = make_settings(db_url, mock_url)
    with uvicorn_thread(create_app(settings, run_worker=False)) as url:
        def get(path: str, **params: Any) -> httpx.Response:
            return httpx.get(f"{url}{path}", params=params, headers=viewer)

        # -- reading: filters and keyset paging ------------------------------------------------
        dead = get("/v1/deliveries", status="dead").json()
        assert dead["total"] == 3 and dead["next"] is None
        assert sorted(d["error_code"] for d in dead["items"]) == [
            "DOWNSTREAM_REJECTED", "RETRIES_EXHAUSTED", "RETRIES_EXHAUSTED"]
        page1 = get("/v1/deliveries", status="dead", limit=2).json()
        page2 = get("/v1/deliveries", status="dead", limit=2, cursor=page1["next"]).json()
        ids = [d["id"] for d in page1["items"] + page2["items"]]
        assert ids == sorted(ids, reverse=True) == [d["id"] for d in dead["items"]]
        assert page2["next"] is None and page2["total"] == 3
        assert get("/v1/deliveries", error_code="RETRIES_EXHAUSTED").json()["total"] == 2
        assert get("/v1/deliveries", partner_id="someone-else").json()["total"] == 0
        assert get("/v1/deliveries", adapter="canonical", status="delivered").json()["total"] == 1
        assert get("/v1/deliveries", status="dead", since="2026-03-02T09:00:00+00:00",
                   until="2026-03-03").json()["total"] == 3
        assert get("/v1/deliveries", until="2026-03-01").json()["total"] == 0
        # A bare "until" date is through that day, as the console reads it: the same set.
        assert get("/v1/deliveries", status="dead", until="2026-03-02").json()["total"] == 3
        # The last cursor is well formed but holds 2**64 - 1, past a database integer.
        for bad in ({"status": "stuck"}, {"since": "yesterday"}, {"cursor": "garbage"},
                    {"limit": 0}, {"error_code": "NOPE"}, {"adapter": "fax"},
                    {"cursor": "WyJkZWxpdmVyaWVzIiwxODQ0Njc0NDA3MzcwOTU1MTYxNV0"}):
            _coded(get("/v1/deliveries", **bad), 422, "SCHEMA")
        r2_dead = next(d for d in dead["items"] if d["record_id"] == r2)
        shown = get(f"/v1/deliveries/{r2_dead['id']}").json()
        assert shown["error_code"] == "DOWNSTREAM_REJECTED" and "[REJECT]" in shown["last_error"]
        assert "dead" in [e["kind"] for e in shown["history"]]
        _coded(get("/v1/deliveries/999999"), 404, "NOT_FOUND")
        _coded(httpx.get(f"{url}/v1/deliveries"), 401, "UNAUTHENTICATED")

        # -- a viewer may not act, anywhere ---------------------------------------------------
        actions = [("/v1/deliveries/reprocess", {"reason": "x"}),
                   ("/v1/records/revalidate", {"reason": "x"}),
                   (f"/v1/conflicts/{r0}/resolve", {"keep": "this", "reason": "x"}),
                   (f"/v1/records/{r2}/edit", {"changes": {"activity.title": "t"}, "reason": "x"}),
                   ("/v1/rejections/1/edit", {"changes": {"a": 1}, "reason": "x"})]
        for path, body in actions:
            error = _coded(httpx.post(f"{url}{path}", json=body, headers=viewer), 403, "FORBIDDEN")
            assert "操作员" in error["message_zh"]

        # -- reprocess: dry run count first, then the same count for real ---------------------
        def reprocess(**body: Any) -> httpx.Response:
            return httpx.post(f"{url}/v1/deliveries/reprocess", json=body, headers=op, timeout=30)

        _coded(reprocess(error_code="RETRIES_EXHAUSTED"), 422, "SCHEMA")  # no reason
        _coded(reprocess(error_code="RETRIES_EXHAUSTED", reason="   "), 422, "SCHEMA")
        _coded(reprocess(status="stuck", reason="x"), 422, "SCHEMA")
        assert reprocess(status="delivered", reason="no").json()["matched"] == 0
        dry = reprocess(error_code="RETRIES_EXHAUSTED", dry_run=True, reason="下游恢复").json()
        assert (dry["matched"], dry["requeued"], dry["dry_run"]) == (2, 0, True)
        assert _outbox(store)[(r0, 1)]["status"] == "dead"
        real = reprocess(error_code="RETRIES_EXHAUSTED", reason="下游恢复").json()
        assert (real["matched"], real["requeued"], real["dry_run"]) == (dry["matched"], 2, False)
        assert reprocess(error_code="RETRIES_EXHAUSTED", reason="again").json()["matched"] == 0

        # Two reprocess calls at once for r2 (by id): it is queued once.
        results: list[deliveries.ReprocessResult] = []
        race = [threading.Thread(target=lambda: results.append(deliveries.reprocess(
            store, DeliveryFilter(record_ids=(r2,)), dry_run=False, reason="race",
            actor="racer"))) for _ in range(2)]
        for t in race:
            t.start()
        for t in race:
            t.join()
        assert sum(r.requeued for r in results) == 1

        _drain(worker)
        after = _outbox(store)
        # r0, r1 were applied already: the management system answers duplicate, applies nothing.
        assert {after[(r, 1)]["receipt_status"] for r in (r0, r1)} == {"duplicate"}
        assert {after[(r, 1)]["status"] for r in (r0, r1)} == {"delivered"}
        assert after[(r0, 1)]["batch_key"] != first[(r0, 1)]["batch_key"]
        assert after[(r2, 1)]["status"] == "dead"  # refused again: the title needs fixing

        # -- reprocess with edit ---------------------------------------------------------------
        def edit(record_id: str, changes: dict[str, Any], **more: Any) -> httpx.Response:
            return httpx.post(f"{url}/v1/records/{record_id}/edit", headers=op, timeout=30,
                              json={"changes": changes, "reason": "标题含测试标记", **more})

        bad_id = corrupt_check_digit(subs[2]["person"]["id_number"])
        refused = _coded(edit(r2, {"person.id_number": bad_id}), 422, "ID_NUMBER_INVALID")
        assert bad_id not in str(refused)
        _coded(edit(r2, {"source_record_id": "D-9"}), 422, "SCHEMA")
        _coded(edit(r3, {"activity.title": "x"}), 409, "NOT_EDITABLE")  # delivered
        _coded(edit(r2, {"activity.title": "高原医学专题讲座"}, version=2), 409, "RECORD_CHANGED")
        edited = edit(r2, {"activity.title": "高原医学专题讲座"}, version=1)
        assert edited.status_code == 200, edited.text
        assert edited.json()["version"] == 2 and edited.json()["status"] == "corrected"
        assert edited.json()["diff"] == [{"field": "activity.title",
                                          "from": "[REJECT] 高原医学专题讲座", "to": "高原医学专题讲座"}]
        _drain(worker)
        r0_view = get(f"/v1/records/{r0}").json()
        r2_view = get(f"/v1/records/{r2}").json()

    final = _outbox(store)
    assert final[(r2, 1)]["status"] == "superseded" and final[(r2, 2)]["status"] == "delivered"
    with store.connect() as conn:
        assert deliveries.status_counts(conn) == {"pending": 0, "delivered": 4, "dead": 0,
                                                  "superseded": 1}
    snap = httpx.get(f"{mock_url}/_mock/applied").json()
    assert snap["double_applied"] == [] and snap["out_of_order"] == []
    assert sorted((a["record_id"], a["version"]) for a in snap["applied"]) == sorted(
        [(r0, 1), (r1, 1), (r3, 1), (r2, 2)])

    # The audit trail: who, why, which filter; the requeued rows name the batch they died in.
    [run] = [e for e in _events(store, "ops_reprocess") if e["detail"]["reason"] == "下游恢复"]
    assert run["actor"] == "wang-ops"  # the dry run changed nothing and left no event
    assert run["detail"]["filter"] == {"error_code": "RETRIES_EXHAUSTED"}
    assert (run["detail"]["matched"], run["detail"]["requeued"]) == (2, 2)
    requeued = {e["record_id"]: e for e in _events(store, "delivery_requeued")}
    assert requeued[r0]["actor"] == acting.name
    assert requeued[r0]["detail"]["previous_batch"] == first[(r0, 1)]["batch_key"]
    assert requeued[r0]["detail"]["reprocess"] == run["detail"]["reprocess"]
    assert [e["actor"] for e in _events(store, "delivery_requeued") if e["record_id"] == r2] == ["racer"]
    [edit_event] = _events(store, "edited")
    assert (edit_event["record_id"], edit_event["version"], edit_event["actor"]) == (r2, 2, "wang-ops")
    assert edit_event["detail"]["diff"][0]["field"] == "activity.title"
    kinds = [e["kind"] for e in r0_view["timeline"]]
    assert kinds.index("dead") < kinds.index("delivery_requeued") < len(kinds) - 1
    assert kinds[-1] == "delivered" and r0_view["status"] == "delivered"
    assert r2_view["status"] == "delivered" and r2_view["record"]["version"] == 2
    assert [d["status"] for d in r2_view["deliveries"]] == ["superseded", "delivered"]


def test_conflicts_are_resolved_by_choosing_a_version_and_rejections_are_edited(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: Callable[..., Partner],
    new_operator: Callable[..., str], mock_ce: tuple[str, Faults],
    worker_for: Callable[[Clock], DeliveryWorker],
) -> None:
    mock_url, _ = mock_ce
    p1, p2 = new_partner(store), new_partner(store)
    ref1, ref2 = PartnerRef(p1.partner_id, "canonical"), PartnerRef(p2.partner_id, "canonical")
    rng = random.Random(9)
    person = make_person(rng)
    first = [canonical_submission(rng, f"A-{i}", person=person, hours="16",
                                  title=f"临床医学新进展 {i}") for i in range(2)]
    second = []  # the same activities reported by another partner, with other hours
    for sub in first:
        other = copy.deepcopy(sub)
        other["source_record_id"] = "B" + sub["source_record_id"][1:]
        other["claimed"]["quantity"] = "24"
        second.append(other)
    a0, a1 = (a.record_id for a in ingest(store, ref1, first))
    answers = ingest(store, ref2, second)
    assert [a.status for a in answers] == ["conflict", "conflict"]
    b0, b1 = (a.record_id for a in answers)
    viewer = _bearer(new_operator(store, role="viewer"))
    op = _bearer(new_operator(store))
    bad = canonical_submission(rng, "A-bad", person=person)
    bad["person"]["id_number"] = corrupt_check_digit(person.id_number)
    [rejected] = ingest(store, ref1, [bad])
    assert rejected.status == "rejected"

    with uvicorn_thread(create_app(make_settings(db_url, mock_url), run_worker=False)) as url:
        def resolve(record_id: str, keep: str, **more: Any) -> httpx.Response:
            return httpx.post(f"{url}/v1/conflicts/{record_id}/resolve", headers=op, timeout=30,
                              json={"keep": keep, "reason": "经核实以卫健委数据为准", **more})

        listed = httpx.get(f"{url}/v1/conflicts", headers=viewer).json()
        assert listed["total"] == 2
        assert {(c["record_id"], c["conflicts_with"], c["hours"], c["other_hours"])
                for c in listed["items"]} == {(b0, a0, "24.0", "16.0"), (b1, a1, "24.0", "16.0")}
        one = httpx.get(f"{url}/v1/conflicts", params={"limit": 1}, headers=viewer).json()
        more = httpx.get(f"{url}/v1/conflicts", params={"limit": 1, "cursor": one["next"]},
                         headers=viewer).json()
        assert [c["record_id"] for c in one["items"] + more["items"]] == [b0, b1]

        _coded(resolve(b1, "both"), 422, "SCHEMA")
        _coded(resolve("R-nope", "this"), 404, "NOT_FOUND")
        _coded(resolve(a0, "this"), 409, "NOT_A_CONFLICT")  # the first claimant is no conflict
        # A decision on another version than the current one changes nothing (409).
        _coded(resolve(b1, "existing", version=2), 409, "RECORD_CHANGED")
        kept = resolve(b1, "existing", version=1)
        assert kept.status_code == 200, kept.text
        assert (kept.json()["status"], kept.json()["forwarded"]) == ("duplicate", False)
        _coded(resolve(b1, "existing"), 409, "NOT_A_CONFLICT")  # resolved once
        took = resolve(b0, "this")
        assert took.status_code == 200, took.text
        assert (took.json()["status"], took.json()["superseded"]) == ("accepted", a0)
        assert httpx.get(f"{url}/v1/conflicts", headers=viewer).json()["total"] == 0

        # -- a rejection, corrected by an operator --------------------------------------------
        found = httpx.get(f"{url}/v1/rejections", headers=viewer,
                          params={"error_code": "ID_NUMBER_INVALID"})
        assert found.json()["total"] == 1, found.text
        assert bad["person"]["id_number"] not in found.text  # masked
        rej_id = found.json()["items"][0]["id"]
        other_batch = httpx.get(f"{url}/v1/rejections", headers=viewer,
                                params={"error_code": "ID_NUMBER_INVALID", "batch_id": "B-NONE"})
        assert other_batch.json()["total"] == 0, other_batch.text  # came in no batch

        def fix(id_number: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/rejections/{rej_id}/edit", headers=op, timeout=30,
                              json={"changes": {"person.id_number": id_number},
                                    "reason": "身份证号录入错误"})

        _coded(fix(corrupt_check_digit(bad["person"]["id_number"])), 422, "ID_NUMBER_INVALID")
        # Found by schemathesis: an integer beyond 64 bits parsed, then failed to store (500)
        huge = _coded(httpx.post(f"{url}/v1/rejections/{rej_id}/edit", headers=op, timeout=30,
                                 json={"changes": {"x": [1, -2**70]}, "reason": "x"}),
                      422, "SCHEMA")
        assert huge["field"] == "changes.x"
        fixed = fix(person.id_number)
        assert fixed.status_code == 200, fixed.text
        assert fixed.json()["status"] == "accepted" and fixed.json()["version"] == 1
        assert person.id_number not in fixed.text  # the diff is masked
        _coded(fix(person.id_number), 409, "NOT_EDITABLE")
        _coded(httpx.post(f"{url}/v1/rejections/99999/edit", headers=op,
                          json={"changes": {"a": 1}, "reason": "x"}), 404, "NOT_FOUND")
        _coded(httpx.get(f"{url}/v1/rejections", params={"since": "2026-13-01"},
                         headers=viewer), 422, "SCHEMA")

    with store.connect() as conn:
        rows = {r["record_id"]: r for r in conn.execute(select(records)).mappings()}
        holder = conn.execute(select(natural_keys.c.record_id).where(
            natural_keys.c.natural_key == rows[b0]["natural_key"])).scalar_one()
        rejection_status = conn.execute(select(rejections.c.status).where(
            rejections.c.id == rej_id)).scalar_one()
    assert rejection_status == "revalidated"
    # keep=existing: b1 is a duplicate of a1 and is never forwarded.
    assert (rows[b1]["status"], rows[b1]["duplicate_of"]) == ("duplicate", a1)
    # keep=this: b0 forwarded and holds the activity; a0 withdrawn (a new version, forwarded).
    assert holder == b0 and rows[b0]["status"] == "accepted"
    assert rows[a0]["withdrawn"] and rows[a0]["current_version"] == 2
    assert rows[a0]["duplicate_of"] == b0
    queued = _outbox(store)
    assert (b1, 1) not in queued and (b0, 1) in queued and (a0, 2) in queued
    # The person is credited once per activity: b0's 24 h, a1's 16 h, the fixed record's hours.
    credited = {rid: r["credited_hours"] for rid, r in rows.items()
                if r["status"] == "accepted" and not r["withdrawn"]}
    assert set(credited) == {b0, a1, fixed.json()["record_id"]} and credited[b0] == "24.0"

    # The first claimant's partner resends it unchanged: held again, never credited twice.
    [resent] = ingest(store, ref1, first[:1])
    assert resent.status == "conflict"

    _drain(worker_for(Clock()))
    snap = httpx.get(f"{mock_url}/_mock/applied").json()
    assert snap["double_applied"] == [] and snap["out_of_order"] == []
    withdrawn = {(a["record_id"], a["version"]): a["withdrawn"] for a in snap["applied"]}
    assert withdrawn[(a0, 2)] is True and withdrawn[(b0, 1)] is False
    assert (b1, 1) not in withdrawn

    resolved = _events(store, "conflict_resolved")
    assert {(e["record_id"], e["detail"]["keep"]) for e in resolved} >= {(b0, "this"), (b1, "existing")}
    assert all(e["detail"]["reason"] == "经核实以卫健委数据为准" for e in resolved)
    [superseded] = _events(store, "superseded")
    assert (superseded["record_id"], superseded["detail"]["by"]) == (a0, b0)
    [edited] = _events(store, "rejection_edited")
    assert edited["detail"]["rejection_id"] == rej_id
    assert person.id_number not in str(edited["detail"]) and edited["detail"]["diff"]


def test_a_dead_version_already_replaced_by_a_correction_is_superseded_not_resent(
    store: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    worker_for: Callable[[Clock], DeliveryWorker],
) -> None:
    mock_url, _ = mock_ce
    ref = PartnerRef(new_partner(store).partner_id, "canonical")
    sub = canonical_submission(random.Random(7), "S-1", title="[REJECT] 会计准则专题")
    [v1] = ingest(store, ref, [sub])
    worker = worker_for(Clock())
    _drain(worker)  # v1 refused downstream: dead
    [v2] = ingest(store, ref, [{**sub, "activity": {**sub["activity"], "title": "会计准则专题"}}])
    assert (v2.status, v2.version) == ("corrected", 2)

    result = deliveries.reprocess(store, DeliveryFilter(status="dead"), dry_run=False,
                                  reason="年底清理", actor="li")
    assert (result.matched, result.requeued, result.superseded) == (1, 0, 1)
    _drain(worker)
    rows = _outbox(store)
    assert (rows[(v1.record_id, 1)]["status"], rows[(v1.record_id, 2)]["status"]) == (
        "superseded", "delivered")
    snap = httpx.get(f"{mock_url}/_mock/applied").json()
    assert [(a["record_id"], a["version"]) for a in snap["applied"]] == [(v1.record_id, 2)]
    assert snap["out_of_order"] == []
    [event] = _events(store, "delivery_superseded")
    assert (event["record_id"], event["version"], event["actor"]) == (v1.record_id, 1, "li")


@pytest.mark.parametrize(("field", "value"), [
    ("since", "0001-01-01"),  # before year 1 once in UTC (Asia/Shanghai is +08:00)
    ("until", "9999-12-31T23:00-05:00"),  # after year 9999 once in UTC
    ("until", "1999-12-31"),
])
def test_times_outside_the_years_2000_to_2999_are_a_coded_422_not_a_500(
    db_url: str, store: Engine, make_settings: MakeSettings, new_operator: Callable[..., str],
    field: str, value: str,
) -> None:
    headers = _bearer(new_operator(store))
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        answers = [httpx.get(f"{url}/v1/deliveries", params={field: value}, headers=headers),
                   httpx.get(f"{url}/v1/rejections", params={field: value}, headers=headers),
                   httpx.post(f"{url}/v1/deliveries/reprocess", headers=headers, timeout=30,
                              json={field: value, "dry_run": True, "reason": "x"})]
        for resp in answers:
            assert _coded(resp, 422, "SCHEMA")["field"] == field
            assert "2000-2999" in resp.json()["error"]["message"]
        aware = value if "T" in value else value + "T00:00+08:00"  # its body takes aware times
        again = httpx.post(f"{url}/v1/records/revalidate", headers=headers, timeout=30,
                           json={field: aware, "dry_run": True})
        assert _coded(again, 422, "SCHEMA")["field"] == field  # the field refused, as the CLI names it
        assert "2000-2999" in again.json()["error"]["message"]
        edges = httpx.get(f"{url}/v1/deliveries", headers=headers,
                          params={"since": "2000-01-01", "until": "2999-12-31T23:59+00:00"})
        assert edges.status_code == 200 and edges.json()["total"] == 0


def test_a_conflict_its_partner_withdrew_is_closed_not_resolved_against_the_holder(
        db_url: str, store: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], new_operator: Callable[..., str]) -> None:
    """B's report conflicts with A's record; B's partner withdraws it; ops then keep "this".

    Before (review 33): B stayed listed as an open conflict, and keeping it withdrew A — the
    activity's only live report, which A's partner never took back — and forwarded B, withdrawn,
    as a record the management system had never had: the person lost the activity's hours.
    """
    from gateway.ops.overview import overview
    from gateway.pipeline.withdraw import withdraw

    ref1 = PartnerRef(new_partner(store).partner_id, "canonical")
    ref2 = PartnerRef(new_partner(store).partner_id, "canonical")
    first = canonical_submission(random.Random(34), "A-0", hours="16")
    second = copy.deepcopy(first)
    second["source_record_id"], second["claimed"]["quantity"] = "B-0", "24"
    [holder] = ingest(store, ref1, [first])
    [held] = ingest(store, ref2, [second])
    assert (holder.status.value, held.status.value) == ("accepted", "conflict")
    withdrawn = withdraw(store, ref2, "B-0")
    assert withdrawn is not None and withdrawn.record_id == held.record_id
    viewer, op = _bearer(new_operator(store, role="viewer")), _bearer(new_operator(store))
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        assert httpx.get(f"{url}/v1/conflicts", headers=viewer).json()["total"] == 0
        for keep in ("this", "existing"):
            error = _coded(httpx.post(f"{url}/v1/conflicts/{held.record_id}/resolve", headers=op,
                                      json={"keep": keep, "reason": "以卫健委数据为准"}),
                           409, "NOT_A_CONFLICT")
            assert "withdrawn" in error["message"] and "撤回" in error["message_zh"]
    with store.connect() as conn:
        assert overview(conn, make_settings(db_url))["open_conflicts"] == 0  # the console's tile
        kept = conn.execute(select(records.c.withdrawn, records.c.status, records.c.current_version)
                            .where(records.c.record_id == holder.record_id)).one()
        queued = conn.execute(select(outbox.c.record_id, outbox.c.version)).all()
    assert tuple(kept) == (False, "accepted", 1)
    assert queued == [(holder.record_id, 1)]  # nothing of B's, and no withdrawal of A
