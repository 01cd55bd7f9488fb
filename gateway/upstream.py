"""Reading an upstream API (the college's pull, the reference sync): retries and one request's bound.

:func:`retrying`: tenacity with full-jitter backoff; a ``Retry-After`` is honoured, and one
beyond ``PULL_RETRY_MAX_WAIT_SECONDS`` ends the run (the scheduler tries again) instead of
waiting less.

:func:`bounded_request`: httpx times out each phase and each read, never a whole request, so a
server that trickles its answer a byte at a time (a stuck proxy, a half-dead relay) - its
headers or its body - holds the caller, and the scheduled job's lease, for as long as it
trickles (httpx has no total timeout: encode/httpx#1450).  This gives one request a deadline,
``DEADLINE_TIMEOUTS`` × the timeout: each socket read and write of the client's connections
waits at most until the deadline (:class:`_DeadlineBackend`), and the answer is streamed and
refused once it outgrows a size cap.  Either way the caller gets :class:`AnswerCutOff`, an httpx
transport error, so each caller's translation of httpx errors at its edge (a retriable pull or
fetch error, an alert not sent, a delivery retried) applies unchanged.  The alerts' robot post
and the delivery worker's post to the management system use it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import httpcore
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


# The deadline (time.monotonic()) of the bounded request this thread is sending, if any.
_DEADLINE: ContextVar[float | None] = ContextVar("upstream_deadline", default=None)


def _until_deadline(timeout: float | None, late: type[httpcore.TimeoutException]) -> float | None:
    """``timeout``, shortened to what is left of the current request's deadline."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise late("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the current request's deadline.

    httpcore reads a status line and headers in a loop of reads, each with the read timeout:
    a byte every few seconds never times out.  Here each read waits only until the deadline.
    """

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _until_deadline(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _until_deadline(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(
            ssl_context, server_hostname, _until_deadline(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend, opening :class:`_DeadlineStream` connections."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self.backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self.backend.connect_tcp(
            host, port, _until_deadline(timeout, httpcore.ConnectTimeout), local_address,
            socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self.backend.connect_unix_socket(
            path, _until_deadline(timeout, httpcore.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self.backend.sleep(seconds)


def _bind_deadlines(client: httpx.Client) -> None:
    """Open the client's connections through :class:`_DeadlineBackend` (once per client).

    httpx exposes no network backend (nor a total timeout), so this reaches its transports'
    httpcore pools: every ``httpx.HTTPTransport`` (the client's own and an environment proxy's
    mount) keeps one as ``_pool``, and httpcore opens each new connection with the pool's
    ``_network_backend``.  A connection the client opened before is not bounded: the clients
    here are the gateway's own, first used through :func:`bounded_request`.  Another transport
    (``httpx.MockTransport`` in tests) has no network to bound.
    """
    for transport in [client._transport, *client._mounts.values()]:  # noqa: SLF001 - see above
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is not None and not isinstance(backend, _DeadlineBackend):
            pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]


def bounded_request(client: httpx.Client, method: str, url: str, *,
                    timeout_seconds: float | None = None, max_bytes: int = MAX_ANSWER_BYTES,
                    **kwargs: Any) -> httpx.Response:
    """Send one request and read its answer whole, within ``DEADLINE_TIMEOUTS`` × ``timeout_seconds``.

    ``timeout_seconds`` defaults to the longest of the client's own phase timeouts (a client
    without any gets the size cap alone).  ``kwargs`` go to ``client.stream`` (``params``,
    ``json``, …); the client's per-phase timeouts still apply within the deadline, which bounds
    connecting, sending, waiting for the headers and reading them and the body alike.  Returns
    the answer as a read :class:`httpx.Response`; raises :class:`AnswerCutOff` (or another httpx
    error).
    """
    if timeout_seconds is None:
        phases = client.timeout.as_dict().values()
        timeout_seconds = max((t for t in phases if t is not None), default=None)
    deadline = (time.monotonic() + DEADLINE_TIMEOUTS * timeout_seconds
                if timeout_seconds is not None else None)
    _bind_deadlines(client)
    token = _DEADLINE.set(deadline)
    try:
        return _read_whole(client, method, url, max_bytes, timeout_seconds, kwargs)
    except httpx.TimeoutException as exc:
        if deadline is None or time.monotonic() < deadline:
            raise  # one phase's own timeout, within the deadline
        raise _late(timeout_seconds, exc.request) from exc
    finally:
        _DEADLINE.reset(token)


def _late(timeout_seconds: float | None, request: httpx.Request) -> AnswerCutOff:
    return AnswerCutOff(f"the answer took longer than {DEADLINE_TIMEOUTS} × "
                        f"{timeout_seconds or 0:g} s", request=request)


def _read_whole(client: httpx.Client, method: str, url: str, max_bytes: int,
                timeout_seconds: float | None, kwargs: dict[str, Any]) -> httpx.Response:
    deadline = _DEADLINE.get()
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
            if deadline is not None and time.monotonic() > deadline:  # an unbound connection
                raise _late(timeout_seconds, response.request)
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
