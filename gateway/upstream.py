"""Retry policy for reading an upstream API (the college's pull, the reference sync).

tenacity with full-jitter backoff; a ``Retry-After`` is honoured, and one beyond
``PULL_RETRY_MAX_WAIT_SECONDS`` ends the run (the scheduler tries again) instead of waiting less.
"""

from __future__ import annotations

import logging

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from gateway.config import Settings
from gateway.errors import RetriableUpstreamError


def retrying(settings: Settings, log: logging.Logger | None = None, what: str = "upstream") -> Retrying:
    cap = settings.pull_retry_max_wait_seconds
    jitter = wait_random_exponential(multiplier=0.2, max=cap)

    def failure(state: RetryCallState) -> BaseException | None:
        return state.outcome.exception() if state.outcome is not None else None

    def wait(state: RetryCallState) -> float:
        exc = failure(state)
        if isinstance(exc, RetriableUpstreamError) and exc.retry_after is not None:
            return exc.retry_after
        return float(jitter(state))

    def stop(state: RetryCallState) -> bool:
        exc = failure(state)
        too_long = isinstance(exc, RetriableUpstreamError) and (exc.retry_after or 0) > cap
        return too_long or state.attempt_number >= settings.pull_retries

    def before_sleep(state: RetryCallState) -> None:
        if log is not None:
            log.warning("%s failed (attempt %d): %s; retrying", what, state.attempt_number,
                        failure(state))

    return Retrying(retry=retry_if_exception_type(RetriableUpstreamError), stop=stop, wait=wait,
                    before_sleep=before_sleep, reraise=True)
