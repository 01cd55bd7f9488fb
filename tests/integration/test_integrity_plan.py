"""R14 against a filed plan's period, on SQLite and PostgreSQL (SPEC §4 R9, R14).

青人社厅函〔2022〕394号 六(五): a plan is filed with its 培训时限 (the reference plan's
``starts_on``..``ends_on``); 六(一) 诚信学习: a base's result dated outside it cannot be true
of that plan, so it is flagged ``INTEGRITY_OUTSIDE_PLAN`` for review, never dropped — the
record is accepted, credited and stored with the warning.  Both boundary days are inside.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.reference import import_csv
from gateway.signing import SigningClient
from gateway.store.tables import record_versions, records
from mock_partners.generators import make_person
from tests.support.keys import KEYS
from tests.support.reference import load_base_and_plan
from tests.support.servers import uvicorn_thread

BASE, PLAN = "QHJD-014", "PLAN-2026-014"  # load_base_and_plan: 2026-03-01 .. 2026-12-15
CODE = "INTEGRITY_OUTSIDE_PLAN"

# result id → (started_on, completed_on, the field flagged or None)
CASES: dict[str, tuple[str | None, str, str | None]] = {
    "IN-FIRST-DAY": ("2026-03-01", "2026-03-01", None),
    "IN-LAST-DAY": ("2026-12-15", "2026-12-15", None),
    "IN-WHOLE": ("2026-03-01", "2026-12-15", None),
    "IN-NO-START": (None, "2026-06-02", None),
    "OUT-DAY-BEFORE": ("2026-02-28", "2026-03-02", "started_on"),
    "OUT-DAY-AFTER": ("2026-12-14", "2026-12-16", "completed_on"),
    "OUT-NO-START": (None, "2026-02-28", "completed_on"),
}


def _result(rng: random.Random, result_id: str, started: str | None, completed: str) -> dict[str, Any]:
    person = make_person(rng)  # one person a result: no overlaps between them
    return {"result_id": result_id, "id_no": person.id_number, "name": person.name,
            "region": person.region, "hours": "16", "completed_on": completed, "passed": True,
            **({"started_on": started} if started else {})}


def _push(client: SigningClient, plan_id: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    response = client.post("/v1/partners/training_base/records",
                           content=orjson.dumps({"base_code": BASE, "plan_id": plan_id,
                                                 "results": results}),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    answers: list[dict[str, Any]] = response.json()["results"]
    return answers


def _flagged(notes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in notes if n["code"] == CODE]


def test_results_outside_the_plan_period_are_flagged_accepted_and_credited(
    db_url: str, store: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner],
) -> None:
    base = new_partner(store, adapter="training_base", base_code=BASE)
    load_base_and_plan(store, BASE, PLAN)
    rng = random.Random(14)
    sent = [_result(rng, rid, start, end) for rid, (start, end, _) in CASES.items()]

    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url, \
            SigningClient(url, base.app_key, base.secret, timeout=30) as client:
        answers = _push(client, PLAN, sent)

    by_id = dict(zip(CASES, answers, strict=True))
    for rid, (_start, _end, field) in CASES.items():
        answer = by_id[rid]
        assert answer["status"] == "accepted", (rid, answer)  # flagged, never dropped
        flagged = _flagged(answer["warnings"])
        assert len(flagged) == (1 if field else 0), (rid, answer["warnings"])
        if field:
            note = flagged[0]
            assert note["field"].endswith(field), note
            assert "2026-03-01" in note["message"] and "2026-12-15" in note["message"]
            assert "2026-03-01" in note["message_zh"] and "培训时限" in note["message_zh"]

    with store.connect() as conn:
        stored = {r.source_record_id: r for r in conn.execute(
            select(records.c.source_record_id, records.c.record_id, records.c.status,
                   records.c.credited_hours))}
        payloads = {rid: orjson.loads(payload) for rid, payload in conn.execute(
            select(record_versions.c.record_id, record_versions.c.payload))}
    assert set(stored) == set(CASES)
    ids = {r["id_no"] for r in sent}
    for rid, (_start, _end, field) in CASES.items():
        row = stored[rid]
        assert (row.status, row.credited_hours) == ("accepted", "16.0"), rid  # still counted
        flagged = _flagged(payloads[row.record_id]["warnings"])
        assert len(flagged) == (1 if field else 0), (rid, flagged)
        for note in flagged:  # the window is named; no identity number ever is
            assert PLAN in note["message"] and PLAN in note["message_zh"]
            assert not any(i in note["message"] + note["message_zh"] for i in ids)


def test_a_plan_without_dates_or_an_unknown_plan_is_not_a_plan_period(
    db_url: str, store: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], tmp_path: Path,
) -> None:
    base = new_partner(store, adapter="training_base", base_code=BASE)
    load_base_and_plan(store, BASE, PLAN)
    undated = tmp_path / "plans.csv"
    undated.write_text("plan_id,base_code,title,category,hours,starts_on,ends_on,filed_on\n"
                       f"PLAN-UNDATED,{BASE},无日期计划,professional,40,,,2026-03-01\n",
                       encoding="utf-8")
    imported = import_csv(store, "plans", undated, actor="test", keys=KEYS)
    assert not imported.ok  # a plan needs its period: the row is refused, not stored half
    rng = random.Random(15)

    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url, \
            SigningClient(url, base.app_key, base.secret, timeout=30) as client:
        answers = [*_push(client, "PLAN-UNDATED", [_result(rng, "U-1", "2026-01-10", "2026-01-12")]),
                   *_push(client, "PLAN-NONE", [_result(rng, "U-2", "2026-01-10", "2026-01-12")])]

    for answer in answers:  # R9 answers for them; there is no period to judge against
        assert answer["status"] == "rejected", answer
        assert [e["code"] for e in answer["errors"]] == ["PLAN_NOT_FILED"]
        assert not _flagged(answer.get("warnings") or [])
