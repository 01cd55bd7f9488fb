"""Streaming readers for partner batch files (CSV, XLSX, NDJSON).

The helpers for adapters of file rows (:class:`~adapters.rows.TabularAdapter`,
:class:`~adapters.rows.RowBuilder`) live in :mod:`adapters.rows`.

Readers yield ``(row_number, cells)`` where ``cells`` maps a header to its cell, and hold one
row at a time whatever the file's size (STYLE.md, "the hot path"):

- Row numbers are what a person sees opening the file: the header is row 1 (the first row
  that is not blank) and data starts at row 2 (an XLSX sheet row; a CSV record, which is the file line unless a quoted cell holds a
  line break).  NDJSON has no header: its row number is the line number.  Blank rows (every
  cell empty) are skipped but still counted, so later numbers stay right.
- Header names are folded by :func:`header_name` (NFKC; whitespace, ideographic spaces
  included, and zero-width characters removed anywhere, so a padded "姓　名" names the 姓名
  column); empty header cells and repeats of an earlier header are ignored (the first column
  of a name wins).  A short row's missing cells are ``""``; XLSX empty cells are ``""`` too, so every format says "empty" the same way.
- **A broken row never stops the file.**  Instead of raising, a reader yields
  ``(row_number, {ROW_ERROR: "why"})`` — a one-key dict under the reserved header
  :data:`ROW_ERROR` (``"__error__"``), which no partner column uses.  Adapters turn it into a
  ``SCHEMA`` row error (see :func:`row_error`), so the batch processor needs no special case.
  It is used for a CSV record whose bytes are not valid in the file's encoding, a CSV syntax
  error, and an NDJSON line that is not a JSON object.

CSV encoding and delimiter are decided once per file, from its first 64 KiB (UTF-8 with or
without a BOM, UTF-16 with a BOM, GB18030): :mod:`adapters.tabular.csv_reader` says how.

**Limits** (a hostile file must not exhaust memory; every reader holds one bounded row):

- A cell over :data:`MAX_CELL_CHARS` (32,767, Excel's own limit for a cell) is a row error.
- A CSV record or NDJSON line over :data:`MAX_RECORD_CHARS` (1 Mi characters; bytes for
  NDJSON) is a row error: lines are read in bounded pieces and the rest of the offending line
  is skipped unread into memory.  Python's ``csv`` also refuses one field over 131,072
  characters (``csv.field_size_limit``), which becomes a row error too.
- An XLSX workbook is checked before openpyxl parses it (:func:`xlsx_census`), from the sizes
  its ZIP directory declares (decompression never runs past them) and one streaming pass over
  the first sheet's XML: more than :data:`MAX_XLSX_UNPACKED_BYTES` unpacked, a shared-strings
  table (which openpyxl holds whole) over :data:`MAX_XLSX_SHARED_STRINGS_BYTES`, one ``<row>``
  over :data:`MAX_XLSX_ROW_XML_BYTES`, or a row number past Excel's 1,048,576 raise
  :class:`WorkbookTooLarge` — the whole file is refused; there is no row to blame safely.

The modules: :mod:`~adapters.tabular.common` (row types, row errors, header names, the
whole-file errors, format detection), :mod:`~adapters.tabular.csv_reader`,
:mod:`~adapters.tabular.xlsx_reader`, :mod:`~adapters.tabular.ndjson_reader`, and
:mod:`~adapters.tabular.dispatch` (a file by path).  Import from the package: its names are
the public surface.
"""

from __future__ import annotations

from adapters.tabular.common import (
    HEAD_BYTES,
    MAX_CELL_CHARS,
    MAX_RECORD_CHARS,
    ROW_ERROR,
    ROW_ERROR_ZH,
    Cells,
    Format,
    Row,
    UnreadableFile,
    UnsupportedFormat,
    WorkbookTooLarge,
    detect_format,
    header_name,
    row_error,
    row_error_zh,
)
from adapters.tabular.csv_reader import UTF8_MAJORITY, detect_encoding, iter_csv
from adapters.tabular.dispatch import count_data_rows, count_rows, iter_rows, parse_file
from adapters.tabular.ndjson_reader import iter_ndjson
from adapters.tabular.xlsx_reader import (
    MAX_XLSX_ROW_XML_BYTES,
    MAX_XLSX_SHARED_STRINGS_BYTES,
    MAX_XLSX_UNPACKED_BYTES,
    XlsxCensus,
    iter_xlsx,
    xlsx_census,
)

__all__ = [
    "HEAD_BYTES",
    "ROW_ERROR",
    "ROW_ERROR_ZH",
    "UTF8_MAJORITY",
    "Cells",
    "Format",
    "Row",
    "MAX_CELL_CHARS",
    "MAX_RECORD_CHARS",
    "MAX_XLSX_ROW_XML_BYTES",
    "MAX_XLSX_SHARED_STRINGS_BYTES",
    "MAX_XLSX_UNPACKED_BYTES",
    "UnreadableFile",
    "UnsupportedFormat",
    "WorkbookTooLarge",
    "XlsxCensus",
    "count_data_rows",
    "detect_encoding",
    "detect_format",
    "header_name",
    "iter_csv",
    "iter_ndjson",
    "iter_rows",
    "iter_xlsx",
    "count_rows",
    "parse_file",
    "row_error",
    "row_error_zh",
    "xlsx_census",
]
