"""What the management system's 200 may leave out or garble (review 35, session 30).

A scripted management system (a real HTTP server on 127.0.0.1) answers each batch as a test
says.  SPEC §5: a receipt is ``{"record_id", "version", "status": accepted | duplicate |
rejected}``; SPEC §7: retries scheduled in the store, dead-lettered with a reason after the
configured attempts, never dropped, versions of one record in order.

Found: a record the 200 gave no receipt for was put straight into the next batch, attempts
unchanged — sent again every poll, for ever, never dead-lettered; a receipt of another status
("pending") counted as delivered, and version 2 went out before version 1 was applied; a receipt
whose version was not a number crashed every cycle, so nothing was counted or audited.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.accounts import Partner
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.tables import audit_events, outbox
from mock_partners import generators as gen
from tests.support.servers import uvicorn_thread

T0 = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)
Script = Callable[[list[dict[str, Any]]], Any]  # the batch's records → the JSON answered


class Scripted:
    """A management system answering 200 with whatever ``script`` makes of each batch."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.script: Script = lambda recs: {"receipts": [_receipt(r) for r in recs]}

        async def batch(request: Request) -> Response:
            recs = orjson.loads(await request.body())["records"]
            self.calls.append([(r["record_id"], r["version"]) for r in recs])
            return Response(orjson.dumps(self.script(recs)), media_type="application/json")

        self.app = Starlette(routes=[Route("/api/v1/ce-records/batch", batch, methods=["POST"])])


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _receipt(rec: dict[str, Any], status: str = "accepted") -> dict[str, Any]:
    return {"record_id": rec["record_id"], "version": rec["version"], "status": status,
            "receipt_no": f"N-{rec['record_id']}-{rec['version']}"}


@pytest.fixture
def scripted() -> Iterator[tuple[str, Scripted]]:
    ce = Scripted()
    with uvicorn_thread(ce.app) as url:
        yield url, ce


@pytest.fixture
def worker(db_url: str, engine: Engine, scripted: tuple[str, Scripted],
           make_settings: Callable[..., Settings]) -> Iterator[tuple[DeliveryWorker, Clock]]:
    clock = Clock()
    made = DeliveryWorker(engine, make_settings(db_url, scripted[0], delivery_max_attempts=3,
                                                retry_schedule=(10, 20, 30)), clock=clock)
    yield made, clock
    made.close()


def _put(engine: Engine, partner: Partner, subs: list[dict[str, Any]]) -> list[str]:
    answers = ingest(engine, PartnerRef(partner.partner_id, "canonical"), subs)
    assert all(a.status.value in ("accepted", "corrected") for a in answers), answers
    return [str(a.record_id) for a in answers]


def _rows(engine: Engine) -> dict[tuple[str, int], dict[str, Any]]:
    with engine.connect() as conn:
        return {(r["record_id"], r["version"]): dict(r)
                for r in conn.execute(select(outbox)).mappings()}


def _kinds(engine: Engine, record_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(audit_events.c.kind).where(
            audit_events.c.record_id == record_id).order_by(audit_events.c.seq)).scalars())


def _cycles(worker: DeliveryWorker, clock: Clock, seconds: list[float]) -> None:
    """One ``run_once`` now, and one after each of ``seconds`` more; none may raise."""
    worker.run_once()
    for step in seconds:
        clock.now += timedelta(seconds=step)
        worker.run_once()


def test_a_record_the_reply_gives_no_receipt_is_retried_on_the_schedule_then_dead_lettered(
        engine: Engine, new_partner: Callable[..., Partner], scripted: tuple[str, Scripted],
        worker: tuple[DeliveryWorker, Clock]) -> None:
    _, ce = scripted
    work, clock = worker
    rng = random.Random(35)
    silent, answered = _put(engine, new_partner(engine),
                            [gen.canonical_submission(rng, f"S-{i}") for i in range(2)])
    ce.script = lambda recs: {"receipts": [_receipt(r) for r in recs if r["record_id"] != silent]}
    work.run_once()
    work.run_once()  # at the same moment: nothing is due, nothing is sent again
    assert len(ce.calls) == 1
    rows = _rows(engine)
    assert rows[(answered, 1)]["status"] == "delivered"
    assert (rows[(silent, 1)]["status"], rows[(silent, 1)]["attempts"]) == ("pending", 1)
    _cycles(work, clock, [9, 1])  # due 10 s after the first attempt (retry_schedule[0])
    assert ce.calls[1:] == [[(silent, 1)]]
    _cycles(work, clock, [20, 30, 60])  # the third attempt is the last (DELIVERY_MAX_ATTEMPTS=3)
    assert ce.calls[1:] == [[(silent, 1)]] * 2
    dead = _rows(engine)[(silent, 1)]
    assert (dead["status"], dead["error_code"], dead["attempts"]) == ("dead", "RETRIES_EXHAUSTED", 3)
    assert "no receipt" in dead["last_error"]
    assert _kinds(engine, silent)[-1] == "dead"
    assert _kinds(engine, silent).count("retry_scheduled") == 2


def test_a_receipt_of_another_status_is_no_delivery_and_the_next_version_waits(
        engine: Engine, new_partner: Callable[..., Partner], scripted: tuple[str, Scripted],
        worker: tuple[DeliveryWorker, Clock]) -> None:
    _, ce = scripted
    work, clock = worker
    partner = new_partner(engine)
    first = gen.canonical_submission(random.Random(36), "V-1", hours="8")
    [record_id] = _put(engine, partner, [first])
    ce.script = lambda recs: {"receipts": [_receipt(r, "pending" if r["version"] == 1 else "accepted")
                                           for r in recs]}
    work.run_once()
    again = {**first, "claimed": {**first["claimed"], "quantity": "16"}}
    assert _put(engine, partner, [again]) == [record_id]  # version 2, queued behind version 1
    _cycles(work, clock, [10, 20, 30, 60])
    sent = [version for call in ce.calls for _, version in call]
    assert sent == [1, 1, 1, 2], sent  # version 2 only once version 1 was given up on
    rows = _rows(engine)
    assert (rows[(record_id, 1)]["status"], rows[(record_id, 1)]["error_code"]) == (
        "dead", "RETRIES_EXHAUSTED")
    assert rows[(record_id, 2)]["status"] == "delivered"


@pytest.mark.parametrize("garble", [
    lambda recs: {"receipts": [{**_receipt(r), "version": "v1"} for r in recs]},
    lambda recs: {"receipts": [{**_receipt(r), "version": None} for r in recs]},
    lambda recs: {"receipts": ["accepted" for _ in recs]},
    lambda recs: {"receipts": "oops"},
    lambda recs: {"receipts": [{**_receipt(r), "version": "\u00b2"} for r in recs]},
    lambda recs: {"receipts": [{**_receipt(r), "version": "1" * 5000} for r in recs]},
], ids=["version-text", "version-null", "bare-string", "not-a-list", "superscript-two",
        "5000-digits"])
def test_a_garbled_receipt_is_a_failed_attempt_not_a_crash(
        engine: Engine, new_partner: Callable[..., Partner], scripted: tuple[str, Scripted],
        worker: tuple[DeliveryWorker, Clock], garble: Script) -> None:
    _, ce = scripted
    work, clock = worker
    [record_id] = _put(engine, new_partner(engine), [gen.canonical_submission(random.Random(37), "G-1")])
    ce.script = garble
    _cycles(work, clock, [10, 20, 30, 60])
    row = _rows(engine)[(record_id, 1)]
    assert (row["status"], row["error_code"], row["attempts"]) == ("dead", "RETRIES_EXHAUSTED", 3)
    assert "attempt" in _kinds(engine, record_id)
