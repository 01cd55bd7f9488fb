"""What every reader of :mod:`adapters.tabular` shares: row types, row errors, header names.

Also the whole-file errors (:class:`UnreadableFile` and its kinds), the per-cell and
per-record limits the readers apply alike, and :func:`detect_format`, which picks a reader
from a file's first bytes.  May touch: nothing (pure functions of their arguments).
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Literal

Format = Literal["csv", "xlsx", "ndjson"]
Cells = dict[str, object]
Row = tuple[int, Cells]

ROW_ERROR = "__error__"
ROW_ERROR_ZH = "__error_zh__"  # the same reason in Chinese, beside ROW_ERROR
HEAD_BYTES = 64 * 1024

_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # legacy .xls (BIFF) and other OLE2 files
_UTF8_BOM = codecs.BOM_UTF8

MAX_CELL_CHARS = 32_767  # Excel's own limit for one cell
MAX_RECORD_CHARS = 1 << 20  # one CSV record (characters) or NDJSON line (bytes)


class UnreadableFile(ValueError):
    """The file as a whole cannot be read (a broken workbook); its batch fails, with this."""


class UnsupportedFormat(UnreadableFile):
    """The file is of a kind the gateway does not read (e.g. a legacy ``.xls`` workbook)."""


class WorkbookTooLarge(UnreadableFile):
    """An XLSX workbook past a limit of the package docs (a ZIP bomb, a monstrous row)."""


def _too_long_cell(cells: Iterable[object]) -> bool:
    return any(isinstance(c, str) and len(c) > MAX_CELL_CHARS for c in cells)


def _broken(en: str, zh: str) -> Cells:
    """A broken row's cells: the reason in English, and in Chinese for the row error (SPEC §6)."""
    return {ROW_ERROR: en, ROW_ERROR_ZH: zh}


def _long_cell_error(number: int) -> Cells:
    return _broken(f"row {number}: a cell longer than {MAX_CELL_CHARS:,} characters",
                   f"第 {number} 行：有单元格超过 {MAX_CELL_CHARS:,} 个字符")


def row_error(cells: Mapping[str, object]) -> str | None:
    """The reader's reason when ``cells`` stands for a broken row, else ``None``."""
    if ROW_ERROR in cells:
        return str(cells[ROW_ERROR])
    return None


def row_error_zh(cells: Mapping[str, object]) -> str | None:
    """The reader's reason in Chinese, when it gave one."""
    value = cells.get(ROW_ERROR_ZH)
    return None if value is None else str(value)


# -- format detection -------------------------------------------------------------------------


def detect_format(
    head: bytes, filename: str | None = None, content_type: str | None = None
) -> Format:
    r"""The format of a file from its first bytes; the name and type only break a tie.

    ZIP magic (``PK\x03\x04``) → ``xlsx``; first non-space byte (after a BOM) ``{`` →
    ``ndjson``; anything else → ``csv``.  An empty head falls back to the file name's
    extension or the content type.  A legacy ``.xls`` (OLE2) raises :class:`UnsupportedFormat`:
    read as CSV it would give a screen of nonsense rows instead of one clear answer.
    """
    if head.startswith(_ZIP_MAGIC):
        return "xlsx"
    if head.startswith(_OLE_MAGIC):
        raise UnsupportedFormat("legacy .xls workbooks are not supported; save as .xlsx or CSV")
    body = head.removeprefix(_UTF8_BOM).lstrip()
    if body:
        return "ndjson" if body.startswith(b"{") else "csv"
    name = (filename or "").lower()
    kind = (content_type or "").lower()
    if name.endswith(".xlsx") or "spreadsheetml" in kind:
        return "xlsx"
    if name.endswith((".ndjson", ".jsonl")) or "ndjson" in kind or "jsonl" in kind:
        return "ndjson"
    return "csv"



# Characters that occupy no room and are no letter: a BOM, zero-width spaces and joiners.
_INVISIBLE = dict.fromkeys(map(ord, "\ufeff\u200b\u200c\u200d\u2060\u180e"))


def header_name(raw: object) -> str:
    """A header cell as the columns are named: NFKC, with no whitespace anywhere.

    Chinese forms pad two-character headers to align them ("姓　名", "学分 类别"); every
    column name of SPEC §8 is free of spaces, so folding them away loses nothing.
    """
    if raw is None:
        return ""
    name = str(raw).translate(_INVISIBLE)
    if not name.isascii():
        name = unicodedata.normalize("NFKC", name)
    return "".join(name.split())


def _header(cells: Iterable[object]) -> list[tuple[int, str]]:
    """(column index, name) of the usable header cells (package docs)."""
    seen: set[str] = set()
    columns: list[tuple[int, str]] = []
    for index, raw in enumerate(cells):
        name = header_name(raw)
        if name and name not in seen:
            seen.add(name)
            columns.append((index, name))
    return columns

