"""The CSV reader: encoding and delimiter decided per file, one bounded record at a time.

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

May touch: nothing but the stream it is given (read once, never seeked, left open).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator
from typing import IO

from adapters.tabular.common import (
    _UTF8_BOM,
    HEAD_BYTES,
    MAX_CELL_CHARS,
    MAX_RECORD_CHARS,
    Cells,
    Row,
    _broken,
    _header,
    _long_cell_error,
    _too_long_cell,
)

# A head with undecodable bytes is still UTF-8 when it holds at least this many validly decoded
# multibyte characters per undecodable byte (module docs).
UTF8_MAJORITY = 4
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # Excel's "Unicode text" starts FF FE
_SURROGATES = re.compile("[\udc80-\udcff]")
_ASCII_BYTES = bytes(range(128))


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
    """Rows of a CSV file read from a binary stream, in constant memory (package and module docs)."""
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

