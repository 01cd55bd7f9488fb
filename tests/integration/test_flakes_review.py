"""Review of intermittent failures: what a loaded 2-core machine showed, made deterministic.

Chasing ``test_a_hung_parse_worker_is_given_up_on_and_the_batch_resumes``
(tests/integration/test_batch_crash_review.py), which also failed, about once in 14 runs, with
``OperationalError: database is locked`` on ``BEGIN IMMEDIATE`` after the 60 s busy timeout:
the SIGSTOP had landed while the parse worker read the reference data, and on SQLite that read
holds the store's write lock.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest
from sqlalchemy.engine import make_url

import gateway.reference as reference_module
from gateway.reference import ReferenceCache
from gateway.store.db import make_engine
from tests.support.keys import KEYS


def test_a_parse_worker_reading_the_reference_holds_no_sqlite_write_lock(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inside, release = threading.Event(), threading.Event()
    real = reference_module.latest_seq

    def hung_after(conn: object) -> int:  # the worker stops (SIGSTOP, a hang) inside the read
        seq = real(conn)  # type: ignore[arg-type]
        inside.set()
        release.wait(30)
        return seq

    monkeypatch.setattr(reference_module, "latest_seq", hung_after)
    worker_engine = make_engine(sqlite_url)  # as batch_parse._reference_cache: its own engine
    cache = ReferenceCache(worker_engine, KEYS)
    reader = threading.Thread(target=cache.current, name="parse-worker")
    reader.start()
    try:
        assert inside.wait(30), "the reference read never started"
        # Any writer of the store: ingest, the delivery worker, a batch chunk, a lease renewal.
        writer = sqlite3.connect(str(make_url(sqlite_url).database), timeout=1.0,
                                 isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("ROLLBACK")
        finally:
            writer.close()
    finally:
        release.set()
        reader.join(30)
        worker_engine.dispose()
