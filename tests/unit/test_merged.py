"""adapters/merged.py: merged ranges filled from their anchors, overlapping ranges refused."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from adapters.merged import MergedCells, MergeRange, OverlappingMerges

HEADER = ["h1", "h2", "h3", "h4", "h5"]
ROWS = [HEADER, ["a", "b", "c", "d", "e"], ["", "", "", "", "f"], ["", "", "", "", "g"]]


def _read(ranges: Sequence[MergeRange], rows: list[list[object]]) -> list[list[object]]:
    """The rows (row 1 the header) as the reader hands them over, merges filled."""
    merges = MergedCells(ranges)
    merges.header_width(len(rows[0]))
    out = []
    for number, values in enumerate(rows, start=1):
        merges.begin(number, values)
        out.append(list(merges.fill(number, values)))
    return out


def test_ranges_side_by_side_fill_their_own_cells() -> None:
    got = _read([(2, 1, 4, 1), (2, 2, 3, 3)], ROWS)  # A2:A4 and B2:C3
    assert got[2] == ["a", "b", "b", "", "f"] and got[3] == ["a", "", "", "", "g"]


@pytest.mark.parametrize("ranges", [
    [(2, 1, 3, 2), (2, 2, 3, 3)],  # A2:B3 and B2:C3 share column B
    [(2, 1, 3, 3), (3, 2, 4, 2)],  # B3:B4 starts inside A2:C3
], ids=["side-by-side", "nested"])
def test_ranges_that_share_a_cell_are_refused_though_they_cover_less_than_the_row(
        ranges: list[MergeRange]) -> None:
    """Excel will not open such a sheet.

    Before, only ranges summing past the row's width were refused; narrower ones silently
    let the last range win the shared cell.
    """
    with pytest.raises(OverlappingMerges):
        _read(ranges, ROWS)


def test_a_row_under_thousands_of_full_width_ranges_is_refused() -> None:
    with pytest.raises(OverlappingMerges):
        _read([(2, 1, 3, 5)] * 5000, ROWS)
