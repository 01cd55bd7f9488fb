"""Driving the real delivery worker in tests: run its cycles until the outbox is drained."""

from __future__ import annotations

from collections.abc import Callable

from gateway.delivery.worker import DeliveryWorker

MakeWorker = Callable[..., DeliveryWorker]  # the ``make_worker`` fixture (tests/conftest.py)


def drain(worker: DeliveryWorker, limit: int = 40) -> None:
    """Run the worker's cycles until one sends nothing; fail after ``limit`` busy cycles."""
    for _ in range(limit):
        if worker.run_once() == 0:
            return
    raise AssertionError(f"worker still busy after {limit} cycles")
