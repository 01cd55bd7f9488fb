"""Masking of identity numbers in text and logs (SPEC §7 "identity numbers are masked in logs").

Pure string functions plus one :class:`logging.Filter`; no I/O of its own.  Everything that
writes an identity number into a log line, an audit text or an error message passes it
through :func:`mask_id` or :func:`mask_text` first.

- :func:`mask_id` — ``630102198704139126`` → ``630102********9126``.
- :func:`mask_text` — masks every 15- or 18-character identity-number-looking token, and
  every identity number written in groups with white space between (``630102 1987 0413 9126``,
  tabs or line breaks too).
- :func:`masked` — a parsed structure (a payload, an audit detail) with every string and number
  masked, its shape kept: JSON text escapes a tab or a line break, so masking the text misses
  a number whose groups they split.
- :func:`mask_excerpt` — the first characters of a partner's answer, masked before the cut.
- :class:`MaskingFilter` — masks a log record before any handler formats it.
- :func:`redact_urls` — a URL's userinfo, query and fragment values and secret-named path
  parameters starred (a password, a robot key, an access token).
- :class:`UrlRedactingFilter` — redacts the URLs httpx logs with every request it sends.
- :func:`install_log_masking` — puts the filters on the root handlers, uvicorn's and httpx's
  loggers.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import Any

__all__ = ["MaskingFilter", "UrlRedactingFilter", "install_log_masking", "mask_excerpt", "mask_id",
           "mask_text", "masked", "redact_urls"]

# 17 digits + a digit or X (18-character resident id), or 15 digits (first-generation id);
# ``\d`` takes full-width digits too (partners' spreadsheets hold them), and so the X may be
# full-width (Ｘ, ｘ); never a slice of a longer digit run (an order number, a timestamp in ms, …).  The ids the
# gateway makes are matched first and kept whole: record and batch ids (``R``/``B`` + 24
# lowercase hex) and delivery keys (32 lowercase hex, a uuid4), each a whole token.  One in a
# few hundred holds a digit run of an identity number's shape between its hex letters, and
# masked it would name nothing in an audit text, an error or a log line.
_FIFTEEN_DIGITS = re.compile(r"\d{15}")
_ID_TOKEN = re.compile(r"(?P<own>(?<![0-9A-Za-z])(?:[RB][0-9a-f]{24}|[0-9a-f]{32})(?![0-9A-Za-z]))"
                       r"|(?<!\d)(?:\d{17}[\dXxＸｘ]|\d{15})(?!\d)")

# An identity number written in groups ("630102 1987 0413 9126", full-width digits and the
# ideographic space too): the adapters fold it and drop every white space (SPEC §8;
# adapters/rows.py ``text(code=True)``), so the number is valid, and the raw cell a rejection
# keeps shows it so.  A gap is therefore any white space the adapters drop — spaces, tabs, line
# breaks — but at most 16 characters, so :data:`_MAX_SPAN` stays bounded.  Unlike the unbroken
# token, whole groups are joined only into something shaped like a resident id — a region's
# first digit, a plausible birth date — so a row of hours, a date, or counts on separate lines
# are left alone.
_MAX_GAP = 16
_GAP = rf"\s{{1,{_MAX_GAP}}}"
# The pre-check: 15+ characters of digits and white space, from a digit.  It holds every
# number either pattern masks; a class run, it costs what ``\d{15}`` did (a pattern of 15 digits
# with optional gaps between was 2-6x slower on error messages and log lines).
_DIGIT_RUN = re.compile(r"\d[\d\s]{14,}")
_GROUP = re.compile(r"\d+[XxＸｘ]?")
_GROUPED = re.compile(rf"(?<![\dA-Za-z])\d+[XxＸｘ]?(?:{_GAP}\d+[XxＸｘ]?)+(?![\dA-Za-z])")
_MAX_SPAN = 18 + 17 * _MAX_GAP  # the longest an identity number written in groups can be

_UVICORN_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error")

# A URL in running text: scheme, then everything up to white space or a quote.  Its userinfo
# (``user:password@``) and each query value (a WeCom robot's ``key=``, DingTalk's
# ``access_token=``) are what a setting's URL may carry as a secret.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_USERINFO = re.compile(r"^([^:/?#]+://)[^/?#]*@")
_QUERY_ITEM = re.compile(r"(&)([^=&#]*)(=?)[^&#]*")
# ``name=value`` outside the query: in the fragment (an OAuth implicit grant's
# ``#access_token=``, a single-page app's ``#/cb?token=``) and in the path (``;token=``,
# ``&sig=`` with no ``?``), each after a ``;``, ``&``, ``/`` or ``?`` or at the start.
_PAIR = re.compile(r"(^|[;&/?])([^=;&/?#]*)=([^;&/?#]*)")
# A name that says its value is a secret: one of these words, whole or after ``_``/``-``
# (``token``, ``access_token``, ``client-secret``, ``api_key``; not ``monkey`` nor ``keyword``).
_SECRET_NAME = re.compile(r"(?:^|.*[_-])(?:token|secret|key|apikey|password|passwd|pwd|"
                          r"signature|sig|credential|auth|sessionid|jsessionid)$", re.IGNORECASE)

# Attributes every LogRecord has; anything else came from ``extra=`` and may be formatted.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def mask_id(id_number: str) -> str:
    """Mask an identity number, keeping just enough to recognise it.

    18 characters or more keep the first 6 (the region) and the last 4; shorter ones keep
    the first 2 and the last 2; 4 characters or fewer are starred completely, since
    keeping 2 + 2 would reveal them whole.
    """
    n = len(id_number)
    if n == 0:
        return ""
    if n >= 18:
        head, tail = 6, 4
    elif n > 4:
        head, tail = 2, 2
    else:
        return "*" * n
    return id_number[:head] + "*" * (n - head - tail) + id_number[n - tail :]


def mask_text(text: str) -> str:
    """Replace every identity-number-looking token in ``text`` with its masked form."""
    if _DIGIT_RUN.search(text) is None:  # the common case, 3× cheaper than sub()
        return text
    text = _GROUPED.sub(_mask_groups, text)
    if _FIFTEEN_DIGITS.search(text) is None:
        return text
    return _ID_TOKEN.sub(lambda m: m.group(0) if m.group("own") else mask_id(m.group(0)), text)


def _mask_groups(run: re.Match[str]) -> str:
    """Mask the identity numbers in a run of digit groups with white space between.

    A number is whole consecutive groups (two at least: one alone is the unbroken token's
    business) of 18 characters (the last may be X) or 15 digits (no digit alone), shaped like
    a resident id; the longest is taken first.  The white space stays; the digits are starred
    as :func:`mask_id` stars the number written without it.
    """
    text, base = run.group(0), run.start()
    groups = [(m.start() + base, m.group(0)) for m in _GROUP.finditer(run.group(0))]
    out, done, i = [], base, 0
    while i < len(groups):
        end = _id_groups(groups, i)
        if end is None:
            i += 1
            continue
        start, stop = groups[i][0], groups[end][0] + len(groups[end][1])
        out += [text[done - base:start - base], _star(text[start - base:stop - base])]
        done, i = stop, end + 1
    out.append(text[done - base:])
    return "".join(out)


def _id_groups(groups: list[tuple[int, str]], first: int) -> int | None:
    """The last group of the longest identity number starting at group ``first``, if any."""
    found, chars, lone = None, "", False
    for j in range(first, len(groups)):
        chars += groups[j][1]
        lone = lone or len(groups[j][1]) == 1
        if len(chars) > 18 or (chars[-1] in "XxＸｘ" and len(chars) != 18):
            break
        # A digit alone among 15 is more likely a list ("1 2 3 … 13") than an old id's groups.
        if j > first and (len(chars) == 18 or (len(chars) == 15 and not lone)) \
                and _shaped_like_an_id(chars):
            found = j
    return found


def _shaped_like_an_id(chars: str) -> bool:
    """A region code's first digit (1–8) and a birth date that can be (GB 11643; 15: yymmdd)."""
    digits = [unicodedata.digit(c, -1) for c in chars]
    if not 1 <= digits[0] <= 8:
        return False
    if len(chars) == 18:
        century, month, day = digits[6] * 10 + digits[7], digits[10:12], digits[12:14]
        if century not in (18, 19, 20):
            return False
    else:
        month, day = digits[8:10], digits[10:12]
    return 1 <= month[0] * 10 + month[1] <= 12 and 1 <= day[0] * 10 + day[1] <= 31


def _star(written: str) -> str:
    """``written`` (an identity number with white space) starred where :func:`mask_id` stars."""
    masked = iter(mask_id("".join(written.split())))
    return "".join(c if c.isspace() else next(masked) for c in written)


def masked(value: Any) -> Any:
    """``value`` with every identity-number-looking string or number masked, its shape kept.

    Walks the structure rather than masking its JSON text: a masked number inside JSON text
    (``1.28e+16`` → ``"1281…"``) would no longer parse.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        text = str(value)
        hidden = mask_text(text)
        return value if hidden == text else hidden
    if isinstance(value, dict):
        return {mask_text(str(key)): masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    return mask_text(value if isinstance(value, str) else str(value))


def mask_excerpt(text: str, limit: int = 200) -> str:
    """The first ``limit`` characters of ``text`` (a partner's error body), masked.

    Masked before the cut: an identity number across the cut would otherwise keep up to 17
    of its digits, too short for :func:`mask_text` to know it later.  Masking keeps lengths,
    and an identity number that starts inside the excerpt ends within 18 characters of it
    (:data:`_MAX_SPAN` when written in groups with white space between).
    """
    return mask_text(text[: limit + _MAX_SPAN])[:limit]


class MaskingFilter(logging.Filter):
    """Masks identity numbers in a record's message, exception and stack text.

    The message is rendered (``getMessage()``) and masked; when something was masked it
    becomes the record's ``msg`` and ``args`` are cleared.  One exception: when every
    argument can be masked in place and the message still renders (uvicorn's access log,
    whose formatter unpacks ``args`` positionally), the args are kept, masked, so that
    formatter keeps working.  Records with nothing to mask are left alone.  The filter never
    drops a record and is idempotent, so it may sit on loggers and handlers alike.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            rendered = record.getMessage()
        except Exception:  # a broken format string: keep the raw parts, masked
            rendered = f"{record.msg!s} {record.args!r}"
            record.msg, record.args = mask_text(rendered), ()
        else:
            if mask_text(rendered) != rendered:
                self._mask_message(record, rendered)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            # The traceback text is cached masked; the live exception is dropped because
            # formatters that re-render it (rich, sentry) would print the raw number again.
            record.exc_text = mask_text(record.exc_text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                record.__dict__[key] = mask_text(value)
        return True

    @staticmethod
    def _mask_message(record: logging.LogRecord, rendered: str) -> None:
        args = record.args
        if isinstance(args, tuple) and args and isinstance(record.msg, str):
            masked_args = tuple(mask_text(a) if isinstance(a, str) else a for a in args)
            msg = mask_text(record.msg)
            try:
                again = msg % masked_args
            except Exception:  # e.g. %d given a masked string
                again = None
            if again is not None and mask_text(again) == again:
                record.msg, record.args = msg, masked_args
                return
        record.msg, record.args = mask_text(rendered), ()


def redact_urls(text: str) -> str:
    """``text`` with every URL's secrets starred (``http://***@host/p;token=***?key=***#t=***``).

    Starred: the userinfo, every query value and every fragment value (``#access_token=…``),
    and in the path a ``name=value`` whose name says it is a secret (:data:`_SECRET_NAME`:
    ``;token=…``, ``&sig=…`` with no ``?``).  The path's other parts, the names and a fragment
    without ``=`` stay: they say which call it was.  A query item without ``=`` is starred whole
    (it may be a bare token).
    """
    if "://" not in text:
        return text
    return _URL.sub(_redact_url, text)


def _redact_url(url: re.Match[str]) -> str:
    text, trail = _split_trailing(url.group(0))
    without_userinfo = _USERINFO.sub(r"\1***@", text)
    before, hash_mark, fragment = without_userinfo.partition("#")
    head, mark, query = before.partition("?")  # an ``&`` in the path is not a query
    head = _PAIR.sub(lambda m: f"{m[1]}{m[2]}=***" if m[3] and _SECRET_NAME.match(m[2]) else m[0],
                     head)
    fragment = _PAIR.sub(lambda m: f"{m[1]}{m[2]}=***", fragment)
    if mark:
        query = _QUERY_ITEM.sub(lambda m: f"{m[1]}{m[2]}=***" if m[3] else f"{m[1]}***",
                                "&" + query)[1:]
    return f"{head}{mark}{query}{hash_mark}{fragment}{trail}"


def _split_trailing(url: str) -> tuple[str, str]:
    """``url`` without the prose punctuation that follows it: ``(see http://h/?k=v), then``.

    Trailing ``.,;:!`` and a closing bracket the URL did not open belong to the sentence, not
    to the last query value (they would be starred with it).
    """
    end = len(url)
    while end:
        last = url[end - 1]
        opener = {")": "(", "]": "["}.get(last)
        if last in ".,;:!" or (opener and url.count(opener, 0, end) < url.count(last, 0, end)):
            end -= 1
        else:
            break
    return url[:end], url[end:]


def _redacted_arg(arg: object) -> object:
    """A log argument as it renders, redacted, if its text holds a URL; else the argument itself."""
    text = str(arg)
    return redact_urls(text) if "://" in text else arg


class UrlRedactingFilter(logging.Filter):
    """Redacts the URLs in a record (:func:`redact_urls`): put on the ``httpx`` logger.

    httpx logs each request at INFO as ``HTTP Request: POST <full URL> …``: the URL of
    ``DOWNSTREAM_URL``, ``CADRE_COLLEGE_URL`` or ``ALERT_WEBHOOK_URL`` with whatever credentials
    it carries.  Arguments are replaced by their redacted text, so the message renders as before.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted_arg(a) for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact_urls(record.msg)
        return True


def _has_masking(filterer: logging.Filterer) -> bool:
    return any(isinstance(f, MaskingFilter) for f in filterer.filters)


def _add(filterer: logging.Filterer, flt: logging.Filter) -> None:
    if not _has_masking(filterer):
        filterer.addFilter(flt)


def install_log_masking() -> MaskingFilter:
    """Add :class:`MaskingFilter` to the root logger's handlers and uvicorn's loggers.

    And :class:`UrlRedactingFilter` to httpx's logger (the records of its own name: httpx
    logs on ``httpx`` itself).
    Idempotent: a logger or handler that already has a masking filter gets no second one.
    Handlers added to the root logger later are not covered; call this again after
    reconfiguring logging (uvicorn's own ``dictConfig`` keeps logger filters).
    """
    flt = MaskingFilter()
    for handler in logging.getLogger().handlers:
        _add(handler, flt)
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        _add(logger, flt)
        for handler in logger.handlers:
            _add(handler, flt)
    httpx_logger = logging.getLogger("httpx")
    if not any(isinstance(f, UrlRedactingFilter) for f in httpx_logger.filters):
        httpx_logger.addFilter(UrlRedactingFilter())
    return flt
