"""The ``cadre_college`` adapter: Qinghai Cadre Network College (青海干部网络学院, SPEC §8).

The college is the only channel for public-subject hours (SPEC §4 R2).  The gateway pulls its
completions page by page (``gateway.pull.cadre_college``); this adapter turns one page item
into a canonical submission::

    xh   completion id         → source_record_id
    sfzh id number             → person.id_number (resident id)
    xm   name                  → person.name
    dwmc employer (optional)   → person.employer_name
    dqdm region code           → person.region_code
    kcbh course id             → activity.plan_id (provider_code is the college's "QHGBWY")
    kcmc course title          → activity.title
    xs   hours                 → claimed.quantity (unit hours)
    wcsj completed at          → activity.completed_on and year ("YYYY-MM-DD HH:MM:SS", Beijing)
    zsbh certificate (optional)→ evidence.certificate_no

Every item is a public-subject online course, passed.  The submission then goes through
:func:`~gateway.pipeline.validate.validate_submission`, so identity and contract rules apply
exactly as for any other partner; error fields name the college's own (pinyin) key.  Pure: no
I/O, and ``parse`` never raises for bad input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from adapters.base import Adapter, ParsedRow
from contracts import Note
from contracts.errors import message
from gateway.pipeline.validate import validate_submission

__all__ = ["NATIVE_FIELD", "PROVIDER_CODE", "REQUIRED_KEYS", "CadreCollegeAdapter", "item_to_row"]

PROVIDER_CODE = "QHGBWY"  # 青海干部网络学院
BEIJING = ZoneInfo("Asia/Shanghai")
REQUIRED_KEYS = ("xh", "sfzh", "xm", "dqdm", "kcbh", "kcmc", "xs", "wcsj")
OPTIONAL_KEYS = ("dwmc", "zsbh")
# Canonical field → the college's key, so an error names what the college sent.
NATIVE_FIELD = {
    "source_record_id": "xh",
    "person.id_number": "sfzh",
    "person.name": "xm",
    "person.employer_name": "dwmc",
    "person.region_code": "dqdm",
    "activity.plan_id": "kcbh",
    "activity.title": "kcmc",
    "claimed.quantity": "xs",
    "activity.completed_on": "wcsj",
    "year": "wcsj",
    "evidence.certificate_no": "zsbh",
}


class _Bad(ValueError):
    """One key's value cannot be read; carries the key for the SCHEMA note."""

    def __init__(self, key: str, detail: str, detail_zh: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key, self.detail, self.detail_zh = key, detail, detail_zh


def _schema(key: str, detail: str, detail_zh: str) -> Note:
    en, zh = message("SCHEMA")
    return Note(code="SCHEMA", field=key, message=f"{en} ({key}: {detail})",
                message_zh=f"{zh}（{key}：{detail_zh}）")


def _text(item: dict[str, Any], key: str) -> str:
    """A text value: strings and integers (ids sent as numbers) are read, anything else is not."""
    value = item.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad(key, f"expected text, got {type(value).__name__}",
                   f"应为文本，实际为 {type(value).__name__}")
    return str(value).strip()


def _hours(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise _Bad("xs", "hours must be a number", "学时必须是数字")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad("xs", "hours must be a finite number", "学时必须是有限数字")
    try:
        # Floats go through repr so 1.5 stays 1.5, not its binary expansion.
        hours = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        raise _Bad("xs", f"hours {str(value)[:20]!r} is not a number",
                   f"学时 {str(value)[:20]!r} 不是数字") from None
    if not hours.is_finite():
        raise _Bad("xs", "hours must be a finite number", "学时必须是有限数字")
    # One spelling per value (2, "2.0", 2.0 → "2"), so a resent page hashes the same.
    hours = hours.normalize() if hours else Decimal(0)
    exponent = hours.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0:
        try:
            hours = hours.quantize(Decimal(1))
        except InvalidOperation:
            raise _Bad("xs", "hours out of range", "学时超出范围") from None
    return hours


def completed_on(wcsj: Any) -> date:
    """The Beijing calendar day of ``wcsj`` ("YYYY-MM-DD HH:MM:SS", Beijing time).

    A naive time is Beijing time as the college documents it, so 00:05 stays on its own day
    (converting through UTC would move it to the day before).  A time with an explicit
    offset is converted to Beijing first.
    """
    if not isinstance(wcsj, str) or not wcsj.strip():
        raise _Bad("wcsj", "expected a time 'YYYY-MM-DD HH:MM:SS'",
                   "应为时间 'YYYY-MM-DD HH:MM:SS'")
    text = wcsj.strip()
    try:
        if len(text) < 10 or text[4] != "-" or text[7] != "-":
            raise ValueError(text)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _Bad("wcsj", f"{text[:40]!r} is not a time 'YYYY-MM-DD HH:MM:SS'",
                   f"{text[:40]!r} 不是 'YYYY-MM-DD HH:MM:SS' 格式的时间") from None
    if when.tzinfo is not None:
        when = when.astimezone(BEIJING)
    return when.date()


def _read(item: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Note]]:
    """Read every key; each unreadable one is its own ``SCHEMA`` note."""
    errors: list[Note] = []
    texts: dict[str, str] = {}
    for key in (*REQUIRED_KEYS, *OPTIONAL_KEYS):
        try:
            if key == "xs":
                texts[key] = str(_hours(item[key]))
            elif key == "wcsj":
                texts[key] = completed_on(item[key]).isoformat()
            else:
                texts[key] = _text(item, key)
        except _Bad as bad:
            errors.append(_schema(bad.key, bad.detail, bad.detail_zh))
    if errors:
        return None, errors
    person: dict[str, Any] = {"id_type": "resident_id", "id_number": texts["sfzh"],
                              "name": texts["xm"], "region_code": texts["dqdm"]}
    if texts["dwmc"]:
        person["employer_name"] = texts["dwmc"]
    return {
        "source_record_id": texts["xh"],
        "person": person,
        "year": date.fromisoformat(texts["wcsj"]).year,
        "category": "public",
        "activity_type": "online_course",
        "activity": {"title": texts["kcmc"], "provider_code": PROVIDER_CODE,
                     "plan_id": texts["kcbh"], "mode": "online", "completed_on": texts["wcsj"]},
        "claimed": {"quantity": texts["xs"], "unit": "hours", "details": {}},
        "evidence": {"certificate_no": texts["zsbh"] or None, "assessment": "passed"},
    }, []


def _missing_notes(item: dict[str, Any]) -> list[Note]:
    """Every required key that is absent or blank, one note each."""
    notes = []
    for key in REQUIRED_KEYS:
        value = item.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            notes.append(_schema(key, "required", "必填"))
    return notes


def item_to_row(item: Any, row: int | None = None) -> ParsedRow:
    """One page item → a canonical submission or coded ``SCHEMA`` notes; never raises."""
    if not isinstance(item, dict):
        return ParsedRow(row=row, raw=item, errors=[
            _schema("data", f"each item must be an object, got {type(item).__name__}",
                    f"每一项必须是对象，实际为 {type(item).__name__}")])
    missing = _missing_notes(item)
    if missing:
        return ParsedRow(row=row, raw=item, errors=missing)
    try:
        submission, errors = _read(item)
    except Exception as exc:  # noqa: BLE001 - the contract: one bad item never raises
        return ParsedRow(row=row, raw=item, errors=[
            _schema("data", f"the item could not be read ({type(exc).__name__})",
                    f"无法读取该项（{type(exc).__name__}）")])
    if submission is None:
        return ParsedRow(row=row, raw=item, errors=errors)
    v = validate_submission(submission)
    errors = [e.model_copy(update={"field": NATIVE_FIELD.get(e.field or "", e.field)})
              for e in v.errors]
    return ParsedRow(row=row, raw=item, submission=v.submission, errors=errors,
                     warnings=list(v.warnings))


class CadreCollegeAdapter(Adapter):
    """``parse`` takes one item of a completions page and yields exactly one row."""

    name: ClassVar[str] = "cadre_college"

    def parse(self, raw: Any) -> Iterator[ParsedRow]:
        yield item_to_row(raw)
