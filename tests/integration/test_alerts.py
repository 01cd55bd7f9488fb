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
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, delete, func, insert, select, text, update
from sqlalchemy.engine import make_url

from gateway import alerts, audit
from gateway.accounts import Partner
from gateway.alerts import Evaluation, evaluate
from gateway.batch_requests import NewBatch, record_batch
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.ops.deliveries import DeliveryFilter, reprocess
from gateway.ops.overview import backlog, overview
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.scheduling import LeaseLost
from gateway.store.db import make_engine
from gateway.store.tables import alert_state, batches, outbox, partners
from mock_partners import webhook_sink
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission
from tests.support.servers import cli, uvicorn_thread

MakeSettings = Callable[..., Settings]
# 10:00 on 6 October in Xining: September's monthly batch was due by the 5th.
OCT_6 = datetime(2026, 10, 6, 2, 0, tzinfo=UTC)
# A monthly partner registered then owes September first: August's push was late from 6 September.
SEPT_20 = datetime(2026, 9, 20, 2, 0, tzinfo=UTC)
JUNE = datetime(2026, 6, 15, 2, 0, tzinfo=UTC)
DEC_27 = datetime(2026, 12, 27, 2, 0, tzinfo=UTC)  # three days before the 30 December close
ROBOT_PATH = "/cgi-bin/webhook/send?key=test-robot"


@pytest.fixture
def sink() -> Iterator[str]:
    with uvicorn_thread(webhook_sink.create_app()) as url:
        yield url


def received(sink_url: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = httpx.get(f"{sink_url}/_mock/received").json()["messages"]
    return messages


def content(message: dict[str, Any]) -> str:
    body = message["body"]
    text: str = body["markdown"]["content"] if body["msgtype"] == "markdown" else body["text"]["content"]
    return text


def state(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["key"]: dict(r) for r in conn.execute(select(alert_state)).mappings()}


def dead_letter(engine: Engine, worker: DeliveryWorker, partner: PartnerRef, rng: random.Random,
                source_id: str) -> None:
    """Ingest a record the mock management system rejects; ``worker`` dead-letters it."""
    sub = canonical_submission(rng, source_id)
    sub["activity"]["title"] = "[REJECT] 高原医学专题讲座"
    ingest(engine, partner, [sub])
    while worker.run_once():
        pass


def registered(engine: Engine, partner: Partner, at: datetime = SEPT_20) -> Partner:
    """``partner``, as if registered ``at``: what it owes starts from there, not from today."""
    with engine.begin() as conn:
        conn.execute(update(partners).where(partners.c.partner_id == partner.partner_id)
                     .values(created_at=at))
    return partner


def monthly_batch(engine: Engine, partner: Partner, period: str) -> str:
    """Accept a monthly batch as ``POST /v1/batches`` does (nothing processes it here)."""
    batch_id = f"B{uuid.uuid4().hex[:24]}"
    record_batch(engine, NewBatch(batch_id, partner.partner_id, partner.adapter, "monthly", period,
                                  Path("/nonexistent") / f"{batch_id}.csv", "csv", 10, "0" * 64), "test")
    return batch_id


def test_missed_monthly_push_fires_once_is_retried_clears_and_fires_again(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    late = registered(engine, new_partner(engine, adapter="health"))
    punctual = registered(engine, new_partner(engine, adapter="finance"))
    monthly_batch(engine, punctual, "2026-08")
    monthly_batch(engine, punctual, "2026-09")
    key = f"missed_push:{late.partner_id}:2026-09"
    down = make_settings(db_url, alert_webhook_url=f"http://127.0.0.1:9{ROBOT_PATH}")
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}")

    # Before its deadline September is not late yet (August's came before registration).
    assert evaluate(engine, down, OCT_6 - timedelta(days=1)).active == []

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
    assert state(engine)[key]["sent_at"] is not None
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


def test_a_reprocessed_old_dead_letter_is_not_an_old_backlog(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    """The backlog's age counts from when a row was last queued, not from when it was created."""
    partner = new_partner(engine)
    rng = random.Random(6)
    subs = [canonical_submission(rng, f"Q-{i}") for i in range(2)]
    ingest(engine, PartnerRef(partner.partner_id, "canonical"), subs)
    month_ago = datetime.now(UTC) - timedelta(days=30)
    with engine.begin() as conn:  # dead letters of a month ago
        conn.execute(update(outbox).values(status="dead", error_code="DOWNSTREAM_REJECTED",
                                           created_at=month_ago, updated_at=month_ago))
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}", alert_backlog_age_seconds=600)
    before = datetime.now(UTC)
    done = reprocess(engine, DeliveryFilter(status="dead"), dry_run=False, reason="下游已恢复",
                     actor="op-test")
    assert done.requeued == 2
    with engine.connect() as conn:
        pending = backlog(conn)
    assert pending.size == 2 and pending.oldest_queued_at is not None
    assert pending.oldest_queued_at >= before - timedelta(seconds=1)
    assert evaluate(engine, settings).active == []  # was: backlog_age fired, 30 days "late"
    # The age still grows from the requeue: the row that is still waiting is alerted then.
    later = pending.oldest_queued_at + timedelta(seconds=601)
    assert evaluate(engine, settings, later).fired == ["backlog_age"]


def test_backlog_age_in_dingtalk_shape_clears_through_the_cli_and_fires_again(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    partner = new_partner(engine)
    rng = random.Random(5)
    subs = [canonical_submission(rng, f"B-{i}") for i in range(3)]
    assert {a.status for a in ingest(engine, PartnerRef(partner.partner_id, "canonical"), subs)} == {"accepted"}
    with engine.connect() as conn:
        oldest = backlog(conn).oldest_queued_at
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
    # The real 30 December close (the suite otherwise runs with 2026 extended).
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}", alert_year_close_days=7,
                             year_close_extensions={})
    try:
        dead_letter(engine, worker, partner, rng, "D-1")
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

        dead_letter(engine, worker, partner, rng, "D-2")
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
    partner = registered(engine, new_partner(engine, adapter="finance"))
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


def test_a_dead_letter_committed_late_with_an_older_stamp_is_still_alerted(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults], sink: str) -> None:
    """Workers stamp ``now`` before their transaction, and commits don't come in stamp order.

    The mark is the last dead-lettering audit event's sequence number, given in commit order,
    so a dead letter stamped before the last alert but committed after it is still news.
    """
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    rng = random.Random(11)
    worker_settings = make_settings(db_url, mock_ce[0])
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}")
    worker = DeliveryWorker(engine, worker_settings)
    try:
        dead_letter(engine, worker, partner, rng, "L-1")
    finally:
        worker.close()
    [first] = evaluate(engine, settings, JUNE).fired
    with engine.connect() as conn:
        stamped = conn.execute(select(func.max(outbox.c.updated_at))
                               .where(outbox.c.status == "dead")).scalar_one()

    # A second worker whose clock read a minute before the first one's commit, committing now.
    late = DeliveryWorker(engine, worker_settings, name="late-worker",
                          clock=lambda: stamped - timedelta(minutes=1))
    try:
        dead_letter(engine, late, partner, rng, "L-2")
    finally:
        late.close()
    with engine.connect() as conn:
        stamps = conn.execute(select(outbox.c.updated_at).where(outbox.c.status == "dead")
                              .order_by(outbox.c.id)).scalars().all()
    assert len(stamps) == 2 and stamps[1] < stamps[0]  # the late one carries the older stamp

    again = evaluate(engine, settings, JUNE)
    assert [c.kind for c in again.active] == ["dead_letters"] and again.fired != [first]
    assert len(again.fired) == 1
    assert evaluate(engine, settings, JUNE).fired == []
    texts = [content(m) for m in received(sink)]
    assert len(texts) == 2
    assert "新增 (new)：1 条；死信总数 (total dead)：2 条" in texts[1]


def test_an_alert_post_in_flight_holds_no_transaction(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    """The claim commits before the post: writers don't wait for a slow robot.

    On SQLite a transaction open across the post would hold the store's one write lock, so the
    write below would wait for the robot; on PostgreSQL it would hold a pooled connection idle
    in transaction (the evaluation's connections are named, so only they are looked at).
    """
    partner = registered(engine, new_partner(engine, adapter="finance"))
    key = f"missed_push:{partner.partner_id}:2026-09"
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}")
    # The robot's answer must outlast, with room for a loaded machine, a write, a look at
    # pg_stat_activity and a read of alert_state; the write must take under half of it.
    delay = 10.0  # 6 s left a 3 s bound for the write: tight on the CI machine
    httpx.post(f"{sink}/_mock/faults", json={"delay_ms": int(delay * 1000)}).raise_for_status()
    postgres = not db_url.startswith("sqlite")
    name = f"alerts-{uuid.uuid4().hex[:8]}"
    evaluating = make_engine(make_url(db_url).update_query_dict({"application_name": name})
                             .render_as_string(hide_password=False)) if postgres else engine
    posting = threading.Event()
    results: list[Evaluation] = []

    def on_request(_request: httpx.Request) -> None:
        posting.set()

    client = httpx.Client(timeout=delay + 20, event_hooks={"request": [on_request]})
    thread = threading.Thread(target=lambda: results.append(
        evaluate(evaluating, settings, OCT_6, client=client)))
    thread.start()
    try:
        assert posting.wait(timeout=20), "the alert was never posted"
        started = time.monotonic()
        with engine.begin() as conn:  # what ingest, the worker and batch chunks all do
            audit.append(conn, [audit.Event("test_write", actor="test")])
        took = time.monotonic() - started
        idle_in_transaction = 0
        if postgres:
            with engine.connect() as conn:
                idle_in_transaction = conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
                    " AND state LIKE 'idle in transaction%'"), {"name": name}).scalar_one()
        in_flight = state(engine).get(key)
        still_posting = not results
    finally:
        thread.join(timeout=30)
        client.close()
        if postgres:
            evaluating.dispose()
    assert took < delay / 2, f"a write waited {took:.2f} s for the alert's post"
    assert idle_in_transaction == 0
    assert still_posting, "the post returned before the checks ran"
    # What kept the key during the post: a committed claim, not yet marked sent.
    assert in_flight is not None and in_flight["sent_at"] is None
    [result] = results
    assert result.fired == [key]
    assert state(engine)[key]["sent_at"] is not None
    assert len(received(sink)) == 1


def test_a_claim_left_unsent_is_sent_after_its_lease_and_a_failed_rearm_is_undone(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    """The crash windows of claim, post, mark sent.

    An evaluator that died after committing its claim leaves the row unsent: while its lease
    (4 × the webhook timeout) runs, others take it as being posted; after that the next tick
    posts it.  A failed post of a re-armed row restores it as it was, so the next tick retries.
    """
    partner = registered(engine, new_partner(engine, adapter="health"))
    key = f"missed_push:{partner.partner_id}:2026-09"
    # A 60 s lease (4 x 15 s): an evaluation's claim time is its now plus the time it has taken,
    # and on the CI machine that took seconds; with 20 s and ticks 1 s either side of its end,
    # the tick after it found nothing to fire (2026-11-28).
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}",
                             alert_webhook_timeout_seconds=15)
    with engine.begin() as conn:  # what the dead evaluator committed before posting
        conn.execute(insert(alert_state).values(key=key, kind="missed_push", fired_at=OCT_6,
                                                cleared_at=None, sent_at=None, detail="{}"))

    within = evaluate(engine, settings, OCT_6 + timedelta(seconds=50))
    assert within.already == [key] and within.fired == [] and received(sink) == []
    after = evaluate(engine, settings, OCT_6 + timedelta(seconds=61))
    assert after.fired == [key], (after.already, after.failed)
    row = state(engine)[key]
    assert row["sent_at"] is not None and row["fired_at"] >= OCT_6 + timedelta(seconds=61)
    assert evaluate(engine, settings, OCT_6 + timedelta(minutes=2)).already == [key]
    assert len(received(sink)) == 1

    # The batch arrives, then fails: the condition recurs, but the robot refuses the re-armed alert.
    batch_id = monthly_batch(engine, partner, "2026-09")
    assert evaluate(engine, settings, OCT_6 + timedelta(minutes=3)).cleared == [key]
    cleared = state(engine)[key]
    with engine.begin() as conn:
        conn.execute(update(batches).where(batches.c.batch_id == batch_id).values(status="failed"))
    httpx.post(f"{sink}/_mock/faults", json={"fail_next": 1, "status": 503}).raise_for_status()
    assert list(evaluate(engine, settings, OCT_6 + timedelta(minutes=4)).failed) == [key]
    assert state(engine)[key] == cleared
    assert evaluate(engine, settings, OCT_6 + timedelta(minutes=5)).fired == [key]
    assert len(received(sink)) == 2


def annual_batch(engine: Engine, partner: Partner, year: int) -> str:
    batch_id = f"B{uuid.uuid4().hex[:24]}"
    record_batch(engine, NewBatch(batch_id, partner.partner_id, partner.adapter, "annual", str(year),
                                  Path("/nonexistent") / f"{batch_id}.csv", "csv", 10, "0" * 64), "test")
    return batch_id


def _owed(result: Evaluation, partner: Partner) -> list[str]:
    return [c.key.rsplit(":", 1)[1] for c in result.active
            if c.detail.get("partner_id") == partner.partner_id]


def test_every_missing_month_since_the_partner_started_is_alerted_until_pushed(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    """Back to January of the previous CE year, from the first deadline after registration; annuals."""
    quiet = new_partner(engine, adapter="health")
    registered(engine, quiet, datetime(2025, 3, 10, 2, 0, tzinfo=UTC))
    veteran = new_partner(engine, adapter="finance")
    registered(engine, veteran, datetime(2021, 6, 1, 2, 0, tzinfo=UTC))
    settings = make_settings(db_url)  # no webhook: the conditions alone

    # Registered on 10 March: February's push was late from 6 March, March's is due by 5 April.
    since_march = [f"2025-{m:02d}" for m in range(3, 13)] + [f"2026-{m:02d}" for m in range(1, 10)]
    result = evaluate(engine, settings, OCT_6)
    assert _owed(result, quiet) == [*since_march, "2025"]
    assert [c.kind for c in result.active if c.key.endswith(":2025")][-1] == "missed_annual"
    # Registered years ago: the look-back stops at January of the previous year.
    assert _owed(result, veteran) == ["2025-01", "2025-02", *since_march, "2025"]
    with engine.connect() as conn:
        board = {p["partner_id"]: p for p in overview(conn, settings, OCT_6)["partners"]}
    assert board[quiet.partner_id]["missing_months"] == since_march
    assert board[quiet.partner_id]["missing_annual"] == [2025]

    for month in since_march[:10]:
        monthly_batch(engine, quiet, month)
    annual_batch(engine, quiet, 2025)
    assert _owed(evaluate(engine, settings, OCT_6), quiet) == since_march[10:]
    annual = [c for c in evaluate(engine, settings, datetime(2026, 1, 20, 2, tzinfo=UTC)).active
              if c.kind == "missed_annual" and c.detail["partner_id"] == veteran.partner_id]
    assert [c.key for c in annual] == [f"missed_annual:{veteran.partner_id}:2025"]
    assert "应于 2026-01-15 前推送" in annual[0].lines[2]


def test_the_annual_batch_is_due_from_the_configured_day_from_partners_registered_before_it(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    settings = make_settings(db_url, alert_annual_push_day=20)
    old = new_partner(engine, adapter="finance")
    registered(engine, old, datetime(2026, 2, 10, 2, tzinfo=UTC))  # owes February on
    for month in range(2, 13):
        monthly_batch(engine, old, f"2026-{month:02d}")
    newcomer = new_partner(engine, adapter="health")
    registered(engine, newcomer, datetime(2027, 1, 2, 2, tzinfo=UTC))

    on_the_day = datetime(2027, 1, 20, 15, 59, 59, tzinfo=UTC)  # 23:59:59 on the 20th in Xining
    assert _owed(evaluate(engine, settings, on_the_day), old) == []
    late = evaluate(engine, settings, on_the_day + timedelta(seconds=1))
    assert _owed(late, old) == ["2026"]
    # Registered on 2 January, before December's deadline and 2026's: both are owed.
    assert _owed(late, newcomer) == ["2026-12", "2026"]

    annual_batch(engine, old, 2026)
    assert _owed(evaluate(engine, settings, on_the_day + timedelta(days=1)), old) == []


def test_missed_pushes_go_out_as_one_digest_after_the_urgent_alerts_within_the_robots_limit(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    """Alerts turned on for partners owing dozens of pushes: one message for them, not 43.

    The sink answers as WeCom does past 20 messages a minute (errcode 45009): a message a key
    would leave most of them, and any alert fired after them, failing until the next tick.
    """
    veteran = registered(engine, new_partner(engine, adapter="finance"),
                         datetime(2021, 6, 1, 2, 0, tzinfo=UTC))  # 21 months and 2025's annual
    quiet = registered(engine, new_partner(engine, adapter="health"),
                       datetime(2025, 3, 10, 2, 0, tzinfo=UTC))  # 19 months and 2025's annual
    late = registered(engine, new_partner(engine, adapter="health"))  # September 2026 only
    ingest(engine, PartnerRef(new_partner(engine).partner_id, "canonical"),
           [canonical_submission(random.Random(28), "Q-1")])
    with engine.begin() as conn:  # queued two hours before: the backlog is old too
        conn.execute(update(outbox).values(created_at=OCT_6 - timedelta(hours=2), queued_at=None))
    httpx.post(f"{sink}/_mock/faults", json={"per_minute": 20}).raise_for_status()
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}",
                             alert_backlog_age_seconds=600)
    owed = [c.key for c in evaluate(engine, make_settings(db_url), OCT_6).active
            if c.kind in ("missed_push", "missed_annual")]
    assert len(owed) == 22 + 20 + 1

    # The robot refuses both messages: every claim is given back, and the next tick sends all.
    httpx.post(f"{sink}/_mock/faults", json={"fail_next": 2, "errcode": 93000,
                                             "per_minute": 20}).raise_for_status()
    refused = evaluate(engine, settings, OCT_6)
    assert refused.fired == [] and sorted(refused.failed) == sorted(["backlog_age", *owed])
    assert received(sink) == [] and state(engine) == {}

    first = evaluate(engine, settings, OCT_6)
    assert first.failed == {} and first.already == []
    assert first.fired == ["backlog_age", *owed]  # the urgent alert first
    assert all(state(engine)[key]["sent_at"] is not None for key in owed)
    backlog_message, message = received(sink)
    assert "投递积压超时" in content(backlog_message)
    text = content(message)
    assert "合作方数据未按时推送" in text and "(43 pushes missed, 3 partners)" in text
    assert f"{veteran.partner_id}（财政 finance）：月度 (months) 2025-01 至 2026-09（21 个月）；" \
           "年度 (annual) 2025" in text
    assert f"{quiet.partner_id}（卫健 health）：月度 (months) 2025-03 至 2026-09（19 个月）" in text
    assert f"{late.partner_id}（卫健 health）：月度 (months) 2026-09" in text
    assert len(text.encode()) <= 4096

    again = evaluate(engine, settings, OCT_6 + timedelta(hours=1))
    assert again.fired == [] and sorted(again.already) == sorted(["backlog_age", *owed])
    # The late partner pushes September: its key clears, the others stay sent.
    monthly_batch(engine, late, "2026-09")
    cleared = evaluate(engine, settings, OCT_6 + timedelta(hours=2))
    assert cleared.cleared == [f"missed_push:{late.partner_id}:2026-09"] and cleared.fired == []
    assert len(received(sink)) == 2


def _owing_22(engine: Engine, new_partner: Callable[..., Partner]) -> Partner:
    """A finance partner registered years ago: 21 months and 2025's annual owed at OCT_6."""
    return registered(engine, new_partner(engine, adapter="finance"),
                      datetime(2021, 6, 1, 2, 0, tzinfo=UTC))


class _Clock:
    """``time`` as gateway.alerts reads it: monotonic seconds the test moves on."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def _slow_store_and_a_replica_at_the_post(engine: Engine, settings: Settings,
                                           monkeypatch: pytest.MonkeyPatch) -> tuple[_Clock, dict[str, Any]]:
    """A slow store (60 ms of the clock a claim or check) and another replica just before the post.

    Only the next evaluation is slow.  Before its first post another replica evaluates;
    ``seen`` gets the leases as they stand then (``"leases"``, the rows' ``fired_at``) and that
    replica's evaluation (``"other"``).
    """
    clock = _Clock()
    monkeypatch.setattr(alerts, "time", clock)
    take, send = alerts._take, alerts.send
    seen: dict[str, Any] = {}

    def slow_take(*args: Any, **kwargs: Any) -> Any:
        claim = take(*args, **kwargs)
        if "leases" not in seen:  # slow until the first post, the other replica's is not
            clock.now += 0.06
        return claim

    def send_while_another_replica_evaluates(client: httpx.Client, url: str,
                                             body: dict[str, Any], **kwargs: Any) -> None:
        if "leases" not in seen:  # set first: the other replica's own post comes here too
            seen["leases"] = {row["fired_at"] for row in state(engine).values()}
            seen["other"] = evaluate(engine, settings, OCT_6 + timedelta(seconds=clock.now))
        send(client, url, body, **kwargs)

    monkeypatch.setattr(alerts, "_take", slow_take)
    monkeypatch.setattr(alerts, "send", send_while_another_replica_evaluates)
    return clock, seen


def test_a_digests_claims_start_their_lease_again_just_before_the_post(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claimed one by one on a slow store, the first claims' leases would run out unposted.

    Lease 1 s (4 × a 0.25 s webhook timeout); each claim takes 60 ms of the evaluation's clock,
    22 claims 1.3 s.  At the post every claim carries the post's time, and another replica
    evaluating then finds each key being posted (``already``): one digest, each key once.
    """
    partner = _owing_22(engine, new_partner)
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}",
                             alert_webhook_timeout_seconds=0.25)
    clock, seen = _slow_store_and_a_replica_at_the_post(engine, settings, monkeypatch)
    first = evaluate(engine, settings, OCT_6)
    assert clock.now > 4 * 0.25  # the claims took longer than a lease
    [lease] = seen["leases"]  # one time on all 22, the post's
    assert abs((lease.replace(tzinfo=UTC) if lease.tzinfo is None else lease)
               - (OCT_6 + timedelta(seconds=1.32))) < timedelta(milliseconds=1)
    other: Evaluation = seen["other"]
    assert len(first.fired) == 22 and other.fired == [] and sorted(other.already) == sorted(first.fired)
    [message] = received(sink)
    assert partner.partner_id in content(message)


def test_a_lease_lost_while_claiming_gives_the_claims_taken_back(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job taken over after five claims: they are given back, not left to their lease."""
    _owing_22(engine, new_partner)
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}")
    calls = {"n": 0}

    def ensure_held() -> None:
        calls["n"] += 1
        if calls["n"] == 6:  # one before the conditions are read, then one a claim
            raise LeaseLost("taken over")

    monkeypatch.setattr(alerts, "ensure_held", ensure_held)
    with pytest.raises(LeaseLost):
        evaluate(engine, settings, OCT_6)
    monkeypatch.undo()
    assert state(engine) == {} and received(sink) == []
    # The replica that took the job over evaluates next: every month is in its one digest.
    after = evaluate(engine, settings, OCT_6 + timedelta(seconds=1))
    assert after.already == [] and len(after.fired) == 22 and len(received(sink)) == 1


def test_one_new_claim_ahead_of_many_live_keys_is_posted_once(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tick with one month newly due and 21 already sent: checking the 21 outlasts its lease.

    (Second review: only a digest of several claims was re-stamped, so the one new claim ran out
    and another replica posted it as well.)
    """
    _owing_22(engine, new_partner)
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}",
                             alert_webhook_timeout_seconds=0.25)  # lease 1 s
    first = evaluate(engine, settings, OCT_6)
    assert len(first.fired) == 22
    new_key = first.fired[0]  # as if newly due: one new claim ahead of 21 live keys
    with engine.begin() as conn:
        conn.execute(delete(alert_state).where(alert_state.c.key == new_key))
    clock, seen = _slow_store_and_a_replica_at_the_post(engine, settings, monkeypatch)
    second = evaluate(engine, settings, OCT_6)
    assert clock.now > 4 * 0.25
    assert second.fired == [new_key]
    assert seen["other"].fired == [] and new_key in seen["other"].already
    assert len(received(sink)) == 2
