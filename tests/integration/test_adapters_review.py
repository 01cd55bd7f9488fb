"""Review of the partner adapters against SPEC §3/§8 and the notice (青人社厅函〔2022〕394号).

What a provincial health or finance department's real files look like, pushed through the real
readers (``adapters.tabular``), the adapters' ``parse`` and, where the effect is on the store,
the batch processor on SQLite and PostgreSQL.  Each test under "findings" was a strict xfail
(a finding, its reason saying what was wrong and where); each is fixed and now guards its fix.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from openpyxl import Workbook
from sqlalchemy import Engine, select

from adapters.base import ParsedRow
from adapters.health import HealthAdapter
from adapters.tabular import iter_csv, iter_xlsx
from adapters.training_base import TrainingBaseRosterAdapter
from gateway.accounts import Partner
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.batch_status import batch_status
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.signing import file_sha256
from gateway.store.tables import records
from mock_partners.files import FINANCE_HEADERS, HEALTH_HEADERS, write_csv
from mock_partners.generators import make_id_number
from tests.contract.test_adapter_suite import FINANCE_CELLS, HEALTH_CELLS

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]

RNG = random.Random(20261127)
ID_A = make_id_number(RNG, "630102", date(1987, 4, 13))
ID_B = make_id_number(RNG, "630202", date(1979, 9, 2))
ID_C = make_id_number(RNG, "632801", date(1990, 1, 30))

HEALTH: dict[str, object] = {**HEALTH_CELLS, "身份证号": ID_A}
FINANCE: dict[str, object] = {**FINANCE_CELLS, "证件号码": ID_A, "单位名称": "海东市平安区财政局",
                              "地区代码": "630200", "学习方式": "网络", "完成日期": "2026-03-05"}


def _one(rows: list[ParsedRow]) -> ParsedRow:
    assert len(rows) == 1
    return rows[0]


def _csv(header: list[str], rows: list[list[object]], encoding: str = "utf-8") -> bytes:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    return ("\r\n".join(lines) + "\r\n").encode(encoding)


def _health_rows(data: bytes) -> list[ParsedRow]:
    adapter = HealthAdapter()
    return [p for row in iter_csv(io.BytesIO(data)) for p in adapter.parse(row)]


def _codes(p: ParsedRow) -> list[tuple[str | None, str]]:
    return [(e.field, e.code) for e in p.errors]


# -- the batch processor, as an upload is processed ------------------------------------------


def _run_batch(engine: Engine, settings: Settings, partner: Partner, path: Path, kind: str,
               period: str) -> dict[str, Any]:
    batch = NewBatch(new_batch_id(), partner.partner_id, partner.adapter, kind, period, path,
                     "csv", path.stat().st_size, file_sha256(path))
    record_batch(engine, batch, actor=partner.partner_id)
    processor = BatchProcessor(engine, settings, name="adapters-review")
    for _ in range(5):
        if not processor.run_once():
            break
    with engine.connect() as conn:
        status = batch_status(conn, batch.batch_id)
    assert status is not None and status["status"] == "done", status
    return status


def _finance_file(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "finance.csv"
    write_csv(path, rows, FINANCE_HEADERS)
    return path


# -- findings ---------------------------------------------------------------------------------


def test_finance_row_with_an_old_or_placeholder_employer_code_is_accepted(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner,
        tmp_path: Path) -> None:
    partner = new_partner(engine, adapter="finance")
    rows = [
        {**FINANCE, "流水号": "KJ-1", "证件号码": ID_A, "统一社会信用代码": "无"},
        {**FINANCE, "流水号": "KJ-2", "证件号码": ID_B, "统一社会信用代码": "12345678-9"},
        {**FINANCE, "流水号": "KJ-3", "证件号码": ID_C, "统一社会信用代码": "630100400001234"},
    ]
    status = _run_batch(engine, make_settings(db_url), partner, _finance_file(tmp_path, rows),
                        "monthly", "2026-03")
    assert status["rejected_rows"] == []
    assert status["counts"]["accepted"] == 3


def test_record_numbers_mangled_by_excel_are_refused_not_merged(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner,
        tmp_path: Path) -> None:
    partner = new_partner(engine, adapter="finance")
    rows = [{**FINANCE, "流水号": "2.02603E+16", "证件号码": ID_A, "姓名": "赵伟"},
            {**FINANCE, "流水号": "2.02603E+16", "证件号码": ID_B, "姓名": "马兰"}]
    status = _run_batch(engine, make_settings(db_url), partner, _finance_file(tmp_path, rows),
                        "monthly", "2026-03")
    with engine.connect() as conn:
        versions = conn.execute(select(records.c.current_version)).scalars().all()
    assert status["counts"]["corrected"] == 0, "another person's row replaced the first record"
    assert all(v == 1 for v in versions)
    assert [(r["row"], r["column"], r["code"]) for r in status["rejected_rows"]] == [
        (2, "流水号", "SCHEMA"), (3, "流水号", "SCHEMA")]


@pytest.mark.parametrize("padded", [{"姓名": "姓　名"}, {"姓名": "姓 名"}, {"学分类别": "学分 类别"}])
def test_headers_padded_with_spaces_still_name_their_columns(padded: dict[str, str]) -> None:
    header = [padded.get(name, name) for name in HEALTH_HEADERS]
    parsed = _one(_health_rows(_csv(header, [[HEALTH[name] for name in HEALTH_HEADERS]])))
    assert _codes(parsed) == []
    assert parsed.submission is not None and parsed.submission.person.name == "赵伟"


def test_xlsx_merged_cells_give_every_row_their_value() -> None:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(list(HEALTH_HEADERS))
    first = [HEALTH[name] for name in HEALTH_HEADERS]
    second = [{"记录编号": "WJ-2026-000124", "身份证号": ID_B, "姓名": "马兰",
               "工作单位": None, "地区代码": None}.get(name, HEALTH[name]) for name in HEALTH_HEADERS]
    sheet.append(first)
    sheet.append(second)
    for name in ("工作单位", "地区代码"):
        column = HEALTH_HEADERS.index(name) + 1
        sheet.merge_cells(start_row=2, start_column=column, end_row=3, end_column=column)
    data = io.BytesIO()
    book.save(data)
    data.seek(0)
    parsed = [p for row in iter_xlsx(data) for p in HealthAdapter().parse(row)]
    assert [_codes(p) for p in parsed] == [[], []]
    subs = [p.submission for p in parsed]
    assert [(s.person.region_code, s.person.employer_name) for s in subs if s] == [
        ("630100", "青海省人民医院"), ("630100", "青海省人民医院")]


def test_roster_row_the_reader_could_not_read_says_why() -> None:
    header = ["result_id", "id_no", "name", "employer", "region", "hours", "completed_on",
              "base_code", "plan_id"]
    good = ",".join(["R1", ID_A, "张三", "青海省人民医院心血管内科", "630102", "24", "2026-03-05",
                     "JD-01", "P-1"]).encode()
    bad = b",".join([b"R2", ID_B.encode(), b"\xff\xfe", "青海省人民医院".encode(), b"630102",
                     b"24", b"2026-03-05", b"JD-01", b"P-1"])
    data = ",".join(header).encode() + b"\r\n" + good + b"\r\n" + bad + b"\r\n"
    adapter = TrainingBaseRosterAdapter()
    parsed = [p for row in iter_csv(io.BytesIO(data)) for p in adapter.parse(row)]
    assert [p.ok for p in parsed] == [True, False]
    errors = parsed[1].errors
    assert [e.code for e in errors] == ["SCHEMA"]
    assert "utf-8" in errors[0].message, errors[0].message  # the reader's reason, not "required"


def test_excel_unicode_text_csv_reads_as_its_rows() -> None:
    lines = ["\t".join(HEALTH_HEADERS), "\t".join(str(HEALTH[n]) for n in HEALTH_HEADERS)]
    data = ("\r\n".join(lines) + "\r\n").encode("utf-16")  # BOM + UTF-16LE, as Excel writes
    parsed = _health_rows(data)
    assert [_codes(p) for p in parsed] == [[]]


@pytest.mark.parametrize("credits", ["2.5学分", "2.5 学分", "2.5分"])
def test_credits_written_with_their_unit(credits: str) -> None:
    parsed = _one(list(HealthAdapter().parse((2, {**HEALTH, "学分": credits}))))
    assert _codes(parsed) == []
    assert str(parsed.credits) == "2.5" and str(parsed.credited_hours) == "9.0"


# -- checked and right, not covered elsewhere -------------------------------------------------


@pytest.mark.parametrize("encoding", ["gb18030", "utf-8-sig"])
def test_health_batch_with_a_repeated_header_row_and_blank_tail(
        encoding: str, db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: NewPartner, tmp_path: Path) -> None:
    """A file concatenated from two exports (header again mid-file, blank rows at the end).

    The repeated header is one rejected row naming its columns; its neighbours are accepted
    and the blank tail counts nothing.
    """
    partner = new_partner(engine, adapter="health")
    second = {**HEALTH, "记录编号": "WJ-2026-000124", "身份证号": ID_B, "姓名": "马兰"}
    rows = [[HEALTH[n] for n in HEALTH_HEADERS], list(HEALTH_HEADERS),
            [second[n] for n in HEALTH_HEADERS], [""] * len(HEALTH_HEADERS), [" "] * 3]
    path = tmp_path / "health.csv"
    path.write_bytes(_csv(list(HEALTH_HEADERS), rows, encoding))
    status = _run_batch(engine, make_settings(db_url), partner, path, "monthly", "2026-03")
    assert (status["counts"]["accepted"], status["counts"]["rejected"]) == (2, 1)
    assert {r["row"] for r in status["rejected_rows"]} == {3}
    assert {r["code"] for r in status["rejected_rows"]} == {"SCHEMA"}
