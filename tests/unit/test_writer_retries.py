"""Which writer failures ingest runs again (gateway.pipeline.writer_retry._may_retry).

A deadlock PostgreSQL broke, or a serialization failure, rolled the whole transaction back:
running it again is safe and is what the partner's request needs.  Any other database error
is not retried (a bug must not run four times).  Each run again is counted by its cause.
"""

from __future__ import annotations

import psycopg.errors
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from gateway.metrics import WRITER_RETRIES
from gateway.pipeline.writer_retry import _KeyRaceLost, _may_retry, writer_retries

REGISTRY_VIEW = CollectorRegistry()  # the process-wide counter, read through a registry of ours
REGISTRY_VIEW.register(WRITER_RETRIES)


@pytest.mark.parametrize("exc", [
    OperationalError("UPDATE caps_ledger", {}, psycopg.errors.DeadlockDetected("deadlock")),
    OperationalError("UPDATE records", {}, psycopg.errors.SerializationFailure("serialize")),
    IntegrityError("INSERT INTO records", {}, psycopg.errors.UniqueViolation("twin")),
    _KeyRaceLost("k"),
], ids=["deadlock", "serialization", "unique", "key-race"])
def test_races_and_deadlocks_are_run_again(exc: BaseException) -> None:
    assert _may_retry(exc)


@pytest.mark.parametrize("exc", [
    OperationalError("SELECT 1", {}, psycopg.errors.AdminShutdown("down")),
    ProgrammingError("SELECT nope", {}, psycopg.errors.UndefinedColumn("nope")),
    ValueError("a bug"),
], ids=["shutdown", "programming", "bug"])
def test_other_failures_are_not(exc: BaseException) -> None:
    assert not _may_retry(exc)


@pytest.mark.parametrize(("exc", "cause"), [
    (OperationalError("UPDATE caps_ledger", {}, psycopg.errors.DeadlockDetected("d")), "deadlock"),
    (OperationalError("UPDATE records", {}, psycopg.errors.SerializationFailure("s")),
     "serialization"),
    (IntegrityError("INSERT INTO records", {}, psycopg.errors.UniqueViolation("twin")), "unique"),
    (_KeyRaceLost("k"), "key_race"),
], ids=["deadlock", "serialization", "unique", "key-race"])
def test_each_run_again_is_counted_by_its_cause(exc: BaseException, cause: str) -> None:
    """Ops see contention between replicas as ``ce_gateway_writer_retries_total{cause}``."""
    def count() -> float:
        return REGISTRY_VIEW.get_sample_value("ce_gateway_writer_retries_total", {"cause": cause}) or 0.0

    before, runs = count(), []
    for attempt in writer_retries():
        with attempt:
            runs.append(1)
            if len(runs) < 3:
                raise exc
    assert len(runs) == 3
    assert count() - before == 2  # two runs again; the third succeeded


def test_a_failure_that_is_not_run_again_is_not_counted() -> None:
    before = sum(s.value for m in REGISTRY_VIEW.collect() if m.name == "ce_gateway_writer_retries"
                 for s in m.samples if s.name.endswith("_total"))
    with pytest.raises(ValueError):
        for attempt in writer_retries():
            with attempt:
                raise ValueError("a bug")
    after = sum(s.value for m in REGISTRY_VIEW.collect() if m.name == "ce_gateway_writer_retries"
                for s in m.samples if s.name.endswith("_total"))
    assert after == before
