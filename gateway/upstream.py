"""Reading an upstream API (the college's pull, the reference sync): retries and one request's bound.

:func:`retrying`: tenacity with full-jitter backoff; a ``Retry-After`` is honoured, and one
beyond ``PULL_RETRY_MAX_WAIT_SECONDS`` ends the run (the scheduler tries again) instead of
waiting less.

:func:`bounded_request`: httpx times out each phase and each read, never a whole request, so a
server that trickles its answer a byte at a time (a stuck proxy, a half-dead relay) holds the
caller - and the scheduled job's lease - for as long as it trickles.  This sends the request and
streams the answer, giving up once ``DEADLINE_TIMEOUTS`` × the timeout has passed or the answer
outgrows a size cap, with :class:`AnswerCutOff`: an httpx transport error, so each caller's
translation of httpx errors at its edge (a retriable pull or fetch error, an alert not sent)
applies unchanged.  The alerts' robot post uses it too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from gateway.config import Settings
from gateway.errors import RetriableUpstreamError

__all__ = ["DEADLINE_TIMEOUTS", "MAX_ANSWER_BYTES", "AnswerCutOff", "bounded_request", "retrying"]

# A whole request may take this many timeouts (connect, send, wait, read) before it is cut off.
DEADLINE_TIMEOUTS = 3
# An upstream page larger than this is refused unread: a page of PULL_PAGE_SIZE ≤ 1,000
# completions, or of reference items, is a few hundred KB.
MAX_ANSWER_BYTES = 32 * 1024 * 1024
# Headers that describe the body as sent on the wire, not as read (decoded, whole) here.
_WIRE_HEADERS = ("content-encoding", "content-length", "transfer-encoding")


class AnswerCutOff(httpx.TransportError):
    """The answer was not read whole within the request's deadline or its size cap."""


def bounded_request(client: httpx.Client, method: str, url: str, *,
                    timeout_seconds: float | None = None, max_bytes: int = MAX_ANSWER_BYTES,
                    **kwargs: Any) -> httpx.Response:
    """Send one request and read its answer whole, within ``DEADLINE_TIMEOUTS`` × ``timeout_seconds``.

    ``timeout_seconds`` defaults to the longest of the client's own phase timeouts (a client
    without any gets the size cap alone).  ``kwargs`` go to ``client.stream`` (``params``,
    ``json``, …); the client's per-phase timeouts still apply within the deadline.  The deadline
    is checked as each chunk arrives, so it is overrun by at most one read timeout.  Returns the
    answer as a read :class:`httpx.Response`; raises :class:`AnswerCutOff` (or another httpx
    error).
    """
    if timeout_seconds is None:
        phases = client.timeout.as_dict().values()
        timeout_seconds = max((t for t in phases if t is not None), default=None)
    deadline = (time.monotonic() + DEADLINE_TIMEOUTS * timeout_seconds
                if timeout_seconds is not None else float("inf"))
    with client.stream(method, url, **kwargs) as response:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise AnswerCutOff(f"the answer is {declared} bytes, over the cap of {max_bytes}",
                               request=response.request)
        chunks, size = [], 0
        for chunk in response.iter_bytes():  # decoded: the cap holds for a compressed body too
            size += len(chunk)
            if size > max_bytes:
                raise AnswerCutOff(f"the answer outgrew the cap of {max_bytes} bytes",
                                   request=response.request)
            if time.monotonic() > deadline:
                raise AnswerCutOff(f"the answer took longer than {DEADLINE_TIMEOUTS} × "
                                   f"{timeout_seconds or 0:g} s", request=response.request)
            chunks.append(chunk)
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _WIRE_HEADERS]
    return httpx.Response(response.status_code, headers=headers, content=b"".join(chunks),
                          request=response.request)


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
