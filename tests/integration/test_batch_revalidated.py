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
import orjson
import pytest
from sqlalchemy import Engine, event, select

from benchmarks.batch_status import write_refused_batch
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.batch_status import batch_status
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

        # Ops' list of rejections names each one's file row too.
        listed = httpx.get(f"{url}/v1/rejections", params={"batch_id": batch_id},
                           headers={"Authorization": f"Bearer {viewer}"})
        assert listed.status_code == 200, listed.text
        assert sorted(r["row"] for r in listed.json()["items"]) == [2, 3, 4]

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
            assert table.count("已通过（重新校验或修改）") == 3
            closed = console.get("/ops/rejections", params={"status": "all"})
            assert closed.status_code == 200, closed.text
            assert all(f"第 {row} 行" in closed.text for row in (2, 3, 4))

    with store.connect() as conn:
        kept = conn.execute(select(rejections.c.row_no, rejections.c.status)
                            .where(rejections.c.batch_id == batch_id)
                            .order_by(rejections.c.id)).all()
    # Row 3: refused at first, refused again (a fresh row), then let through; row 4 refused
    # in both runs, then edited through.
    assert sorted(kept) == sorted([(2, "revalidated"), (3, "superseded"), (3, "revalidated"),
                                   (4, "superseded"), (4, "superseded"), (4, "revalidated")])


def test_a_pushed_results_rejection_keeps_no_row(
    db_url: str, store: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner],
) -> None:
    """A push numbers its results from 0 too; only a batch file's row is kept as ``row_no``."""
    base = new_partner(store, adapter="training_base", base_code="QH-BASE-01")
    document = {"base_code": "QH-BASE-01", "plan_id": "PLAN-1",
                "results": [{"result_id": "R-1"}, {"result_id": "R-2"}]}  # nothing else: refused
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url, \
            SigningClient(url, base.app_key, base.secret) as client:
        pushed = client.post("/v1/partners/training_base/records", content=orjson.dumps(document),
                             headers={"Content-Type": "application/json"})
    assert pushed.status_code == 200, pushed.text
    assert [a["status"] for a in pushed.json()["results"]] == ["rejected", "rejected"]
    with store.connect() as conn:
        kept = conn.execute(select(rejections.c.batch_id, rejections.c.row_no)).all()
    assert kept == [(None, None), (None, None)]


def test_a_batch_status_finds_its_revalidated_rows_in_an_index(db_url: str, store: Engine) -> None:
    """Partners poll the status: no read of it visits or sorts every row of the batch.

    Without ``status`` in the index, each poll read every rejection of the batch to test it
    (about 120 ms for 300,000 on SQLite, a table scan on PostgreSQL; the review's figures),
    and SQLite sorted all of its row errors by id for each page (68 ms at 300,000).
    """
    if not db_url.startswith("sqlite"):
        pytest.skip("the plan is read with SQLite's EXPLAIN QUERY PLAN")
    with store.begin() as conn:
        write_refused_batch(conn, "B1", 50)  # the benchmark's batch, small
        conn.execute(rejections.update().where(rejections.c.row_no == 7).values(status="revalidated"))
    statements: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any,
             _many: bool) -> None:
        if "FROM rejections" in statement or "FROM batch_errors" in statement:
            statements.append((statement, parameters))

    event.listen(store, "before_cursor_execute", note)
    try:
        with store.connect() as conn:
            status = batch_status(conn, "B1")
    finally:
        event.remove(store, "before_cursor_execute", note)
    assert status is not None and status["revalidated"] == 1
    assert [r["row"] for r in status["rejected_rows"] if r["revalidated"]] == [7]
    assert len(statements) == 3  # the page of row errors, the count, the page's rows
    with store.connect() as conn:
        for statement, parameters in statements:
            plan = " | ".join(str(r[-1]) for r in conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters))
            if "FROM batch_errors" in statement:  # the page found in id order, not sorted
                assert "ix_batch_errors_batch_id_id" in plan and "TEMP B-TREE" not in plan, plan
            else:
                assert "COVERING INDEX ix_rejections_batch_id_status_row_no" in plan, plan
