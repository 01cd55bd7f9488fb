"""Review of the changes landed since cd7e0c2 (session20): person keys, Excel-mangled ids.

Its two findings (commands other than serve/worker ignoring a wrong PERSON_KEY_SECRET; an
XLSX record number Excel rounded, read as an int) were strict xfails and are fixed; the tests
assert the correct behaviour.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from openpyxl import Workbook
from sqlalchemy import func, select

from adapters.finance import FinanceAdapter
from adapters.tabular import iter_xlsx
from gateway.person_keys import PersonKeys
from gateway.store.db import make_engine
from gateway.store.tables import batches, record_versions, records, reference_deferrals
from mock_partners.files import FINANCE_HEADERS
from tests.fixtures import make_golden
from tests.integration.test_adapters_review import FINANCE, ID_A, ID_B
from tests.support.servers import cli

SECRET = "session20-deployments-own-person-key-secret-0123456789"
OTHER = "session20-a-different-person-key-secret-9876543210"


def _keyed_store(tmp_path: Path) -> dict[str, str]:
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'keyed.sqlite3'}",
           "CE_GATEWAY_SECRET_KEY": "session20-secret-key",
           "CE_GATEWAY_BATCH_DIR": str(tmp_path / "batches"),
           "CE_GATEWAY_PERSON_KEY_SECRET": SECRET}
    migrated = cli(env, "db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    return env


def _count(url: str, table: object) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]
    finally:
        engine.dispose()


# Found: only `serve` and `worker` checked the secret against the store; every other command
# (ingest, reference import, retention run, revalidate, …) wrote person keys under whatever
# CE_GATEWAY_PERSON_KEY_SECRET it was given - a one-off `ingest` from a shell without the
# deployment's secret filed everyone of its file under a second key, with no way to re-key.
# Fixed: gateway/cli/common.py _engine checks it for every command that opens the store.


def test_cli_ingest_refuses_another_person_key_secret(tmp_path: Path) -> None:
    env = _keyed_store(tmp_path)
    wrong = cli({**env, "CE_GATEWAY_PERSON_KEY_SECRET": OTHER}, "ingest",
                str(make_golden.HEALTH_CSV), "--adapter", "health", "--kind", "monthly",
                "--period", "2026-03", "--json")
    url = env["CE_GATEWAY_DATABASE_URL"]
    written = _count(url, records)
    assert wrong.returncode == 2, (wrong.returncode, wrong.stderr[-400:])
    assert "CONFIG_INVALID (CE_GATEWAY_PERSON_KEY_SECRET)" in wrong.stderr
    assert written == 0 and _count(url, batches) == 0


def test_cli_reference_import_refuses_another_person_key_secret(tmp_path: Path) -> None:
    env = _keyed_store(tmp_path)
    deferrals = tmp_path / "deferrals.csv"
    deferrals.write_text(f"id_number,from_year,reason,approved_on\n{ID_A},2025,illness,"
                         "2026-01-06\n", encoding="utf-8")
    wrong = cli({**env, "CE_GATEWAY_PERSON_KEY_SECRET": OTHER}, "reference", "import",
                "deferrals", str(deferrals), "--json")
    written = _count(env["CE_GATEWAY_DATABASE_URL"], reference_deferrals)
    assert wrong.returncode == 2, (wrong.returncode, wrong.stderr[-400:])
    assert "CONFIG_INVALID (CE_GATEWAY_PERSON_KEY_SECRET)" in wrong.stderr
    assert written == 0


@pytest.mark.parametrize("args", [("retention", "run", "--json"),
                                  ("revalidate", "--reason", "review", "--json")])
def test_other_writing_commands_refuse_another_person_key_secret(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    env = _keyed_store(tmp_path)
    wrong = cli({**env, "CE_GATEWAY_PERSON_KEY_SECRET": OTHER}, *args)
    assert wrong.returncode == 2, (wrong.returncode, wrong.stderr[-400:])
    assert "CONFIG_INVALID (CE_GATEWAY_PERSON_KEY_SECRET)" in wrong.stderr


def test_cli_ingest_with_the_stores_own_secret_keys_with_it(tmp_path: Path) -> None:
    """The right secret: the CLI's records carry the store's keyed person keys."""
    env = _keyed_store(tmp_path)
    done = cli(env, "ingest", str(make_golden.HEALTH_CSV), "--adapter", "health", "--kind",
               "monthly", "--period", "2026-03", "--json")
    assert done.returncode == 0, done.stderr[-400:]
    engine = make_engine(env["CE_GATEWAY_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(records.c.person_key, record_versions.c.payload).join(
                record_versions, record_versions.c.record_id == records.c.record_id)).all()
    finally:
        engine.dispose()
    assert stored
    for person_key, payload in stored:
        person = json.loads(payload)["person"]
        assert person_key == PersonKeys(SECRET).of(person["id_type"], person["id_number"])


# -- adapters ----------------------------------------------------------------------------------


def _finance_xlsx(rows: list[dict[str, object]], *, whole: bool = False,
                  ) -> list[tuple[int, dict[str, object]]]:
    """``rows`` (over FINANCE's cells) as an XLSX sheet, read back by the batch reader.

    openpyxl writes a long int as a double (``6.3…e+17``); ``whole`` writes each such number
    cell's digits whole instead, as some exporters do (PhpSpreadsheet with a PHP int).
    """
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(list(FINANCE_HEADERS))
    for row in rows:
        sheet.append([{**FINANCE, **row}[h] for h in FINANCE_HEADERS])
    data = io.BytesIO()
    book.save(data)
    if whole:
        numbers = {r["证件号码"] for r in rows if isinstance(r.get("证件号码"), int)}
        data = _digits_whole(data, {f"<v>{float(n)!r}</v>": f"<v>{n}</v>" for n in numbers})
    data.seek(0)
    return list(iter_xlsx(data))


def _digits_whole(data: io.BytesIO, replace: dict[str, str]) -> io.BytesIO:
    out = io.BytesIO()
    with zipfile.ZipFile(data) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            if item.filename.startswith("xl/worksheets/"):
                text = body.decode()
                for old, new in replace.items():
                    assert old in text, old
                    text = text.replace(old, new)
                body = text.encode()
            dst.writestr(item, body)
    return out


def test_xlsx_record_number_cell_excel_rounded_to_an_int_is_refused() -> None:
    # What Excel keeps of 2026030512345678 and 2026030512345679: 15 digits, then a 0.
    rows = _finance_xlsx([{"流水号": 2026030512345670, "证件号码": person}
                          for person in (ID_A, ID_B)])
    # openpyxl reads them as ints; iter_xlsx hands them over as the doubles Excel held
    assert [type(cells["流水号"]) for _, cells in rows] == [float, float]
    parsed = [p for row in rows for p in FinanceAdapter().parse(row)]
    assert [[(e.field, e.code) for e in p.errors] for p in parsed] == [
        [("流水号", "SCHEMA")], [("流水号", "SCHEMA")]]


def test_an_identity_number_a_program_wrote_whole_in_a_number_cell_still_reads() -> None:
    """Not Excel (which keeps 15 digits): a program wrote all 18, and the int is exact.

    Only an int whose digits past the 15th are zeros is taken for Excel's rounding; handing
    every long int over as a float turned this accountant's valid identity number into
    '6.3…E+17' and refused her row.
    """
    [(_, cells)] = _finance_xlsx([{"证件号码": int(ID_A), "流水号": "KJ-2026-000789"}],
                                 whole=True)
    assert cells["证件号码"] == int(ID_A)
    [parsed] = FinanceAdapter().parse((2, cells))
    assert parsed.errors == [] and parsed.submission is not None
    assert parsed.submission.person.id_number == ID_A
