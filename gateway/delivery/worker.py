"""The delivery worker: outbox → management system, effectively once and in order (SPEC §7).

One cycle claims a *delivery batch* — a group of outbox rows sent together under one
``Idempotency-Key`` — by lease, sends it, and records the outcome:

* a due batch that failed before is re-sent whole, with the same key, so a reply lost after
  the management system applied it is answered from its idempotency cache, never applied twice;
* otherwise up to ``DELIVERY_BATCH_SIZE`` pending rows form a new batch; a row whose record has
  an earlier version still undelivered waits, so versions arrive in order;
* short in-call retries (tenacity, full jitter, ``Retry-After`` honoured) ride out blips; after
  them the batch's attempt count and next-attempt time go on its row, so a restart never resets
  the schedule; the last scheduled attempt dead-letters the rows with ``RETRIES_EXHAUSTED``;
* a ``Retry-After`` (429/503) longer than ``INLINE_RETRY_MAX_WAIT_SECONDS`` ends the in-call
  retries at once (a worker never sleeps on a lease for it, nor asks again sooner) and the next
  attempt is due after ``max(RETRY_SCHEDULE step, Retry-After)``; the Retry-After is capped at
  the schedule's longest step, so a hostile header cannot park rows for longer than our own
  longest back-off.  It shows in ``last_error`` and the ``attempt``/``retry_scheduled`` events;
* a per-record ``rejected`` receipt dead-letters that record only; a 400 on the whole request
  splits the batch in halves until the bad record stands alone;
* a circuit breaker stops claiming while the downstream keeps failing; when the failure that
  opens it carried a ``Retry-After`` (capped as above), it stays open that long before probing,
  so other rows are not sent into the back-off either (gateway/delivery/circuit.py).

Leases (``lease_owner``/``lease_until``, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL) let several
workers share one store; a crashed worker's batch is re-claimed when its lease expires.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy import Connection, Engine, and_, bindparam, exists, insert, or_, select, update
from sqlalchemy.orm import aliased
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_random_exponential,
)

from contracts.errors import message
from gateway import audit, metrics, upstream
from gateway.config import Settings
from gateway.delivery.circuit import CircuitBreaker, CircuitState
from gateway.delivery.policy import Action, classify, classify_exception, retry_after_seconds
from gateway.errors import PermanentDeliveryError, RetriableDeliveryError
from gateway.masking import mask_excerpt
from gateway.outage import Outage
from gateway.pipeline import caps
from gateway.pipeline.caps import REFUSED_FOR_GOOD
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.succession import reallocate_after_delivery
from gateway.pipeline.writer_retry import writer_retries
from gateway.store.tables import delivery_batches, outbox, record_versions

log = logging.getLogger(__name__)
INTAKE_PATH = "/api/v1/ce-records/batch"


@dataclass(frozen=True)
class Claimed:
    batch_key: str
    attempts: int
    rows: list[dict[str, Any]]  # outbox id, record_id, version (never_sent: see _form_batch)
    fresh: bool = False  # formed by this claim: nobody sent it before


@dataclass
class CycleStats:
    sent: int = 0
    delivered: int = 0
    dead: int = 0
    retried: int = 0
    http_calls: int = 0
    unexpected_duplicates: int = 0  # see DeliveryWorker._apply_receipts


@dataclass
class _Reply:
    action: Action
    status: int | None
    receipts: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    retry_after: float | None = None  # the last try's Retry-After, in seconds


RECEIPT_STATUSES = frozenset({"accepted", "duplicate", "rejected"})


def _readable(receipt: Any) -> bool:
    """A receipt as SPEC §5 writes it: a record id, a whole version, a status of the three."""
    if not isinstance(receipt, dict) or receipt.get("status") not in RECEIPT_STATUSES:
        return False
    record_id, version = receipt.get("record_id"), receipt.get("version")
    if not isinstance(record_id, str) or isinstance(version, bool):
        return False
    if isinstance(version, str):  # "1" as a number's text; not "²", nor 5,000 digits
        return version.isascii() and version.isdigit() and len(version) <= 18
    return isinstance(version, int)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class DeliveryWorker:
    def __init__(self, engine: Engine, settings: Settings, *, client: httpx.Client | None = None,
                 name: str | None = None, clock: Callable[[], datetime] | None = None) -> None:
        self.engine, self.settings = engine, settings
        self.name = name or worker_id()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._client = client or httpx.Client(base_url=settings.downstream_url,
                                              timeout=settings.downstream_timeout_seconds)
        self.breaker = CircuitBreaker(settings.circuit_failure_threshold,
                                      settings.circuit_reset_seconds)
        self.stats = CycleStats()
        self._rules = RulesConfig.from_settings(settings)
        self._stop = threading.Event()

    # -- claiming -------------------------------------------------------------------------
    def _lease(self, now: datetime) -> dict[str, Any]:
        return {"lease_owner": self.name,
                "lease_until": now + timedelta(seconds=self.settings.delivery_lease_seconds)}

    def claim(self) -> Claimed | None:
        now = self._clock()
        with self.engine.begin() as conn:
            return self._claim_due_batch(conn, now) or self._form_batch(conn, now)

    def _claim_due_batch(self, conn: Connection, now: datetime) -> Claimed | None:
        row = conn.execute(
            select(delivery_batches.c.batch_key, delivery_batches.c.attempts)
            .where(delivery_batches.c.status == "pending",
                   delivery_batches.c.next_attempt_at <= now,
                   or_(delivery_batches.c.lease_until.is_(None),
                       delivery_batches.c.lease_until < now))
            .order_by(delivery_batches.c.next_attempt_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if row is None:
            return None
        conn.execute(update(delivery_batches).where(delivery_batches.c.batch_key == row.batch_key)
                     .values(**self._lease(now), updated_at=now))
        rows = conn.execute(
            select(outbox.c.id, outbox.c.record_id, outbox.c.version)
            .where(outbox.c.batch_key == row.batch_key, outbox.c.status == "pending")
            .order_by(outbox.c.id)
        ).mappings().all()
        return Claimed(row.batch_key, int(row.attempts), [dict(r) for r in rows])

    def _form_batch(self, conn: Connection, now: datetime) -> Claimed | None:
        earlier = aliased(outbox)
        # "Not delivered, dead nor superseded" is "pending", said so that the
        # probe can only use the (record_id, version) index: with ``status = 'pending'`` and
        # stale statistics (a fresh table, a year-end burst) PostgreSQL probed through the
        # status index instead, comparing every pending row with every other — 0.6 s a claim
        # at 2,000 pending, quadratic beyond (measured; tests/e2e/test_scale_faults.py).
        waiting_for_earlier = exists().where(
            and_(earlier.c.record_id == outbox.c.record_id, earlier.c.version < outbox.c.version,
                 earlier.c.status.not_in(("delivered", "dead", "superseded"))))
        # Never sent: no attempt, no requeue after a reply without its receipt (last_error) and
        # no reprocess by ops (queued_at).  A "duplicate" for such a row is news (_apply_receipts).
        never_sent = and_(outbox.c.attempts == 0, outbox.c.last_error.is_(None),
                          outbox.c.queued_at.is_(None)).label("never_sent")
        rows = conn.execute(
            select(outbox.c.id, outbox.c.record_id, outbox.c.version, never_sent)
            .where(outbox.c.status == "pending", outbox.c.batch_key.is_(None), ~waiting_for_earlier)
            .order_by(outbox.c.id)
            .limit(self.settings.delivery_batch_size)
            .with_for_update(skip_locked=True)
        ).mappings().all()
        if not rows:
            return None
        key = uuid.uuid4().hex
        conn.execute(insert(delivery_batches).values(
            batch_key=key, status="pending", attempts=0, next_attempt_at=now, created_at=now,
            updated_at=now, **self._lease(now)))
        ids = [r["id"] for r in rows]
        conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(batch_key=key, updated_at=now))
        return Claimed(key, 0, [dict(r) for r in rows], fresh=True)

    # -- sending --------------------------------------------------------------------------
    def _body(self, rows: Sequence[dict[str, Any]]) -> bytes:
        with self.engine.connect() as conn:
            payloads = {
                (r.record_id, r.version): r.payload
                for r in conn.execute(select(record_versions.c.record_id, record_versions.c.version,
                                             record_versions.c.payload)
                                      .where(record_versions.c.record_id.in_([x["record_id"] for x in rows])))
            }
        parts = [payloads[(r["record_id"], r["version"])].encode() for r in rows]
        return b'{"records":[' + b",".join(parts) + b"]}"

    def _post_once(self, key: str, body: bytes) -> _Reply:
        self.stats.http_calls += 1
        started = time.perf_counter()
        try:
            # bounded as a whole: a management system (or a relay before it) that trickles its
            # answer would otherwise hold this worker, and its lease, for as long as it trickles
            response = upstream.bounded_request(
                self._client, "POST", INTAKE_PATH, content=body,
                headers={"Idempotency-Key": key, "Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            metrics.observe_delivery("transport_error", time.perf_counter() - started)
            classify_exception(exc)  # every httpx error is transient; others propagate
            self.breaker.record_failure()
            raise RetriableDeliveryError(f"{type(exc).__name__}: {exc}") from exc
        action = classify(response.status_code)
        metrics.observe_delivery(action.value, time.perf_counter() - started)
        if action in (Action.RETRY, Action.RATE_LIMITED):
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            self.breaker.record_failure(hold=min(retry_after or 0.0, self._retry_after_cap))
            reason = f"HTTP {response.status_code}"
            if retry_after is not None:
                reason += f" (Retry-After {retry_after:.0f} s)"
            raise RetriableDeliveryError(reason, status_code=response.status_code,
                                         retry_after=retry_after)
        self.breaker.record_success()
        if action is Action.SPLIT:
            raise PermanentDeliveryError(f"HTTP {response.status_code}: {mask_excerpt(response.text)}",
                                         status_code=response.status_code)
        receipts: list[dict[str, Any]] = []
        if action is Action.DELIVERED:
            try:
                listed = orjson.loads(response.content)["receipts"]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise RetriableDeliveryError("unreadable receipts", status_code=response.status_code) from exc
            if not isinstance(listed, list):
                raise RetriableDeliveryError("unreadable receipts", status_code=response.status_code)
            # A receipt that is not one of SPEC §5's (a dict naming a record, a whole version
            # and accepted | duplicate | rejected) says nothing: its row has no receipt.
            receipts = [r for r in listed if _readable(r)]
        elif action is Action.ALREADY_APPLIED:
            # 409 is success whatever its body; a body that repeats the first answer's receipts
            # still says which record was rejected and what each receipt number is.
            try:
                answer = orjson.loads(response.content)
                receipts = [r for r in answer.get("receipts", []) if _readable(r)]
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                receipts = []
        return _Reply(action, response.status_code, receipts)

    @property
    def _retry_after_cap(self) -> float:
        """The longest ``Retry-After`` obeyed: our own schedule's longest step."""
        return float(max(self.settings.retry_schedule))

    def _stop_in_call(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        too_long = (isinstance(exc, RetriableDeliveryError) and exc.retry_after is not None
                    and exc.retry_after > self.settings.inline_retry_max_wait_seconds)
        return too_long or state.attempt_number >= self.settings.inline_retries

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        jitter = wait_random_exponential(multiplier=0.2, max=self.settings.inline_retry_max_wait_seconds)
        if isinstance(exc, RetriableDeliveryError) and exc.retry_after is not None:
            return min(exc.retry_after, self.settings.inline_retry_max_wait_seconds)
        return float(jitter(state))

    def send(self, claimed: Claimed, body: bytes) -> tuple[_Reply, list[dict[str, Any]]]:
        """Send with short in-call retries; returns the final reply and every try's record."""
        tries: list[dict[str, Any]] = []
        retry_after: float | None = None  # the last try's, carried to the store's schedule

        def one_try() -> _Reply:
            nonlocal retry_after
            started = time.perf_counter()
            retry_after = None
            try:
                reply = self._post_once(claimed.batch_key, body)
                tries.append({"status": reply.status, "ms": round((time.perf_counter() - started) * 1000)})
                return reply
            except (RetriableDeliveryError, PermanentDeliveryError) as exc:
                tries.append({"status": exc.status_code, "error": exc.reason,
                              "ms": round((time.perf_counter() - started) * 1000)})
                if isinstance(exc, RetriableDeliveryError) and exc.retry_after is not None:
                    retry_after = exc.retry_after
                    tries[-1]["retry_after"] = exc.retry_after
                raise

        retrying = Retrying(
            retry=retry_if_exception_type(RetriableDeliveryError),
            stop=self._stop_in_call,
            wait=self._wait,
            retry_error_callback=lambda s: _Reply(Action.RETRY, None, retry_after=retry_after,
                                                  reason=str(s.outcome.exception()) if s.outcome else ""),
            before_sleep=lambda s: self._abort_if_open(),
        )
        try:
            return retrying(one_try), tries
        except PermanentDeliveryError as exc:
            return _Reply(Action.SPLIT, exc.status_code, reason=exc.reason), tries
        except _CircuitOpened as exc:
            return _Reply(Action.RETRY, None, reason=str(exc), retry_after=retry_after), tries

    def _abort_if_open(self) -> None:
        if self.breaker.state is not CircuitState.CLOSED:
            raise _CircuitOpened("circuit open: stop retrying in-call")

    # -- recording outcomes ---------------------------------------------------------------
    def run_once(self) -> int:
        """One cycle; returns how many records were sent (0 = nothing to do or circuit open)."""
        if not self.breaker.allow():
            return 0
        claimed = self.claim()
        if claimed is None:
            self.breaker.release_probe()
            return 0
        if not claimed.rows:
            self._finish_batch(claimed.batch_key)
            self.breaker.release_probe()  # nothing was sent: a half-open probe slot goes back
            return 0
        return self.deliver(claimed)

    def deliver(self, claimed: Claimed) -> int:
        """Send one claimed batch and record its outcome; returns how many records were sent."""
        body = self._body(claimed.rows)
        reply, tries = self.send(claimed, body)
        self.stats.sent += len(claimed.rows)
        self._record(claimed, reply, tries)
        return len(claimed.rows)

    def _finish_batch(self, key: str, status: str = "done") -> None:
        with self.engine.begin() as conn:
            conn.execute(update(delivery_batches).where(delivery_batches.c.batch_key == key)
                         .values(status=status, lease_owner=None, lease_until=None, updated_at=self._clock()))

    def _record(self, claimed: Claimed, reply: _Reply, tries: list[dict[str, Any]]) -> None:
        """Record a send's outcome in one transaction, run again after a deadlock (PostgreSQL).

        Losing it would be worse than slow: the batch would be sent again under its key, and
        the management system's "already applied" would then pass a refused record as delivered.
        """
        now = self._clock()
        stats = replace(self.stats)
        for attempt in writer_retries():
            with attempt:
                self.stats = replace(stats)  # a rolled-back attempt counted nothing
                self._record_once(claimed, reply, tries, now)
        # Counted once committed: a Prometheus counter cannot take a rolled-back attempt back.
        if unexpected := self.stats.unexpected_duplicates - stats.unexpected_duplicates:
            metrics.count_unexpected_duplicates(unexpected)

    def _record_once(self, claimed: Claimed, reply: _Reply, tries: list[dict[str, Any]],
                     now: datetime) -> None:
        events = [audit.Event("attempt", r["record_id"], r["version"], self.name,
                              {"batch": claimed.batch_key, "try": i + 1, **t})
                  for r in claimed.rows for i, t in enumerate(tries)]
        with self.engine.begin() as conn:
            if not self._may_record(conn, claimed, reply):
                audit.append(conn, events, now)  # the tries happened; their outcome is not ours
                return
            if reply.action in (Action.DELIVERED, Action.ALREADY_APPLIED):
                events += self._apply_receipts(conn, claimed, reply, now,
                                               first_send=claimed.fresh and len(tries) == 1)
            elif reply.action is Action.SPLIT:
                events += self._split(conn, claimed, reply, now)
            else:
                events += self._schedule_retry(conn, claimed, reply, now)
            # A record refused for good counts nowhere: its capped hours go to the rest of its
            # group (R10), in this transaction, so no allocation ever sees it half done.
            refused = [(e.record_id, e.version) for e in events
                       if e.kind == "dead" and e.detail.get("code") in REFUSED_FOR_GOOD
                       and e.record_id is not None and e.version is not None]
            # An older version applied only now (reprocessed after an outage) behind a current
            # one refused already: the management system counts it from now on (refused_pins).
            landed = {e.record_id: e.version for e in events if e.kind == "delivered"
                      and e.record_id is not None and e.version is not None}
            refused += [(rid, current) for rid, current in caps.refused_now(conn, landed).items()
                        if current > landed[rid]]
            events += reallocate_after_delivery(
                conn, self._rules, now, refused, actor=self.name,
                reason="refused downstream (DOWNSTREAM_REJECTED): its share goes to the others")
            audit.append(conn, events, now)

    def _may_record(self, conn: Connection, claimed: Claimed, reply: _Reply) -> bool:
        """Fencing: record this outcome only if it is still ours.

        Our lease may have run out while we sent (a stall longer than DELIVERY_LEASE_SECONDS)
        and another worker re-claimed the batch.  Then only a success is still news — the
        downstream applied the batch under its key — and only while nobody has finished the
        batch; a failure, a split or a retry schedule is the current holder's to decide.  The
        batch row is locked first, so a concurrent claim or record waits for us or we for it.
        """
        row = conn.execute(select(delivery_batches.c.status, delivery_batches.c.lease_owner)
                           .where(delivery_batches.c.batch_key == claimed.batch_key)
                           .with_for_update()).first()
        ours = row is not None and row.status == "pending" and (
            row.lease_owner == self.name
            or reply.action in (Action.DELIVERED, Action.ALREADY_APPLIED))
        if not ours:
            log.warning("delivery batch %s: lease lost to %s (status %s); %s outcome dropped",
                        claimed.batch_key, row.lease_owner if row else None,
                        row.status if row else None, reply.action.value)
        return ours

    def _dead(self, conn: Connection, row: dict[str, Any], code: str, reason: str,
              now: datetime, attempts: int) -> audit.Event:
        conn.execute(update(outbox).where(outbox.c.id == row["id"]).values(
            status="dead", error_code=code, last_error=reason[:2000], attempts=attempts,
            updated_at=now))
        self.stats.dead += 1
        return audit.Event("dead", row["record_id"], row["version"], self.name,
                           {"code": code, "reason": reason[:500], "message_zh": message(code)[1]})

    def _apply_receipts(self, conn: Connection, claimed: Claimed, reply: _Reply,
                        now: datetime, first_send: bool = False) -> list[audit.Event]:
        """Record each receipt; ``first_send``: this batch's one and only request so far.

        A ``duplicate`` receipt is success (SPEC §5), but for a version this store never sent
        before, on a batch's first request, it means the management system holds that number
        already, perhaps with other content: the store was restored from a backup without
        ``ce-gateway db restored``, or another gateway delivers to it.  Counted
        (``ce_gateway_delivery_unexpected_duplicates_total``), logged and marked
        ``unexpected`` on the ``delivered`` event for ops (docs/operations.md).
        """
        # Every receipt is _readable (send() kept no other).
        by_key = {(r["record_id"], int(r["version"])): r for r in reply.receipts}
        events: list[audit.Event] = []
        delivered: list[dict[str, Any]] = []
        unexpected: list[dict[str, Any]] = []
        unanswered: list[dict[str, Any]] = []
        for row in claimed.rows:
            receipt = by_key.get((row["record_id"], row["version"]))
            if reply.action is Action.ALREADY_APPLIED and receipt is None:
                # Applied before (the first answer was lost), and the 409 says no more of it.
                receipt = {"status": "duplicate", "receipt_no": None}
            if receipt is None:
                unanswered.append(row)  # not applied as far as we know: tried again, later
                continue
            if receipt.get("status") == "rejected":
                events.append(self._dead(conn, row, "DOWNSTREAM_REJECTED",
                                         str(receipt.get("reason") or "rejected"), now,
                                         claimed.attempts + 1))
                continue
            delivered.append({"oid": row["id"], "r_status": str(receipt.get("status")),
                              "r_no": receipt.get("receipt_no")})
            detail = {"receipt_no": receipt.get("receipt_no"),
                      "receipt_status": receipt.get("status"), "batch": claimed.batch_key}
            if (first_send and reply.action is Action.DELIVERED and row.get("never_sent")
                    and receipt.get("status") == "duplicate"):
                unexpected.append(row)
                detail["unexpected"] = True
            events.append(audit.Event("delivered", row["record_id"], row["version"], self.name,
                                      detail))
        if unexpected:
            self.stats.unexpected_duplicates += len(unexpected)
            log.warning("delivery batch %s: the management system already held %d record "
                        "version(s) this store never sent (first: %s version %s); was the store "
                        "restored from a backup without `ce-gateway db restored`, or does another "
                        "gateway deliver to it? (docs/operations.md, Backup and restore)",
                        claimed.batch_key, len(unexpected), unexpected[0]["record_id"],
                        unexpected[0]["version"])
        if delivered:
            # One executemany for the batch: a statement per row was most of a worker's time.
            conn.execute(update(outbox).where(outbox.c.id == bindparam("oid")).values(
                status="delivered", receipt_status=bindparam("r_status"),
                receipt_no=bindparam("r_no"), attempts=claimed.attempts + 1,
                delivered_at=now, updated_at=now), delivered)
            self.stats.delivered += len(delivered)
        conn.execute(update(delivery_batches).where(delivery_batches.c.batch_key == claimed.batch_key)
                     .values(status="done", attempts=claimed.attempts + 1, lease_owner=None,
                             lease_until=None, updated_at=now))
        if unanswered:
            # No receipt: a failed attempt for those rows, retried on the schedule and
            # dead-lettered after the last, as any failed delivery (review 35: they went straight
            # into the next batch, attempts unchanged, sent every poll for ever).  They move to a
            # batch of their own (a new key: the answer named nothing of theirs).
            rest = Claimed(self._child_batch(conn, claimed.batch_key, unanswered, now,
                                             attempts=claimed.attempts),
                           claimed.attempts, unanswered)
            events += self._schedule_retry(
                conn, rest, replace(reply, reason="no receipt for it in the reply",
                                    retry_after=None), now)
        return events

    def _child_batch(self, conn: Connection, parent_key: str, rows: list[dict[str, Any]],
                     now: datetime, attempts: int = 0) -> str:
        """A new batch (a new Idempotency-Key) for ``rows`` of ``parent_key``, due now."""
        key = uuid.uuid4().hex
        conn.execute(insert(delivery_batches).values(
            batch_key=key, status="pending", attempts=attempts, next_attempt_at=now,
            parent_key=parent_key, created_at=now, updated_at=now))
        conn.execute(update(outbox).where(outbox.c.id.in_([r["id"] for r in rows]))
                     .values(batch_key=key, updated_at=now))
        return key

    def _split(self, conn: Connection, claimed: Claimed, reply: _Reply,
               now: datetime) -> list[audit.Event]:
        conn.execute(update(delivery_batches).where(delivery_batches.c.batch_key == claimed.batch_key)
                     .values(status="split", attempts=claimed.attempts + 1, last_error=reply.reason,
                             lease_owner=None, lease_until=None, updated_at=now))
        if len(claimed.rows) == 1:
            return [self._dead(conn, claimed.rows[0], "DOWNSTREAM_REJECTED", reply.reason, now,
                               claimed.attempts + 1)]
        half = len(claimed.rows) // 2
        for part in (claimed.rows[:half], claimed.rows[half:]):
            # The refused request was not applied, so the halves may carry new keys.
            self._child_batch(conn, claimed.batch_key, part, now)
        return [audit.Event("split", r["record_id"], r["version"], self.name,
                            {"batch": claimed.batch_key, "reason": reply.reason[:300]})
                for r in claimed.rows]

    def _schedule_retry(self, conn: Connection, claimed: Claimed, reply: _Reply,
                        now: datetime) -> list[audit.Event]:
        attempts = claimed.attempts + 1
        ids = [r["id"] for r in claimed.rows]
        if attempts >= self.settings.max_attempts:
            conn.execute(update(delivery_batches).where(delivery_batches.c.batch_key == claimed.batch_key)
                         .values(status="dead", attempts=attempts, last_error=reply.reason,
                                 lease_owner=None, lease_until=None, updated_at=now))
            return [self._dead(conn, r, "RETRIES_EXHAUSTED",
                               f"{attempts} attempts; last: {reply.reason}", now, attempts)
                    for r in claimed.rows]
        delay = float(self.settings.retry_delay(attempts))
        if reply.retry_after is not None:  # the downstream's back-off, within our own longest
            delay = max(delay, min(reply.retry_after, self._retry_after_cap))
        due = now + timedelta(seconds=delay)
        conn.execute(update(delivery_batches).where(delivery_batches.c.batch_key == claimed.batch_key)
                     .values(attempts=attempts, next_attempt_at=due, last_error=reply.reason,
                             lease_owner=None, lease_until=None, updated_at=now))
        conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(
            attempts=attempts, last_error=reply.reason[:2000], updated_at=now))
        self.stats.retried += len(ids)
        detail: dict[str, Any] = {"attempts": attempts, "next_attempt_at": due.isoformat(),
                                  "reason": reply.reason[:300]}
        if reply.retry_after is not None:
            detail["retry_after"] = reply.retry_after
        return [audit.Event("retry_scheduled", r["record_id"], r["version"], self.name, dict(detail))
                for r in claimed.rows]

    # -- running ----------------------------------------------------------------------------
    def run_forever(self) -> None:
        log.info("delivery worker %s started", self.name)
        outage = Outage(log, "delivery cycle", min(5.0, self.settings.delivery_poll_seconds * 4))
        while not self._stop.is_set():
            try:
                sent = self.run_once()
                outage.succeeded()
            except Exception:  # the loop must survive a database blip; the row keeps state
                sent = 0
                self._stop.wait(outage.failed())
            if sent == 0:
                wait = self.settings.delivery_poll_seconds
                if self.breaker.state is CircuitState.OPEN:
                    wait = max(wait, min(self.breaker.seconds_until_probe(), 5.0))
                self._stop.wait(wait)
        log.info("delivery worker %s stopped", self.name)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._client.close()


class _CircuitOpened(Exception):
    pass
