"""Cell normalization for partner files: text, numbers and dates as partners really write them.

Pure functions over the standard library; no I/O, no imports from ``gateway``.  Every parser
raises :class:`ValueError` with a message fit for a row error (the adapter wraps it in a
``SCHEMA`` note naming the column); nothing else escapes for any input.

- :func:`to_ascii_digits` — full-width digits, letters and spaces → ASCII (Unicode NFKC), stripped.
- :func:`cell_text` — any cell value (CSV string, Excel number, JSON value) → stripped text.
- :func:`parse_decimal` — ``"1,234.5"``, ``"２.５"``, ``" 3 "``, Excel floats → :class:`Decimal`.
- :func:`mangled_number` — why a record-number cell lost digits to Excel (or ``None``).
- :func:`parse_date` — the date forms of SPEC §8 (a time after them dropped), their full-width
  variants, Excel date cells, Excel serial numbers and yyyymmdd numbers → :class:`datetime.date`.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

__all__ = ["cell_text", "code_text", "loads_exact", "mangled_number", "parse_date", "parse_decimal",
           "show_value", "to_ascii_digits"]

# Lone surrogates come from undecodable bytes (``errors="surrogateescape"``); they are not text
# and could not be stored or serialised later.
_SURROGATES = re.compile("[\ud800-\udfff]")
_WHITESPACE = re.compile(r"\s+")

# A plain decimal, or one with thousands separators in their proper places ("1,234,567.5").
# "1,5" is refused rather than guessed (a decimal comma or a typo?).
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_GROUPED_NUMBER = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?")
# Floats read from Excel carry binary noise (0.1 + 0.2 = 0.30000000000000004); credits and
# hours never need more than this many places.
_FLOAT_PLACES = Decimal("1e-6")

# An optional time of day after any date form ("2026-03-05 08:30:00", "2026-03-05T08:30",
# "20260305 08:30", "2026年3月5日 08:30"): the date part counts, the time is dropped.
_CLOCK = r"[0-9]{1,2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?"
_TIME = r"(?:[ T]" + _CLOCK + ")?"
_DATE_FORMS = (
    # 2026-03-05, 2026/3/5, 2026.3.5 (one separator throughout)
    re.compile(r"(?P<y>[0-9]{4})(?P<sep>[-/.])(?P<m>[0-9]{1,2})(?P=sep)(?P<d>[0-9]{1,2})" + _TIME),
    # 20260305
    re.compile(r"(?P<y>[0-9]{4})(?P<m>[0-9]{2})(?P<d>[0-9]{2})" + _TIME),
    # 2026年3月5日, spaces allowed around the parts; the 日 is sometimes left off, and then a
    # time needs a space or T before it ("2026年3月508:30" would be day 50 or day 5?)
    re.compile(r"(?P<y>[0-9]{4})\s*年\s*(?P<m>[0-9]{1,2})\s*月\s*(?P<d>[0-9]{1,2})(?:\s*日)?"
               r"(?:(?:\s+|T|(?<=日))" + _CLOCK + ")?"),
)
_DATE_HELP = "expected a date like 2026-03-05, 2026/3/5, 20260305 or 2026年3月5日"

# A long number as Excel shows and exports it once the cell is a number ("2.02603E+16"): the
# sign is required, as Excel and Python always write it, so an id like "2026E01" stays an id.
_EXPONENT_FORM = re.compile(r"[0-9]+(?:\.[0-9]*)?[Ee][+-][0-9]{1,3}")
# Excel keeps 15 significant digits: a number cell of 16 digits or more has lost its tail
# (and a float cannot hold every integer past 2**53 ≈ 9.007e15 anyway).
_EXCEL_EXACT_BELOW = 1e15
_RETYPE = ("format the column as text and export again", "请将该列设为文本格式后重新导出")

# Excel's 1900 date system: serial 1 = 1900-01-01, and serial 60 is the 29 February 1900 that
# Lotus 1-2-3 invented and Excel kept.  From serial 61 on, day 0 is 1899-12-30.
_EXCEL_EPOCH = date(1899, 12, 30)
_EXCEL_MAX_SERIAL = 2958465  # 9999-12-31
# An 8-digit number is never a serial (they stop at 7 digits, and plausible years have 5:
# 10000 is 1927-10-18, 99999 is 2173-10-14): it is yyyymmdd, as an NDJSON 20260305 means.
_YYYYMMDD_FIRST, _YYYYMMDD_LAST = 10_000_000, 99_999_999


def to_ascii_digits(s: str) -> str:
    """Full-width digits, letters, punctuation and spaces → ASCII (NFKC), stripped.

    ``"６３０１０２"`` → ``"630102"``, ``"\u3000ＡＢ１\u3000"`` → ``"AB1"``.  Chinese characters are
    unchanged; roman-numeral signs fold too (``"Ⅱ类"`` → ``"II类"``).
    """
    if s.isascii():
        return s.strip()
    return unicodedata.normalize("NFKC", s).strip()


def code_text(s: str) -> str:
    """A code's text (identity numbers, region codes, record ids): folded, without any space.

    ``"ＪＤ－1 2"`` → ``"JD-12"``.
    """
    return "".join(to_ascii_digits(s).split())


def _check_text(s: str) -> str:
    if "\x00" in s:
        raise ValueError("contains a NUL character")
    if not s.isascii() and _SURROGATES.search(s):
        raise ValueError("contains bytes that are not valid text in the file's encoding")
    return s


def loads_exact(data: bytes | str, *, decimals: bool = False) -> Any:
    """JSON as orjson reads it, but integers beyond 64 bits kept exact.

    orjson reads ``20261127000000000001`` as the float ``2.0261127e+19``: two record numbers of
    twenty digits would become one id, and their records one (a correction of the other).
    Python's json keeps them as integers; it reads the rare document that has such a number
    again (orjson's errors, lone surrogates and all, are raised first, as before).

    ``decimals=True`` (a partner's pushed records, whose hours are decimals, never floats:
    SPEC §3): a document with any number that has a fraction or an exponent is read again
    with every such number a :class:`~decimal.Decimal`, so ``8.000000000000000001`` h is not
    taken as 8 h but refused by the contract as any other over-precise quantity is.  A number
    no double holds (``1e400``: valid JSON, which sets no range) is read so too, and refused
    with its record, not with the whole request.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if decimals and str(exc).startswith("number is infinity"):
            return _loads_decimal(data, exc)
        raise
    try:
        if decimals:
            return _loads_decimal(data, None) if _has_float(value) else value
        return json.loads(data) if _has_huge_number(value) else value
    except RecursionError:  # orjson reads 1,024 levels; Python's walk stops sooner
        raise _too_deep() from None


def _too_deep() -> orjson.JSONDecodeError:
    return orjson.JSONDecodeError("the document nests too deep", "", 0)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_decimal(data: bytes | str, orjson_error: orjson.JSONDecodeError | None) -> Any:
    """Python's json with decimal numbers.

    After an orjson error, that error again unless the number was the document's only fault
    (Python's json takes lone surrogates and NaN, which orjson refuses).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant)
        surrogate = orjson_error is not None and _has_surrogate(value)
    except (ValueError, RecursionError):
        raise (orjson_error or _too_deep()) from None
    if surrogate and orjson_error is not None:
        raise orjson_error
    return value


def _any_leaf(value: Any, test: Callable[[Any], bool], *, keys: bool = False) -> bool:
    """Whether ``test`` holds for a leaf of a JSON value (and, with ``keys``, an object's key)."""
    if isinstance(value, dict):
        return any((keys and test(k)) or _any_leaf(v, test, keys=keys) for k, v in value.items())
    if isinstance(value, list):
        return any(_any_leaf(v, test, keys=keys) for v in value)
    return test(value)


def _has_float(value: Any) -> bool:
    return _any_leaf(value, lambda leaf: isinstance(leaf, float))


def _has_surrogate(value: Any) -> bool:
    return _any_leaf(value, lambda leaf: isinstance(leaf, str) and not leaf.isascii()
                     and _SURROGATES.search(leaf) is not None, keys=True)


def _has_huge_number(value: Any) -> bool:
    return _any_leaf(value, lambda leaf: isinstance(leaf, float)
                     and (not math.isfinite(leaf) or abs(leaf) >= 2.0 ** 53))


def cell_text(value: object) -> str:
    """Any cell value → stripped text; ``None`` → ``""``.

    Excel stores numbers as floats, so a region code typed as a number arrives as ``630102`` or
    ``630102.0``: integral numbers are written without a decimal point.  Lists and objects
    (from NDJSON) are not text: :class:`ValueError`.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return _check_text(value.strip())
    if isinstance(value, bool):
        raise ValueError("expected text, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected text, got the number {value!r}")
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return repr(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    raise ValueError(f"expected text, got {type(value).__name__}")


def mangled_number(value: object, text: str) -> tuple[str, str] | None:
    """Why a record number cannot be trusted, in English and Chinese; ``None`` when it can.

    ``value`` is the cell as read, ``text`` its folded text.  Two rows whose long numbers
    Excel rounded alike would carry one id, and the second would replace the first person's
    record as a "correction", so such ids are refused: a float cell of 16 digits or more
    (Excel holds 15), and text in exponent form (``2.02603E+16``, what a CSV exported from
    such a cell says).  Integers are trusted: they come exact from NDJSON (:func:`loads_exact`).
    """
    if isinstance(value, float) and abs(value) >= _EXCEL_EXACT_BELOW:
        return (f"a number cell cannot hold this record number exactly ({show_value(value)}; "
                f"Excel keeps 15 digits): {_RETYPE[0]}",
                f"数值单元格无法准确保存该编号（{show_value(value)}，Excel 只保留15位有效数字），"
                f"{_RETYPE[1]}")
    if ("E" in text or "e" in text) and _EXPONENT_FORM.fullmatch(text) is not None:
        return (f"written in exponent form ({show_value(text)}): the number's digits are lost; "
                f"{_RETYPE[0]}",
                f"编号为科学计数法（{show_value(text)}），已丢失位数，{_RETYPE[1]}")
    return None


def show_value(value: object) -> str:
    """A short, always-printable rendering of a bad value for an error message."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return "'" + text.encode("utf-8", "replace").decode("utf-8") + "'"


def _from_float(value: float) -> Decimal:
    if not math.isfinite(value):
        raise ValueError(f"not a number: {value!r}")
    if value.is_integer() and abs(value) < 1e16:
        return Decimal(int(value))
    # repr is the shortest string that round-trips, so 2.5 → "2.5", never 2.5000000000000000001.
    exact = Decimal(repr(value))
    exponent = exact.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        rounded = exact.quantize(_FLOAT_PLACES)
        # Strip the zeros the quantize added, but never into exponent form ("1E+1").
        exact = rounded.normalize() if rounded != rounded.to_integral() else rounded.to_integral()
    return exact if exact else exact.copy_abs()  # -1e-9 rounds to -0: a zero has no sign


def parse_decimal(value: object) -> Decimal:
    """A number as partners write it → :class:`Decimal`; :class:`ValueError` otherwise.

    Accepts ``int``, ``float`` (Excel: via ``repr``, noise past 6 places rounded away),
    :class:`Decimal`, and text with full-width digits (``"２.５"``), spaces anywhere
    (``" 1 234 "``) and thousands commas in their places (``"1,234.5"``).  The text's own
    precision is kept (``"2.50"`` → ``Decimal("2.50")``).  A zero never has a sign
    (``"-0.0"`` → ``Decimal("0.0")``).  Refused: empty text, ``NaN`` and infinities, exponents
    (``"1e3"``), booleans, and ambiguous commas (``"1,5"``).
    """
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return _from_float(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"not a number: {value}")
        return value if value else value.copy_abs()
    if not isinstance(value, str):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    text = _WHITESPACE.sub("", to_ascii_digits(value))
    if not text:
        raise ValueError("expected a number, got an empty value")
    if _PLAIN_NUMBER.fullmatch(text) is None:
        if _GROUPED_NUMBER.fullmatch(text) is None:
            raise ValueError(f"not a number: {show_value(value)}")
        text = text.replace(",", "")
    try:
        number = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the patterns admit only valid literals
        raise ValueError(f"not a number: {show_value(value)}") from None
    # "-0" is zero: a signed zero would pass "not negative" and end as "-0.0" hours (one
    # truth test on the hot path, cheaper than looking for the minus sign first).
    return number if number else number.copy_abs()


def _excel_serial(serial: float) -> date:
    if not math.isfinite(serial):
        raise ValueError(f"not a date: {serial!r}")
    day = math.floor(serial)  # the fraction is the time of day
    if day < 1 or day > _EXCEL_MAX_SERIAL:
        raise ValueError(f"Excel date serial {serial!r} is out of range")
    if day == 60:
        raise ValueError("Excel date serial 60 is 1900-02-29, a day that does not exist")
    if day < 60:
        return date(1899, 12, 31) + timedelta(days=day)
    return _EXCEL_EPOCH + timedelta(days=day)


def _yyyymmdd(number: float) -> date:
    if isinstance(number, float) and not number.is_integer():
        raise ValueError(f"not a date: {number!r}; {_DATE_HELP}")
    y, md = divmod(int(number), 10_000)
    try:
        return date(y, *divmod(md, 100))
    except ValueError:
        raise ValueError(f"no such date: {number!r}") from None


def parse_date(value: object) -> date:
    """A date as partners write it → :class:`date`; :class:`ValueError` otherwise.

    Accepts ``2026-03-05``, ``2026/3/5``, ``2026.3.5``, ``20260305``, ``2026年3月5日`` (and
    ``2026年3月5``, ``2026 年 3 月 5 日``), each also in full-width characters and each
    optionally followed by a time of day (``2026-03-05 08:30:00``, ``2026年3月5日 08:30``;
    dropped, the date part counts); :class:`date` and :class:`datetime` objects (openpyxl's
    date cells); and numbers (``int`` or integral ``float``, from XLSX or NDJSON): 8 digits
    are yyyymmdd (``20260305``), anything else an Excel serial (``46086`` → 2026-03-05,
    1900 date system).  That is no guess: serials end at 2,958,465 (9999-12-31), 7 digits,
    and those of plausible years have 5.  Text made only of 5 digits is *not* read as a
    serial: a CSV cell is what the partner typed.  Impossible dates (``2026-02-30``,
    ``20261301``) are refused.
    """
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a date, got a boolean")
    if isinstance(value, (int, float)):
        if _YYYYMMDD_FIRST <= value <= _YYYYMMDD_LAST:
            return _yyyymmdd(value)
        return _excel_serial(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a date, got {type(value).__name__}")
    text = to_ascii_digits(value)
    if not text:
        raise ValueError("expected a date, got an empty value")
    for form in _DATE_FORMS:
        m = form.fullmatch(text)
        if m is not None:
            y, mo, d = int(m["y"]), int(m["m"]), int(m["d"])
            try:
                return date(y, mo, d)
            except ValueError:
                raise ValueError(f"no such date: {show_value(value)}") from None
    raise ValueError(f"not a date: {show_value(value)}; {_DATE_HELP}")
