"""How a downstream answer is classified: a table, not an if-chain (SPEC §5 downstream).

``classify(status)`` and ``classify_exception(exc)`` turn an HTTP status or a transport
exception into an :class:`Action`; the worker acts on the action only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

import httpx


class Action(StrEnum):
    DELIVERED = "delivered"  # per-record receipts follow
    ALREADY_APPLIED = "already_applied"  # 409 on the batch: success; receipts if its body has them
    RETRY = "retry"  # transient: in-call retry, then the store's schedule
    RATE_LIMITED = "rate_limited"  # transient, honour Retry-After
    SPLIT = "split"  # the request as a whole is refused: bisect to find the bad record


STATUS_ACTIONS: dict[int, Action] = {
    200: Action.DELIVERED,
    201: Action.DELIVERED,
    409: Action.ALREADY_APPLIED,
    400: Action.SPLIT,
    413: Action.SPLIT,
    422: Action.SPLIT,
    429: Action.RATE_LIMITED,
    503: Action.RATE_LIMITED,
    # Misconfiguration on either side (credentials, URL): keep retrying on the schedule so
    # nothing is dead-lettered by a deployment slip; the circuit and alerts show it.
    401: Action.RETRY,
    403: Action.RETRY,
    404: Action.RETRY,
    408: Action.RETRY,
}

EXCEPTION_ACTIONS: tuple[tuple[type[BaseException], Action], ...] = (
    (httpx.TimeoutException, Action.RETRY),
    (httpx.TransportError, Action.RETRY),  # connection refused/reset, protocol errors
    (httpx.HTTPError, Action.RETRY),
)


def classify(status: int) -> Action:
    if status in STATUS_ACTIONS:
        return STATUS_ACTIONS[status]
    if 500 <= status < 600:
        return Action.RETRY
    if 200 <= status < 300:
        return Action.DELIVERED
    return Action.SPLIT


def classify_exception(exc: BaseException) -> Action:
    for kind, action in EXCEPTION_ACTIONS:
        if isinstance(exc, kind):
            return action
    raise exc


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Parse ``Retry-After`` (seconds or an HTTP date); ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
