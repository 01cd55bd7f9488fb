"""End to end through real processes: SIGKILL the gateway mid-delivery; lose replies.

Proves SPEC §7: every acknowledged record version reaches the management system exactly once,
versions of one record in order, across a crash and across replies lost after the apply.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import SigningClient
from gateway.store.db import make_engine
from gateway.store.tables import outbox
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.conftest import SECRET_KEY
from tests.support.servers import GatewayProcess, poll, uvicorn_thread


def _pending(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(outbox)
                                    .where(outbox.c.status == "pending")).scalar_one())
    finally:
        engine.dispose()


def _applied(mock_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{mock_url}/_mock/applied").json())


def _assert_exactly_once_in_order(mock: dict[str, Any], acked: set[tuple[str, int]]) -> None:
    applied = [(a["record_id"], a["version"]) for a in mock["applied"]]
    assert mock["double_applied"] == []
    assert len(applied) == len(set(applied)), "a record version was applied twice"
    missing = acked - set(applied)
    assert not missing, f"{len(missing)} acknowledged versions never reached the mock"
    assert mock["out_of_order"] == []
    last: dict[str, int] = {}
    for record_id, version in applied:  # the mock's log is in apply order
        assert version > last.get(record_id, 0)
        last[record_id] = version


def test_sigkill_mid_delivery_loses_and_doubles_nothing(
        db_url: str, tmp_path: Path, mock_ce: tuple[str, Faults],
        new_partner: Callable[..., Partner]) -> None:
    mock_url, faults = mock_ce
    # Deliveries take long enough to be caught in flight, and the one worker, sending at most
    # 25 records every 0.2 s, falls behind the sender even on a loaded machine.
    faults.latency_ms = 200
    faults.lost_reply_rate = 0.1
    engine = make_engine(db_url)
    partner = new_partner(engine)
    engine.dispose()
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_DOWNSTREAM_URL": mock_url,
           "CE_GATEWAY_SECRET_KEY": SECRET_KEY, "CE_GATEWAY_DELIVERY_BATCH_SIZE": "25",
           "CE_GATEWAY_DELIVERY_LEASE_SECONDS": "2", "CE_GATEWAY_RETRY_SCHEDULE": "1",
           "CE_GATEWAY_DELIVERY_MAX_ATTEMPTS": "50", "CE_GATEWAY_DELIVERY_POLL_SECONDS": "0.05",
           "CE_GATEWAY_INLINE_RETRY_MAX_WAIT_SECONDS": "0.2"}
    log = tmp_path / "gateway.log"
    gw = GatewayProcess(env, log).start()
    rng = random.Random(42)
    subs = [gen.canonical_submission(rng, f"CR-{i:05d}") for i in range(1200)]
    acked: set[tuple[str, int]] = set()
    stop = threading.Event()

    def submit() -> None:
        with SigningClient(gw.url, partner.app_key, partner.secret) as client:
            for start in range(0, len(subs), 100):
                if stop.is_set():
                    return
                try:
                    response = client.submit(subs[start: start + 100])
                except httpx.HTTPError:
                    return  # the gateway died under us: this request was never acknowledged
                if response.status_code == 200:
                    acked.update((r["record_id"], r["version"]) for r in response.json()["results"]
                                 if r["status"] == "accepted")

    sender = threading.Thread(target=submit)
    sender.start()
    try:
        # Kill while batches are in flight: some applied downstream, a backlog still queued
        # (four batches or more, so a delivery or two between this look and the kill leaves
        # some behind).
        poll(lambda: len(_applied(mock_url)["applied"]) >= 50 and _pending(db_url) >= 100, 60,
             what="first deliveries with a backlog behind them")
        gw.kill9()
        stop.set()
        sender.join(timeout=30)
        assert acked, "nothing was acknowledged before the kill"
        before = len(_applied(mock_url)["applied"])
        assert _pending(db_url) > 0, "the kill came too late to test anything"
        faults.latency_ms = 40  # caught in flight: the backlog may now drain faster

        gw = GatewayProcess(env, log).start()
        # After the restart, correct a few acknowledged records: v2 must follow v1.
        corrected = subs[:5]
        with SigningClient(gw.url, partner.app_key, partner.secret) as client:
            for sub in corrected:
                sub["claimed"]["quantity"] = "99"
            response = client.submit(corrected)
        assert response.status_code == 200
        acked.update((r["record_id"], r["version"]) for r in response.json()["results"]
                     if r["status"] in ("corrected", "accepted"))
        poll(lambda: _pending(db_url) == 0, 120, interval=0.2, what="the backlog to drain")
    finally:
        gw.stop()
    mock = _applied(mock_url)
    assert len(mock["applied"]) > before
    _assert_exactly_once_in_order(mock, acked)
    text = log.read_text()
    assert not any(s["person"]["id_number"] in text for s in subs), "an id number reached the log"


def test_lost_replies_are_never_applied_twice(
        db_url: str, mock_ce: tuple[str, Faults], new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings]) -> None:
    mock_url, faults = mock_ce
    faults.lost_reply_rate = 1.0  # every new batch is applied, then its reply is lost
    settings = make_settings(db_url, mock_url, delivery_batch_size=10, inline_retries=3)
    engine = make_engine(db_url)
    partner = new_partner(engine)
    engine.dispose()
    rng = random.Random(7)
    subs = [gen.canonical_submission(rng, f"LR-{i:03d}") for i in range(30)]
    with uvicorn_thread(create_app(settings, run_worker=True)) as url, \
            SigningClient(url, partner.app_key, partner.secret) as client:
        results = client.submit(subs).json()["results"]
        acked = {(r["record_id"], r["version"]) for r in results if r["status"] == "accepted"}
        assert len(acked) == 30
        poll(lambda: _pending(db_url) == 0, 60, what="delivery")
    mock = _applied(mock_url)
    _assert_exactly_once_in_order(mock, acked)
    assert len(mock["applied"]) == 30
    # Every batch was sent at least twice under one key: the lost reply, then the replay.
    keys = {a["idempotency_key"] for a in mock["applied"]}
    assert len(keys) == 3
    assert mock["requests"]["by_status"].get("503", 0) >= 3
    assert mock["requests"]["by_status"].get("200", 0) >= 3
    engine = make_engine(db_url)
    with engine.connect() as conn:
        delivered = conn.execute(select(func.count()).select_from(outbox)
                                 .where(outbox.c.status == "delivered",
                                        outbox.c.receipt_no.is_not(None))).scalar_one()
    engine.dispose()
    assert delivered == 30
