"""The XLSX reader: a census of the workbook against the limits, then openpyxl's read-only mode.

May touch: nothing but the workbook it is given (read only).
"""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET  # expat refuses entity-expansion bombs (Python ≥ 3.7.1)
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from adapters.merged import (
    MAX_MERGED_RANGES,
    MergedCells,
    MergeRange,
    OverlappingMerges,
    find_merges,
)
from adapters.tabular.common import (
    Row,
    UnreadableFile,
    WorkbookTooLarge,
    _header,
    _long_cell_error,
    _too_long_cell,
)

_XLSX_CHUNK = 1000
# Excel keeps 15 significant digits of a number, yet openpyxl reads one written without '.'
# or 'E' as an int.  An int of 16 digits or more whose digits past the 15th are all zeros is
# what Excel writes of a number it rounded: it is handed over as the float Excel held, so a
# record number can tell (normalize.mangled_number).  One with other digits there was written
# whole by a program, not Excel, and stays the exact int (an identity number in a number cell).
_XLSX_EXACT = 10**15

MAX_XLSX_ROW_XML_BYTES = 16 << 20  # one <row> element of the sheet's XML
MAX_XLSX_SHARED_STRINGS_BYTES = 256 << 20  # openpyxl loads this part whole
MAX_XLSX_UNPACKED_BYTES = 8 << 30  # every part together, as the ZIP directory declares
XLSX_MAX_ROW_NUMBER = 1_048_576  # an Excel sheet's last row

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
    """Check an XLSX workbook against the limits of the package docs before it is parsed.

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
        census = xlsx_census(handle)  # the limits of the package docs, before openpyxl parses
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

