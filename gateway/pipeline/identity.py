"""Identity numbers, credit codes and region codes (SPEC §3 ``person``).

Pure checks over python-stdnum; no I/O.  They answer with error and warning *codes* of
``contracts.errors``; :mod:`gateway.pipeline.validate` turns them into notes.

What is a hard rule and what is only a warning (SPEC §3):

- resident id (GB 11643): 18 characters, the check digit and a real birth date are hard
  rules → ``ID_NUMBER_INVALID``.  A region prefix missing from today's code list is only
  ``ID_REGION_UNKNOWN``: ids issued under abolished codes (Haidong's pre-2013 ``6321xx``)
  stay valid for life.
- unified social credit code (GB 32100): a failing check digit is ``USCC_INVALID``, a
  warning, because early pilot codes fail their own checksum.
- a record's ``region_code`` must be a known division, else ``REGION_UNKNOWN``.

Why not ``stdnum.cn.ric.validate`` alone: it also checks the birth *place*, judged against
the birth year, and raises the same ``InvalidComponent`` for a bad date and an unknown place
(and, in python-stdnum 2.2, a bare ``KeyError`` when only the province of a prefix is known).
So the steps are taken one by one here, and the place is judged against today's list.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from functools import lru_cache
from typing import NamedTuple
from zoneinfo import ZoneInfo

from stdnum import numdb
from stdnum.cn import ric, uscc
from stdnum.exceptions import (
    InvalidChecksum,
    InvalidComponent,
    InvalidFormat,
    InvalidLength,
    ValidationError,
)
from stdnum.util import isdigits

from gateway.masking import mask_id

__all__ = [
    "QINGHAI_PREFECTURES",
    "IdFinding",
    "check_resident_id",
    "check_uscc",
    "region_known",
    "resident_id_findings",
]

SHANGHAI = ZoneInfo("Asia/Shanghai")

# Qinghai's prefecture-level divisions today (SPEC §3).  Haidong became a prefecture-level
# city (630200) in 2013; its former prefecture code 632100 is abolished.
QINGHAI_PREFECTURES: dict[str, str] = {
    "630100": "西宁市",
    "630200": "海东市",
    "632200": "海北藏族自治州",
    "632300": "黄南藏族自治州",
    "632500": "海南藏族自治州",
    "632600": "果洛藏族自治州",
    "632700": "玉树藏族自治州",
    "632800": "海西蒙古族藏族自治州",
}
_QINGHAI_PREFIXES = frozenset(code[:4] for code in QINGHAI_PREFECTURES)

# Nobody alive and working was born before this; a checksum-valid "18xx" id is made up.
_EARLIEST_BIRTH = date(1900, 1, 1)
_SIX_DIGITS = re.compile(r"[0-9]{6}")
# One entry of stdnum's cn/loc data: "[1985-2013]民和回族土族自治县", "[2013-]海东市", "西宁市".
_PERIOD = re.compile(r"^\[(\d*)-(\d*)\]")


class IdFinding(NamedTuple):
    """One finding about an identity number: a code and a detail safe to show (masked)."""

    code: str
    detail: str
    detail_zh: str


@lru_cache(maxsize=8192)
def _stdnum_places(code: str) -> tuple[tuple[int | None, int | None], ...]:
    """The validity periods stdnum's birth-place data has for a 6-digit code; () = unknown."""
    info: dict[str, str] = {}
    for _part, props in numdb.get("cn/loc").info(code):
        info.update(props)
    county = info.get("county")
    if not county:  # unknown, or only the province is known
        return ()
    periods: list[tuple[int | None, int | None]] = []
    for entry in county.split(","):
        m = _PERIOD.match(entry)
        if m is None:
            periods.append((None, None))
        else:
            start, end = m.groups()
            periods.append((int(start) if start else None, int(end) if end else None))
    return tuple(periods)


def _in_qinghai_today(code: str) -> bool:
    return code in QINGHAI_PREFECTURES or code[:4] in _QINGHAI_PREFIXES


def region_known(code: str) -> bool:
    """Whether a 6-digit region code is a known administrative division.

    Known: a Qinghai prefecture, a county under one (same first 4 digits), or any code in
    stdnum's birth-place data, of any period — people move, so other provinces' codes are
    valid too.
    """
    if not isinstance(code, str) or not _SIX_DIGITS.fullmatch(code):
        return False
    return _in_qinghai_today(code) or bool(_stdnum_places(code))


def _region_current(code: str) -> bool:
    """Whether the code is in today's list: Qinghai's divisions or a still-open stdnum entry."""
    if _in_qinghai_today(code):
        return True
    return any(end is None for _start, end in _stdnum_places(code))


def _today() -> date:
    return datetime.now(SHANGHAI).date()


def _bad(detail: str, detail_zh: str) -> IdFinding:
    return IdFinding("ID_NUMBER_INVALID", detail, detail_zh)


def _slow_compact(number: str) -> str | None:
    try:
        return str(ric.compact(number))
    except (ValidationError, TypeError):
        return None


def _birth_date(compact: str) -> date:
    try:
        return date(int(compact[6:10]), int(compact[10:12]), int(compact[12:14]))
    except ValueError:
        raise InvalidComponent() from None


def resident_id_findings(number: str, *, today: date | None = None) -> list[IdFinding]:
    """Check a resident id; errors and warnings with details that show the id only masked.

    Lowercase ``x`` is accepted (stdnum upper-cases).  At most one ``ID_NUMBER_INVALID``;
    the region is judged only for an otherwise valid number.
    """
    if not isinstance(number, str):
        return [IdFinding("ID_NUMBER_INVALID", "not a text value", "不是文本")]
    # stdnum's compact() (strip spaces/dashes, upper-case) is a tenth of a batch row's cost;
    # a clean 18-character number, the usual case, needs only upper().
    compact = number.upper() if len(number) == 18 and number.isalnum() else _slow_compact(number)
    if compact is None:
        return [IdFinding("ID_NUMBER_INVALID", "not a text value", "不是文本")]
    shown = mask_id(compact)
    try:
        if len(compact) != 18:
            raise InvalidLength()
        if not isdigits(compact[:17]) or compact[17] not in "0123456789X":
            raise InvalidFormat()
        if compact[-1] != ric.calc_check_digit(compact):
            raise InvalidChecksum()
        born = _birth_date(compact)  # InvalidComponent when there is no such day
        if born > (today or _today()):
            raise InvalidComponent("the birth date lies in the future", "出生日期晚于今天")
        if born < _EARLIEST_BIRTH:
            raise InvalidComponent("the birth date lies before 1900", "出生日期早于1900年")
    except InvalidLength:
        n = len(compact)
        return [_bad(f"{shown}: 18 characters expected, got {n}", f"{shown}：应为18位，实际{n}位")]
    except InvalidFormat:
        return [
            _bad(f"{shown}: 17 digits and a digit or X expected", f"{shown}：应为17位数字加数字或X")
        ]
    except InvalidChecksum:
        return [_bad(f"{shown}: the check digit does not match", f"{shown}：校验码不符")]
    except InvalidComponent as exc:
        en, zh = (
            exc.args
            if len(exc.args) == 2
            else ("the birth date is not a real date", "出生日期不存在")
        )
        return [_bad(f"{shown}: {en}", f"{shown}：{zh}")]
    if not _region_current(compact[:6]):
        prefix = compact[:6]
        return [
            IdFinding(
                "ID_REGION_UNKNOWN", f"{shown}: region prefix {prefix}", f"{shown}：地区码 {prefix}"
            )
        ]
    return []


def check_resident_id(number: str, *, today: date | None = None) -> tuple[list[str], list[str]]:
    """Check a resident id: ``(error codes, warning codes)``.

    Errors: ``ID_NUMBER_INVALID`` for a wrong length or format, a bad check digit, or an
    impossible birth date (no such day, in the future, or before 1900).  Warnings:
    ``ID_REGION_UNKNOWN`` when the region prefix is not in today's code list.
    """
    errors: list[str] = []
    warnings: list[str] = []
    for finding in resident_id_findings(number, today=today):
        (warnings if finding.code == "ID_REGION_UNKNOWN" else errors).append(finding.code)
    return errors, warnings


def check_uscc(code: str) -> list[str]:
    """Check a unified social credit code: ``["USCC_INVALID"]`` when it fails, else ``[]``."""
    try:
        uscc.validate(code)
    except (ValidationError, TypeError, ValueError):
        return ["USCC_INVALID"]
    return []
