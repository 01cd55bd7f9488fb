"""Prometheus metrics (``GET /metrics``, text exposition): what ops graphs and alerts on.

The route is ``gateway/api/routes/metrics.py``; this module holds what it exposes.

Two kinds of numbers, kept apart:

* **Events counted where they happen** (records ingested, delivery attempts and their latency,
  batch rows processed): process-wide counters below, incremented by library code (ingest,
  the batch processor, the delivery worker) through :func:`count_ingested`,
  :func:`observe_delivery` and :func:`count_batch_rows`.  They are *not* in prometheus-client's
  global registry: each app registers them into its own :class:`CollectorRegistry`
  (:func:`build_registry`), so several apps in one test process never clash.  In production one
  process is one app, and Prometheus' ``instance`` label tells replicas apart; ``rate()``
  copes with the reset a restart brings.
* **State read at scrape time** (backlog size and oldest age, dead letters, pull lag): a
  :class:`StoreCollector` per app runs a few aggregate queries on indexed status columns when
  Prometheus scrapes; the circuit state comes from the in-process delivery worker.

Labels are partner ids, adapter names, statuses and outcomes only — bounded sets, never an
identity number, record id or any other personal datum.  ``/metrics`` needs no token: serve it
inside the network boundary only (the reverse proxy must not route it from outside).
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from gateway.store.db import snapshot

if TYPE_CHECKING:
    from contracts import RecordAnswer
    from gateway.delivery.worker import DeliveryWorker

__all__ = ["BATCH_ROWS", "CIRCUIT_VALUES", "DELIVERY_ATTEMPTS", "DELIVERY_LATENCY", "INGESTED",
           "WRITER_RETRIES", "CircuitCollector", "StoreCollector", "build_registry",
           "count_batch_rows", "count_ingested", "count_writer_retry", "observe_delivery"]

log = logging.getLogger(__name__)

# -- counted where it happens (process-wide; registered per app) --------------------------------

INGESTED = Counter(
    "ce_gateway_ingested_records", "Records answered by ingest (API, batch files, pulls), by status.",
    ["partner_id", "adapter", "status"], registry=None)
DELIVERY_ATTEMPTS = Counter(
    "ce_gateway_delivery_attempts",
    "HTTP posts to the management system, by outcome (the policy table's action, or "
    "transport_error).", ["outcome"], registry=None)
DELIVERY_LATENCY = Histogram(
    "ce_gateway_delivery_latency_seconds", "Time of one HTTP post to the management system.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0), registry=None)
BATCH_ROWS = Counter(
    "ce_gateway_batch_rows_processed", "Rows of batch files ingested (committed chunks).",
    ["partner_id", "adapter"], registry=None)
WRITER_RETRIES = Counter(
    "ce_gateway_writer_retries",
    "Store transactions run again after a lost race or a deadlock (ingest, withdrawals, ops "
    "conflict resolution, delivery outcomes, reprocessing), by cause.", ["cause"], registry=None)
UNEXPECTED_DUPLICATES = Counter(
    "ce_gateway_delivery_unexpected_duplicates",
    "Record versions the management system answered 'duplicate' for on this store's first "
    "send of them: it holds the number already (a store restored from a backup, or another "
    "gateway delivering to it).", registry=None)
PROCESS_COLLECTORS: tuple[Collector, ...] = (INGESTED, DELIVERY_ATTEMPTS, DELIVERY_LATENCY,
                                             BATCH_ROWS, WRITER_RETRIES, UNEXPECTED_DUPLICATES)

# The circuit breaker's state as a number (alert on > 0).
CIRCUIT_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


def count_ingested(partner_id: str, adapter: str, answers: Sequence[RecordAnswer]) -> None:
    """Count one committed ingest call's answers by status."""
    for status, n in Tally(answer.status.value for answer in answers).items():
        INGESTED.labels(partner_id, adapter, status).inc(n)


def observe_delivery(outcome: str, seconds: float) -> None:
    """One HTTP post to the management system: its outcome and how long it took."""
    DELIVERY_ATTEMPTS.labels(outcome).inc()
    DELIVERY_LATENCY.observe(seconds)


def count_unexpected_duplicates(n: int) -> None:
    UNEXPECTED_DUPLICATES.inc(n)


def count_batch_rows(partner_id: str, adapter: str, rows: int) -> None:
    BATCH_ROWS.labels(partner_id, adapter).inc(rows)


def count_writer_retry(cause: str) -> None:
    """A writer's transaction rolled back and runs again, counted by ``cause``.

    ``deadlock``, ``serialization``, ``key_race`` (a twin took an activity or a cap group
    first) or ``unique`` (a twin's row).
    """
    WRITER_RETRIES.labels(cause).inc()


# -- read at scrape time ------------------------------------------------------------------------

class StoreCollector(Collector):
    """Backlog, oldest pending age, dead letters and pull lag, queried when scraped."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None) -> None:
        self.engine = engine
        self._clock = clock or (lambda: datetime.now(UTC))

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("ce_gateway_store_up", "1 if the store answered this scrape's queries, else 0."),
            GaugeMetricFamily("ce_gateway_backlog_records", "Deliveries pending in the outbox."),
            GaugeMetricFamily("ce_gateway_backlog_oldest_age_seconds",
                              "Age of the oldest pending delivery (0 when none is pending)."),
            GaugeMetricFamily("ce_gateway_dead_letters", "Deliveries dead-lettered (status dead)."),
            GaugeMetricFamily("ce_gateway_pull_lag_seconds",
                              "Seconds since a pull source's last successful run.", labels=["source"]),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()  # names only: registering must not query the store

    def collect(self) -> Iterable[Metric]:
        from gateway.ops.overview import backlog, dead_letters, pull_lag  # avoids an import cycle

        up, size, age, dead, lag = self._families()
        now = self._clock()
        try:
            with snapshot(self.engine) as conn:  # one moment, and no SQLite write lock
                pending = backlog(conn)
                dead_count = dead_letters(conn)
                pulls = pull_lag(conn, now)
        except Exception:  # noqa: BLE001 - a scrape reports the store down, it does not fail
            log.warning("metrics: store queries failed", exc_info=True)
            up.add_metric([], 0.0)
            return [up]
        up.add_metric([], 1.0)
        size.add_metric([], float(pending.size))
        age.add_metric([], pending.oldest_age_seconds(now) or 0.0)
        dead.add_metric([], float(dead_count))
        for source, info in pulls.items():
            if info["lag_seconds"] is not None:
                lag.add_metric([source], float(info["lag_seconds"]))
        return [up, size, age, dead, lag]


class CircuitCollector(Collector):
    """The in-process delivery worker's circuit: 0 closed, 1 half-open, 2 open.

    No sample when this process runs no worker (``serve --no-worker``).
    """

    def __init__(self, worker: Callable[[], DeliveryWorker | None]) -> None:
        self._worker = worker

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("ce_gateway_circuit_state",
                                 "Delivery circuit breaker: 0 closed, 1 half-open, 2 open.")

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        worker = self._worker()
        if worker is not None:
            family.add_metric([], CIRCUIT_VALUES[worker.breaker.state.value])
        return [family]


def build_registry(worker: Callable[[], DeliveryWorker | None],
                   engine: Engine | None = None) -> CollectorRegistry:
    """One process's registry: its circuit, its store's state if ``engine``, then the counters.

    An app passes its engine; ``ce-gateway worker --metrics-port`` passes none (its backlog is
    the replicas' to report).  A scrape reads collectors in registration order, so the circuit
    comes first: a scrape that shows it open already counts every failed attempt that opened
    it (read after the store's queries, the counters could lag the circuit within one scrape).
    """
    registry = CollectorRegistry()
    registry.register(CircuitCollector(worker))
    if engine is not None:
        registry.register(StoreCollector(engine))
    for collector in PROCESS_COLLECTORS:
        registry.register(collector)
    return registry

