"""Streaming readers for partner batch files (CSV, XLSX, NDJSON).

The helpers for adapters of file rows (:class:`~adapters.rows.TabularAdapter`,
:class:`~adapters.rows.RowBuilder`) live in :mod:`adapters.rows`.

Readers yield ``(row_number, cells)`` where ``cells`` maps a header to its cell, and hold one
row at a time whatever the file's size (STYLE.md, "the hot path"):

- Row numbers are what a person sees opening the file: the header is row 1 (the first row
  that is not blank) and data starts at row 2 (an XLSX sheet row; a CSV record, which is the file line unless a quoted cell holds a
  line break).  NDJSON has no header: its row number is the line number.  Blank rows (every
  cell empty) are skipped but still counted, so later numbers stay right.
- Header cells are stripped and a BOM removed; empty header cells and repeats of an earlier
  header are ignored (the first column of a name wins).  A short row's missing cells are
  ``""``; XLSX empty cells are ``""`` too, so every format says "empty" the same way.
- **A broken row never stops the file.**  Instead of raising, a reader yields
  ``(row_number, {ROW_ERROR: "why"})`` — a one-key dict under the reserved header
  :data:`ROW_ERROR` (``"__error__"``), which no partner column uses.  Adapters turn it into a
  ``SCHEMA`` row error (see :func:`row_error`), so the batch processor needs no special case.
  It is used for a CSV record whose bytes are not valid in the file's encoding, a CSV syntax
  error, and an NDJSON line that is not a JSON object.

CSV encoding is decided once per file, from its first 64 KiB: a UTF-8 BOM → ``utf-8-sig``;
text that decodes as UTF-8 (a multibyte character cut at the 64 KiB mark allowed) → ``utf-8``;
anything else → ``gb18030`` (a superset of GBK and GB2312, and able to decode almost any byte
sequence).  The rest is decoded with ``errors="surrogateescape"``: bytes that are not valid in
the chosen encoding survive as lone surrogates, and the one record that holds them becomes a
row error — not a crash of the batch and not silently replaced characters (``errors="replace"``
would turn a mis-encoded name into ``"��"`` and accept it).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

import orjson

from adapters.base import Adapter, ParsedRow

__all__ = [
    "ROW_ERROR",
    "Cells",
    "Format",
    "Row",
    "UnreadableFile",
    "UnsupportedFormat",
    "detect_format",
    "iter_csv",
    "iter_ndjson",
    "iter_rows",
    "iter_xlsx",
    "count_rows",
    "parse_file",
    "row_error",
]

Format = Literal["csv", "xlsx", "ndjson"]
Cells = dict[str, object]
Row = tuple[int, Cells]

ROW_ERROR = "__error__"
HEAD_BYTES = 64 * 1024

_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # legacy .xls (BIFF) and other OLE2 files
_UTF8_BOM = codecs.BOM_UTF8
_SURROGATES = re.compile("[\udc80-\udcff]")
_XLSX_CHUNK = 1000


class UnreadableFile(ValueError):
    """The file as a whole cannot be read (a broken workbook); its batch fails, with this."""


class UnsupportedFormat(UnreadableFile):
    """The file is of a kind the gateway does not read (e.g. a legacy ``.xls`` workbook)."""


def row_error(cells: Mapping[str, object]) -> str | None:
    """The reader's reason when ``cells`` stands for a broken row, else ``None``."""
    if ROW_ERROR in cells:
        return str(cells[ROW_ERROR])
    return None


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


# -- CSV --------------------------------------------------------------------------------------


class _Prefixed(io.RawIOBase):
    """``head`` (already read to detect the encoding) followed by the rest of ``stream``.

    Works for any object with ``read()`` (an upload's spooled file, a socket reader), so the
    detection never needs to seek; closing it leaves ``stream`` open for its owner.
    """

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n


def _read_head(stream: IO[bytes], size: int = HEAD_BYTES) -> tuple[bytes, bool]:
    """Up to ``size`` bytes (looping over short reads) and whether the stream ended."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts), False


def detect_encoding(head: bytes, at_eof: bool = False) -> str:
    """``utf-8-sig``, ``utf-8`` or ``gb18030`` for a CSV from its first bytes (module docs)."""
    if head.startswith(_UTF8_BOM):
        return "utf-8-sig"
    try:
        # final=False lets a multibyte character cut at the end of ``head`` pass.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=at_eof)
    except UnicodeDecodeError:
        return "gb18030"
    return "utf-8"


def _sniff_delimiter(head: bytes) -> str:
    """Comma, unless the header line has tabs and no commas (Excel's "Unicode text")."""
    first = head.split(b"\n", 1)[0]
    return "\t" if b"\t" in first and b"," not in first else ","


def _header(cells: Iterable[object]) -> list[tuple[int, str]]:
    """(column index, name) of the usable header cells (module docs)."""
    seen: set[str] = set()
    columns: list[tuple[int, str]] = []
    for index, raw in enumerate(cells):
        name = "" if raw is None else str(raw).replace("\ufeff", "").strip()
        if name and name not in seen:
            seen.add(name)
            columns.append((index, name))
    return columns


def _cells(columns: list[tuple[int, str]], row: list[str]) -> Cells:
    width = len(row)
    return {name: (row[i] if i < width else "") for i, name in columns}


def iter_csv(stream: IO[bytes]) -> Iterator[Row]:
    """Rows of a CSV file read from a binary stream, in constant memory (module docs)."""
    head, at_eof = _read_head(stream)
    encoding = detect_encoding(head, at_eof)
    text = io.TextIOWrapper(
        io.BufferedReader(_Prefixed(head, stream), buffer_size=HEAD_BYTES),
        encoding=encoding,
        errors="surrogateescape",
        newline="",
    )
    reader = csv.reader(text, delimiter=_sniff_delimiter(head.removeprefix(_UTF8_BOM)))
    columns: list[tuple[int, str]] | None = None
    names: list[str] = []
    contiguous = True
    number = 0
    try:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                number += 1
                yield number, {ROW_ERROR: f"row {number}: not valid CSV ({exc})"}
                continue
            number += 1
            joined = "".join(row)
            if not joined.strip():
                continue
            if columns is None:
                # An undecodable header name matches no column, so every row will say which
                # column is missing; the U+FFFD keeps the name printable in those errors.
                columns = _header(_SURROGATES.sub("\ufffd", cell) for cell in row)
                names = [name for _, name in columns]
                contiguous = [i for i, _ in columns] == list(range(len(columns)))
                continue
            if not joined.isascii() and _SURROGATES.search(joined):
                yield number, {ROW_ERROR: f"row {number}: bytes that are not valid {encoding}"}
                continue
            if contiguous and len(row) >= len(names):
                yield number, dict(zip(names, row, strict=False))
            else:
                yield number, _cells(columns, row)
    finally:
        text.close()  # closes the wrapper chain down to _Prefixed, never the caller's stream


# -- XLSX -------------------------------------------------------------------------------------


@contextmanager
def _quiet_openpyxl() -> Iterator[None]:
    """Silence openpyxl's own UserWarnings, and nothing else, while it works.

    They ("no default style", unsupported extensions, data validation) describe workbook
    features the gateway does not read, and the test suite turns warnings into errors.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"openpyxl(\.|$)")
        yield


def iter_xlsx(source: str | Path | IO[bytes]) -> Iterator[Row]:
    """Rows of the first sheet of an XLSX workbook, streamed by openpyxl's read-only mode.

    ``data_only=True``: formulas give their cached values.  Cells keep openpyxl's types
    (``str``, ``int``, ``float``, ``datetime`` for date cells); empty cells are ``""``.
    Warnings are silenced only while openpyxl works, a chunk of rows at a time, never while
    the caller holds a row.  A file that is not a readable workbook raises
    :class:`UnreadableFile` (the whole batch fails; there are no rows to judge).
    """
    from openpyxl import load_workbook

    # openpyxl refuses a *path* without an .xlsx-like extension (a stored upload has none),
    # so it is given an open file instead.
    owned = open(source, "rb") if isinstance(source, (str, Path)) else None  # noqa: SIM115
    try:
        with _quiet_openpyxl():
            book = load_workbook(owned or source, read_only=True, data_only=True)
    except Exception as exc:
        if owned is not None:
            owned.close()
        raise UnreadableFile(f"not a readable XLSX workbook ({type(exc).__name__}: {exc})") from exc
    try:
        sheet = book.worksheets[0] if book.worksheets else None
        if sheet is None:
            return
        # Read-only mode trusts the file's <dimension>, which some tools write wrong (a sheet
        # "A1:B2" with 10,000 rows would be cut short): read every row that is there instead.
        sheet.reset_dimensions()
        rows = sheet.iter_rows(values_only=True)
        columns: list[tuple[int, str]] | None = None
        number = 0
        while True:
            with _quiet_openpyxl():
                chunk = [row for _, row in zip(range(_XLSX_CHUNK), rows, strict=False)]
            if not chunk:
                return
            for values in chunk:
                number += 1
                if all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                    continue
                if columns is None:
                    columns = _header(values)
                    continue
                width = len(values)
                yield number, {
                    name: ("" if i >= width or values[i] is None else values[i])
                    for i, name in columns
                }
    finally:
        book.close()
        if owned is not None:
            owned.close()


# -- NDJSON -----------------------------------------------------------------------------------


def iter_ndjson(stream: IO[bytes]) -> Iterator[Row]:
    """Rows of an NDJSON file: one JSON object a line, UTF-8 (RFC 8259); row number = line.

    A line that is not valid JSON, not UTF-8, or not an object becomes a row error.
    """
    for number, line in enumerate(stream, start=1):
        if number == 1:
            line = line.removeprefix(_UTF8_BOM)
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield number, {ROW_ERROR: f"line {number}: not valid JSON ({exc})"}
            continue
        if not isinstance(value, dict):
            kind = type(value).__name__
            yield number, {ROW_ERROR: f"line {number}: expected a JSON object, got {kind}"}
            continue
        yield number, value


# -- dispatch ---------------------------------------------------------------------------------


def iter_rows(path: str | Path, fmt: Format | None = None) -> Iterator[Row]:
    """Rows of the file at ``path``; ``fmt=None`` detects the format from its first bytes."""
    path = Path(path)
    if fmt is None:
        with path.open("rb") as probe:
            fmt = detect_format(probe.read(4096), path.name)
    if fmt == "xlsx":
        yield from iter_xlsx(path)
        return
    if fmt not in ("csv", "ndjson"):
        raise UnsupportedFormat(f"unknown format {fmt!r}")
    with path.open("rb") as stream:
        yield from (iter_csv(stream) if fmt == "csv" else iter_ndjson(stream))


def parse_file(adapter: Adapter, path: str | Path, fmt: Format | None = None) -> Iterator[ParsedRow]:
    """Read a file and parse each row with a tabular adapter (convenience for CLI and tests)."""
    for row in iter_rows(path, fmt):
        yield from adapter.parse(row)




def count_rows(path: str | Path, fmt: Format | None = None) -> int:
    """The last row number of a file, for progress bars (one fast pass over the rows)."""
    last = 1
    for row_no, _ in iter_rows(path, fmt):
        last = row_no
    return last
