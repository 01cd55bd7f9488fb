"""A training base's journey through the HTTP API, on SQLite and PostgreSQL (review).

SPEC §2 "Training base": submit 1–1,000 results and get a per-record answer at once, resend
safely, correct or withdraw what it sent; §4 R9 (directory, filed plan, failed assessment);
§7 dedup and scope; §8 the ``training_base`` push and roster.  Each base talks to a real
gateway (uvicorn on 127.0.0.1) with the signing client partners use.

The xfail tests are findings: each fails today because of the bug its reason names.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, func, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import SigningClient
from gateway.store.tables import outbox, record_versions, records
from mock_partners.generators import make_person
from tests.support.reference import load_base_and_plan
from tests.support.servers import poll, uvicorn_thread

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]
BASE, PLAN = "QHJD-101", "PLAN-2026-101"  # load_base_and_plan: 40 h, 2026-03-01..2026-12-15
ROSTER_COLUMNS = ("result_id", "id_no", "name", "employer", "region", "hours", "started_on",
                  "completed_on", "passed", "certificate_no", "base_code", "plan_id")


def _result(rng: random.Random, result_id: str, **fields: Any) -> dict[str, Any]:
    person = make_person(rng)
    result = {"result_id": result_id, "id_no": person.id_number, "name": person.name,
              "employer": person.employer, "region": person.region, "hours": "16",
              "started_on": "2026-05-10", "completed_on": "2026-05-13", "passed": True,
              "certificate_no": f"JD-{result_id}"}
    result.update(fields)
    return result


@contextmanager
def _base_session(db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
                  *, run_worker: bool = False, **settings: Any) -> Iterator[SigningClient]:
    """A recognised base with its plan filed on 1 March, and a signed client for it.

    ``run_worker``: the in-process workers too, which process uploaded batch files.
    """
    base = new_partner(store, adapter="training_base", base_code=BASE)
    load_base_and_plan(store, BASE, PLAN)
    with uvicorn_thread(create_app(make_settings(db_url, **settings), run_worker=run_worker)) as url, \
            SigningClient(url, base.app_key, base.secret, timeout=120) as client:
        yield client


def _push(client: SigningClient, results: list[dict[str, Any]], **envelope: Any) -> list[dict[str, Any]]:
    document = {"base_code": BASE, "plan_id": PLAN, **envelope, "results": results}
    document = {k: v for k, v in document.items() if v is not None}
    response = client.post("/v1/partners/training_base/records", content=orjson.dumps(document),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    answers: list[dict[str, Any]] = response.json()["results"]
    assert [a["index"] for a in answers] == list(range(len(results)))
    return answers


def _stored(store: Engine) -> tuple[int, int, int]:
    """(records, record versions, outbox rows): what a push left in the store."""
    with store.connect() as conn:
        return (int(conn.execute(select(func.count()).select_from(records)).scalar_one()),
                int(conn.execute(select(func.count()).select_from(record_versions)).scalar_one()),
                int(conn.execute(select(func.count()).select_from(outbox)).scalar_one()))


def _status_of(store: Engine, record_id: str) -> str:
    with store.connect() as conn:
        return str(conn.execute(select(records.c.status)
                                .where(records.c.record_id == record_id)).scalar_one())


def _payload(store: Engine, record_id: str) -> dict[str, Any]:
    with store.connect() as conn:
        version = conn.execute(select(records.c.current_version)
                               .where(records.c.record_id == record_id)).scalar_one()
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == record_id,
            record_versions.c.version == version)).scalar_one()
    loaded: dict[str, Any] = orjson.loads(payload)
    return loaded


# -- what is right today ------------------------------------------------------------------------


def test_a_bases_1000_results_resent_corrected_withdrawn_and_sent_again(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
) -> None:
    """SPEC §2: 1,000 results in one request, resent, corrected, withdrawn and sent again.

    The resend is all ``duplicate`` and stores nothing; two corrections are ``corrected`` v2
    and the rest ``duplicate``; a withdrawn result sent again is reinstated as a new version;
    the same result twice in a request is one record.
    """
    rng = random.Random(101)
    results = [_result(rng, f"K-{i:04d}") for i in range(1000)]
    with _base_session(db_url, store, make_settings, new_partner) as client:
        first = _push(client, results)
        assert {a["status"] for a in first} == {"accepted"}
        assert all(a["errors"] == [] and a["version"] == 1 for a in first)
        ids = {a["source_record_id"]: a["record_id"] for a in first}
        assert len(set(ids.values())) == 1000
        after_first = _stored(store)
        assert after_first == (1000, 1000, 1000)

        again = _push(client, results)
        assert [(a["status"], a["record_id"], a["version"]) for a in again] == [
            ("duplicate", ids[r["result_id"]], 1) for r in results]
        assert _stored(store) == after_first

        results[10] = {**results[10], "hours": "24"}
        results[500] = {**results[500], "hours": "8"}
        fixed = _push(client, results)
        changed = {a["index"]: (a["status"], a["version"]) for a in fixed if a["status"] != "duplicate"}
        assert changed == {10: ("corrected", 2), 500: ("corrected", 2)}
        assert _stored(store) == (1000, 1002, 1002)

        gone = client.delete("/v1/records/K-0042")
        assert gone.status_code == 200, gone.text
        assert (gone.json()["record_id"], gone.json()["version"]) == (ids["K-0042"], 2)
        back = _push(client, [results[42]])
        assert [(a["status"], a["record_id"], a["version"]) for a in back] == [
            ("corrected", ids["K-0042"], 3)]
        assert _payload(store, ids["K-0042"])["withdrawn"] is False

        twice = _result(rng, "T-1")
        same = _push(client, [twice, dict(twice)])
        assert [(a["status"], a["version"]) for a in same] == [("accepted", 1), ("duplicate", 1)]
        assert same[0]["record_id"] == same[1]["record_id"]


def test_r9_failures_are_answered_per_result_with_both_messages(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
) -> None:
    """SPEC §4 R9 and §5: a failed assessment and an unfiled plan are rejected alone."""
    rng = random.Random(102)
    with _base_session(db_url, store, make_settings, new_partner) as client:
        answers = _push(client, [_result(rng, "F-1", passed=False), _result(rng, "OK-1")])
        unfiled = _push(client, [_result(rng, "U-1")], plan_id="PLAN-NEVER-FILED")
    failed, good = answers
    assert (failed["status"], failed["record_id"]) == ("rejected", None)
    assert [e["code"] for e in failed["errors"]] == ["ASSESSMENT_FAILED"]
    assert good["status"] == "accepted"
    assert [e["code"] for e in unfiled[0]["errors"]] == ["PLAN_NOT_FILED"]
    for answer in (failed, unfiled[0]):
        assert set(answer) >= {"index", "source_record_id", "status", "record_id", "errors", "warnings"}
        assert all(e["message"] and e["message_zh"] for e in answer["errors"])


# -- findings -----------------------------------------------------------------------------------


def test_two_corrections_swapping_dates_in_one_request_are_both_corrected(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
) -> None:
    rng = random.Random(103)
    a = _result(rng, "S-A", hours="16", started_on="2026-05-10", completed_on="2026-05-13")
    b = {**a, "result_id": "S-B", "hours": "24", "started_on": "2026-06-10",
         "completed_on": "2026-06-13", "certificate_no": "JD-S-B"}
    with _base_session(db_url, store, make_settings, new_partner) as client:
        first = _push(client, [a, b])
        assert [x["status"] for x in first] == ["accepted", "accepted"]
        # The base finds it had the two sessions' dates the wrong way round.
        swapped = _push(client, [{**a, "started_on": "2026-06-10", "completed_on": "2026-06-13"},
                                 {**b, "started_on": "2026-05-10", "completed_on": "2026-05-13"}])
    assert [(x["status"], x["version"], x["errors"]) for x in swapped] == [
        ("corrected", 2, []), ("corrected", 2, [])]
    assert [_status_of(store, x["record_id"]) for x in swapped] == ["accepted", "accepted"]


def test_a_push_without_plan_id_is_a_schema_error_naming_plan_id(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
) -> None:
    rng = random.Random(104)
    with _base_session(db_url, store, make_settings, new_partner) as client:
        document = {"base_code": BASE, "results": [_result(rng, "NP-1")]}
        response = client.post("/v1/partners/training_base/records",
                               content=orjson.dumps(document),
                               headers={"Content-Type": "application/json"})
    assert "None" not in response.text
    if response.status_code == 422:  # refused whole, as a push without base_code is
        assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (
            "SCHEMA", "plan_id")
        return
    assert response.status_code == 200, response.text
    [answer] = response.json()["results"]
    assert answer["status"] == "rejected"
    assert [(e["code"], e["field"]) for e in answer["errors"]] == [("SCHEMA", "plan_id")]


def test_a_roster_row_without_plan_id_is_a_schema_error_naming_the_column(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
    tmp_path: Path,
) -> None:
    rng = random.Random(105)
    rows = [{**_result(rng, f"RO-{i}"), "passed": "是", "base_code": BASE, "plan_id": plan}
            for i, plan in enumerate((PLAN, ""))]
    path = tmp_path / "roster.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ROSTER_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with _base_session(db_url, store, make_settings, new_partner, run_worker=True,
                       batch_dir=tmp_path / "batches") as client:
        response = client.upload_batch(path, adapter="training_base", kind="roster", period="2026")
        assert response.status_code == 202, response.text
        batch_id = response.json()["batch_id"]

        def done() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
            return body if body["status"] in ("done", "failed") else None

        status: dict[str, Any] = poll(done, 60, interval=0.1, what="the roster to finish")
    assert status["counts"]["accepted"] == 1 and status["counts"]["rejected"] == 1, status
    assert "None" not in orjson.dumps(status["rejected_rows"]).decode()
    assert [(r["row"], r["column"], r["code"]) for r in status["rejected_rows"]] == [
        (3, "plan_id", "SCHEMA")]


def test_a_pushs_rule_errors_name_the_bases_own_keys(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
) -> None:
    rng = random.Random(106)
    with _base_session(db_url, store, make_settings, new_partner) as client:
        failed, above = _push(client, [_result(rng, "F-1", passed=False),
                                       _result(rng, "H-1", hours="80", started_on="2026-05-01")])
        [unfiled] = _push(client, [_result(rng, "U-1")], plan_id="PLAN-NEVER-FILED")
    assert [e["field"] for e in failed["errors"]] == ["passed"]
    assert [e["field"] for e in unfiled["errors"]] == ["plan_id"]
    assert [w["field"] for w in above["warnings"] if w["code"] == "INTEGRITY_ABOVE_PLAN"] == ["hours"]


def test_a_result_without_passed_is_not_recorded_as_passed(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
) -> None:
    rng = random.Random(107)
    result = _result(rng, "NP-1")
    del result["passed"]
    with _base_session(db_url, store, make_settings, new_partner) as client:
        [answer] = _push(client, [result])
    assert answer["status"] == "accepted"  # R9 refuses a failed assessment only
    assert _payload(store, answer["record_id"])["evidence"]["assessment"] == "none"


def test_a_bases_numbers_as_floats_read_as_its_adapter_always_read_them(
        db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    """A training base's push is not read with decimal numbers (unlike POST /v1/records).

    Its adapter rounds a double's noise away (16.000000000000004 h from a JavaScript client),
    and takes 1.0 for passed; a review (37) found both refused while the push was read with
    decimals, so the push keeps orjson's floats.
    """
    rng = random.Random(37)
    noisy = _result(rng, "F-1", hours=16.000000000000004, passed=1.0)
    body = orjson.dumps({"base_code": BASE, "plan_id": PLAN, "results": [noisy]})
    assert b"16.000000000000004" in body
    with _base_session(db_url, store, make_settings, new_partner) as client:
        [answer] = client.post("/v1/partners/training_base/records", content=body,
                               headers={"Content-Type": "application/json"}).json()["results"]
    assert answer["status"] == "accepted", answer
    with store.connect() as conn:
        assert conn.execute(select(records.c.hours)).scalar_one() in ("16", "16.0")
