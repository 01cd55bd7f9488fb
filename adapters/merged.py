"""Merged cells of an XLSX sheet: found in its XML, filled in as the rows stream by.

A hand-kept sheet often merges a column down over several rows (one hospital's 工作单位 and
地区代码 for all its staff).  Excel shows the value on every row of the merge, but the file
holds it only in the merge's top-left (anchor) cell, and openpyxl's read-only mode ignores
``<mergeCells>``: without this module the other rows would read as empty.

- :func:`find_merges` collects the ``<mergeCell ref="A2:A5"/>`` ranges of one block of sheet
  XML; :func:`adapters.tabular.xlsx_census` calls it during its one streaming pass, so the
  sheet is never read twice nor held whole.  At most :data:`MAX_MERGED_RANGES` ranges (a
  few MiB) are kept; past that the workbook is refused.
- :class:`MergedCells` fills, row by row, each cell a merge covers with its anchor's value.
  It costs nothing on a sheet without merges, and on one with merges only the ranges that
  cover the current row are looked at.  Merges overlapping each other (which Excel refuses
  to open) are refused too, so a hostile file cannot make each row cost more than its width.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["MAX_MERGED_RANGES", "MergeRange", "MergedCells", "OverlappingMerges", "find_merges"]

MergeRange = tuple[int, int, int, int]  # (first row, first column, last row, last column), 1-based

MAX_MERGED_RANGES = 1 << 16
XLSX_MAX_COLUMNS = 16_384  # an Excel sheet's last column, XFD

_MERGE_CELL = re.compile(
    rb"<(?:[A-Za-z_][\w.-]{0,15}:)?mergeCell\s[^>]{0,256}?\bref\s*=\s*[\"']"
    rb"\$?([A-Za-z]{1,3})\$?([0-9]{1,7})(?::\$?([A-Za-z]{1,3})\$?([0-9]{1,7}))?[\"']")


class OverlappingMerges(ValueError):
    """Two merged ranges cover one cell: the sheet is not one Excel would open."""


def _column(letters: bytes) -> int:
    number = 0
    for letter in letters.upper():
        number = number * 26 + letter - 64  # "A" is 65
    return number


def find_merges(data: bytes, start: int, stop: int) -> list[MergeRange]:
    """The merged ranges whose ``<mergeCell>`` tag starts in ``data[start:stop]``.

    A single cell "merged" with itself covers nothing and is left out.
    """
    if b"mergeCell" not in data:  # the usual case: one fast search of the block
        return []
    found: list[MergeRange] = []
    for match in _MERGE_CELL.finditer(data, start):
        if match.start() >= stop:
            break
        col1, row1, col2, row2 = match.groups()
        first_col, first_row = _column(col1), int(row1)
        last_col, last_row = (first_col, first_row) if col2 is None else (_column(col2), int(row2))
        first_row, last_row = sorted((first_row, last_row))
        first_col, last_col = sorted((first_col, last_col))
        if (first_row, first_col) != (last_row, last_col) and last_col <= XLSX_MAX_COLUMNS:
            found.append((first_row, first_col, last_row, last_col))
    return found


class MergedCells:
    """Fills the cells of merged ranges from their anchors, one row at a time, in row order."""

    def __init__(self, ranges: Sequence[MergeRange]) -> None:
        self._waiting = sorted(ranges, reverse=True)  # pop() gives the next range to start
        # (last row, first index, stop index, anchor value) of the ranges begun so far
        self._active: list[tuple[int, int, int, object]] = []
        self._width = XLSX_MAX_COLUMNS  # the header's width, once known

    def __bool__(self) -> bool:
        return bool(self._waiting or self._active)

    def header_width(self, width: int) -> None:
        """Only the header's columns are read: ranges right of them are dropped."""
        self._width = width
        self._active = [a for a in self._active if a[1] < width]

    def begin(self, number: int, values: Sequence[object]) -> None:
        """Take the anchors of the ranges that start on row ``number`` (every row, blank too)."""
        waiting = self._waiting
        while waiting and waiting[-1][0] <= number:
            first_row, first_col, last_row, last_col = waiting.pop()
            if first_row < number or first_col > self._width:
                continue  # its anchor row was never read, or it lies right of the header
            anchor = values[first_col - 1] if first_col <= len(values) else None
            self._active.append((last_row, first_col - 1, last_col, anchor))

    def fill(self, number: int, values: Sequence[object]) -> Sequence[object]:
        """``values`` of row ``number`` with the covered cells set to their anchors' values."""
        live = [a for a in self._active if a[0] >= number]
        self._active = live
        if not live:
            return values
        row = list(values)
        width = self._width if self._width < XLSX_MAX_COLUMNS else len(row)
        # Checked before any cell is written: ranges sharing a cell would let the last one win
        # it, and thousands of them on one row would each be filled.
        spans = sorted(((first, min(stop, width), anchor) for _, first, stop, anchor in live
                        if first < min(stop, width)), key=lambda span: span[0])
        end = 0
        for first, stop, _ in spans:
            if first < end:
                raise OverlappingMerges(f"row {number}: merged ranges overlap")
            end = stop
        if end > len(row):
            row.extend([None] * (end - len(row)))
        for first, stop, anchor in spans:
            row[first:stop] = [anchor] * (stop - first)
        return row
