"""Seeded generators of the health and finance partners' batch files (SPEC §8).

Deterministic for a seed, streaming (a million rows are never held in memory), and realistic
enough to exercise the readers and adapters: Chinese headers, identity numbers with valid
check digits, dates in every form of SPEC §8, now and then full-width digits.

- :func:`health_rows`, :func:`finance_rows` — iterators of row dicts (header → cell).  With
  ``bad_ratio > 0`` a share of rows is corrupted, one fault each; such a row carries
  ``row[BAD_KEY] == (column, code)``: the column and error code the adapter must answer.
  Keys starting with ``_`` are never written to a file.
- :func:`write_csv`, :func:`write_xlsx`, :func:`write_ndjson` — stream rows to a file.
- :func:`year_dataset` — twelve monthly pushes and the annual push built from them, with a
  manifest naming which record ids the reconciliation must report in which category.

No generated person has two rows for the same project on the same day (the dedup natural key),
unless :func:`year_dataset` makes that conflict on purpose.
"""

from __future__ import annotations

import calendar
import csv
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson
from stdnum.cn import uscc

from adapters.normalize import parse_date, parse_decimal
from mock_partners.generators import corrupt_check_digit, make_person

__all__ = [
    "BAD_KEY",
    "FINANCE_HEADERS",
    "HEALTH_HEADERS",
    "YearDataset",
    "finance_rows",
    "health_rows",
    "write_csv",
    "write_ndjson",
    "write_xlsx",
    "year_dataset",
]

Row = dict[str, Any]

BAD_KEY = "_bad"
HEALTH_HEADERS = ("记录编号", "身份证号", "姓名", "工作单位", "地区代码", "项目编号", "项目名称",
                  "学分类别", "学分", "开始日期", "完成日期", "证书编号")
FINANCE_HEADERS = ("流水号", "证件号码", "姓名", "单位名称", "统一社会信用代码", "地区代码",
                   "学习方式", "课程名称", "科目类别", "学分", "完成日期")

HOSPITALS = ["青海省人民医院", "青海大学附属医院", "西宁市第一人民医院", "海东市第二人民医院",
             "玉树州人民医院", "海西州人民医院", "果洛州人民医院", "湟中区卫生院",
             "青海省妇女儿童医院", "青海省藏医院"]
CME_TITLES = ["高原病防治新进展", "急诊急救技能培训", "基层慢病管理", "医院感染防控规范",
              "临床合理用药", "藏医药传承与发展", "妇幼保健适宜技术", "医学影像诊断新技术",
              "包虫病防治", "全科医学基层实践", "重症医学规范化诊疗", "中医适宜技术推广"]
FINANCE_UNITS = ["青海省财政厅", "西宁市国有资产监督管理委员会", "格尔木市财政局",
                 "青海盐湖工业股份有限公司", "海东市审计局", "青海银行股份有限公司",
                 "玉树州财政局", "西宁市城西区财政局"]
FINANCE_COURSES = [("政府会计制度专题", 8), ("企业会计准则解读", 12), ("管理会计应用指引", 8),
                   ("税收政策解读", 6), ("内部控制规范", 8), ("财务共享服务实务", 12),
                   ("会计职业道德", 4), ("预算绩效管理", 16), ("数字化转型与财务", 24)]

_FULL = str.maketrans("0123456789.", "０１２３４５６７８９．")
_CLASS_SPELLINGS = {"I": ["Ⅰ类"] * 5 + ["I类", "I", "一类", "Ｉ类"],
                    "II": ["Ⅱ类"] * 5 + ["II类", "II", "二类", "ＩＩ类"]}
_MODES = ["面授"] * 4 + ["网络"] * 5 + ["其他"]
_KINDS = ["专业科目"] * 4 + ["公需科目"]
_USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"


def _date_text(rng: random.Random, day: date) -> str:
    """One of the SPEC §8 date forms, now and then in full-width digits."""
    form = rng.randrange(4)
    text = (day.isoformat(), f"{day.year}/{day.month}/{day.day}", f"{day:%Y%m%d}",
            f"{day.year}年{day.month}月{day.day}日")[form]
    return text.translate(_FULL) if rng.random() < 0.03 else text


def _maybe_full(rng: random.Random, text: str) -> str:
    return text.translate(_FULL) if rng.random() < 0.03 else text


@dataclass(frozen=True)
class _Project:
    plan_id: str
    title: str
    credit_class: str
    credits: Decimal


def _uscc(rng: random.Random, region: str) -> str:
    body = "91" + region + "".join(rng.choice(_USCC_CHARS) for _ in range(9))
    return body + uscc.calc_check_digit(body)


class _Maker:
    """Rows for one span of days; each person's k-th row falls on its own (day, project).

    Person p's k-th row is on day ``(offset_p + k) % D``; from the (D+1)-th row on the project
    gets a session suffix, so (person, project, day) never repeats whatever the row count.
    """

    def __init__(self, rng: random.Random, people: Sequence[Any], offsets: Sequence[int],
                 first: date, days: int, prefix: str) -> None:
        self.rng, self.people, self.offsets = rng, people, offsets
        self.first, self.days, self.prefix = first, days, prefix
        self.counts = [0] * len(people)
        self.seq = 0

    def _slot(self) -> tuple[Any, date, int]:
        p = self.rng.randrange(len(self.people))
        k = self.counts[p]
        self.counts[p] = k + 1
        day = self.first + timedelta(days=(self.offsets[p] + k) % self.days)
        return self.people[p], day, k // self.days

    def next_id(self) -> str:
        self.seq += 1
        return f"{self.prefix}{self.seq:07d}"

    def row(self) -> Row:
        raise NotImplementedError


class _Health(_Maker):
    projects: list[_Project]

    def row(self) -> Row:
        rng = self.rng
        person, done, session = self._slot()
        project = rng.choice(self.projects)
        title, plan_id = project.title, project.plan_id
        if session:
            title, plan_id = f"{title}（第{session + 1}期）", plan_id and f"{plan_id}-{session + 1}"
        start = done - timedelta(days=rng.randrange(4)) if rng.random() < 0.85 else None
        id_number = person.id_number
        if rng.random() < 0.02:
            id_number = f"{id_number[:6]} {id_number[6:14]} {id_number[14:]}"
        return {
            "记录编号": self.next_id(),
            "身份证号": id_number,
            "姓名": person.name,
            "工作单位": rng.choice(HOSPITALS),
            "地区代码": _maybe_full(rng, person.region),
            "项目编号": plan_id,
            "项目名称": title,
            "学分类别": rng.choice(_CLASS_SPELLINGS[project.credit_class]),
            "学分": _maybe_full(rng, str(project.credits)),
            "开始日期": _date_text(rng, start) if start else "",
            "完成日期": _date_text(rng, done),
            "证书编号": f"CME{done.year}{rng.randrange(10**8):08d}" if rng.random() < 0.9 else "",
        }


class _Finance(_Maker):
    uscc_of: dict[str, str]

    def row(self) -> Row:
        rng = self.rng
        person, done, session = self._slot()
        title, credits = rng.choice(FINANCE_COURSES)
        if session:
            title = f"{title}（第{session + 1}期）"
        unit = rng.choice(FINANCE_UNITS)
        return {
            "流水号": self.next_id(),
            "证件号码": person.id_number,
            "姓名": person.name,
            "单位名称": unit,
            "统一社会信用代码": self.uscc_of[unit] if rng.random() < 0.7 else "",
            "地区代码": _maybe_full(rng, person.region),
            "学习方式": rng.choice(_MODES),
            "课程名称": title,
            "科目类别": rng.choice(_KINDS),
            "学分": _maybe_full(rng, str(credits)),
            "完成日期": _date_text(rng, done),
        }


def _people(rng: random.Random, count: int) -> tuple[list[Any], list[int]]:
    people = [make_person(rng) for _ in range(count)]
    return people, [rng.randrange(366) for _ in people]


def _health_projects(rng: random.Random, year: int) -> list[_Project]:
    projects = []
    for i, title in enumerate(CME_TITLES):
        cls = "I" if i % 3 else "II"
        if cls == "I":
            level = rng.choice(["国", "青"])
            plan = f"{year}-{rng.randint(1, 18):02d}-{rng.randint(1, 12):02d}-{rng.randrange(1000):03d}({level})"
            credits = Decimal(rng.choice([1, 2, 3, 4, 5, 6, 8, 10]))
        else:
            plan = ""  # self-organised Ⅱ类 activities often have no project number
            credits = Decimal(rng.choice(["0.5", "1", "1.5", "2", "3"]))
        projects.append(_Project(plan, title, cls, credits))
    return projects


def _span(year: int, month: int | None) -> tuple[date, int]:
    if month is None:
        return date(year, 1, 1), 366 if calendar.isleap(year) else 365
    return date(year, month, 1), calendar.monthrange(year, month)[1]


def _pool_size(n: int) -> int:
    return max(20, min((n + 1) // 2, 100_000))


def _make(adapter: Literal["health", "finance"], rng: random.Random, year: int,
          month: int | None, people: list[Any], offsets: list[int], prefix: str) -> _Maker:
    first, days = _span(year, month)
    if adapter == "health":
        health = _Health(rng, people, offsets, first, days, prefix)
        health.projects = _health_projects(random.Random(f"projects-{year}"), year)
        return health
    finance = _Finance(rng, people, offsets, first, days, prefix)
    unit_rng = random.Random("units")
    finance.uscc_of = {u: _uscc(unit_rng, "630100") for u in FINANCE_UNITS}
    return finance


# -- faults -----------------------------------------------------------------------------------


def _corrupt(rng: random.Random, row: Row, faults: Sequence[tuple[str, str, str]],
             year: int) -> Row:
    kind, column, code = rng.choice(faults)
    if kind == "id":
        row[column] = corrupt_check_digit(str(row[column]).replace(" ", ""))
    elif kind == "impossible_date":
        row[column] = f"{year}-02-30"
    elif kind == "junk_date":
        row[column] = rng.choice(["下月补报", "2026-13-01", "N/A"])
    elif kind == "empty":
        row[column] = ""
    elif kind == "credits":
        row[column] = rng.choice(["两学分", "abc", "1,5", "-"])
    elif kind == "region":
        row[column] = "639999"
    else:
        row[column] = kind  # an unknown enumeration value, written as is
    row[BAD_KEY] = (column, code)
    return row


_HEALTH_FAULTS = [("id", "身份证号", "ID_NUMBER_INVALID"), ("impossible_date", "完成日期", "SCHEMA"),
                  ("junk_date", "开始日期", "SCHEMA"), ("empty", "姓名", "SCHEMA"),
                  ("credits", "学分", "SCHEMA"), ("Ⅲ类", "学分类别", "SCHEMA"),
                  ("region", "地区代码", "REGION_UNKNOWN"), ("empty", "项目名称", "SCHEMA")]
_FINANCE_FAULTS = [("id", "证件号码", "ID_NUMBER_INVALID"), ("impossible_date", "完成日期", "SCHEMA"),
                   ("empty", "姓名", "SCHEMA"), ("credits", "学分", "SCHEMA"),
                   ("函授", "学习方式", "SCHEMA"), ("继续科目", "科目类别", "SCHEMA"),
                   ("region", "地区代码", "REGION_UNKNOWN"), ("empty", "课程名称", "SCHEMA")]


def _rows(adapter: Literal["health", "finance"], seed: int, n: int, year: int,
          month: int | None, bad_ratio: float) -> Iterator[Row]:
    rng = random.Random(seed)
    people, offsets = _people(rng, _pool_size(n))
    tag = "WJ" if adapter == "health" else "KJ"
    maker = _make(adapter, rng, year, month, people, offsets,
                  f"{tag}{year}{month or 0:02d}-{seed}-")
    faults = _HEALTH_FAULTS if adapter == "health" else _FINANCE_FAULTS
    for _ in range(n):
        row = maker.row()
        if bad_ratio and rng.random() < bad_ratio:
            row = _corrupt(rng, row, faults, year)
        yield row


def health_rows(seed: int, n: int, year: int, month: int | None = None,
                bad_ratio: float = 0.0) -> Iterator[Row]:
    """``n`` rows of the health commission's file (:data:`HEALTH_HEADERS`).

    They were completed in ``year`` (and ``month``); a ``bad_ratio`` share carries one fault,
    named by ``row[BAD_KEY]``.
    """
    return _rows("health", seed, n, year, month, bad_ratio)


def finance_rows(seed: int, n: int, year: int, month: int | None = None,
                 bad_ratio: float = 0.0) -> Iterator[Row]:
    """``n`` rows of the finance department's file (:data:`FINANCE_HEADERS`), as health_rows."""
    return _rows("finance", seed, n, year, month, bad_ratio)


# -- writers ----------------------------------------------------------------------------------


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def write_csv(path: str | Path, rows: Iterable[Row], headers: Sequence[str],
              encoding: Literal["utf-8", "utf-8-sig", "gb18030"] = "utf-8") -> int:
    """Stream ``rows`` to a CSV file with a header line; returns the number of data rows."""
    count = 0
    with open(path, "w", encoding=encoding, newline="") as out:
        writer = csv.writer(out)
        writer.writerow(headers)
        for row in rows:
            writer.writerow([_text(row.get(h)) for h in headers])
            count += 1
    return count


_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _excel_serial(day: date) -> int:
    return (day - date(1899, 12, 30)).days


def write_xlsx(path: str | Path, rows: Iterable[Row], headers: Sequence[str],
               date_cells: bool = True, number_columns: Sequence[str] = ("学分",)) -> int:
    """Stream ``rows`` to an XLSX workbook (openpyxl write-only mode); returns the row count.

    With ``date_cells``, cells of columns named ``…日期`` that hold a valid date are written
    as Excel dates in most rows, as plain text in every third row (as typed), and as a bare
    serial number in every tenth (a cell whose date format was lost).  Plain ASCII numbers in
    ``number_columns`` become numeric cells.  Anything that does not parse stays text, so a
    faulty row stays faulty.
    """
    from openpyxl import Workbook

    book = Workbook(write_only=True)
    sheet = book.create_sheet("Sheet1")
    sheet.append(list(headers))
    dated = {h for h in headers if h.endswith("日期")} if date_cells else set()
    numeric = set(number_columns)
    count = 0
    for i, row in enumerate(rows):
        cells: list[object] = []
        for h in headers:
            value = row.get(h)
            if h in dated and isinstance(value, str) and value and i % 3 != 2:
                try:
                    day = parse_date(value)
                except ValueError:
                    pass
                else:
                    value = _excel_serial(day) if i % 10 == 9 else day
            elif h in numeric and isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value):
                number = parse_decimal(value)
                value = int(number) if number == number.to_integral_value() else float(number)
            cells.append("" if value is None else value)
        sheet.append(cells)
        count += 1
    book.save(path)
    return count


def write_ndjson(path: str | Path, rows: Iterable[Row], headers: Sequence[str] | None = None) -> int:
    """Stream ``rows`` as one JSON object a line (UTF-8); ``_``-keys are left out."""
    count = 0
    with open(path, "wb") as out:
        for row in rows:
            keys = headers if headers is not None else [k for k in row if not k.startswith("_")]
            out.write(orjson.dumps({k: row.get(k, "") for k in keys}, default=str) + b"\n")
            count += 1
    return count


# -- a year of pushes, for reconciliation ------------------------------------------------------


class YearDataset(NamedTuple):
    monthly: list[list[Row]]  # 12 lists, January first; an empty list is a month never pushed
    annual: list[Row]
    manifest: dict[str, Any]


def year_dataset(seed: int, year: int, people: int = 200, per_month: int = 40,
                 adapter: Literal["health", "finance"] = "health") -> YearDataset:
    """Twelve monthly batches and the annual batch built from them.

    The annual batch repeats most monthly rows exactly (``unchanged``); changes the credits of
    a few under the same record id (``changed``: a correction); leaves a few out (``missing``);
    adds new rows (``added``), among them every row of the one or two months that were never
    pushed (``empty_months``); and reports a few activities again under a new record id with
    other credits (``conflict``; ``conflict_with`` maps each to the record it collides with:
    same person, project and completion date).  ``manifest`` lists the record ids of each
    category (sorted) and ``id_column`` names the record-id column.
    """
    rng = random.Random(seed)
    pool, offsets = _people(rng, people)
    tag, id_column = ("WJ", "记录编号") if adapter == "health" else ("KJ", "流水号")
    empty = sorted(rng.sample(range(1, 13), rng.choice([1, 2])))
    makers = {m: _make(adapter, rng, year, m, pool, offsets, f"{tag}{year}{m:02d}-{seed}-")
              for m in range(1, 13)}

    monthly: list[list[Row]] = []
    for m in range(1, 13):
        count = 0 if m in empty else per_month
        monthly.append([makers[m].row() for _ in range(count)])

    pushed = [row[id_column] for rows in monthly for row in rows]
    few = max(2, len(pushed) // 40)
    picked = rng.sample(pushed, 3 * few)
    changed, missing, conflicted = set(picked[:few]), set(picked[few:2 * few]), picked[2 * few:]

    annual: list[Row] = []
    added: list[str] = []
    conflicts: dict[str, str] = {}
    for m, rows in enumerate(monthly, start=1):
        for row in rows:
            rid = row[id_column]
            if rid in missing:
                continue
            if rid in changed:
                row = {**row, "学分": str(parse_decimal(row["学分"]) + 1)}
            annual.append(dict(row))
        extra = per_month if m in empty else rng.randrange(0, 3)
        for _ in range(extra):
            new = makers[m].row()
            added.append(new[id_column])
            annual.append(new)
        for rid in conflicted:
            original = next((r for r in rows if r[id_column] == rid), None)
            if original is not None:
                twin = {**original, id_column: makers[m].next_id(),
                        "学分": str(parse_decimal(original["学分"]) + 2)}
                conflicts[twin[id_column]] = rid
                annual.append(twin)

    unchanged = [rid for rid in pushed if rid not in changed and rid not in missing]
    manifest: dict[str, Any] = {
        "id_column": id_column,
        "unchanged": sorted(unchanged),
        "changed": sorted(changed),
        "missing": sorted(missing),
        "added": sorted(added),
        "conflict": sorted(conflicts),
        "conflict_with": dict(sorted(conflicts.items())),
        "empty_months": empty,
        "monthly_counts": [len(rows) for rows in monthly],
        "annual_count": len(annual),
    }
    return YearDataset(monthly, annual, manifest)

