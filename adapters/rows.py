"""Helpers for adapters of one file row (health, finance, rosters).

:class:`TabularAdapter` guarantees one :class:`~adapters.base.ParsedRow` per row and never
raises; :class:`RowBuilder` reads cells by the partner's column name and names that column in
every error.  The readers that produce the rows live in :mod:`adapters.tabular`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from adapters.base import Adapter, ParsedRow
from adapters.normalize import (
    cell_text,
    code_text,
    mangled_number,
    parse_date,
    parse_decimal,
    show_value,
)
from adapters.tabular import row_error, row_error_zh
from contracts import CESubmission, Note
from gateway.pipeline.validate import note, validate_submission

ONE_PLACE = Decimal("0.1")
# A 学分 cell written with its unit ("2.5学分", "2.5 分"); the longer unit is tried first.
CREDIT_UNITS = ("学分", "分")


def unpack_row(raw: object) -> tuple[int | None, Mapping[str, object] | None, Note | None]:
    """Split an adapter input — ``(row_number, cells)`` or bare ``cells`` — into its parts.

    When it is not a usable row, the cells are ``None`` and a ``SCHEMA`` note says why.
    """
    row: int | None = None
    cells: object = raw
    if (isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[0], int)
            and not isinstance(raw[0], bool)):
        row, cells = raw
    if not isinstance(cells, Mapping):
        return row, None, note("SCHEMA", f"expected a row of cells, got {type(cells).__name__}",
                               detail_zh="应为一行数据（列名到单元格）")
    reason = row_error(cells)
    if reason is not None:
        return row, None, note("SCHEMA", reason,
                               detail_zh=f"该行无法读取：{row_error_zh(cells) or reason}")
    if not all(isinstance(k, str) for k in cells):
        return row, None, note("SCHEMA", "column names must be text", detail_zh="列名必须是文本")
    return row, cells, None


def to_hours(credits: Decimal, rate: Decimal) -> Decimal:
    """Credits × rate, rounded half-up to one decimal place (hours carry at most one)."""
    return (credits * rate).quantize(ONE_PLACE, rounding=ROUND_HALF_UP)


def credit_note(credits: Decimal, rate: Decimal, hours: Decimal, *, what: tuple[str, str],
                basis: tuple[str, str]) -> Note:
    """The ``CREDIT_CONVERSION`` rule note; ``what`` and ``basis`` are (English, Chinese)."""
    return Note(
        code="CREDIT_CONVERSION",
        message=f"{what[0]}: {credits} credits × {rate} h per credit = {hours} h ({basis[0]})",
        message_zh=f"{what[1]}：{credits} 学分 × 每学分 {rate} 学时 = {hours} 学时（{basis[1]}）",
    )


class TabularAdapter(Adapter):
    """An adapter of one file row.

    ``parse((row_number, cells))`` yields exactly one :class:`ParsedRow` and never raises;
    subclasses implement :meth:`parse_cells`.
    """

    @classmethod
    def stored_source_id(cls, sent: str) -> str:
        return code_text(sent)  # as a record-number cell is read (RowBuilder.record_id)

    def parse(self, raw: Any) -> Iterator[ParsedRow]:
        row, cells, problem = unpack_row(raw)
        if cells is None:
            kept = raw[1] if row is not None and isinstance(raw, tuple) else raw
            yield ParsedRow(row=row, raw=kept, errors=[problem] if problem else [])
            return
        try:
            parsed = self.parse_cells(row, cells)
        except Exception as exc:  # noqa: BLE001 - the contract: a bad row never raises
            detail = f"the row could not be read ({type(exc).__name__})"
            parsed = ParsedRow(row=row, raw=dict(cells), errors=[note(
                "SCHEMA", detail, detail_zh=f"无法读取该行（{type(exc).__name__}）")])
        yield parsed

    @abstractmethod
    def parse_cells(self, row: int | None, cells: Mapping[str, object]) -> ParsedRow:
        """One row's cells → a :class:`ParsedRow` (may raise only on a bug: caught above)."""

    def converted(self, parsed: ParsedRow, credits: Decimal | None, rate: Decimal, *,
                  what: tuple[str, str], basis: tuple[str, str]) -> ParsedRow:
        """Record native credits (for control totals), and hours on an acceptable row.

        The hours come with the ``CREDIT_CONVERSION`` rule note that explains them.
        """
        parsed.credits = credits
        if parsed.ok and credits is not None:
            hours = to_hours(credits, rate)
            parsed.credited_hours = hours
            parsed.rule_notes = [credit_note(credits, rate, hours, what=what, basis=basis)]
        return parsed


# -- row helper for tabular adapters ----------------------------------------------------------


def _kind_zh(raw: object) -> str:
    """What a cell that is not text holds, in Chinese (for its row error)."""
    if isinstance(raw, str):
        return "含有空字符或不符合文件编码的字节"
    if isinstance(raw, bool):
        return "收到布尔值"
    if isinstance(raw, float):
        return f"收到数值 {raw!r}"
    if isinstance(raw, dict):
        return "收到对象"
    if isinstance(raw, list):
        return "收到数组"
    return f"收到 {type(raw).__name__}"


def _column_note(column: str, detail: str, detail_zh: str) -> Note:
    return note("SCHEMA", f"{column}: {detail}", field=column, detail_zh=f"{column}：{detail_zh}")


class RowBuilder:
    """Reads one row's cells by Chinese column name into canonical values, collecting errors.

    A failing column records a ``SCHEMA`` error naming the column and returns a *placeholder*
    that satisfies the contract, so :meth:`finish` can still run the full validation (identity
    number, region, …) on the other columns and report every problem of the row at once;
    findings about placeholder columns are dropped and the row gets no submission.
    """

    def __init__(self, cells: Mapping[str, object]) -> None:
        self.cells = cells
        self.errors: list[Note] = []
        self.bad: set[str] = set()

    def _fail(self, column: str, detail: str, detail_zh: str) -> None:
        if column not in self.bad:
            self.bad.add(column)
            self.errors.append(_column_note(column, detail, detail_zh))

    def _raw(self, column: str, required: bool) -> object | None:
        if column not in self.cells:
            if required:
                self._fail(column, "missing column", "缺少该列")
            return None
        value = self.cells[column]
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                self._fail(column, "empty", "不能为空")
            return None
        return value

    def text(self, column: str, *, required: bool = True, code: bool = False,
             placeholder: str = "-") -> str | None:
        """Stripped text of a cell.

        ``code=True`` also folds full-width characters and drops spaces (identity numbers,
        region codes, record ids).
        """
        raw = self._raw(column, required)
        if raw is None:
            return placeholder if required else None
        try:
            value = cell_text(raw)
        except ValueError as exc:
            self._fail(column, str(exc), f"不是有效文本（{_kind_zh(raw)}）")
            return placeholder if required else None
        if code:
            value = code_text(value)
        if not value:
            if required:
                self._fail(column, "empty", "不能为空")
                return placeholder
            return None
        return value

    def record_id(self, column: str) -> str:
        """A required record number (code text), refused when Excel has mangled it.

        See :func:`adapters.normalize.mangled_number`: a record number that lost digits would
        merge two people's rows into one record.
        """
        value = self.text(column, code=True) or "-"
        raw = self.cells.get(column)
        # Most ids are text with no E in them: one test each, before the function call.
        if (isinstance(raw, float) or "E" in value or "e" in value) and column not in self.bad:
            problem = mangled_number(raw, value)
            if problem is not None:
                self._fail(column, *problem)
        return value

    def number(self, column: str, *, required: bool = True,
               units: tuple[str, ...] = ()) -> Decimal | None:
        """A non-negative number; text may end in one of the column's own ``units``.

        ``units`` are tried in order, so a longer one goes first (``("学分", "分")``): a
        hand-kept sheet writes "2.5学分", and the unit is the column's, so nothing is guessed.
        """
        raw = self._raw(column, required)
        if raw is None:
            return Decimal(0) if required else None
        if units and isinstance(raw, str) and raw.rstrip().endswith(units):
            text = raw.rstrip()
            unit = next(u for u in units if text.endswith(u))
            raw = text[: -len(unit)]
        try:
            value = parse_decimal(raw)
        except ValueError as exc:
            self._fail(column, str(exc), f"不是有效数字：{show_value(raw)}")
            return Decimal(0) if required else None
        if value < 0:
            self._fail(column, f"negative: {value}", f"不能为负数：{value}")
            return Decimal(0) if required else None
        return value

    def day(self, column: str, *, required: bool = True) -> date | None:
        raw = self._raw(column, required)
        if raw is None:
            return date(2000, 1, 1) if required else None
        try:
            return parse_date(raw)
        except ValueError as exc:
            self._fail(column, str(exc), f"不是有效日期：{show_value(raw)}（应如 2026-03-05、2026/3/5、"
                       "20260305 或 2026年3月5日）")
            return date(2000, 1, 1) if required else None

    def choice(self, column: str, table: Mapping[str, str], expected: str, *,
               required: bool = True) -> str | None:
        """A cell looked up in ``table``.

        The keys of ``table`` are folded (NFKC, upper case, no spaces); ``expected`` names the
        allowed values in an error.
        """
        text = self.text(column, required=required, code=True)
        if text is None or column in self.bad:
            return next(iter(table.values())) if required else None
        key = text.upper()
        if key not in table:
            self._fail(column, f"unknown value {show_value(text)} (expected {expected})",
                       f"取值 {show_value(text)} 不在允许范围内（应为 {expected}）")
            return next(iter(table.values())) if required else None
        return table[key]

    def finish(
        self, raw: Mapping[str, object], columns_of: Mapping[str, str]
    ) -> tuple[CESubmission | None, list[Note], list[Note]]:
        """Validate the canonical dict; notes get the Chinese column of their field.

        ``columns_of`` maps a canonical path (``person.id_number``) or its prefix to a column.
        """
        checked = validate_submission(dict(raw))
        errors = list(self.errors)
        warnings_: list[Note] = []
        for found, target in ((checked.errors, errors), (checked.warnings, warnings_)):
            for n in found:
                column = _column_of(n.field, columns_of)
                if column is not None and column in self.bad:
                    continue  # about a placeholder: the column's own error says it
                target.append(n if column is None else n.model_copy(update={"field": column}))
        submission = checked.submission if not self.errors else None
        return submission, errors, warnings_


def _column_of(path: str | None, columns_of: Mapping[str, str]) -> str | None:
    while path:
        if path in columns_of:
            return columns_of[path]
        path = path.rpartition(".")[0]
    return None
