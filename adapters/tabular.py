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

CSV encoding is decided once per file, from its first 64 KiB: a UTF-8 BOM → ``utf-8-sig``;
a UTF-16 BOM (``FF FE`` or ``FE FF``: Excel's "Unicode text", tab-separated) followed by
text with a line break → ``utf-16``;
text that decodes as UTF-8 (a multibyte character cut at the 64 KiB mark allowed) → ``utf-8``.
Otherwise the head is weighed, because one stray byte (a ``"Café"`` typed in Latin-1 by a bad
export) must not condemn a whole UTF-8 file: decoded as UTF-8, it is still ``utf-8`` when its
validly decoded multibyte characters number at least :data:`UTF8_MAJORITY` (4) per undecodable
byte, and ``gb18030`` (a superset of GBK and GB2312) when they do not.  GB18030 Chinese text
read as UTF-8 is mostly undecodable: a hanzi's two bytes rarely form a UTF-8 sequence, about
0.17 valid characters per bad byte in long text, at most 0.75 in the generators' one-row files
and 1.2 over 2,000 random 10-hanzi strings.  A UTF-8 file has to go wrong in about one
character in five to fall under 4; a head with no multibyte character at all (ASCII plus a
stray byte) stays ``gb18030``, as a GBK name among ASCII columns looks just the same.
The rest is decoded with ``errors="surrogateescape"``: bytes that are not valid in
the chosen encoding survive as lone surrogates, and the one record that holds them becomes a
row error — not a crash of the batch and not silently replaced characters (``errors="replace"``
would turn a mis-encoded name into ``"��"`` and accept it; UTF-16, whose bad code units may
hold bytes below 0x80 that ``surrogateescape`` cannot carry, gets a handler of the same
effect).  The delimiter is sniffed from the header line: a tab, when it has tabs and no
commas.  A file whose first 64 KiB are
pure ASCII is ``utf-8``; GB18030 text first met after the head is then rejected row by row.

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
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import unicodedata
import warnings
import xml.etree.ElementTree as ET  # expat refuses entity-expansion bombs (Python ≥ 3.7.1)
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from adapters.base import Adapter, ParsedRow
from adapters.merged import (
    MAX_MERGED_RANGES,
    MergedCells,
    MergeRange,
    OverlappingMerges,
    find_merges,
)
from adapters.normalize import loads_exact

__all__ = [
    "ROW_ERROR",
    "ROW_ERROR_ZH",
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

Format = Literal["csv", "xlsx", "ndjson"]
Cells = dict[str, object]
Row = tuple[int, Cells]

ROW_ERROR = "__error__"
ROW_ERROR_ZH = "__error_zh__"  # the same reason in Chinese, beside ROW_ERROR
HEAD_BYTES = 64 * 1024
# A head with undecodable bytes is still UTF-8 when it holds at least this many validly decoded
# multibyte characters per undecodable byte (module docs, "CSV encoding").
UTF8_MAJORITY = 4

_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # legacy .xls (BIFF) and other OLE2 files
_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # Excel's "Unicode text" starts FF FE
_SURROGATES = re.compile("[\udc80-\udcff]")
_ASCII_BYTES = bytes(range(128))
_XLSX_CHUNK = 1000
# Excel keeps 15 significant digits of a number, yet openpyxl reads one written without '.'
# or 'E' as an int.  An int of 16 digits or more whose digits past the 15th are all zeros is
# what Excel writes of a number it rounded: it is handed over as the float Excel held, so a
# record number can tell (normalize.mangled_number).  One with other digits there was written
# whole by a program, not Excel, and stays the exact int (an identity number in a number cell).
_XLSX_EXACT = 10**15

MAX_CELL_CHARS = 32_767  # Excel's own limit for one cell
MAX_RECORD_CHARS = 1 << 20  # one CSV record (characters) or NDJSON line (bytes)
MAX_XLSX_ROW_XML_BYTES = 16 << 20  # one <row> element of the sheet's XML
MAX_XLSX_SHARED_STRINGS_BYTES = 256 << 20  # openpyxl loads this part whole
MAX_XLSX_UNPACKED_BYTES = 8 << 30  # every part together, as the ZIP directory declares
XLSX_MAX_ROW_NUMBER = 1_048_576  # an Excel sheet's last row


class UnreadableFile(ValueError):
    """The file as a whole cannot be read (a broken workbook); its batch fails, with this."""


class UnsupportedFormat(UnreadableFile):
    """The file is of a kind the gateway does not read (e.g. a legacy ``.xls`` workbook)."""


class WorkbookTooLarge(UnreadableFile):
    """An XLSX workbook past a limit of the module docs (a ZIP bomb, a monstrous row)."""


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
    """``utf-8-sig``, ``utf-16``, ``utf-8`` or ``gb18030`` for a CSV from its first bytes."""
    if head.startswith(_UTF8_BOM):
        return "utf-8-sig"
    if head.startswith(_UTF16_BOMS) and _has_utf16_line_break(head):
        return "utf-16"  # the codec reads the BOM, and with it the byte order
    # final=False lets a multibyte character cut at the end of ``head`` pass (it is held back
    # by the decoder, neither valid nor invalid).
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=at_eof)
    except UnicodeDecodeError:
        pass
    else:
        return "utf-8"  # the usual case, decided without counting anything
    # Counted from lengths, never per byte or per character: this runs on 64 KiB of hanzi.
    decoder = codecs.getincrementaldecoder("utf-8")("ignore")
    text = decoder.decode(head, final=at_eof)  # the undecodable bytes dropped
    held = len(decoder.getstate()[0])  # the start of a character cut at the end of the head
    invalid = len(head) - held - len(text.encode("utf-8"))
    ascii_bytes = len(head) - len(head.translate(None, _ASCII_BYTES))  # never part of an error
    multibyte = len(text) - ascii_bytes  # characters UTF-8 decoded from 2-4 bytes
    return "utf-8" if multibyte >= UTF8_MAJORITY * invalid else "gb18030"


def _has_utf16_line_break(head: bytes) -> bool:
    """Whether UTF-16 text follows the BOM: a CSV's head holds a line break.

    Two stray bytes FF FE before 8-bit text (not valid UTF-8 or GB18030 either) then stay
    the undecodable bytes they are, not a line of nonsense hanzi.
    """
    text = head[: len(head) & ~1].decode("utf-16", "ignore")
    return "\n" in text or "\r" in text


def _mark_undecodable(exc: UnicodeError) -> tuple[str, int]:
    """``surrogateescape`` for UTF-16, whose bad code units may hold bytes below 0x80."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    return "".join(chr(0xDC80 | (b & 0x7F)) for b in bad), exc.end


_UTF16_ERRORS = "ce-gateway-undecodable"
codecs.register_error(_UTF16_ERRORS, _mark_undecodable)


def _sniff_delimiter(head: bytes, encoding: str = "utf-8") -> str:
    """Comma, unless the header line has tabs and no commas (Excel's "Unicode text")."""
    if encoding == "utf-16":  # a hanzi's code unit may hold a 0x2C byte: look at characters
        line = head.decode("utf-16", "ignore").split("\n", 1)[0]
        return "\t" if "\t" in line and "," not in line else ","
    first = head.split(b"\n", 1)[0]
    return "\t" if b"\t" in first and b"," not in first else ","


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
    """(column index, name) of the usable header cells (module docs)."""
    seen: set[str] = set()
    columns: list[tuple[int, str]] = []
    for index, raw in enumerate(cells):
        name = header_name(raw)
        if name and name not in seen:
            seen.add(name)
            columns.append((index, name))
    return columns


def _cells(columns: list[tuple[int, str]], row: list[str]) -> Cells:
    width = len(row)
    return {name: (row[i] if i < width else "") for i, name in columns}


class _RecordTooLong(Exception):
    """Raised through ``csv.reader`` by :class:`_BoundedLines`; the reader resets on next()."""


class _BoundedLines:
    """The lines of ``text`` for ``csv.reader``, at most MAX_RECORD_CHARS per record.

    ``spent`` counts the characters handed out since the caller last set it to 0 (at each
    record); past the limit the rest of the physical line is read and dropped in bounded
    pieces, and :class:`_RecordTooLong` is raised.
    """

    def __init__(self, text: io.TextIOWrapper) -> None:
        self._readline = text.readline
        self.spent = 0

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> str:
        line = self._readline(MAX_RECORD_CHARS + 1 - self.spent)
        if not line:
            raise StopIteration
        self.spent += len(line)
        if self.spent <= MAX_RECORD_CHARS:
            return line
        while line and not line.endswith(("\n", "\r")):
            line = self._readline(HEAD_BYTES)
        raise _RecordTooLong


def iter_csv(stream: IO[bytes]) -> Iterator[Row]:
    """Rows of a CSV file read from a binary stream, in constant memory (module docs)."""
    head, at_eof = _read_head(stream)
    encoding = detect_encoding(head, at_eof)
    text = io.TextIOWrapper(
        io.BufferedReader(_Prefixed(head, stream), buffer_size=HEAD_BYTES),
        encoding=encoding,
        errors=_UTF16_ERRORS if encoding == "utf-16" else "surrogateescape",
        newline="",
    )
    lines = _BoundedLines(text)
    reader = csv.reader(lines, delimiter=_sniff_delimiter(head.removeprefix(_UTF8_BOM), encoding))
    columns: list[tuple[int, str]] | None = None
    names: list[str] = []
    contiguous = True
    number = 0
    try:
        while True:
            lines.spent = 0
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                number += 1
                yield number, _broken(f"row {number}: not valid CSV ({exc})",
                                      f"第 {number} 行：不是有效的 CSV（{exc}）")
                continue
            except _RecordTooLong:
                number += 1
                yield number, _broken(f"row {number}: longer than {MAX_RECORD_CHARS:,} characters",
                                      f"第 {number} 行：超过 {MAX_RECORD_CHARS:,} 个字符")
                continue
            number += 1
            joined = "".join(row)
            if not joined.strip():
                continue
            if len(joined) > MAX_CELL_CHARS and _too_long_cell(row):
                yield number, _long_cell_error(number)
                continue
            if columns is None:
                # An undecodable header name matches no column, so every row will say which
                # column is missing; the U+FFFD keeps the name printable in those errors.
                columns = _header(_SURROGATES.sub("\ufffd", cell) for cell in row)
                names = [name for _, name in columns]
                contiguous = [i for i, _ in columns] == list(range(len(columns)))
                continue
            if not joined.isascii() and _SURROGATES.search(joined):
                yield number, _broken(f"row {number}: bytes that are not valid {encoding}",
                                      f"第 {number} 行：含有不符合 {encoding} 编码的字节")
                continue
            if contiguous and len(row) >= len(names):
                yield number, dict(zip(names, row, strict=False))
            else:
                yield number, _cells(columns, row)
    finally:
        text.close()  # closes the wrapper chain down to _Prefixed, never the caller's stream


# -- XLSX -------------------------------------------------------------------------------------

# A row element's start tag, with or without a namespace prefix ("<row ", "<x:row>").
_ROW_START = re.compile(rb"<(?:[A-Za-z_][\w.-]{0,15}:)?row[\s>/]")
_ROW_NUMBER = re.compile(rb"\sr\s*=\s*[\"']?(\d+)")
_SCAN_BLOCK = 1 << 20
_TAG_MARGIN = 4096  # a start tag is looked at whole once this much follows it (or at the end)
_NS_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id"
_SMALL_PART = 16 << 20  # the workbook and relationship parts parsed to find the first sheet


@dataclass(frozen=True)
class XlsxCensus:
    """What :func:`xlsx_census` found: row elements of the first sheet (header included)."""

    rows: int
    highest_row_number: int
    largest_row_bytes: int  # of the XML between two row starts (or before the first, after the last)
    merged: tuple[MergeRange, ...] = ()  # the sheet's merged ranges (adapters.merged)


def _scan_sheet_xml(stream: IO[bytes], name: str) -> XlsxCensus:
    """Count ``<row>`` elements and collect merged ranges in bounded memory.

    Refuses a row or a row number past the limits, or more than MAX_MERGED_RANGES merges.
    """
    pending, offset, last_start, rows, highest, largest = b"", 0, 0, 0, 0, 0
    merged: list[MergeRange] = []
    while True:
        block = stream.read(_SCAN_BLOCK)
        data = pending + block
        usable = len(data) if not block else max(0, len(data) - _TAG_MARGIN)
        merged += find_merges(data, 0, usable)
        if len(merged) > MAX_MERGED_RANGES:
            raise WorkbookTooLarge(f"{name}: more than {MAX_MERGED_RANGES:,} merged ranges")
        for match in _ROW_START.finditer(data, 0, len(data)):
            start = match.start()
            if start >= usable:
                break
            if offset + start - last_start > MAX_XLSX_ROW_XML_BYTES:
                break  # reported below, with the same check as a row that never ends
            largest = max(largest, offset + start - last_start)
            last_start, rows = offset + start, rows + 1
            end = data.find(b">", start, start + _TAG_MARGIN)
            number = _ROW_NUMBER.search(data, start, end if end >= 0 else start + _TAG_MARGIN)
            if number is not None:
                highest = max(highest, int(number.group(1)))
            else:
                highest += 1
            if highest > XLSX_MAX_ROW_NUMBER:
                raise WorkbookTooLarge(f"{name}: a row number past Excel's {XLSX_MAX_ROW_NUMBER:,}")
        if offset + usable - last_start > MAX_XLSX_ROW_XML_BYTES:
            raise WorkbookTooLarge(
                f"{name}: one row (or the XML around the rows) holds more than "
                f"{MAX_XLSX_ROW_XML_BYTES >> 20} MiB")
        if not block:
            return XlsxCensus(rows, highest, max(largest, offset + usable - last_start),
                              tuple(merged))
        pending, offset = data[usable:], offset + usable


def _first_sheet_part(archive: zipfile.ZipFile) -> str | None:
    """The part openpyxl reads as ``worksheets[0]``: the workbook's first ``<sheet>``."""

    def small_xml(name: str) -> Any:
        info = archive.getinfo(name)
        if info.file_size > _SMALL_PART:
            raise WorkbookTooLarge(f"{name}: {info.file_size:,} bytes unpacked")
        return ET.fromstring(archive.read(name))

    names = set(archive.namelist())
    book = "xl/workbook.xml"
    if "_rels/.rels" in names:
        for rel in small_xml("_rels/.rels"):
            if str(rel.get("Type", "")).endswith("/officeDocument"):
                book = str(rel.get("Target", book)).lstrip("/")
    folder, _, leaf = book.rpartition("/")
    rels_name = f"{folder}/_rels/{leaf}.rels" if folder else f"_rels/{leaf}.rels"
    if book not in names or rels_name not in names:
        return None
    targets = {str(r.get("Id")): str(r.get("Target", "")) for r in small_xml(rels_name)}
    for element in small_xml(book).iter():
        if element.tag.rpartition("}")[2] == "sheet":
            target = targets.get(str(element.get(_NS_REL)), "")
            if not target:
                return None
            return target.lstrip("/") if target.startswith("/") else f"{folder}/{target}".lstrip("/")
    return None


def xlsx_census(source: str | Path | IO[bytes]) -> XlsxCensus:
    """Check an XLSX workbook against the limits of the module docs before it is parsed.

    Reads only the ZIP directory and streams each sheet-like XML part once (a ZIP member is
    never decompressed past the size the directory declares).  Raises
    :class:`WorkbookTooLarge` past a limit, :class:`UnreadableFile` for a file that is not a
    ZIP archive; returns the first sheet's row elements, header and formatted blank rows
    included.  A file object is left positioned at its start.
    """
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnreadableFile(f"not a readable XLSX workbook ({type(exc).__name__}: {exc})") from exc
    try:
        infos = archive.infolist()
        unpacked = sum(info.file_size for info in infos)
        if unpacked > MAX_XLSX_UNPACKED_BYTES:
            raise WorkbookTooLarge(f"{unpacked:,} bytes unpacked (at most {MAX_XLSX_UNPACKED_BYTES:,})")
        first = None
        census: dict[str, XlsxCensus] = {}
        for info in infos:
            name = info.filename
            if not name.lower().endswith(".xml") or info.is_dir():
                continue
            if name.lower().endswith("sharedstrings.xml"):
                if info.file_size > MAX_XLSX_SHARED_STRINGS_BYTES:
                    raise WorkbookTooLarge(f"{name}: {info.file_size:,} bytes of shared strings "
                                           f"(at most {MAX_XLSX_SHARED_STRINGS_BYTES:,})")
                continue
            with archive.open(info) as part:
                census[name] = _scan_sheet_xml(part, name)
        try:
            first = _first_sheet_part(archive)
        except (ET.ParseError, KeyError, ValueError):
            first = None
    except WorkbookTooLarge:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise UnreadableFile(f"not a readable XLSX workbook ({type(exc).__name__}: {exc})") from exc
    finally:
        archive.close()
        if not isinstance(source, (str, Path)):
            source.seek(0)
    if first in census:
        return census[first]
    # The first sheet could not be named: the largest part stands in (an upper bound).
    return XlsxCensus(max((c.rows for c in census.values()), default=0),
                      max((c.highest_row_number for c in census.values()), default=0),
                      max((c.largest_row_bytes for c in census.values()), default=0))


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
    (``str``, ``int``, ``float``, ``datetime`` for date cells) but for an int Excel rounded
    (16 digits or more, zeros past the 15th), which comes as the float Excel held; empty cells
    are ``""``.
    A cell inside a merged range reads as the range's top-left cell, as Excel shows it
    (:mod:`adapters.merged`; the ranges come from the census pass).
    Warnings are silenced only while openpyxl works, a chunk of rows at a time, never while
    the caller holds a row.  A file that is not a readable workbook raises
    :class:`UnreadableFile` (the whole batch fails; there are no rows to judge).
    """
    from openpyxl import load_workbook

    # openpyxl refuses a *path* without an .xlsx-like extension (a stored upload has none),
    # so it is given an open file instead.
    owned = open(source, "rb") if isinstance(source, (str, Path)) else None  # noqa: SIM115
    handle: IO[bytes] = owned or source  # type: ignore[assignment]
    try:
        census = xlsx_census(handle)  # the limits of the module docs, before openpyxl parses
        with _quiet_openpyxl():
            book = load_workbook(handle, read_only=True, data_only=True)
    except Exception as exc:
        if owned is not None:
            owned.close()
        if isinstance(exc, UnreadableFile):
            raise
        raise UnreadableFile(f"not a readable XLSX workbook ({type(exc).__name__}: {exc})") from exc
    # Rows held at once stay within about one MAX_XLSX_ROW_XML_BYTES of XML.
    per_chunk = max(1, min(_XLSX_CHUNK, MAX_XLSX_ROW_XML_BYTES // max(census.largest_row_bytes, 1)))
    try:
        sheet = book.worksheets[0] if book.worksheets else None
        if sheet is None or not hasattr(sheet, "iter_rows"):
            return  # no sheet, or a chart sheet first: there are no rows
        # Read-only mode trusts the file's <dimension>, which some tools write wrong (a sheet
        # "A1:B2" with 10,000 rows would be cut short): read every row that is there instead.
        sheet.reset_dimensions()
        rows = sheet.iter_rows(values_only=True)
        columns: list[tuple[int, str]] | None = None
        merges = MergedCells(census.merged)
        number = 0
        while True:
            try:
                with _quiet_openpyxl():
                    chunk = [row for _, row in zip(range(per_chunk), rows, strict=False)]
            except Exception as exc:  # a malformed cell deep in the sheet (e.g. a bad reference)
                raise UnreadableFile(f"row {number + 1}: not readable ({type(exc).__name__}: "
                                     f"{exc})") from exc
            if not chunk:
                return
            for values in chunk:
                number += 1
                if number > XLSX_MAX_ROW_NUMBER:  # openpyxl fills gaps up to a row's number
                    raise WorkbookTooLarge(f"a row number past Excel's {XLSX_MAX_ROW_NUMBER:,}")
                if merges:
                    merges.begin(number, values)
                if all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                    continue  # blank as written: a merge reaching into it does not fill it
                if merges:
                    try:
                        values = merges.fill(number, values)
                    except OverlappingMerges as exc:
                        raise UnreadableFile(str(exc)) from exc
                if _too_long_cell(values):
                    yield number, _long_cell_error(number)
                    continue
                if columns is None:
                    columns = _header(values)
                    if columns:
                        merges.header_width(columns[-1][0] + 1)
                    continue
                width = len(values)
                cells: dict[str, Any] = {}
                for i, name in columns:
                    value = values[i] if i < width else None
                    if value is None:
                        value = ""
                    elif (type(value) is int and not -_XLSX_EXACT < value < _XLSX_EXACT
                          and not str(abs(value))[15:].strip("0")):
                        value = float(value)  # what Excel held: a double, rounded to 15 digits
                    cells[name] = value
                yield number, cells
    finally:
        book.close()
        if owned is not None:
            owned.close()


# -- NDJSON -----------------------------------------------------------------------------------


def iter_ndjson(stream: IO[bytes]) -> Iterator[Row]:
    """Rows of an NDJSON file: one JSON object a line, UTF-8 (RFC 8259); row number = line.

    A line that is not valid JSON, not UTF-8, or not an object becomes a row error, and so
    does a line over MAX_RECORD_CHARS bytes (never read whole) or a string value over
    MAX_CELL_CHARS characters.
    """
    for number, line in enumerate(_bounded_byte_lines(stream), start=1):
        if line is None:
            yield number, _broken(f"line {number}: longer than {MAX_RECORD_CHARS:,} bytes",
                                  f"第 {number} 行：超过 {MAX_RECORD_CHARS:,} 字节")
            continue
        if number == 1:
            line = line.removeprefix(_UTF8_BOM)
        if not line.strip():
            continue
        try:
            value = loads_exact(line)
        except orjson.JSONDecodeError as exc:
            yield number, _broken(f"line {number}: not valid JSON ({exc})",
                                  f"第 {number} 行：不是有效的 JSON（{exc}）")
            continue
        if not isinstance(value, dict):
            kind = type(value).__name__
            yield number, _broken(f"line {number}: expected a JSON object, got {kind}",
                                  f"第 {number} 行：应为 JSON 对象，收到 {kind}")
            continue
        if len(line) > MAX_CELL_CHARS and _too_long_cell(value.values()):
            yield number, _long_cell_error(number)
            continue
        yield number, value


def _bounded_byte_lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """The lines of ``stream``; ``None`` for one over MAX_RECORD_CHARS bytes (dropped unread)."""
    readline = stream.readline
    while line := readline(MAX_RECORD_CHARS + 1):
        if len(line) <= MAX_RECORD_CHARS:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = readline(HEAD_BYTES)
        yield None


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


def count_data_rows(path: str | Path, fmt: Format, stop_after: int | None = None) -> int:
    """Rows a batch of this file counts (every row a reader yields, row errors included).

    The header and blank rows are not counted.  With ``stop_after`` the count stops at
    ``stop_after + 1``: enough to know a file is over a limit without reading all of it.
    """
    count = 0
    for _ in iter_rows(path, fmt):
        count += 1
        if stop_after is not None and count > stop_after:
            break
    return count
