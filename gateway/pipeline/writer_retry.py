"""When a writer's transaction may simply run again, and how often it does.

Every writer of records runs in :func:`writer_retries`: ingest and withdrawals
(:mod:`gateway.pipeline.ingest`, :mod:`gateway.pipeline.withdraw`), ops edits and the delivery
worker.  A chunk's decisions rest on what it read: if a concurrent replica changed that first
(:class:`_KeyRaceLost`), won a unique row, or PostgreSQL broke a deadlock or a serialization
failure, the transaction was rolled back and runs again after a short random pause, at most
8 times.  Any other failure is raised (a bug must not run eight times).

It touches no table; each retry is counted by its cause in ``ce_gateway_writer_retries_total``.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, IntegrityError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from gateway import metrics


class _KeyRaceLost(Exception):
    """A concurrent writer changed what this chunk decided on: judge again.

    It claimed one of the chunk's natural keys first, withdrew a holder the chunk judged
    against, or changed a record the chunk versions; the transaction is rolled back.
    """


# PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back
# and may simply run again.  Cap groups are locked in one order, but a successor's group
# (succeed()) is locked after the chunk's own, so two writers can meet crosswise.
_RETRY_SQLSTATES = {"40P01": "deadlock", "40001": "serialization"}


def _retry_cause(exc: BaseException) -> str | None:
    """Why a writer may run again, or None.

    A concurrent twin won a race (an activity, a cap group, a unique row), or PostgreSQL broke
    a deadlock or a serialization failure.
    """
    if isinstance(exc, _KeyRaceLost):
        return "key_race"
    if isinstance(exc, IntegrityError):
        return "unique"
    if isinstance(exc, DBAPIError):
        return _RETRY_SQLSTATES.get(getattr(exc.orig, "sqlstate", None) or "")
    return None


def _may_retry(exc: BaseException) -> bool:
    return _retry_cause(exc) is not None


def _count_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    metrics.count_writer_retry(exc is not None and _retry_cause(exc) or "other")


def writer_retries() -> Retrying:
    """Run a lost race again after a short random pause (full jitter), counting it.

    Twins racing for one person's activities would otherwise meet again at once.  The count
    (``ce_gateway_writer_retries_total``) is how ops see contention between replicas.
    """
    return Retrying(retry=retry_if_exception(_may_retry), stop=stop_after_attempt(8),
                    wait=wait_random_exponential(multiplier=0.005, max=0.25),
                    before_sleep=_count_retry, reraise=True)
