"""How an operator's filter times read (gateway/ops/common.parse_when): API, CLI and console alike."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gateway.errors import PayloadRejected
from gateway.ops.common import parse_when

XINING = ZoneInfo("Asia/Shanghai")


@pytest.mark.parametrize("typed", ["2026-03-01", "20260301", " 2026-03-01 "])
def test_a_date_alone_is_the_whole_day_in_any_iso_form(typed: str) -> None:
    midnight = datetime(2026, 3, 1, tzinfo=XINING)
    assert parse_when(typed, "since") == midnight
    assert parse_when(typed, "until") == midnight + timedelta(days=1)  # through that day


@pytest.mark.parametrize("typed", ["2026-03-01T00:00", "2026-03-01 10:00", "2026-03-01T10:00+08:00"])
def test_a_time_is_that_moment_for_since_and_until_alike(typed: str) -> None:
    assert parse_when(typed, "since") == parse_when(typed, "until")
    assert parse_when(typed, "until") == datetime.fromisoformat(typed).replace(
        tzinfo=datetime.fromisoformat(typed).tzinfo or XINING)


@pytest.mark.parametrize("typed", ["2026-13-01", "yesterday", "1899-01-01"])
def test_what_is_no_time_is_refused_naming_the_field(typed: str) -> None:
    with pytest.raises(PayloadRejected) as refused:
        parse_when(typed, "until")
    assert refused.value.field == "until" and refused.value.message_zh


@pytest.mark.parametrize("typed", ["2026-03-01", "20260301", "2026-03-01T08:30",
                                   "2026-03-01T08:30+00:00", "2026-03-01 10:00"])
def test_the_console_reads_a_filter_time_as_the_cli_and_api_do(typed: str) -> None:
    """A reprocess or revalidation previewed in the console selects what the CLI then runs.

    The console took only a 10-character value for a whole day, so ``until=20260301`` left
    1 March out there and kept it in from the CLI (review 32).
    """
    from gateway.console.forms import period

    assert period({"since": typed}, XINING)[0] == parse_when(typed, "since")
    assert period({"until": typed}, XINING)[1] == parse_when(typed, "until")
