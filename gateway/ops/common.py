"""What the ops modules share: opaque keyset cursors, coded 409s, filter values, field edits.

Pure helpers, no I/O.  Errors are :class:`gateway.errors.PayloadRejected` subclasses, so the
API answers them coded (zh/en) and the CLI prints their message.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from gateway.errors import PayloadRejected
from gateway.masking import mask_text, masked

MAX_LIMIT = 500
_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,31}")


class OpsConflict(PayloadRejected):
    """The target is not in a state the action applies to (409, coded)."""

    status_code = 409
    default_code = "NOT_EDITABLE"


def record_changed(record_id: str, shown: int, current: int) -> OpsConflict:
    """RECORD_CHANGED: an action decided on version ``shown`` while ``current`` is the record's."""
    return OpsConflict("RECORD_CHANGED", detail=f"(record {record_id}: version {shown} was shown, "
                       f"version {current} is current)",
                       detail_zh=f"（记录 {record_id}：显示的是第 {shown} 版，当前为第 {current} 版）")


def refuse(field: str, detail: str, detail_zh: str) -> PayloadRejected:
    """A coded ``SCHEMA`` error naming the bad field (422), its detail in English and Chinese."""
    return PayloadRejected("SCHEMA", field=field, detail=f"({detail})", detail_zh=f"（{detail_zh}）")


def require_reason(reason: str | None) -> str:
    if reason is None or not reason.strip():
        raise refuse("reason", "a reason is required; it is kept in the audit trail",
                     "必须填写原因，原因会记入审计记录")
    if len(reason) > 1000:
        raise refuse("reason", "at most 1000 characters", "最多 1000 个字符")
    return reason.strip()


def check_text(field: str, value: str | None, max_length: int = 64) -> None:
    """A filter value PostgreSQL can compare: no NUL, not absurdly long."""
    if value is not None and ("\x00" in value or len(value) > max_length):
        raise refuse(field, f"at most {max_length} characters, no NUL",
                     f"最多 {max_length} 个字符，且不能含 NUL 字符")


def check_code(value: str | None) -> None:
    from contracts.errors import CATALOGUE

    if value is not None and (not _CODE.fullmatch(value) or value not in CATALOGUE):
        raise refuse("error_code", f"unknown error code {value[:40]!r}", f"未知的错误代码 {value[:40]!r}")


# Filter times are refused outside these years: at the calendar's edges a UTC conversion (or
# the database driver's) overflows, and no record of the gateway's lies there anyway.
FIRST_YEAR, LAST_YEAR = 2000, 2999
_YEARS = f"a time in the years {FIRST_YEAR}-{LAST_YEAR}"
_YEARS_ZH = f"须为 {FIRST_YEAR}-{LAST_YEAR} 年之间的时间"
# As instants, with a day's slack either side so that a time inside the years in any UTC
# offset (the console's end-of-day "until 2999-12-31" included) passes.
_EARLIEST = datetime(FIRST_YEAR, 1, 1, tzinfo=UTC) - timedelta(days=1)
_LATEST = datetime(LAST_YEAR + 1, 1, 1, tzinfo=UTC) + timedelta(days=1)


def check_aware(field: str, value: datetime | None) -> None:
    """A filter time: aware, and inside the years 2000-2999 in any time zone (else 422)."""
    if value is None:
        return
    if value.tzinfo is None or value.utcoffset() is None:
        raise refuse(field, "a time must carry a UTC offset", "时间须带 UTC 偏移量")
    try:
        instant = value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise refuse(field, _YEARS, _YEARS_ZH) from None
    if not _EARLIEST <= instant < _LATEST:
        raise refuse(field, _YEARS, _YEARS_ZH)


def limit_of(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise refuse("limit", f"between 1 and {MAX_LIMIT}", f"须在 1 到 {MAX_LIMIT} 之间")
    return limit


def parse_when(value: str | None, field: str, timezone: str = "Asia/Shanghai") -> datetime | None:
    """An ISO 8601 time or date as typed by an operator; without an offset it is ``timezone``.

    A bare date starts that day, except for ``until``: "until 2026-03-01" means through that
    day (the next midnight), as the console reads it, so a filter previewed there and run from
    the CLI or the API selects the same rows.
    """
    if value is None or value == "":
        return None
    text = value.strip()
    try:
        try:  # a date alone, in any ISO form (2026-03-01, 20260301): the whole day
            when, whole_day = datetime.combine(date.fromisoformat(text), time()), True
        except ValueError:
            when, whole_day = datetime.fromisoformat(text.replace("Z", "+00:00")), False
    except ValueError as exc:
        raise refuse(field, f"not an ISO 8601 date or time: {text[:40]!r}",
                     f"不是 ISO 8601 日期或时间：{text[:40]!r}") from exc
    if not FIRST_YEAR <= when.year <= LAST_YEAR:  # as typed: 2000-01-01 in +08:00 is fine
        raise refuse(field, _YEARS, _YEARS_ZH)
    if whole_day and field == "until":
        when += timedelta(days=1)
    when = when if when.tzinfo is not None else when.replace(tzinfo=ZoneInfo(timezone))
    check_aware(field, when)  # converts (inside a try) to be sure the database can take it
    return when


# -- keyset cursors --------------------------------------------------------------------------


CURSOR_ZH = "不是本列表给出的游标"


def encode_cursor(kind: str, *values: Any) -> str:
    """An opaque cursor: the list kind and the last item's sort key."""
    raw = orjson.dumps([kind, *values])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, kind: str, arity: int) -> list[Any] | None:
    """The sort key of a cursor made by :func:`encode_cursor` for ``kind``; bad → 422."""
    if cursor is None or cursor == "":
        return None
    try:
        if len(cursor) > 512:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = orjson.loads(raw)
    except (ValueError, binascii.Error, orjson.JSONDecodeError) as exc:
        raise refuse("cursor", "not a cursor this list gave out", CURSOR_ZH) from exc
    if not (isinstance(values, list) and len(values) == arity + 1 and values[0] == kind):
        raise refuse("cursor", "not a cursor this list gave out", CURSOR_ZH)
    # A crafted number past what a database integer holds would overflow the driver (a 500);
    # no cursor holds a boolean (JSON true is an int to isinstance, and PostgreSQL's 500).
    if any(isinstance(v, bool) or (isinstance(v, int) and not -(2**63) <= v < 2**63)
           for v in values[1:]):
        raise refuse("cursor", "not a cursor this list gave out", CURSOR_ZH)
    return values[1:]


def masked_source_id(source_record_id: str | None) -> str | None:
    """A partner's source id as lists show it: it may be an identity number; a rejection may have none."""
    return None if source_record_id is None else mask_text(source_record_id)


def iso(value: datetime | date | None) -> str | None:
    return None if value is None else value.isoformat()


# -- field edits ("reprocess with edit") -----------------------------------------------------


def apply_changes(raw: Mapping[str, Any], changes: Mapping[str, Any],
                  protected: frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``raw`` with ``changes`` applied, and the masked diff ``[{field, from, to}]``.

    A change's key is a dotted path (``"activity.title"``, ``"身份证号"``); its parents must be
    objects.  ``protected`` paths (and everything under them) may not change.  A change that
    changes nothing is left out of the diff; no diff at all is refused.
    """
    if not changes:
        raise refuse("changes", "no changes given", "没有给出任何修改")
    if len(changes) > 50:
        raise refuse("changes", "at most 50 fields at once", "一次最多修改 50 个字段")
    out = copy.deepcopy(dict(raw))
    diff: list[dict[str, Any]] = []
    for path, value in changes.items():
        parts = path.split(".")
        if not path or "\x00" in path or len(path) > 200 or any(not p for p in parts):
            raise refuse("changes", f"bad field path {path[:60]!r}", f"字段路径 {path[:60]!r} 无效")
        if any(path == p or path.startswith(p + ".") for p in protected):
            raise refuse(f"changes.{path}", "this field cannot be edited", "该字段不能修改")
        try:  # a value the store could not keep as JSON: an integer beyond 64 bits
            orjson.dumps(value)
        except TypeError:
            raise refuse(f"changes.{path}", "not a JSON value the record can hold "
                         "(integers must fit in 64 bits)",
                         "不是记录能保存的 JSON 值，整数须在 64 位范围内") from None
        node: Any = out
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise refuse(f"changes.{path}", f"{part!r} is not an object in the record",
                             f"记录中的 {part!r} 不是对象")
        before = node.get(parts[-1])
        if before == value and parts[-1] in node:
            continue
        node[parts[-1]] = value
        diff.append({"field": path, "from": masked(before), "to": masked(value)})
    if not diff:
        raise refuse("changes", "the changes change nothing", "这些修改没有改变任何内容")
    return out, diff
