"""Which writer failures ingest runs again (gateway.pipeline.ingest._may_retry).

A deadlock PostgreSQL broke, or a serialization failure, rolled the whole transaction back:
running it again is safe and is what the partner's request needs.  Any other database error
is not retried (a bug must not run four times).
"""

from __future__ import annotations

import psycopg.errors
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from gateway.pipeline.ingest import _KeyRaceLost, _may_retry


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
