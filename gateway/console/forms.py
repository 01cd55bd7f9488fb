"""Reading query strings and form fields for the console: a bad value is a Chinese 400 page.

Every parser raises :class:`ConsoleError` naming the field, never a bare exception, so a typo in
a URL shows a friendly page instead of a 500.  Times typed by an operator are in the console's
time zone (Asia/Shanghai) and become aware UTC datetimes here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from contracts.errors import CATALOGUE
from gateway.accounts import ADAPTERS_WITH_PUSH
from gateway.ops.common import FIRST_YEAR, LAST_YEAR
from gateway.revalidate import RevalidationFilter, RevalidationRefused

DELIVERY_STATUSES = ("pending", "delivered", "dead", "superseded")
ALL = "all"  # the status filter's 全部, spelled out so a link keeps it (an empty value is dropped)
MAX_TEXT = 64
MAX_REASON = 500
MAX_IDS = 500


class ConsoleError(Exception):
    """A page-level refusal: rendered as an HTML page with a Chinese title and message."""

    def __init__(self, status_code: int, title: str, message: str) -> None:
        super().__init__(f"{status_code} {title}: {message}")
        self.status_code, self.title, self.message = status_code, title, message


class LoginRequired(Exception):
    """No valid session: the browser is sent to the login page."""


def bad_param(name: str, why: str) -> ConsoleError:
    return ConsoleError(400, "参数有误", f"参数 “{name}” {why}")


def text(params: Mapping[str, Any], name: str, max_len: int = MAX_TEXT) -> str | None:
    """A short free-text parameter, stripped; empty → None."""
    raw = params.get(name)
    if raw is None:
        return None
    value = str(raw).strip()
    if not value:
        return None
    if len(value) > max_len:
        raise bad_param(name, f"过长（最多 {max_len} 个字符）")
    if any(ord(ch) < 32 for ch in value):  # NUL and friends: PostgreSQL cannot even compare them
        raise bad_param(name, "含有不可见控制字符")
    return value


def choice(params: Mapping[str, Any], name: str, allowed: Sequence[str]) -> str | None:
    value = text(params, name)
    if value is not None and value not in allowed:
        raise bad_param(name, f"只能是 {'、'.join(allowed)} 之一")
    return value


def integer(params: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = text(params, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise bad_param(name, "应为整数") from None
    if not low <= number <= high:
        raise bad_param(name, f"应在 {low} 到 {high} 之间")
    return number


def moment(params: Mapping[str, Any], name: str, zone: ZoneInfo, *, end_of_day: bool = False
           ) -> datetime | None:
    """``2026-03-01``, ``2026-03-01T08:30`` or a full ISO time; local unless it names a zone."""
    value = text(params, name)
    if value is None:
        return None
    try:  # a date alone, in any ISO form (2026-03-01, 20260301), as the CLI and API read it
        try:
            parsed, whole_day = datetime.combine(date.fromisoformat(value), time.min), True
        except ValueError:
            parsed, whole_day = datetime.fromisoformat(value), False
    except ValueError:
        raise bad_param(name, "应为日期（如 2026-03-01）或时间（如 2026-03-01T08:30）") from None
    # At the calendar's edges (0001-01-01 in +08:00, 9999-12-31 + 1 day) the arithmetic and the
    # UTC conversion overflow; no record lies outside these years anyway.
    if not FIRST_YEAR <= parsed.year <= LAST_YEAR:
        raise bad_param(name, f"的年份应在 {FIRST_YEAR} 到 {LAST_YEAR} 之间")
    if whole_day and end_of_day:  # "until 2026-03-01" means through that day: the next midnight
        parsed += timedelta(days=1)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise bad_param(name, f"的年份应在 {FIRST_YEAR} 到 {LAST_YEAR} 之间") from None


def period(params: Mapping[str, Any], zone: ZoneInfo) -> tuple[datetime | None, datetime | None]:
    """``since`` (inclusive) and ``until`` (through that day), in order."""
    since, until = moment(params, "since", zone), moment(params, "until", zone, end_of_day=True)
    if since and until and since >= until:
        raise bad_param("until", "应晚于开始时间")
    return since, until


def reason(params: Mapping[str, Any]) -> str | None:
    return text(params, "reason", MAX_REASON)


@dataclass(frozen=True)
class DeliveryQuery:
    """What the failed-deliveries page and the reprocess forms filter by (as typed)."""

    status: str | None = None
    adapter: str | None = None
    partner_id: str | None = None
    error_code: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    record_ids: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)  # the same, as strings for links and forms

    @property
    def empty(self) -> bool:
        return not any((self.status, self.adapter, self.partner_id, self.error_code, self.since,
                        self.until, self.record_ids))


def delivery_query(params: Mapping[str, Any], record_ids: Sequence[str], zone: ZoneInfo,
                   *, default_status: str | None = None) -> DeliveryQuery:
    """The filter fields of ``params``; a missing ``status`` means ``default_status``.

    ``status=all`` (or an empty ``status``, as older links have it) means every status.  ``raw``
    holds the filter as links and hidden fields carry it: the record ids too, and ``all`` for
    every status, so a pager link or a form does not fall back to ``default_status``.
    """
    status = (choice(params, "status", (*DELIVERY_STATUSES, ALL)) if "status" in params
              else default_status)
    status = None if status == ALL else status
    adapter = choice(params, "adapter", sorted(ADAPTERS_WITH_PUSH))
    since, until = period(params, zone)
    ids: dict[str, None] = {}  # in order, each once (a list's `in` was quadratic in the post)
    for value in record_ids:
        cleaned = text({"record_id": value}, "record_id")
        if cleaned:
            ids[cleaned] = None
            if len(ids) > MAX_IDS:
                raise bad_param("record_id", f"一次最多 {MAX_IDS} 条")
    query = DeliveryQuery(status=status, adapter=adapter, partner_id=text(params, "partner_id"),
                          error_code=text(params, "error_code"), since=since, until=until,
                          record_ids=tuple(ids))
    raw: dict[str, Any] = {k: text(params, k)
                           for k in ("adapter", "partner_id", "error_code", "since", "until")}
    raw["status"] = status or ALL
    raw["record_id"] = list(ids)
    return DeliveryQuery(**{**query.__dict__, "raw": raw})


REJECTION_FILTER_KEYS = ("adapter", "partner_id", "error_code", "batch_id", "since", "until")


@dataclass(frozen=True)
class RejectionQuery:
    """What the rejections list and the revalidation form filter by: open rejections."""

    filter: RevalidationFilter
    raw: dict[str, Any]  # as typed, for links, hidden fields and the summary

    @property
    def empty(self) -> bool:
        return not self.filter.as_dict()


def rejection_query(params: Mapping[str, Any], zone: ZoneInfo) -> RejectionQuery:
    """The filter fields of ``params`` (``POST /v1/records/revalidate``'s filter)."""
    adapter = choice(params, "adapter", sorted(ADAPTERS_WITH_PUSH))
    code = text(params, "error_code")
    if code is not None and code not in CATALOGUE:
        raise bad_param("error_code", "不是已知的错误码")
    since, until = period(params, zone)
    raw = {k: text(params, k) for k in REJECTION_FILTER_KEYS}
    try:
        flt = RevalidationFilter(partner_id=raw["partner_id"], adapter=adapter, error_code=code,
                                 batch_id=raw["batch_id"], since=since, until=until)
    except RevalidationRefused as exc:  # pragma: no cover - the checks above come first
        raise bad_param("filter", f"无效：{exc.message_zh}") from None
    return RejectionQuery(flt, raw)
