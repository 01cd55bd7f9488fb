"""The delivery worker against the real mock management system, on SQLite and PostgreSQL.

Each test drives the worker with ``run_once()`` (or ``claim()``) in the test thread; time is
an injected clock, never a sleep.  What the management system received is read back from the
mock (``/_mock/applied``), so "effectively once, in order" is checked from the receiving side.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, insert, select, update

from contracts import RecordAnswer
from gateway.accounts import Partner
from gateway.delivery.circuit import CircuitBreaker, CircuitState
from gateway.delivery.worker import DeliveryWorker
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.db import make_engine
from gateway.store.tables import audit_events, delivery_batches, outbox, record_versions
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.integration.test_alerts_leases_review import SlowHeaders
from tests.integration.test_ops_jobs_review import _held

T0 = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)


class Clock:
    """A wall clock the test moves by hand (the worker's ``clock`` parameter)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class MonoClock:
    """A monotonic clock for the circuit breaker."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


MakeWorker = Callable[..., DeliveryWorker]


@pytest.fixture
def make_worker(db_url: str, mock_ce: tuple[str, Faults],
                make_settings: Callable[..., Any]) -> Iterator[MakeWorker]:
    """``DeliveryWorker(make_engine(db_url), settings)`` aimed at the mock; closed afterwards."""
    made: list[DeliveryWorker] = []

    def build(clock: Callable[[], datetime] | None = None, name: str | None = None,
              **overrides: Any) -> DeliveryWorker:
        worker = DeliveryWorker(make_engine(db_url), make_settings(db_url, mock_ce[0], **overrides),
                                clock=clock, name=name)
        made.append(worker)
        return worker

    yield build
    for worker in made:
        worker.close()
        worker.engine.dispose()


# -- helpers --------------------------------------------------------------------------------

def _put(engine: Engine, partner: Partner, subs: list[dict[str, Any]]) -> list[RecordAnswer]:
    answers = ingest(engine, PartnerRef(partner.partner_id, "canonical"), subs)
    assert all(a.status in ("accepted", "corrected") for a in answers), [a.errors for a in answers]
    return answers


def _subs(n: int, seed: int = 11, prefix: str = "S") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [gen.canonical_submission(rng, f"{prefix}-{i}") for i in range(n)]


def _mock(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/_mock/applied").json()
    return body


def _requests(url: str) -> int:
    return int(_mock(url)["requests"]["total"])


def _outbox(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(outbox).order_by(outbox.c.id)).mappings()]


def _batches(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["batch_key"]: dict(r) for r in conn.execute(select(delivery_batches)).mappings()}


def _audit(engine: Engine, kind: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(audit_events).where(audit_events.c.kind == kind)
                            .order_by(audit_events.c.seq)).mappings().all()
    return [{**r, "detail": orjson.loads(r["detail"])} for r in rows]


def _drain(worker: DeliveryWorker, limit: int = 50) -> list[int]:
    """run_once until it has nothing to do; returns what each cycle sent."""
    sent = []
    for _ in range(limit):
        n = worker.run_once()
        sent.append(n)
        if n == 0:
            return sent
    raise AssertionError(f"worker still busy after {limit} cycles: {sent}")


def _assert_once_and_in_order(snap: dict[str, Any]) -> None:
    assert snap["double_applied"] == []
    assert snap["out_of_order"] == []
    assert snap["key_mismatch"] == []


# -- tests ----------------------------------------------------------------------------------

def test_happy_path_delivers_all_with_receipts(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    answers = _put(engine, new_partner(engine), _subs(5))
    worker = make_worker()
    assert worker.run_once() == 5
    assert worker.run_once() == 0

    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert snap["requests"] == {"total": 1, "by_status": {"200": 1}}
    applied = {(a["record_id"], a["version"]): a for a in snap["applied"]}
    assert set(applied) == {(a.record_id, 1) for a in answers}

    rows = _outbox(engine)
    assert {r["status"] for r in rows} == {"delivered"}
    for r in rows:
        assert r["receipt_no"] == applied[(r["record_id"], r["version"])]["receipt_no"]
        assert r["receipt_status"] == "accepted" and r["attempts"] == 1
        assert r["delivered_at"] is not None and r["error_code"] is None
    # One batch, one Idempotency-Key, recorded once by the mock for all five records.
    [key] = {r["batch_key"] for r in rows}
    assert Counter(a["idempotency_key"] for a in snap["applied"]) == {key: 5}
    assert _batches(engine)[key]["status"] == "done"
    assert len(_audit(engine, "delivered")) == 5


def test_batch_size_caps_each_request(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    _put(engine, new_partner(engine), _subs(7))
    worker = make_worker(delivery_batch_size=3)
    assert _drain(worker) == [3, 3, 1, 0]

    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert snap["requests"]["total"] == 3
    sizes = sorted(Counter(a["idempotency_key"] for a in snap["applied"]).values())
    assert sizes == [1, 3, 3]
    assert {r["status"] for r in _outbox(engine)} == {"delivered"}


def test_per_record_rejection_dead_letters_only_that_record(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    subs = _subs(4)
    subs[2]["activity"]["title"] = "[REJECT] 高原医学专题讲座"
    answers = _put(engine, new_partner(engine), subs)
    bad = answers[2].record_id
    worker = make_worker()
    assert _drain(worker) == [4, 0]

    rows = {r["record_id"]: r for r in _outbox(engine)}
    assert rows[bad]["status"] == "dead"
    assert rows[bad]["error_code"] == "DOWNSTREAM_REJECTED"
    assert "[REJECT]" in rows[bad]["last_error"]
    assert rows[bad]["receipt_no"] is None
    assert rows[bad]["attempts"] == 1  # it was sent once, as its mates were
    mates = [r for rid, r in rows.items() if rid != bad]
    assert [r["status"] for r in mates] == ["delivered"] * 3
    assert [r["attempts"] for r in mates] == [1] * 3
    assert len({r["batch_key"] for r in rows.values()}) == 1  # they shared the request

    snap = _mock(url)
    assert {a["record_id"] for a in snap["applied"]} == {r["record_id"] for r in mates}
    assert snap["requests"]["total"] == 1  # a rejected record is not retried
    [dead] = _audit(engine, "dead")
    assert dead["record_id"] == bad and dead["detail"]["code"] == "DOWNSTREAM_REJECTED"


def test_lost_reply_is_retried_with_the_same_key_and_applied_once(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    answers = _put(engine, new_partner(engine), _subs(3))
    clock = Clock()
    # One try per cycle, so the retry is the store's scheduled one, not an in-call one.
    worker = make_worker(clock=clock, inline_retries=1, retry_schedule=(5, 5, 5))

    faults.lost_reply_rate = 1.0
    assert worker.run_once() == 3
    faults.lost_reply_rate = 0.0
    snap = _mock(url)
    assert len(snap["applied"]) == 3  # the mock applied them ...
    assert snap["requests"]["by_status"] == {"503": 1}  # ... but the gateway saw a 503
    rows = _outbox(engine)
    assert {r["status"] for r in rows} == {"pending"}
    [key] = {r["batch_key"] for r in rows}
    assert _batches(engine)[key]["attempts"] == 1

    assert worker.run_once() == 0  # not due yet
    clock.advance(6)
    assert worker.run_once() == 3
    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert snap["requests"]["by_status"] == {"503": 1, "200": 1}
    assert len(snap["applied"]) == len(answers) == 3
    assert {a["idempotency_key"] for a in snap["applied"]} == {key}
    applied = {a["record_id"]: a["receipt_no"] for a in snap["applied"]}
    rows = _outbox(engine)
    assert {r["status"] for r in rows} == {"delivered"}
    assert {r["record_id"]: r["receipt_no"] for r in rows} == applied
    assert {r["batch_key"] for r in rows} == {key}


def test_transient_failure_is_scheduled_in_the_store_and_survives_a_restart(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    _put(engine, new_partner(engine), _subs(4))
    clock = Clock()
    settings = {"retry_schedule": (60, 60, 60), "inline_retries": 2}
    first = make_worker(clock=clock, **settings)

    faults.error_rate = 1.0
    assert first.run_once() == 4
    assert _requests(url) == 2  # the in-call retries, then the store's schedule takes over
    [batch] = _batches(engine).values()
    assert batch["status"] == "pending" and batch["attempts"] == 1
    assert batch["next_attempt_at"] == T0 + timedelta(seconds=60)
    assert batch["next_attempt_at"] > clock.now
    assert batch["last_error"] and "503" in batch["last_error"]
    assert batch["lease_owner"] is None
    rows = _outbox(engine)
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 1)}
    assert all("503" in r["last_error"] for r in rows)
    assert len(_audit(engine, "retry_scheduled")) == 4
    first.close()  # "crash": the schedule lives in the store, not in this object

    later = Clock(T0 + timedelta(seconds=30))
    second = make_worker(clock=later, **settings)
    assert second.run_once() == 0
    assert _requests(url) == 2  # nothing sent before next_attempt_at

    faults.error_rate = 0.0
    assert second.run_once() == 0  # recovered, but still not due
    later.advance(31)
    assert second.run_once() == 4
    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert {a["idempotency_key"] for a in snap["applied"]} == {batch["batch_key"]}
    rows = _outbox(engine)
    assert {(r["status"], r["attempts"]) for r in rows} == {("delivered", 2)}
    assert _batches(engine)[batch["batch_key"]]["status"] == "done"


def test_retries_exhausted_dead_letters_every_row(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    answers = _put(engine, new_partner(engine), _subs(3))
    clock = Clock()
    worker = make_worker(clock=clock, retry_schedule=(1,), delivery_max_attempts=3)
    faults.error_rate = 1.0

    for attempt in (1, 2):
        assert worker.run_once() == 3
        assert {(r["status"], r["attempts"]) for r in _outbox(engine)} == {("pending", attempt)}
        assert _audit(engine, "dead") == []
        clock.advance(1)
    assert worker.run_once() == 3
    rows = _outbox(engine)
    assert {(r["status"], r["error_code"]) for r in rows} == {("dead", "RETRIES_EXHAUSTED")}
    assert all(r["last_error"].startswith("3 attempts") for r in rows)
    [batch] = _batches(engine).values()
    assert (batch["status"], batch["attempts"]) == ("dead", 3)

    dead = _audit(engine, "dead")
    assert sorted(e["record_id"] for e in dead) == sorted(a.record_id for a in answers)
    assert {e["detail"]["code"] for e in dead} == {"RETRIES_EXHAUSTED"}

    # Dead letters are kept, never re-sent on their own.
    sent_so_far = _requests(url)
    assert sent_so_far == 3 * 2  # three attempts of two in-call tries each
    faults.error_rate = 0.0
    clock.advance(3600)
    assert worker.run_once() == 0
    assert _requests(url) == sent_so_far
    assert _mock(url)["applied"] == []


def test_rate_limit_retry_after_is_honoured_in_call(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    _put(engine, new_partner(engine), _subs(4))
    # The cap is above the mock's "Retry-After: 1"; the jittered wait alone would be ≤ 0.2 s.
    worker = make_worker(delivery_batch_size=2, inline_retries=3,
                         inline_retry_max_wait_seconds=3)
    faults.rate_limit_every = 2  # the 2nd, 4th, ... intake request gets 429 + Retry-After

    assert worker.run_once() == 2  # request 1: fine
    started = time.monotonic()
    assert worker.run_once() == 2  # request 2: 429; request 3 after Retry-After: fine
    waited = time.monotonic() - started
    assert waited >= 0.9, f"Retry-After: 1 not honoured (waited {waited:.2f}s)"

    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert snap["requests"]["by_status"] == {"200": 2, "429": 1}
    rows = _outbox(engine)
    assert {(r["status"], r["attempts"]) for r in rows} == {("delivered", 1)}
    assert {b["attempts"] for b in _batches(engine).values()} == {1}
    assert _audit(engine, "retry_scheduled") == []


def _refuse(faults: Faults, status: int, retry_after: str) -> None:
    """Every intake request answers ``status`` (429 or 503) with this ``Retry-After``."""
    faults.retry_after = retry_after
    if status == 429:
        faults.rate_limit_every = 1
    else:
        faults.start_outage()


def _welcome(faults: Faults) -> None:
    faults.rate_limit_every = 0
    faults.stop_outage()


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_a_long_retry_after_sets_the_next_attempt_and_nothing_is_sent_before_it(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker, status: int, form: str) -> None:
    """Retry-After: 3600 beyond the in-call cap: no in-call retry, next attempt in an hour."""
    url, faults = mock_ce
    answers = _put(engine, new_partner(engine), _subs(3))
    clock = Clock()
    # The schedule alone would try again after 5 s; its longest step (2 h) caps a Retry-After.
    worker = make_worker(clock=clock, inline_retries=3, retry_schedule=(5, 30, 7200))
    header = ("3600" if form == "seconds" else
              format_datetime(datetime.now(UTC) + timedelta(seconds=3600), usegmt=True))
    _refuse(faults, status, header)

    assert worker.run_once() == 3
    # One request: a worker neither sleeps an hour on its lease nor asks again in 0.05 s.
    assert _mock(url)["requests"]["by_status"] == {str(status): 1}
    [batch] = _batches(engine).values()
    slack = timedelta(seconds=0 if form == "seconds" else 5)  # an HTTP date has whole seconds
    due = T0 + timedelta(seconds=3600)
    assert (batch["status"], batch["attempts"], batch["lease_owner"]) == ("pending", 1, None)
    assert due - slack <= batch["next_attempt_at"] <= due
    assert f"HTTP {status}" in batch["last_error"] and "Retry-After" in batch["last_error"]
    rows = _outbox(engine)
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 1)}
    assert all("Retry-After" in r["last_error"] for r in rows)
    scheduled = _audit(engine, "retry_scheduled")
    assert sorted(e["record_id"] for e in scheduled) == sorted(a.record_id for a in answers)
    for event in scheduled:
        assert due - slack <= datetime.fromisoformat(event["detail"]["next_attempt_at"]) <= due
        assert 3600 - slack.total_seconds() - 1 <= event["detail"]["retry_after"] <= 3600
    assert {e["detail"]["status"] for e in _audit(engine, "attempt")} == {status}
    assert all(e["detail"]["retry_after"] > 3590 for e in _audit(engine, "attempt"))

    _welcome(faults)  # the downstream is back early; the gateway still keeps its word
    assert worker.run_once() == 0
    clock.advance(30)  # past the schedule's first two steps
    assert worker.run_once() == 0
    clock.advance(3600 - 30 - slack.total_seconds() - 1)
    assert worker.run_once() == 0
    assert _requests(url) == 1
    clock.advance(1 + slack.total_seconds())
    assert worker.run_once() == 3
    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert {a["idempotency_key"] for a in snap["applied"]} == {batch["batch_key"]}
    assert {(r["status"], r["attempts"]) for r in _outbox(engine)} == {("delivered", 2)}


def test_a_retry_after_beyond_the_longest_schedule_step_is_capped(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """A year-long Retry-After parks rows for the schedule's longest step, no longer."""
    url, faults = mock_ce
    _put(engine, new_partner(engine), _subs(2))
    clock = Clock()
    worker = make_worker(clock=clock, retry_schedule=(5, 30, 7200))
    _refuse(faults, 429, str(365 * 86400))

    assert worker.run_once() == 2
    [batch] = _batches(engine).values()
    assert batch["next_attempt_at"] == T0 + timedelta(seconds=7200)
    [event, _] = _audit(engine, "retry_scheduled")
    assert event["detail"]["retry_after"] == 365 * 86400  # what was asked is on record

    _welcome(faults)
    clock.advance(7200)
    assert worker.run_once() == 2
    assert _mock(url)["requests"]["by_status"] == {"429": 1, "200": 1}


def test_a_long_retry_after_holds_the_circuit_open_until_it_has_passed(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """The 503 that opens the circuit asked for an hour: no probe every reset period."""
    url, faults = mock_ce
    _put(engine, new_partner(engine), _subs(2, seed=1, prefix="A"))
    clock, mono = Clock(), MonoClock()
    worker = make_worker(clock=clock, retry_schedule=(5, 30, 7200))
    worker.breaker = CircuitBreaker(1, 30, clock=mono)
    _refuse(faults, 503, "3600")

    assert worker.run_once() == 2
    assert worker.breaker.state is CircuitState.OPEN
    assert worker.breaker.seconds_until_probe() == pytest.approx(3600)
    _welcome(faults)
    _put(engine, new_partner(engine), _subs(2, seed=2, prefix="B"))  # new rows, not yet batched
    mono.now += 30  # the reset period alone would let a probe out now
    clock.advance(30)
    assert worker.breaker.state is CircuitState.OPEN
    assert worker.run_once() == 0
    assert _requests(url) == 1

    mono.now += 3570
    clock.advance(3570)
    assert _drain(worker) == [2, 2, 0]  # the probe, then the rest
    assert worker.breaker.state is CircuitState.CLOSED
    _assert_once_and_in_order(_mock(url))
    assert {r["status"] for r in _outbox(engine)} == {"delivered"}


def test_versions_of_a_record_go_one_at_a_time_and_in_order(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    rng = random.Random(23)
    v1 = gen.canonical_submission(rng, "SRC-V", hours="8")
    other = gen.canonical_submission(rng, "SRC-O")
    [first] = _put(engine, partner, [v1])
    for hours in ("16", "24"):
        fixed = {**v1, "claimed": {**v1["claimed"], "quantity": hours}}
        [answer] = _put(engine, partner, [fixed])
        assert answer.record_id == first.record_id
    _put(engine, partner, [other])
    rid = first.record_id

    clock = Clock()
    a = make_worker(clock=clock, name="worker-a")
    b = make_worker(clock=clock, name="worker-b")
    claimed = a.claim()
    assert claimed is not None
    assert [(r["record_id"], r["version"]) for r in claimed.rows if r["record_id"] == rid] == [
        (rid, 1)]
    # While v1 is in flight (leased by A), nobody may take v2 or v3.
    assert b.claim() is None

    clock.advance(10)  # A's lease (5 s) lapses: B re-sends A's batch, then v2, then v3
    assert _drain(b) == [2, 1, 1, 0]

    snap = _mock(url)
    _assert_once_and_in_order(snap)
    mine = [x for x in sorted(snap["applied"], key=lambda x: x["seq"]) if x["record_id"] == rid]
    assert [m["version"] for m in mine] == [1, 2, 3]
    assert len({m["idempotency_key"] for m in mine}) == 3  # never two versions in one request
    assert mine[0]["idempotency_key"] == claimed.batch_key
    versions = httpx.get(f"{url}/_mock/applied/{rid}").json()["versions"]
    assert [v["record"]["claimed"]["quantity"] for v in versions] == ["8", "16", "24"]
    assert {r["status"] for r in _outbox(engine)} == {"delivered"}


def test_versions_never_in_flight_together_with_batches_of_one(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """Even when another worker forms the next batch, v2 waits until v1 has left pending."""
    url, _ = mock_ce
    partner = new_partner(engine)
    rng = random.Random(29)
    v1 = gen.canonical_submission(rng, "SRC-V", hours="8")
    [first] = _put(engine, partner, [v1])
    _put(engine, partner, [{**v1, "claimed": {**v1["claimed"], "quantity": "12"}}])
    _put(engine, partner, [gen.canonical_submission(rng, "SRC-O")])

    clock = Clock()
    a = make_worker(clock=clock, delivery_batch_size=1)
    b = make_worker(clock=clock, delivery_batch_size=1)
    in_a = a.claim()
    in_b = b.claim()
    assert in_a is not None and in_b is not None
    assert [(r["record_id"], r["version"]) for r in in_a.rows] == [(first.record_id, 1)]
    assert [r["record_id"] for r in in_b.rows] != [first.record_id]  # the other record
    assert b.claim() is None  # v2 still waits for v1

    clock.advance(10)
    assert sorted(_drain(a)[:-1]) == [1, 1, 1]
    _assert_once_and_in_order(_mock(url))


def test_whole_request_refused_is_split_until_the_bad_record_stands_alone(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    answers = _put(engine, new_partner(engine), _subs(4))
    bad = answers[1].record_id
    with engine.begin() as conn:
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == bad)).scalar_one()
        broken = orjson.loads(payload)
        del broken["version"]  # the mock answers 400 for the whole request
        conn.execute(update(record_versions).where(record_versions.c.record_id == bad)
                     .values(payload=orjson.dumps(broken).decode()))

    worker = make_worker()
    sent = _drain(worker)
    assert sent[0] == 4 and sent[-1] == 0

    rows = {r["record_id"]: r for r in _outbox(engine)}
    assert (rows[bad]["status"], rows[bad]["error_code"]) == ("dead", "DOWNSTREAM_REJECTED")
    assert "version" in rows[bad]["last_error"]
    assert rows[bad]["attempts"] >= 1  # refused alone, after the split: still an attempt
    good = {rid for rid in rows if rid != bad}
    assert {rows[rid]["status"] for rid in good} == {"delivered"}

    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert {a["record_id"] for a in snap["applied"]} == good
    # 4 → 2 + 2 → 1 + 1: three refused requests (every one holding the bad record), two good.
    assert snap["requests"]["by_status"] == {"400": 3, "200": 2}
    batches = _batches(engine).values()
    assert Counter(b["status"] for b in batches) == {"split": 3, "done": 2}
    assert all(b["parent_key"] for b in batches if b["status"] == "done")
    [dead] = _audit(engine, "dead")
    assert dead["record_id"] == bad
    assert len(_audit(engine, "split")) == 4 + 2  # the last refusal dead-letters, no split


def test_circuit_opens_stops_sending_and_a_probe_resumes_delivery(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    _put(engine, new_partner(engine), _subs(3))
    clock, mono = Clock(), MonoClock()
    worker = make_worker(clock=clock, inline_retries=2, retry_schedule=(5, 5, 5),
                         circuit_failure_threshold=2, circuit_reset_seconds=30)
    worker.breaker = CircuitBreaker(2, 30, clock=mono)

    faults.retry_after = "0"  # within the in-call cap (0.05 s here), so it is retried in-call
    faults.start_outage()
    assert worker.run_once() == 3
    assert worker.breaker.state is CircuitState.OPEN
    assert _requests(url) == 2

    faults.stop_outage()  # the downstream is back, but the breaker does not know yet
    clock.advance(10)  # the batch is due
    for _ in range(3):
        assert worker.run_once() == 0
    assert _requests(url) == 2  # nothing reached the mock while open
    assert {r["status"] for r in _outbox(engine)} == {"pending"}

    mono.now += 30  # reset period over: half-open, one probe
    assert worker.run_once() == 3
    assert worker.breaker.state is CircuitState.CLOSED
    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert snap["requests"]["by_status"] == {"503": 2, "200": 1}
    assert {r["status"] for r in _outbox(engine)} == {"delivered"}


def test_failed_probe_reopens_the_circuit(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    _put(engine, new_partner(engine), _subs(2))
    clock, mono = Clock(), MonoClock()
    worker = make_worker(clock=clock, inline_retries=3, retry_schedule=(5, 5, 5, 5))
    worker.breaker = CircuitBreaker(2, 30, clock=mono)

    faults.retry_after = "0"  # within the in-call cap (0.05 s here), so it is retried in-call
    faults.start_outage()
    assert worker.run_once() == 2
    assert _requests(url) == 2  # the breaker opened after two tries and cut the third
    clock.advance(10)
    mono.now += 30
    assert worker.run_once() == 2  # the probe ...
    assert _requests(url) == 3  # ... is a single request: no in-call retries while not closed
    assert worker.breaker.state is CircuitState.OPEN
    assert worker.run_once() == 0
    assert _requests(url) == 3


def test_a_probe_slot_is_not_lost_on_an_empty_due_batch(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """A half-open cycle that sends nothing must give the probe back, or the breaker sticks."""
    url, _ = mock_ce
    clock, mono = Clock(), MonoClock()
    worker = make_worker(clock=clock)
    worker.breaker = CircuitBreaker(1, 30, clock=mono)
    worker.breaker.record_failure()
    mono.now += 30
    with engine.begin() as conn:  # a due batch whose rows have all left it
        conn.execute(insert(delivery_batches).values(
            batch_key="e" * 32, status="pending", attempts=1, next_attempt_at=T0,
            created_at=T0, updated_at=T0))
    assert worker.run_once() == 0
    assert _batches(engine)["e" * 32]["status"] == "done"

    _put(engine, new_partner(engine), _subs(2))
    assert worker.run_once() == 2
    assert worker.breaker.state is CircuitState.CLOSED
    assert len(_mock(url)["applied"]) == 2


def test_a_leased_batch_is_not_claimable_until_the_lease_expires(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    _put(engine, new_partner(engine), _subs(3))
    clock = Clock()
    a = make_worker(clock=clock, name="worker-a", delivery_lease_seconds=20)
    b = make_worker(clock=clock, name="worker-b", delivery_lease_seconds=20)

    held = a.claim()  # ... and A crashes before sending
    assert held is not None and len(held.rows) == 3
    batch = _batches(engine)[held.batch_key]
    assert batch["lease_owner"] == "worker-a"
    assert batch["lease_until"] == T0 + timedelta(seconds=20)

    assert b.claim() is None
    clock.advance(19)
    assert b.claim() is None
    assert b.run_once() == 0
    assert _requests(url) == 0

    clock.advance(2)
    taken = b.claim()
    assert taken is not None
    assert taken.batch_key == held.batch_key
    assert [r["id"] for r in taken.rows] == [r["id"] for r in held.rows]
    assert _batches(engine)[held.batch_key]["lease_owner"] == "worker-b"
    assert a.claim() is None  # now B holds it

    clock.advance(21)  # B "crashes" too; whoever comes next sends it under the same key
    assert b.run_once() == 3
    snap = _mock(url)
    _assert_once_and_in_order(snap)
    assert {x["idempotency_key"] for x in snap["applied"]} == {held.batch_key}
    assert {r["status"] for r in _outbox(engine)} == {"delivered"}


def test_workers_claiming_side_by_side_never_share_rows(
        engine: Engine, new_partner: Callable[..., Partner], make_worker: MakeWorker) -> None:
    _put(engine, new_partner(engine), _subs(6))
    clock = Clock()
    workers = [make_worker(clock=clock, delivery_batch_size=2) for _ in range(4)]
    claims = [w.claim() for w in workers]
    got = [c for c in claims if c is not None]
    assert len(got) == 3 and claims[3] is None
    ids = [r["id"] for c in got for r in c.rows]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    owners: defaultdict[str, set[str]] = defaultdict(set)
    for r in _outbox(engine):
        owners[r["batch_key"]].add(r["record_id"])
    assert {k: len(v) for k, v in owners.items()} == {c.batch_key: 2 for c in got}


def test_a_management_system_that_trickles_its_answer_does_not_hold_the_worker(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Any]) -> None:
    """Headers a byte at a time, each within the read timeout: the post is cut off at 3 × it.

    Unbounded, the worker (and its batch's lease) would wait as long as the relay trickles;
    the lease would run out and another worker send the batch again while this one waits.
    """
    _put(engine, new_partner(engine), _subs(2))
    relay = SlowHeaders()
    settings = make_settings(db_url, relay.url, downstream_timeout_seconds=1.0, inline_retries=1,
                             retry_schedule=(60, 60, 60))
    worker = DeliveryWorker(make_engine(db_url), settings, clock=Clock())
    try:
        held, took, results = _held(worker.run_once, 4 * 1.0 + 3, relay.close)
    finally:
        worker.close()
        worker.engine.dispose()
    assert not held, f"the worker still waiting for the answer after {took:.1f} s"
    assert results == [2] and relay.requests == 1
    [batch] = _batches(engine).values()
    assert batch["status"] == "pending" and "took longer than 3 × 1 s" in batch["last_error"]
