"""Reading a file by path: the format detected or given, the rows, and their counts.

May touch: the file at the path it is given (read only).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from adapters.base import Adapter, ParsedRow
from adapters.tabular.common import Format, Row, UnsupportedFormat, detect_format
from adapters.tabular.csv_reader import iter_csv
from adapters.tabular.ndjson_reader import iter_ndjson
from adapters.tabular.xlsx_reader import iter_xlsx


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
