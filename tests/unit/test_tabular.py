"""Streaming readers: encodings, row numbers, blank rows, broken rows, XLSX dates, NDJSON."""

from __future__ import annotations

import io
import re
import tracemalloc
import warnings
import zipfile
from datetime import datetime
from pathlib import Path

import pytest

from adapters.tabular import (
    HEAD_BYTES,
    ROW_ERROR,
    ROW_ERROR_ZH,
    UTF8_MAJORITY,
    UnreadableFile,
    UnsupportedFormat,
    detect_encoding,
    detect_format,
    header_name,
    iter_csv,
    iter_ndjson,
    iter_rows,
    iter_xlsx,
    row_error,
)
from mock_partners.files import (
    FINANCE_HEADERS,
    HEALTH_HEADERS,
    finance_rows,
    health_rows,
    write_csv,
    write_ndjson,
    write_xlsx,
)


def _csv_rows(data: bytes) -> list[tuple[int, dict[str, object]]]:
    return list(iter_csv(io.BytesIO(data)))


class _ReadOnly:
    """A stream with ``read`` only (no seek, no peek), like an upload arriving over a socket."""

    def __init__(self, data: bytes, chunk: int = 1000) -> None:
        self._data, self._pos, self._chunk = data, 0, chunk

    def read(self, size: int = -1) -> bytes:
        size = self._chunk if size < 0 else min(size, self._chunk)  # short reads on purpose
        out = self._data[self._pos : self._pos + size]
        self._pos += len(out)
        return out


# -- CSV encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gb18030"])
def test_csv_encodings_give_identical_rows(tmp_path: Path, encoding: str) -> None:
    reference = tmp_path / "ref.csv"
    write_csv(reference, health_rows(5, 40, 2026, 3), HEALTH_HEADERS, encoding="utf-8")
    path = tmp_path / f"{encoding}.csv"
    write_csv(path, health_rows(5, 40, 2026, 3), HEALTH_HEADERS, encoding=encoding)  # type: ignore[arg-type]

    rows = list(iter_rows(path))
    assert rows == list(iter_rows(reference))
    assert [n for n, _ in rows] == list(range(2, 42))
    first = rows[0][1]
    assert list(first) == list(HEALTH_HEADERS)  # BOM gone from the first header
    expected = next(health_rows(5, 1, 2026, 3))
    assert first["姓名"] == expected["姓名"] and first["身份证号"] == expected["身份证号"]
    assert not any(ROW_ERROR in cells for _, cells in rows)


def test_encoding_detection() -> None:
    text = "记录编号,姓名\n1,王伟\n"
    assert detect_encoding(text.encode("utf-8")) == "utf-8"
    assert detect_encoding(b"\xef\xbb\xbf" + text.encode("utf-8")) == "utf-8-sig"
    assert detect_encoding(text.encode("gb18030")) == "gb18030"
    assert detect_encoding(b"id,name\n1,a\n") == "utf-8"  # ASCII is UTF-8
    # a multibyte character cut at the end of the sampled head is still UTF-8 ...
    cut = "王".encode()[:2]
    assert detect_encoding(b"a,b\n" + cut, at_eof=False) == "utf-8"
    # ... but not when the file really ends there
    assert detect_encoding(b"a,b\n" + cut, at_eof=True) == "gb18030"


def test_utf8_character_cut_at_the_64k_mark(tmp_path: Path) -> None:
    line = "1,王伟伟伟\n".encode()  # "1," + 4 characters of 3 bytes + "\n" = 15 bytes
    pad = 0  # spaces after a header name (stripped) move the 64 KiB mark inside a character
    while (HEAD_BYTES - len("记录编号,姓名\n".encode()) - pad) % len(line) != 3:
        pad += 1
    header = ("记录编号,姓名" + " " * pad + "\n").encode()
    body = header + line * (HEAD_BYTES // len(line) + 10)
    with pytest.raises(UnicodeDecodeError):
        body[:HEAD_BYTES].decode("utf-8")  # the 64 KiB sample ends inside a character
    rows = list(iter_csv(_ReadOnly(body, chunk=4096)))  # type: ignore[arg-type]
    assert len(rows) == HEAD_BYTES // len(line) + 10
    assert all(cells == {"记录编号": "1", "姓名": "王伟伟伟"} for _, cells in rows)


def test_undecodable_bytes_fail_only_their_row() -> None:
    gb = "记录编号,姓名\n1,王伟\n".encode("gb18030") + b"2,\xff\xfe\n" + "3,李芳\n".encode("gb18030")
    rows = _csv_rows(gb)
    assert [n for n, _ in rows] == [2, 3, 4]
    assert rows[0][1] == {"记录编号": "1", "姓名": "王伟"}
    assert row_error(rows[1][1]) == "row 3: bytes that are not valid gb18030"
    assert rows[2][1] == {"记录编号": "3", "姓名": "李芳"}

    # UTF-8 decided from the head; a stray GBK-encoded row far down the file
    utf8 = "记录编号,姓名\n".encode() + "1,王伟\n".encode() * 10_000
    utf8 += "2,李芳\n".encode("gb18030") + "3,赵敏\n".encode()
    rows = _csv_rows(utf8)
    assert len(rows) == 10_002
    assert row_error(rows[-2][1]) == "row 10002: bytes that are not valid utf-8"
    assert rows[-1] == (10_003, {"记录编号": "3", "姓名": "赵敏"})


def _head(path: Path) -> tuple[bytes, bool]:
    data = path.read_bytes()
    return data[:HEAD_BYTES], len(data) <= HEAD_BYTES


def test_a_stray_byte_in_the_head_of_a_utf8_file_fails_only_its_row(tmp_path: Path) -> None:
    # A Latin-1 "Café" from a bad export, in a small UTF-8 file: one row, not the file, is bad.
    path = tmp_path / "one_bad.csv"
    write_csv(path, health_rows(3, 20, 2026, 3), HEALTH_HEADERS, encoding="utf-8")
    good = list(iter_rows(path))
    data = path.read_bytes()
    bad = "WJ-BAD,630104199007148673,王伟,Caf".encode() + b"\xe9" + b",630100\r\n"
    rows = _csv_rows(data + bad + b"WJ-LAST,x\r\n")

    assert detect_encoding(data + bad, at_eof=True) == "utf-8"
    assert rows[:20] == good
    assert rows[20] == (22, {ROW_ERROR: "row 22: bytes that are not valid utf-8",
                             ROW_ERROR_ZH: "第 22 行：含有不符合 utf-8 编码的字节"})
    assert rows[21][1]["记录编号"] == "WJ-LAST"


def test_utf8_head_with_a_few_bad_bytes_stays_utf8() -> None:
    rows = "记录编号,姓名,工作单位\n" + "".join(f"{i},王伟,青海省人民医院\n" for i in range(5))
    head = rows.encode()
    assert detect_encoding(head + b"9,Caf\xe9,x\n", at_eof=True) == "utf-8"
    assert detect_encoding(b"9,\xff\xfe,x\n" + head, at_eof=True) == "utf-8"  # bad first row
    # a GBK-encoded row among UTF-8 ones is that row's problem, not the file's
    assert detect_encoding(head + "9,李芳,西宁市\n".encode("gb18030") + head) == "utf-8"
    # a character cut at the 64 KiB mark is not counted as bad
    assert detect_encoding(head + b"9,Caf\xe9,x\n" + "王".encode()[:2]) == "utf-8"
    # the threshold: UTF8_MAJORITY valid multibyte characters per bad byte, no fewer
    four = "伟" * UTF8_MAJORITY
    assert detect_encoding(f"a,{four}\n".encode() + b"\xe9\n", at_eof=True) == "utf-8"
    assert detect_encoding(f"a,{four[1:]}\n".encode() + b"\xe9\n", at_eof=True) == "gb18030"


def test_pure_ascii_head_is_utf8() -> None:
    ascii_head = b"id,name\n" + b"1,Wang Wei\n" * (HEAD_BYTES // 11)
    assert detect_encoding(ascii_head[:HEAD_BYTES]) == "utf-8"
    assert detect_encoding(ascii_head, at_eof=True) == "utf-8"
    assert detect_encoding(b"", at_eof=True) == "utf-8"
    # ASCII and one stray byte: nothing says UTF-8, and a GBK name would look the same
    assert detect_encoding(b"id,name\n1,Caf\xe9\n", at_eof=True) == "gb18030"


def test_gb18030_files_are_still_gb18030(tmp_path: Path) -> None:
    fixture = Path(__file__).parents[1] / "fixtures" / "health_2026-03_gb18030.csv"
    assert detect_encoding(*_head(fixture)) == "gb18030"
    path = tmp_path / "gb.csv"
    for seed in range(20):
        for n in (1, 2, 5, 100, 2000):  # one row to past the 64 KiB head
            for rows, headers in ((health_rows, HEALTH_HEADERS), (finance_rows, FINANCE_HEADERS)):
                write_csv(path, rows(seed, n, 2026, 3), headers, encoding="gb18030")
                assert detect_encoding(*_head(path)) == "gb18030", (seed, n, headers[0])
                body = path.read_bytes().split(b"\n", 1)[1]  # no Chinese header to help
                assert detect_encoding(body[:HEAD_BYTES]) == "gb18030", (seed, n, headers[0])
    # mostly ASCII: English headers, codes and dates, only the names in Chinese
    for names in ("王伟", "李芳,赵敏", "多杰,才让,祁静,马明"):
        lines = ["result_id,id_no,name,region,hours,completed_on"]
        lines += [f"TB{i:06d},630104199007148673,{name},630100,12,2026-03-05"
                  for i, name in enumerate(names.split(","))]
        data = "\n".join(lines).encode("gb18030")
        assert detect_encoding(data, at_eof=True) == "gb18030", names


def test_undecodable_header_names_stay_printable() -> None:
    assert _csv_rows(b"\xff\xfe,b\n1,2\n") == [(2, {"\ufffd\ufffd": "1", "b": "2"})]
    rows = _csv_rows("记录编号,姓名\n".encode("gb18030") + b"\xff\xff,x\n1,2\n")
    assert rows == [(2, {ROW_ERROR: "row 2: bytes that are not valid gb18030",
                         ROW_ERROR_ZH: "第 2 行：含有不符合 gb18030 编码的字节"}),
                    (3, {"记录编号": "1", "姓名": "2"})]


def test_blank_lines_are_skipped_but_counted() -> None:
    data = "\ufeff 记录编号 ,姓名,\t学分 \n\n1,王伟,2\n,,\n  ,\t, \n2,李芳,3\n\n".encode()
    rows = _csv_rows(data)
    assert rows == [
        (3, {"记录编号": "1", "姓名": "王伟", "学分": "2"}),
        (6, {"记录编号": "2", "姓名": "李芳", "学分": "3"}),
    ]


def test_leading_blank_lines_before_the_header() -> None:
    rows = _csv_rows(b"\n\nid,name\n1,a\n")
    assert rows == [(4, {"id": "1", "name": "a"})]


def test_short_long_rows_empty_and_repeated_headers() -> None:
    data = b"a,,b,a\n1,x,2,3\n4\n5,y,6,7,8\n"
    assert _csv_rows(data) == [
        (2, {"a": "1", "b": "2"}),  # the first "a" wins; the unnamed column is ignored
        (3, {"a": "4", "b": ""}),  # a short row's missing cells are empty
        (4, {"a": "5", "b": "6"}),
    ]
    assert _csv_rows(b"a,b\n1\n1,2,3\n") == [(2, {"a": "1", "b": ""}), (3, {"a": "1", "b": "2"})]


@pytest.mark.parametrize(
    ("raw", "name"),
    [("姓　名", "姓名"), (" 学分 类别 ", "学分类别"), ("记录\u200b编号", "记录编号"),
     ("\ufeff身份证号", "身份证号"), ("证\t件 号\u3000码", "证件号码"), ("ｂａｓｅ＿ｃｏｄｅ", "base_code"),
     ("result_id", "result_id"), (None, ""), (42, "42")],
)
def test_header_names_fold_padding_and_full_width(raw: object, name: str) -> None:
    assert header_name(raw) == name


def test_padded_headers_name_their_columns() -> None:
    data = "记 录 编 号,姓　名,\u200b学分类别\n1,王伟,Ⅰ类\n".encode()
    assert _csv_rows(data) == [(2, {"记录编号": "1", "姓名": "王伟", "学分类别": "Ⅰ类"})]


def test_quoted_cells_and_crlf() -> None:
    data = '记录编号,项目名称\r\n1,"高原病防治, 新进展"\r\n2,"多行\r\n标题"\r\n3,x\r\n'.encode()
    assert _csv_rows(data) == [
        (2, {"记录编号": "1", "项目名称": "高原病防治, 新进展"}),
        (3, {"记录编号": "2", "项目名称": "多行\r\n标题"}),
        (4, {"记录编号": "3", "项目名称": "x"}),  # a record number, as a spreadsheet shows it
    ]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_excel_unicode_text_is_utf16_with_tabs(codec: str) -> None:
    """Excel's "Unicode text": a UTF-16 BOM, tab-separated (丬 is U+4E2C: a 0x2C byte)."""
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}[codec]
    data = bom + "记录编号\t姓名\t丬\r\n1\t王伟\t,\r\n".encode(codec)
    assert detect_encoding(data[:64]) == "utf-16"
    assert _csv_rows(data) == [(2, {"记录编号": "1", "姓名": "王伟", "丬": ","})]


def test_utf16_code_units_that_are_not_text_are_a_row_error() -> None:
    # a lone high surrogate (its bytes 00 D8: one below 0x80), then a byte cut off at the end
    data = (b"\xff\xfe" + "a\tb\r\n1\t".encode("utf-16-le") + b"\x00\xd8" +
            "\r\n2\tx\r\n".encode("utf-16-le") + b"A")
    rows = _csv_rows(data)
    assert [(n, row_error(cells)) for n, cells in rows] == [
        (2, "row 2: bytes that are not valid utf-16"), (3, None),
        (4, "row 4: bytes that are not valid utf-16")]


def test_tab_separated() -> None:
    assert _csv_rows("记录编号\t姓名\n1\t王伟\n".encode()) == [(2, {"记录编号": "1", "姓名": "王伟"})]


def test_csv_syntax_error_is_a_row_error_and_reading_goes_on() -> None:
    data = b"a,b\n1," + b"x" * 200_000 + b"\n2,y\n"
    rows = _csv_rows(data)
    assert rows[0][0] == 2 and "not valid CSV" in str(row_error(rows[0][1]))
    assert rows[1] == (3, {"a": "2", "b": "y"})


def test_empty_and_header_only_files() -> None:
    assert _csv_rows(b"") == []
    assert _csv_rows(b"a,b\n") == []
    assert _csv_rows(b"\xef\xbb\xbf") == []


def test_the_callers_stream_stays_open() -> None:
    stream = io.BytesIO(b"a\n1\n")
    assert list(iter_csv(stream)) == [(2, {"a": "1"})]
    assert not stream.closed


def test_csv_streams_in_constant_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    write_csv(path, health_rows(9, 30_000, 2026, 3), HEALTH_HEADERS, encoding="gb18030")
    size = path.stat().st_size
    assert size > 4_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_rows(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 30_000
    assert peak < 1_000_000, f"peak {peak} bytes while reading a {size}-byte file"


# -- XLSX -------------------------------------------------------------------------------------


def test_xlsx_rows_match_csv_and_dates_are_date_cells(tmp_path: Path) -> None:
    rows = list(health_rows(11, 30, 2026, 3))
    csv_path, xlsx_path = tmp_path / "h.csv", tmp_path / "h.xlsx"
    write_csv(csv_path, rows, HEALTH_HEADERS)
    write_xlsx(xlsx_path, rows, HEALTH_HEADERS)

    from_xlsx = list(iter_xlsx(xlsx_path))
    from_csv = list(iter_rows(csv_path))
    assert [n for n, _ in from_xlsx] == [n for n, _ in from_csv] == list(range(2, 32))
    completed = [cells["完成日期"] for _, cells in from_xlsx]
    assert any(isinstance(v, datetime) for v in completed)  # real Excel date cells
    assert any(isinstance(v, str) for v in completed)  # and dates typed as text
    assert any(isinstance(v, int) for v in completed)  # and a bare serial number
    credits = [cells["学分"] for _, cells in from_xlsx]
    assert any(isinstance(v, (int, float)) for v in credits)
    for (_, x), (_, c) in zip(from_xlsx, from_csv, strict=True):
        assert x["记录编号"] == c["记录编号"] and x["身份证号"] == c["身份证号"]


def test_xlsx_blank_rows_and_header(tmp_path: Path) -> None:
    from openpyxl import Workbook

    path = tmp_path / "blank.xlsx"
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet["A2"], sheet["B2"] = " 记录编号 ", "学分"
    sheet["A3"], sheet["B3"] = "1", 2.5
    sheet["A5"], sheet["B5"] = "2", None  # row 4 missing entirely
    sheet["A6"] = "   "
    sheet["A7"], sheet["B7"] = "3", 46086
    book.save(path)
    assert list(iter_rows(path)) == [
        (3, {"记录编号": "1", "学分": 2.5}),
        (5, {"记录编号": "2", "学分": ""}),
        (7, {"记录编号": "3", "学分": 46086}),
    ]


def test_xlsx_merged_cells_read_as_their_top_left_cell(tmp_path: Path) -> None:
    from openpyxl import Workbook

    path = tmp_path / "merged.xlsx"
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for row in (["记录编号", "工作单位", "地区代码", "学分"], ["1", "青海省人民医院", "630100", 2],
                ["2"], [], ["3", None, None, 4], ["4", "西宁市第一医院", None, None]):
        sheet.append(row)
    sheet.merge_cells("B2:B5")  # down, over a blank row 4 (it stays blank, and skipped)
    sheet.merge_cells("C2:C3")
    sheet.merge_cells("B6:D6")  # across
    sheet.merge_cells("F2:G9")  # right of the header: not read
    book.save(path)
    assert list(iter_xlsx(path)) == [
        (2, {"记录编号": "1", "工作单位": "青海省人民医院", "地区代码": "630100", "学分": 2}),
        (3, {"记录编号": "2", "工作单位": "青海省人民医院", "地区代码": "630100", "学分": ""}),
        (5, {"记录编号": "3", "工作单位": "青海省人民医院", "地区代码": "", "学分": 4}),
        (6, {"记录编号": "4", "工作单位": "西宁市第一医院", "地区代码": "西宁市第一医院",
             "学分": "西宁市第一医院"}),
    ]


def test_openpyxl_warnings_are_silenced_while_reading(tmp_path: Path) -> None:
    """Files from other tools make openpyxl warn (here: no default cell style).

    The suite runs with warnings as errors, and the reader must still read them.
    """
    plain = tmp_path / "plain.xlsx"
    write_xlsx(plain, health_rows(1, 3, 2026, 3), HEALTH_HEADERS)
    styleless = tmp_path / "styleless.xlsx"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(styleless, "w") as out:
        for name in src.namelist():
            data = src.read(name)
            if name == "xl/styles.xml":
                data = re.sub(rb"<cellStyles .*?</cellStyles>", b"", data)
            out.writestr(name, data)
    from openpyxl import load_workbook

    with pytest.warns(UserWarning, match="no default style"):
        load_workbook(styleless, read_only=True).close()
    assert list(iter_rows(styleless)) == list(iter_rows(plain))
    assert not any(f[2] is UserWarning and f[0] == "ignore" for f in warnings.filters)


def test_xlsx_with_a_wrong_dimension_is_read_whole(tmp_path: Path) -> None:
    from openpyxl import Workbook

    right = tmp_path / "right.xlsx"
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for row in (["记录编号", "学分"], ["1", 2], ["2", 3], ["3", 4]):
        sheet.append(row)
    book.save(right)
    wrong = tmp_path / "wrong.xlsx"
    with zipfile.ZipFile(right) as src, zipfile.ZipFile(wrong, "w") as out:
        for name in src.namelist():
            data = src.read(name)
            if name == "xl/worksheets/sheet1.xml":
                data, n = re.subn(rb'<dimension ref="[^"]*"', b'<dimension ref="A1:B2"', data)
                assert n == 1
            out.writestr(name, data)
    assert [n for n, _ in iter_rows(wrong)] == [2, 3, 4]


def test_broken_workbook_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "broken.xlsx"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(UnreadableFile):
        list(iter_rows(path))


# -- NDJSON -----------------------------------------------------------------------------------


def test_ndjson_with_broken_lines() -> None:
    data = (
        b'\xef\xbb\xbf{"a": 1, "b": "x"}\n'
        b"\n"
        b'{"a": 2, \n'
        b"[1, 2]\n"
        b'{"a": "\xff"}\n'
        b'  {"a": 3}  \r\n'
    )
    rows = list(iter_ndjson(io.BytesIO(data)))
    assert [n for n, _ in rows] == [1, 3, 4, 5, 6]
    assert rows[0][1] == {"a": 1, "b": "x"}
    assert "not valid JSON" in str(row_error(rows[1][1]))
    assert row_error(rows[2][1]) == "line 4: expected a JSON object, got list"
    assert "not valid JSON" in str(row_error(rows[3][1]))  # not UTF-8
    assert rows[4] == (6, {"a": 3})
    assert row_error(rows[0][1]) is None


def test_ndjson_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "h.ndjson"
    rows = list(health_rows(3, 5, 2026, 3, bad_ratio=0.5))
    write_ndjson(path, rows)
    read = list(iter_rows(path))
    assert [cells for _, cells in read] == [
        {k: v for k, v in row.items() if not k.startswith("_")} for row in rows
    ]


# -- detection and dispatch -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "filename", "content_type", "expected"),
    [
        (b"PK\x03\x04\x14\x00", None, None, "xlsx"),
        (b"PK\x03\x04", "roster.csv", "text/csv", "xlsx"),  # the bytes win
        (b'{"a": 1}\n', None, None, "ndjson"),
        (b'\xef\xbb\xbf  \n {"a": 1}', None, None, "ndjson"),
        ("记录编号,姓名\n".encode(), "x.ndjson", None, "csv"),
        ("记录编号,姓名\n".encode("gb18030"), None, None, "csv"),
        (b"", "batch.xlsx", None, "xlsx"),
        (b"", None, "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx"),
        (b"", "batch.jsonl", None, "ndjson"),
        (b"", None, "application/x-ndjson", "ndjson"),
        (b"", None, None, "csv"),
    ],
)
def test_detect_format(head: bytes, filename: str | None, content_type: str | None,
                       expected: str) -> None:
    assert detect_format(head, filename, content_type) == expected


def test_legacy_xls_is_refused() -> None:
    with pytest.raises(UnsupportedFormat, match=".xls"):
        detect_format(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 8, "old.xls", None)


def test_iter_rows_detects_each_format(tmp_path: Path) -> None:
    rows = list(health_rows(4, 6, 2026, 3))
    write_csv(tmp_path / "a.csv", rows, HEALTH_HEADERS, encoding="gb18030")
    # no extension, as an upload is stored
    write_xlsx(tmp_path / "upload-1", rows, HEALTH_HEADERS, date_cells=False, number_columns=())
    write_ndjson(tmp_path / "a.txt", rows, HEALTH_HEADERS)
    for name in ("a.csv", "upload-1", "a.txt"):
        read = list(iter_rows(tmp_path / name))
        assert [cells for _, cells in read] == [{h: row[h] for h in HEALTH_HEADERS} for row in rows]
