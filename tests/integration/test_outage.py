"""A background loop against an unreachable store logs the outage once, not every cycle.

The delivery worker and the batch processor go round every fraction of a second; each cycle
logged its failure with a traceback, hundreds a minute while the store was down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.outage import Outage
from gateway.store.db import make_engine

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens on port 1


def _failures(records: list[logging.LogRecord], what: str) -> list[logging.LogRecord]:
    return [r for r in records if what in r.getMessage() and "failed" in r.getMessage()]


@pytest.mark.parametrize("loop", ["delivery worker", "batch processor"])
def test_a_loop_on_an_unreachable_store_logs_one_traceback_and_backs_off(
        loop: str, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(UNREACHABLE, delivery_poll_seconds=0.05)
    engine = make_engine(UNREACHABLE)
    part: DeliveryWorker | BatchProcessor
    if loop == "delivery worker":
        part = DeliveryWorker(engine, settings)
        run: Callable[[], None] = part.run_forever
        what = "delivery cycle"
    else:
        part = BatchProcessor(engine, settings, name="outage-test")
        run = lambda: part.run_forever(poll_seconds=0.05)  # noqa: E731 - as Background runs it
        what = "batch processor cycle"
    caplog.set_level(logging.INFO)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(_failures(caplog.records, what)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        part.stop()
        thread.join(30)
        engine.dispose()
        if isinstance(part, DeliveryWorker):
            part.close()
    failures = _failures(caplog.records, what)
    assert len(failures) >= 4, [r.getMessage() for r in caplog.records]
    # A traceback is exc_info, or exc_text once the masking filter has rendered it.
    with_traceback = [r for r in failures if r.exc_info or r.exc_text]
    # The first failure of the run is logged whole; the rest in one line each, spaced out.
    assert with_traceback == failures[:1], [r.getMessage() for r in failures]
    assert all("failed again" in r.getMessage() for r in failures[1:])
    # The pause grows: after the n-th failure in a row it is first × 2^(n-1) (the worker's first
    # is 4 polls, the processor's one).  Lower bounds only: a loaded machine lengthens a gap,
    # and comparing gaps with each other failed there when one attempt happened to be slow.
    first = min(5.0, settings.delivery_poll_seconds * 4) if loop == "delivery worker" else 0.05
    gaps = [b.created - a.created for a, b in zip(failures[1:], failures[2:], strict=False)]
    assert all(gap >= first * 2 ** (n - 1) - 0.01 for n, gap in enumerate(gaps, start=2)), gaps


def test_an_outage_is_logged_once_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("gateway.test_outage")
    outage = Outage(log, "test cycle", first_pause=0.5, max_pause=3.0)
    caplog.set_level(logging.INFO)
    pauses = []
    for _ in range(5):
        try:
            raise ConnectionError("store down\nsecond line")
        except ConnectionError:
            pauses.append(outage.failed())
    outage.succeeded()
    outage.succeeded()  # a further success says nothing
    assert pauses == [0.5, 1.0, 2.0, 3.0, 3.0]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[1] == "test cycle failed again (2 in a row): ConnectionError: store down"
    assert len(messages) == 6 and messages[-1].startswith("test cycle works again after 5 failed")
