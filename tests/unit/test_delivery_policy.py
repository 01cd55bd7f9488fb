"""The downstream answer table (SPEC §5 "Downstream") and ``Retry-After`` parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from gateway.delivery.policy import Action, classify, classify_exception, retry_after_seconds

NOW = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
REQUEST = httpx.Request("POST", "http://ce.example/api/v1/ce-records/batch")


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (200, Action.DELIVERED),
        (409, Action.ALREADY_APPLIED),
        (400, Action.SPLIT),
        (429, Action.RATE_LIMITED),
        (503, Action.RATE_LIMITED),
        (500, Action.RETRY),
        (502, Action.RETRY),
        (504, Action.RETRY),
    ],
)
def test_status_table(status: int, action: Action) -> None:
    assert classify(status) is action


def test_transient_and_permanent_are_told_apart() -> None:
    # A 409 is success, never a retry; a 400 is permanent, never a retry; 5xx never splits.
    assert classify(409) not in (Action.RETRY, Action.SPLIT)
    assert classify(400) not in (Action.RETRY, Action.RATE_LIMITED, Action.DELIVERED)
    assert all(classify(s) in (Action.RETRY, Action.RATE_LIMITED) for s in range(500, 600))


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectTimeout("connect timed out", request=REQUEST),
        httpx.ReadTimeout("read timed out", request=REQUEST),
        httpx.WriteTimeout("write timed out", request=REQUEST),
        httpx.PoolTimeout("pool timed out", request=REQUEST),
        httpx.ConnectError("connection refused", request=REQUEST),
        httpx.ReadError("connection reset", request=REQUEST),
        httpx.RemoteProtocolError("server disconnected", request=REQUEST),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transport_failures_are_retried(exc: httpx.HTTPError) -> None:
    assert classify_exception(exc) is Action.RETRY


def test_a_non_transport_exception_is_not_swallowed() -> None:
    # A bug in our own code must surface, not be retried for a day.
    with pytest.raises(KeyError):
        classify_exception(KeyError("payload"))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), (" 5 ", 5.0), ("0", 0.0), ("1.5", 1.5), ("-3", 0.0)],
)
def test_retry_after_in_seconds(value: str, seconds: float) -> None:
    assert retry_after_seconds(value, now=NOW) == seconds


def test_retry_after_as_http_date() -> None:
    later = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert later.endswith("GMT")
    assert retry_after_seconds(later, now=NOW) == pytest.approx(90.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    earlier = format_datetime(NOW - timedelta(minutes=5), usegmt=True)
    assert retry_after_seconds(earlier, now=NOW) == 0.0


def test_retry_after_http_date_without_zone_is_read_as_utc() -> None:
    # "-0000" is RFC 5322's "zone unknown"; email.utils answers a naive datetime for it.
    value = "Sun, 01 Mar 2026 08:00:30 -0000"
    assert retry_after_seconds(value, now=NOW) == pytest.approx(30.0)


@pytest.mark.parametrize("value", [None, "", "   ", "garbage", "soon", "Mon, 99 Foo 2026"])
def test_retry_after_absent_or_unreadable_is_none(value: str | None) -> None:
    assert retry_after_seconds(value, now=NOW) is None
