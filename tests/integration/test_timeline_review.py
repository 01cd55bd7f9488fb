"""Review: what an ops engineer sees of one record's life (SPEC §2 Ops team, §5 ops side).

Real records go through ingest, the real delivery worker (an injected clock, no sleeps) and
the mock management system with its faults; what ops then read is ``record_view`` (``GET
/v1/records/{id}``) and ``list_deliveries`` (``GET /v1/deliveries``), checked against what the
mock says it applied (``/_mock/applied``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import Engine

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.delivery.worker import DeliveryWorker
from gateway.ops.deliveries import DeliveryFilter, list_deliveries, reprocess
from gateway.ops.records import record_view
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.integration import test_delivery_worker as delivery_tests
from tests.integration.test_delivery_worker import Clock, MakeWorker
from tests.support.servers import uvicorn_thread

# The delivery tests' fixture: workers with a hand-moved clock each, closed afterwards.
make_worker = delivery_tests.make_worker


def _sub(source_id: str, seed: int = 7, **changes: Any) -> dict[str, Any]:
    sub = gen.canonical_submission(random.Random(seed), source_id)
    for key, value in changes.items():
        sub["activity"][key] = value
    return sub


def _put(engine: Engine, partner: Partner, subs: list[dict[str, Any]]) -> list[str]:
    answers = ingest(engine, PartnerRef(partner.partner_id, "canonical"), subs)
    assert all(a.status in ("accepted", "corrected") for a in answers), [a.errors for a in answers]
    return [str(a.record_id) for a in answers]


def _view(engine: Engine, record_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        view = record_view(conn, record_id)
    assert view is not None
    return view


def _list(engine: Engine, **flt: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return list(list_deliveries(conn, DeliveryFilter(**flt), limit=500)["items"])


def _drain(worker: DeliveryWorker, clock: Clock | None = None, step: float = 10) -> None:
    for _ in range(40):
        sent = worker.run_once()
        if clock is not None:
            clock.advance(step)
        if not sent and (clock is None or not worker.run_once()):
            return


def _applied(url: str) -> dict[tuple[str, int], str]:
    body = httpx.get(f"{url}/_mock/applied").json()
    return {(a["record_id"], a["version"]): a["receipt_no"] for a in body["applied"]}


def _lost_reply_then_409(worker: DeliveryWorker, faults: Faults, clock: Clock) -> None:
    """The batch is applied but its reply is lost; the retry (same key) is answered 409."""
    faults.lost_reply_rate = 1.0
    assert worker.run_once() > 0
    faults.lost_reply_rate = 0.0
    faults.replay_conflict = True  # SPEC §5: "409 on the batch = already applied"
    clock.advance(6)
    assert worker.run_once() > 0


# -- what is right today ----------------------------------------------------------------------


def test_three_versions_show_each_delivery_and_receipt_and_reprocess_does_not_resend_v2(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner, clock = new_partner(engine), Clock()
    worker = make_worker(clock=clock, inline_retries=1, retry_schedule=(5, 5, 5))
    [rid] = _put(engine, partner, [_sub("C-1", seed=3)])
    worker.run_once()
    _put(engine, partner, [_sub("C-1", seed=3, title="[REJECT] 第二版")])
    worker.run_once()
    _put(engine, partner, [_sub("C-1", seed=3, title="第三版 高原医学")])
    worker.run_once()

    view = _view(engine, rid)
    applied = _applied(url)
    rows = {d["version"]: d for d in view["deliveries"]}
    assert [(v, rows[v]["status"]) for v in (1, 2, 3)] == [
        (1, "delivered"), (2, "dead"), (3, "delivered")]
    assert rows[1]["receipt_no"] == applied[(rid, 1)]
    assert rows[3]["receipt_no"] == applied[(rid, 3)]
    assert rows[1]["receipt_no"] != rows[3]["receipt_no"]
    assert rows[2]["error_code"] == "DOWNSTREAM_REJECTED" and rows[2]["receipt_no"] is None
    assert view["status"] == "delivered" and view["current_version"] == 3
    # The timeline: in order, each version's steps, the receipt or the dead reason.
    seqs = [e["seq"] for e in view["timeline"]]
    assert seqs == sorted(seqs)
    steps = [(e["kind"], e["version"]) for e in view["timeline"]
             if e["kind"] in ("received", "corrected", "queued", "attempt", "delivered", "dead")]
    assert steps == [("received", 1), ("queued", 1), ("attempt", 1), ("delivered", 1),
                     ("corrected", 2), ("queued", 2), ("attempt", 2), ("dead", 2),
                     ("corrected", 3), ("queued", 3), ("attempt", 3), ("delivered", 3)]
    by_kind = {(e["kind"], e["version"]): e["detail"] for e in view["timeline"]}
    assert by_kind[("delivered", 3)]["receipt_no"] == applied[(rid, 3)]
    assert by_kind[("dead", 2)]["code"] == "DOWNSTREAM_REJECTED" and by_kind[("dead", 2)]["reason"]

    # Reprocessing the record: v2 is not sent over the delivered v3.
    result = reprocess(engine, DeliveryFilter(record_ids=(rid,)), dry_run=False,
                       reason="partner asked", actor="ops")
    assert (result.matched, result.requeued, result.superseded) == (1, 0, 1)
    worker.run_once()
    assert _applied(url) == applied
    assert _view(engine, rid)["status"] == "delivered"


def test_failed_delivery_filters_return_exactly_their_rows(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    _, faults = mock_ce
    partner, clock = new_partner(engine), Clock()
    worker = make_worker(clock=clock, inline_retries=1, retry_schedule=(5, 5))
    [tired] = _put(engine, partner, [_sub("D-1", seed=4)])
    faults.rate_limit_every, faults.retry_after = 1, "3"
    for _ in range(4):
        worker.run_once()
        clock.advance(6)
    faults.rate_limit_every = 0
    died_tired = clock.now
    clock.advance(60)
    [refused, fine] = _put(engine, partner, [_sub("D-2", seed=5, title="[REJECT] y"),
                                             _sub("D-3", seed=6)])
    worker.run_once()

    def ids(**flt: Any) -> set[str]:
        return {d["record_id"] for d in _list(engine, **flt)}

    assert ids(error_code="RETRIES_EXHAUSTED") == {tired}
    assert ids(error_code="DOWNSTREAM_REJECTED") == {refused}
    assert ids(status="dead") == {tired, refused}
    assert ids(status="delivered") == {fine}
    assert ids(status="dead", until=died_tired + timedelta(seconds=30)) == {tired}
    assert ids(status="dead", since=died_tired + timedelta(seconds=30)) == {refused}
    [row] = _list(engine, error_code="RETRIES_EXHAUSTED")
    assert row["attempts"] == 3 and "429" in row["last_error"]
    assert _view(engine, tired)["status"] == "dead"


# -- findings ---------------------------------------------------------------------------------


def test_a_rejection_answered_again_by_409_is_not_shown_delivered(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    clock = Clock()
    worker = make_worker(clock=clock, inline_retries=1, retry_schedule=(5, 5, 5))
    good, bad = _put(engine, new_partner(engine), [_sub("B-1", seed=1),
                                                   _sub("B-2", seed=2, title="[REJECT] 讲座")])
    _lost_reply_then_409(worker, faults, clock)
    assert (bad, 1) not in _applied(url)  # the management system never applied it
    assert _view(engine, good)["status"] == "delivered"
    view = _view(engine, bad)
    [row] = view["deliveries"]
    assert (view["status"], row["status"], row["error_code"]) == (
        "dead", "dead", "DOWNSTREAM_REJECTED")
    assert {d["record_id"] for d in _list(engine, error_code="DOWNSTREAM_REJECTED")} == {bad}


def test_lost_reply_then_409_shows_one_delivery_with_its_receipt(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    clock = Clock()
    worker = make_worker(clock=clock, inline_retries=1, retry_schedule=(5, 5, 5))
    [rid] = _put(engine, new_partner(engine), [_sub("A-1")])
    _lost_reply_then_409(worker, faults, clock)
    view = _view(engine, rid)
    [row] = view["deliveries"]  # one delivery, not two (right today)
    assert view["status"] == row["status"] == "delivered"
    receipt = _applied(url)[(rid, 1)]
    assert row["receipt_no"] == receipt
    [done] = [e for e in view["timeline"] if e["kind"] == "delivered"]
    assert done["detail"]["receipt_no"] == receipt


def test_record_view_masks_the_identity_number(
        db_url: str, engine: Engine, make_settings: Callable[..., Any],
        new_partner: Callable[..., Partner], new_operator: Callable[..., str]) -> None:
    sub = _sub("M-1", seed=8)
    id_number = sub["person"]["id_number"]
    [rid] = _put(engine, new_partner(engine), [sub])
    viewer = {"Authorization": f"Bearer {new_operator(engine, role='viewer')}"}
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        answer = httpx.get(f"{url}/v1/records/{rid}", headers=viewer, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["timeline"], answer.text
    assert id_number not in answer.text
