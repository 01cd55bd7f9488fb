"""The NDJSON reader: one JSON object a line, each line read in bounded pieces.

May touch: nothing but the stream it is given (left open).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

import orjson

from adapters.normalize import loads_exact
from adapters.tabular.common import (
    _UTF8_BOM,
    HEAD_BYTES,
    MAX_CELL_CHARS,
    MAX_RECORD_CHARS,
    Row,
    _broken,
    _long_cell_error,
    _too_long_cell,
)


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

