"""Alerts (issue 5 §7): each condition is created for real, and fires exactly once.

The robot webhook is the mock sink (``mock_partners/webhook_sink.py``) on a real uvicorn; what
it received is read back over HTTP.  Evaluations take ``now``, so deadlines, ages and the year
close are placed deterministically; each test evaluates more than once to show an alert is
sent once per condition, cleared when the condition goes away and sent again if it recurs.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select, update

from gateway.accounts import Partner
from gateway.alerts import Evaluation, evaluate
from gateway.batches import NewBatch, record_batch
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.ops.overview import backlog
from gateway.pipeline.ingest import PartnerRef, ingest
from gateway.store.tables import alert_state, batches, outbox
from mock_partners import webhook_sink
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission
from tests.support.servers import cli, uvicorn_thread

MakeSettings = Callable[..., Settings]
# 10:00 on 6 October in Xining: September's monthly batch was due by the 5th.
OCT_6 = datetime(2026, 10, 6, 2, 0, tzinfo=UTC)
JUNE = datetime(2026, 6, 15, 2, 0, tzinfo=UTC)
DEC_27 = datetime(2026, 12, 27, 2, 0, tzinfo=UTC)  # three days before the 30 December close
ROBOT_PATH = "/cgi-bin/webhook/send?key=test-robot"


@pytest.fixture
def sink() -> Iterator[str]:
    with uvicorn_thread(webhook_sink.create_app()) as url:
        yield url


def received(sink_url: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = httpx.get(f"{sink_url}/_mock/received", timeout=10).json()["messages"]
    return messages


def content(message: dict[str, Any]) -> str:
    body = message["body"]
    text: str = body["markdown"]["content"] if body["msgtype"] == "markdown" else body["text"]["content"]
    return text


def state(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["key"]: dict(r) for r in conn.execute(select(alert_state)).mappings()}


def monthly_batch(engine: Engine, partner: Partner, period: str) -> str:
    """Accept a monthly batch as ``POST /v1/batches`` does (nothing processes it here)."""
    batch_id = f"B{uuid.uuid4().hex[:24]}"
    record_batch(engine, NewBatch(batch_id, partner.partner_id, partner.adapter, "monthly", period,
                                  Path("/nonexistent") / f"{batch_id}.csv", "csv", 10, "0" * 64), "test")
    return batch_id


def test_missed_monthly_push_fires_once_is_retried_clears_and_fires_again(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    late = new_partner(engine, adapter="health")
    punctual = new_partner(engine, adapter="finance")
    monthly_batch(engine, punctual, "2026-08")
    monthly_batch(engine, punctual, "2026-09")
    key = f"missed_push:{late.partner_id}:2026-09"
    down = make_settings(db_url, alert_webhook_url=f"http://127.0.0.1:9{ROBOT_PATH}")
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}")

    # Before the deadline September is not late yet (August is the month then checked).
    assert [c.key for c in evaluate(engine, down, OCT_6 - timedelta(days=1)).active] == [
        f"missed_push:{late.partner_id}:2026-08"]

    # The webhook is down, then refuses: nothing is recorded, so the next tick tries again.
    first = evaluate(engine, down, OCT_6)
    assert [c.key for c in first.active] == [key]
    assert list(first.failed) == [key] and first.fired == []
    httpx.post(f"{sink}/_mock/faults", json={"fail_next": 2, "status": 500}).raise_for_status()
    assert list(evaluate(engine, settings, OCT_6).failed) == [key]
    httpx.post(f"{sink}/_mock/faults", json={"fail_next": 1, "errcode": 93000}).raise_for_status()
    assert list(evaluate(engine, settings, OCT_6).failed) == [key]
    assert key not in state(engine)
    httpx.post(f"{sink}/_mock/faults", json={}).raise_for_status()

    assert evaluate(engine, settings, OCT_6).fired == [key]
    assert evaluate(engine, settings, OCT_6 + timedelta(hours=1)).already == [key]
    [message] = received(sink)
    assert message["path"] == "/cgi-bin/webhook/send" and message["query"] == {"key": "test-robot"}
    assert message["body"]["msgtype"] == "markdown"
    text = content(message)
    assert "月度数据未按时推送" in text and "(monthly push missed)" in text
    assert late.partner_id in text and "2026-09" in text and "2026-10-05" in text
    assert punctual.partner_id not in text

    # The batch arrives (queued is enough): the condition clears.
    batch_id = monthly_batch(engine, late, "2026-09")
    cleared = evaluate(engine, settings, OCT_6 + timedelta(hours=2))
    assert cleared.active == [] and cleared.cleared == [key]
    assert state(engine)[key]["cleared_at"] is not None

    # Its file then fails to process: the month is missing again and is alerted again, once.
    with engine.begin() as conn:
        conn.execute(update(batches).where(batches.c.batch_id == batch_id).values(status="failed"))
    assert evaluate(engine, settings, OCT_6 + timedelta(hours=3)).fired == [key]
    assert evaluate(engine, settings, OCT_6 + timedelta(hours=4)).already == [key]
    assert len(received(sink)) == 2
    assert state(engine)[key]["cleared_at"] is None


def test_backlog_age_in_dingtalk_shape_clears_through_the_cli_and_fires_again(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    partner = new_partner(engine)
    rng = random.Random(5)
    subs = [canonical_submission(rng, f"B-{i}") for i in range(3)]
    assert {a.status for a in ingest(engine, PartnerRef(partner.partner_id, "canonical"), subs)} == {"accepted"}
    with engine.connect() as conn:
        oldest = backlog(conn).oldest_created_at
    assert oldest is not None
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_ALERT_WEBHOOK_URL": f"{sink}/robot/send?access_token=t",
           "CE_GATEWAY_ALERT_WEBHOOK_FORMAT": "dingtalk", "CE_GATEWAY_ALERT_BACKLOG_AGE_SECONDS": "600"}
    settings = make_settings(db_url, alert_webhook_url=env["CE_GATEWAY_ALERT_WEBHOOK_URL"],
                             alert_webhook_format="dingtalk", alert_backlog_age_seconds=600)

    assert evaluate(engine, settings, oldest + timedelta(seconds=599)).active == []
    assert evaluate(engine, settings, oldest + timedelta(seconds=601)).fired == ["backlog_age"]
    assert evaluate(engine, settings, oldest + timedelta(seconds=900)).already == ["backlog_age"]
    [message] = received(sink)
    assert message["body"]["msgtype"] == "text" and set(message["body"]) == {"msgtype", "text"}
    text = content(message)
    assert "投递积压超时" in text and "(pending)：3 条" in text and "600 s" in text
    assert all(sub["person"]["id_number"] not in text for sub in subs)

    # `ce-gateway alerts check` evaluates at the real now: the backlog is young, so it clears.
    # (A subprocess costs seconds: once, on SQLite; evaluate() is the same code on both.)
    if db_url.startswith("sqlite"):
        done = cli(env, "alerts", "check", "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["configured"] is True and result["active"] == []
        assert result["cleared"] == ["backlog_age"]
    else:
        assert evaluate(engine, settings).cleared == ["backlog_age"]

    assert evaluate(engine, settings, oldest + timedelta(seconds=1200)).fired == ["backlog_age"]
    assert len(received(sink)) == 2


def test_dead_letters_and_failing_deliveries_near_the_year_close_fire_once_each(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults], sink: str) -> None:
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    rng = random.Random(9)
    worker = DeliveryWorker(engine, make_settings(db_url, mock_ce[0]))

    def dead_letter(source_id: str) -> None:
        sub = canonical_submission(rng, source_id)
        sub["activity"]["title"] = "[REJECT] 高原医学专题讲座"
        ingest(engine, partner, [sub])
        while worker.run_once():
            pass

    # The real 30 December close (the suite otherwise runs with 2026 extended).
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}", alert_year_close_days=7,
                             year_close_extensions={})
    try:
        dead_letter("D-1")
        first = evaluate(engine, settings, JUNE)
        [dead_key] = first.fired
        assert [c.kind for c in first.active] == ["dead_letters"]
        # Nothing new since the last alert; and in June the year close is far (no failing alert).
        second = evaluate(engine, settings, JUNE)
        assert second.active == [] and second.fired == [] and second.cleared == [dead_key]

        close_key = "year_close:2026-12-30"
        assert evaluate(engine, settings, DEC_27).fired == [close_key]
        assert evaluate(engine, settings, DEC_27).already == [close_key]

        # Suppose a reprocess delivered it: nothing fails any more, the condition clears.
        with engine.begin() as conn:
            conn.execute(update(outbox).where(outbox.c.status == "dead").values(status="delivered"))
        assert evaluate(engine, settings, DEC_27).cleared == [close_key]

        dead_letter("D-2")
        again = evaluate(engine, settings, DEC_27)
        assert len(again.fired) == 2 and close_key in again.fired and dead_key not in again.fired
        assert evaluate(engine, settings, DEC_27 + timedelta(hours=1)).fired == []
    finally:
        worker.close()

    texts = [content(m) for m in received(sink)]
    assert len(texts) == 4
    assert ["新增死信" in t for t in texts] == [True, False, True, False]
    assert "新增 (new)：1 条；死信总数 (total dead)：1 条" in texts[0]
    assert "临近年度截止仍有投递失败" in texts[1] and "剩余 (days left) 3 天" in texts[1]
    assert "死信 (dead)：1 条" in texts[3]


def test_concurrent_evaluations_send_one_alert(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    """Replicas evaluating at once: the claim on the key lets exactly one of them post."""
    partner = new_partner(engine, adapter="finance")
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}")
    httpx.post(f"{sink}/_mock/faults", json={"delay_ms": 300}).raise_for_status()
    start = threading.Barrier(3)
    results: list[Evaluation] = []

    def replica() -> None:
        start.wait()
        results.append(evaluate(engine, settings, OCT_6))

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    key = f"missed_push:{partner.partner_id}:2026-09"
    assert sorted(len(r.fired) for r in results) == [0, 0, 1]
    assert all(r.fired == [key] or r.already == [key] for r in results)
    assert len(received(sink)) == 1
