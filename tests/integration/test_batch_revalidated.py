"""A batch's status says which of its rejected rows a later revalidation let through.

A health annual for 2025 arrives after the year closed: its rows are refused ``YEAR_CLOSED``
(and one ``ID_NUMBER_INVALID``).  Deferrals approved later let ops revalidate them, one person
at a time.  The batch's ``counts`` stay what it judged; ``revalidated`` and each rejected row's
``revalidated`` say what became of them since, through the partner's API and the console: the
row refused again in the first run is marked once the second run lets it through, because the
fresh rejection keeps its file row, and so does a rejection an operator edits through.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.reference import import_csv
from gateway.signing import SigningClient
from gateway.store.tables import rejections
from mock_partners.generators import make_person
from tests.support.keys import KEYS
from tests.support.servers import uvicorn_thread

COLUMNS = ["记录编号", "身份证号", "姓名", "工作单位", "地区代码", "项目编号", "项目名称",
           "学分类别", "学分", "开始日期", "完成日期", "证书编号"]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _defer(store: Engine, tmp_path: Path, id_number: str) -> None:
    path = tmp_path / f"deferral_{id_number[-4:]}.csv"
    path.write_text("id_number,from_year,reason,approved_on\n"
                    f"{id_number},2025,post_transfer,2026-01-05\n", encoding="utf-8")
    assert import_csv(store, "deferrals", path, actor="test", keys=KEYS).ok


def _rows(status: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    return {r["row"]: (r["code"], r["revalidated"]) for r in status["rejected_rows"]}


def test_a_batch_status_marks_the_rows_revalidation_let_through(
    db_url: str, store: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], new_operator: Callable[..., str], tmp_path: Path,
) -> None:
    rng = random.Random(28)
    first, second, third = make_person(rng), make_person(rng), make_person(rng)
    bad_id = third.id_number[:-1] + ("0" if third.id_number[-1] != "0" else "1")
    path = tmp_path / "health_2025.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([COLUMNS] + [
            [f"WJ-{n}", person_id, person.name, "", person.region, "CME-1", "高原医学新进展",
             "Ⅰ类", "5", "2025-11-18", "2025-11-20", ""]
            for n, (person, person_id) in enumerate(
                [(first, first.id_number), (second, second.id_number), (third, bad_id)], 1)])
    health = new_partner(store, adapter="health")
    operator, viewer = new_operator(store, "operator"), new_operator(store, "viewer")

    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url, \
            SigningClient(url, health.app_key, health.secret) as partner:
        sent = partner.upload_batch(path, adapter="health", kind="annual", period="2025")
        assert sent.status_code == 202, sent.text
        batch_id = sent.json()["batch_id"]
        processor = BatchProcessor(store, make_settings(db_url))
        claimed = processor.claim(batch_id)
        assert claimed is not None
        processor.process(claimed)

        def status() -> dict[str, Any]:
            answer = partner.get(f"/v1/batches/{batch_id}")
            assert answer.status_code == 200, answer.text
            return answer.json()

        def revalidate(reason: str) -> dict[str, Any]:
            done = httpx.post(f"{url}/v1/records/revalidate", json={
                "filter": {"batch_id": batch_id}, "reason": reason},
                headers={"Authorization": f"Bearer {operator}"})
            assert done.status_code == 200, done.text
            return done.json()

        before = status()
        assert before["status"] == "done"
        assert before["counts"] == {"rows": 3, "accepted": 0, "duplicate": 0, "corrected": 0,
                                    "conflict": 0, "rejected": 3}
        assert before["revalidated"] == 0
        assert _rows(before) == {2: ("YEAR_CLOSED", False), 3: ("YEAR_CLOSED", False),
                                 4: ("ID_NUMBER_INVALID", False)}

        _defer(store, tmp_path, first.id_number)
        assert (revalidate("deferral approved for the first")["accepted"]) == 1
        once = status()
        assert once["counts"] == before["counts"]  # what the batch judged stays
        assert once["revalidated"] == 1
        assert _rows(once) == {2: ("YEAR_CLOSED", True), 3: ("YEAR_CLOSED", False),
                               4: ("ID_NUMBER_INVALID", False)}

        _defer(store, tmp_path, second.id_number)
        assert (revalidate("deferral approved for the second")["accepted"]) == 1
        twice = status()
        assert twice["counts"] == before["counts"] and twice["revalidated"] == 2
        # Row 3 was refused again in the first run: its fresh rejection kept the row number.
        assert _rows(twice) == {2: ("YEAR_CLOSED", True), 3: ("YEAR_CLOSED", True),
                                4: ("ID_NUMBER_INVALID", False)}

        # An operator corrects row 4's identity number (its person has a deferral now): the
        # edited rejection's record is the row's too.
        _defer(store, tmp_path, third.id_number)
        with store.connect() as conn:
            [open_row] = conn.execute(select(rejections.c.id).where(
                rejections.c.batch_id == batch_id, rejections.c.status == "open")).scalars()
        edited = httpx.post(f"{url}/v1/rejections/{open_row}/edit", json={
            "changes": {"身份证号": third.id_number}, "reason": "typo in the id, per the hospital"},
            headers={"Authorization": f"Bearer {operator}"})
        assert edited.status_code == 200, edited.text
        assert edited.json()["status"] == "accepted"
        thrice = status()
        assert thrice["counts"] == before["counts"] and thrice["revalidated"] == 3
        assert _rows(thrice) == {2: ("YEAR_CLOSED", True), 3: ("YEAR_CLOSED", True),
                                 4: ("ID_NUMBER_INVALID", True)}

        with httpx.Client(base_url=url, follow_redirects=False) as console:
            login = console.get("/ops/login", params={"next": f"/ops/batches/{batch_id}"})
            csrf = CSRF.search(login.text)
            assert csrf is not None
            assert console.post("/ops/login", data={
                "token": viewer, "csrf": csrf.group(1),
                "next": f"/ops/batches/{batch_id}"}).status_code == 303
            page = console.get(f"/ops/batches/{batch_id}")
            assert page.status_code == 200, page.text
            assert re.search(r'<dd id="batch-revalidated">3 行', page.text)
            table = page.text.split('id="row-errors"', 1)[1].split("</table>", 1)[0]
            assert table.count("复核通过") == 3

    with store.connect() as conn:
        kept = conn.execute(select(rejections.c.row_no, rejections.c.status)
                            .where(rejections.c.batch_id == batch_id)
                            .order_by(rejections.c.id)).all()
    # Row 3: refused at first, refused again (a fresh row), then let through; row 4 refused
    # in both runs, then edited through.
    assert sorted(kept) == sorted([(2, "revalidated"), (3, "superseded"), (3, "revalidated"),
                                   (4, "superseded"), (4, "superseded"), (4, "revalidated")])
