"""Driving the real delivery worker in tests: run its cycles until the outbox is drained."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker

MakeWorker = Callable[..., DeliveryWorker]  # the ``make_worker`` fixture (tests/conftest.py)


def drain(worker: DeliveryWorker, limit: int = 40) -> None:
    """Run the worker's cycles until one sends nothing; fail after ``limit`` busy cycles."""
    for _ in range(limit):
        if worker.run_once() == 0:
            return
    raise AssertionError(f"worker still busy after {limit} cycles")


def drain_at(engine: Engine, settings: Settings, when: datetime) -> None:
    """A worker whose clock reads ``when`` runs until a cycle sends nothing, then closes."""
    worker = DeliveryWorker(engine, settings, clock=lambda: when)
    try:
        while worker.run_once():
            pass
    finally:
        worker.close()
