"""Masking of identity numbers in text and logs (SPEC §7 "identity numbers are masked in logs").

Pure string functions plus one :class:`logging.Filter`; no I/O of its own.  Everything that
writes an identity number into a log line, an audit text or an error message passes it
through :func:`mask_id` or :func:`mask_text` first.

- :func:`mask_id` — ``630102198704139126`` → ``630102********9126``.
- :func:`mask_text` — masks every 15- or 18-character identity-number-looking token.
- :func:`mask_excerpt` — the first characters of a partner's answer, masked before the cut.
- :class:`MaskingFilter` — masks a log record before any handler formats it.
- :func:`install_log_masking` — puts the filter on the root handlers and uvicorn's loggers.
"""

from __future__ import annotations

import logging
import re

__all__ = ["MaskingFilter", "install_log_masking", "mask_excerpt", "mask_id", "mask_text"]

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

_UVICORN_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error")

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
    if _FIFTEEN_DIGITS.search(text) is None:  # the common case, 3× cheaper than sub()
        return text
    return _ID_TOKEN.sub(lambda m: m.group(0) if m.group("own") else mask_id(m.group(0)), text)


def mask_excerpt(text: str, limit: int = 200) -> str:
    """The first ``limit`` characters of ``text`` (a partner's error body), masked.

    Masked before the cut: an identity number across the cut would otherwise keep up to 17
    of its digits, too short for :func:`mask_text` to know it later.  Masking keeps lengths,
    and an identity number that starts inside the excerpt ends within 18 characters of it.
    """
    return mask_text(text[: limit + 18])[:limit]


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


def _has_masking(filterer: logging.Filterer) -> bool:
    return any(isinstance(f, MaskingFilter) for f in filterer.filters)


def _add(filterer: logging.Filterer, flt: logging.Filter) -> None:
    if not _has_masking(filterer):
        filterer.addFilter(flt)


def install_log_masking() -> MaskingFilter:
    """Add :class:`MaskingFilter` to the root logger's handlers and uvicorn's loggers.

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
    return flt
