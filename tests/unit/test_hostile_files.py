"""Hostile native files through the readers and the tabular adapters (issue 6).

Generated files — random bytes, files cut in the middle of a GB18030 character, invalid UTF-8
spliced into a file, huge cells, huge lines, ZIP bombs and monstrous rows in XLSX, formula
injection cells — must never crash a reader or an adapter: every row is either a record or
carries coded errors from the catalogue, and a workbook past a limit is refused whole with
:class:`~adapters.tabular.WorkbookTooLarge`.

Formula injection (``=cmd|' /C calc'!A0``, and cells starting ``+``, ``-``, ``@``): the gateway
never evaluates a cell (XLSX is read with ``data_only=True``: a formula gives its cached value)
and produces no CSV or XLSX of its own (its answers and its console are JSON and HTML); such a
value is kept as the text it is, verbatim, like any other.  Neutralising it is the job of
whoever writes a spreadsheet for people to open (the management system's exports).
"""

from __future__ import annotations

import csv
import io
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.base import ParsedRow
from adapters.finance import FinanceAdapter
from adapters.health import HealthAdapter
from adapters.tabular import (
    MAX_CELL_CHARS,
    MAX_RECORD_CHARS,
    MAX_XLSX_ROW_XML_BYTES,
    ROW_ERROR,
    UnreadableFile,
    WorkbookTooLarge,
    iter_csv,
    iter_ndjson,
    iter_xlsx,
    xlsx_census,
    xlsx_reader,  # its limits are patched where the reader reads them
)
from adapters.training_base import TrainingBaseRosterAdapter
from contracts.errors import CATALOGUE
from mock_partners.files import HEALTH_HEADERS, health_rows, write_xlsx

ADAPTERS = (HealthAdapter(), FinanceAdapter(), TrainingBaseRosterAdapter())
HEADER = ",".join(HEALTH_HEADERS).encode("utf-8") + b"\r\n"
FORMULAS = ["=cmd|' /C calc'!A0", "=HYPERLINK(\"http://x.example\",\"点击\")", "+1+1",
            "-2+3", "@SUM(A1:A2)", "=1+1"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _judged(rows: Iterator[tuple[int, dict[str, Any]]]) -> list[ParsedRow]:
    """Every row through every tabular adapter; each must be a record or coded errors."""
    parsed: list[ParsedRow] = []
    for row in rows:
        for adapter in ADAPTERS:
            for result in adapter.parse(row):
                assert result.ok or result.errors, (adapter.name, row)
                assert all(e.code in CATALOGUE for e in result.errors), result.errors
                parsed.append(result)
    return parsed


def _health_csv(n: int, encoding: str = "utf-8", seed: int = 70) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(HEALTH_HEADERS)
    for row in health_rows(seed, n, 2026, 3):
        writer.writerow([row[h] for h in HEALTH_HEADERS])
    return out.getvalue().encode(encoding)


# -- random bytes and broken encodings -----------------------------------------------------------


@FAST
@given(st.binary(max_size=3000))
def test_random_bytes_never_crash_a_reader_or_adapter(data: bytes) -> None:
    for payload in (data, HEADER + data):
        _judged(iter_csv(io.BytesIO(payload)))
        _judged(iter_ndjson(io.BytesIO(payload)))
    with pytest.raises(Exception) as raised:  # noqa: PT011 - only the kind of failure matters
        list(iter_xlsx(io.BytesIO(b"PK\x03\x04" + data)))
    assert isinstance(raised.value, ValueError), raised.value  # UnreadableFile, never a crash


GB18030_FILE = _health_csv(6, "gb18030")
UTF8_FILE = _health_csv(6, "utf-8")


@FAST
@given(cut=st.integers(min_value=1, max_value=len(GB18030_FILE) - 1))
def test_a_gb18030_file_cut_anywhere_gives_rows_or_coded_errors(cut: int) -> None:
    parsed = _judged(iter_csv(io.BytesIO(GB18030_FILE[:cut])))
    assert len(parsed) <= 6 * len(ADAPTERS)


@FAST
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(UTF8_FILE)),
                          st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\xe4\xb8", b"\xed\xa0\x80",
                                           b"\xf8\x88\x80\x80\x80", b"\x00"])),
                min_size=1, max_size=4))
def test_invalid_utf8_spliced_into_a_file_is_coded_per_row(cuts: list[tuple[int, bytes]]) -> None:
    data = UTF8_FILE
    for at, junk in sorted(cuts, reverse=True):
        data = data[:at] + junk + data[at:]
    rows = list(iter_csv(io.BytesIO(data)))
    _judged(iter(rows))
    # Bytes the file's encoding cannot read never reach an adapter replaced by U+FFFD.
    assert not any("\ufffd" in str(v) for _, cells in rows if ROW_ERROR not in cells
                   for k, v in cells.items() if k in HEALTH_HEADERS[1:])


# -- huge cells and lines ------------------------------------------------------------------------


def test_huge_cells_and_lines_are_row_errors_and_the_next_row_still_reads() -> None:
    good = _health_csv(1).split(b"\r\n")[1]
    over_cell = b"X" * (MAX_CELL_CHARS + 1)
    over_field_limit = b'"' + b"Y" * 200_000 + b'"'
    over_line = b"Z" * (MAX_RECORD_CHARS + 10)
    # Many quoted fields, each small, spanning lines: one record over the record limit.
    over_record = b",".join([b'"a\nb"'] * (MAX_RECORD_CHARS // 4))
    body = b"\r\n".join([HEADER.rstrip(), good, over_cell + b"," + good, over_field_limit,
                         over_line, over_record, good, b""])
    rows = list(iter_csv(io.BytesIO(body)))
    assert [ROW_ERROR in cells for _, cells in rows[:5]] == [False, True, True, True, True]
    assert "32,767" in rows[1][1][ROW_ERROR] and "1,048,576" in rows[3][1][ROW_ERROR]
    # The record over the limit is dropped a line at a time: the lines of it that follow read
    # as nonsense rows (coded below, never accepted), and the good row after it reads again.
    assert rows[-1][1] == rows[0][1]
    parsed = _judged(iter(rows))
    assert sum(p.ok for p in parsed) == 2  # the two good rows, by the health adapter
    ndjson = b'{"a": 1}\n' + b'{"b": "' + b"Q" * (MAX_RECORD_CHARS + 5) + b'"}\n{"c": "' + \
        b"R" * (MAX_CELL_CHARS + 1) + b'"}\n{"d": 4}\n'
    lines = list(iter_ndjson(io.BytesIO(ndjson)))
    assert [(n, ROW_ERROR in cells) for n, cells in lines] == [
        (1, False), (2, True), (3, True), (4, False)]


def test_one_enormous_line_is_read_in_bounded_memory() -> None:
    line = b"x" * (24 << 20)  # 24 MiB on one line, no line break
    enormous = HEADER + line
    tracemalloc.start()
    try:
        csv_rows = list(iter_csv(io.BytesIO(enormous)))
        ndjson_rows = list(iter_ndjson(io.BytesIO(line)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"peak {peak >> 20} MiB"
    assert [ROW_ERROR in cells for _, cells in csv_rows] == [True]
    assert [ROW_ERROR in cells for _, cells in ndjson_rows] == [True]


# -- XLSX: ZIP bombs, monstrous rows, row numbers past Excel's -----------------------------------


SHEET_HEAD = (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
              b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
              b"<sheetData>")
SHEET_TAIL = b"</sheetData></worksheet>"


def _workbook(path: Path, sheet_xml: bytes, shared_strings: bytes | None = None) -> Path:
    """Rewrite a real one-sheet workbook with another sheet XML (compressed: small on disk)."""
    base = path.with_suffix(".base.xlsx")
    write_xlsx(base, list(health_rows(71, 1, 2026, 3)), HEALTH_HEADERS)
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            data = sheet_xml if info.filename == "xl/worksheets/sheet1.xml" else src.read(info)
            out.writestr(info.filename, data)
        if shared_strings is not None:
            out.writestr("xl/sharedStrings.xml", shared_strings)
    return path


def _inline_row(number: int, *texts: str) -> bytes:
    cells = "".join(f'<c t="inlineStr"><is><t>{t}</t></is></c>' for t in texts)
    return f'<row r="{number}">{cells}</row>'.encode()


def test_a_monstrous_xlsx_row_or_row_number_is_refused_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The limits scaled down 16x and 256x, so the test writes megabytes, not hundreds.
    monkeypatch.setattr(xlsx_reader, "MAX_XLSX_ROW_XML_BYTES", MAX_XLSX_ROW_XML_BYTES >> 4)
    monkeypatch.setattr(xlsx_reader, "MAX_XLSX_SHARED_STRINGS_BYTES", 1 << 20)
    huge_cell = _workbook(tmp_path / "huge.xlsx", SHEET_HEAD + _inline_row(1, "记录编号") +
                          _inline_row(2, "A" * (xlsx_reader.MAX_XLSX_ROW_XML_BYTES + 1)) + SHEET_TAIL)
    far_row = _workbook(tmp_path / "far.xlsx", SHEET_HEAD + _inline_row(1, "记录编号") +
                        _inline_row(2_000_000_000, "x") + SHEET_TAIL)
    bomb = _workbook(tmp_path / "bomb.xlsx", SHEET_HEAD + SHEET_TAIL,
                     shared_strings=b"<sst>" + b" " * (2 << 20) + b"</sst>")
    assert huge_cell.stat().st_size < 64 << 10 and bomb.stat().st_size < 64 << 10
    for path in (huge_cell, far_row, bomb):
        with pytest.raises(WorkbookTooLarge):
            xlsx_census(path)
        with pytest.raises(WorkbookTooLarge):
            list(iter_xlsx(path))


def test_an_xlsx_cell_over_excels_limit_is_a_row_error(tmp_path: Path) -> None:
    # Written by hand: openpyxl itself cuts a cell to Excel's limit when it writes one.
    path = _workbook(tmp_path / "long.xlsx", SHEET_HEAD + _inline_row(1, *HEALTH_HEADERS) +
                     _inline_row(2, "R-1", "长" * (MAX_CELL_CHARS + 1)) + _inline_row(3, "R-2") +
                     SHEET_TAIL)
    assert xlsx_census(path).rows == 3
    read = list(iter_xlsx(path))
    assert [(n, ROW_ERROR in cells) for n, cells in read] == [(2, True), (3, False)]
    _judged(iter(read))


# -- formula injection -----------------------------------------------------------------------------


@FAST
@given(formula=st.one_of(st.sampled_from(FORMULAS),
                         st.tuples(st.sampled_from("=+-@"), st.text(min_size=1, max_size=30))
                         .map("".join)))
def test_formula_cells_are_kept_as_text_verbatim(formula: str) -> None:
    row = next(iter(health_rows(73, 1, 2026, 3)))
    row["工作单位"], row["项目名称"] = formula, formula
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(HEALTH_HEADERS)
    writer.writerow([row[h] for h in HEALTH_HEADERS])
    (parsed,) = list(HealthAdapter().parse(next(iter_csv(io.BytesIO(out.getvalue().encode())))))
    if formula.strip() and formula.isprintable():
        assert parsed.ok, parsed.errors
        assert parsed.submission is not None
        assert parsed.submission.person.employer_name == formula.strip()
        assert parsed.submission.activity.title == formula.strip()
    else:
        assert parsed.ok or all(e.code in CATALOGUE for e in parsed.errors)


def test_an_xlsx_formula_is_never_evaluated_only_its_cached_value_read(tmp_path: Path) -> None:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(list(HEALTH_HEADERS))
    row = next(iter(health_rows(74, 1, 2026, 3)))
    sheet.append([row[h] for h in HEALTH_HEADERS])
    sheet["D2"] = "=cmd|' /C calc'!A0"  # 工作单位, a formula openpyxl never calculated
    path = tmp_path / "formula.xlsx"
    book.save(path)
    ((number, cells),) = list(iter_xlsx(path))
    assert number == 2 and cells["工作单位"] == ""  # no cached value: empty, not the formula


def _merges(*refs: str) -> bytes:
    cells = "".join(f'<mergeCell ref="{ref}"/>' for ref in refs)
    return f'<mergeCells count="{len(refs)}">{cells}</mergeCells>'.encode()


def test_xlsx_merged_ranges_past_the_limit_or_overlapping_are_refused_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merged ranges are held for the whole read, so their number is bounded.

    Overlapping ones (which Excel will not open) cannot make each row cost more than its width.
    """
    rows = _inline_row(1, "记录编号", "姓名") + b"".join(
        _inline_row(n, f"R-{n}", "x") for n in range(2, 40))
    monkeypatch.setattr(xlsx_reader, "MAX_MERGED_RANGES", 10)
    many = _workbook(tmp_path / "many.xlsx", SHEET_HEAD + rows + b"</sheetData>" +
                     _merges(*(f"A{n}:A{n + 1}" for n in range(2, 40, 2))) + b"</worksheet>")
    with pytest.raises(WorkbookTooLarge):
        xlsx_census(many)
    with pytest.raises(WorkbookTooLarge):
        list(iter_xlsx(many))
    overlapping = _workbook(tmp_path / "overlap.xlsx", SHEET_HEAD + rows + b"</sheetData>" +
                            _merges(*(["B2:B39"] * 5)) + b"</worksheet>")
    assert len(xlsx_census(overlapping).merged) == 5
    with pytest.raises(UnreadableFile, match="overlap"):
        list(iter_xlsx(overlapping))
