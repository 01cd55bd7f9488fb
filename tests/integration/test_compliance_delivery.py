"""Compliance counts what the management system counts (SPEC §4 R1 against SPEC §5 downstream).

A record whose current version the management system refused for good — dead-lettered
``DOWNSTREAM_REJECTED`` after a per-record ``rejected`` receipt or a 400 on the record alone —
is never counted there, so it must not count here either: it leaves the totals and is listed
under ``not_counted`` with its code and reason (identity numbers masked).  A record dead-
lettered ``RETRIES_EXHAUSTED`` still counts (ops reprocess it); a refused one that ops
reprocess and the management system then accepts counts again; only the current version is
judged.  Every counted record carries its delivery state.

Real ingest and the real delivery worker, against the mock management system on uvicorn (or,
where its reason must quote an identity number, an ``httpx.MockTransport`` downstream), on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine, event, select

from gateway import compliance
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.masking import mask_id
from gateway.ops.deliveries import DeliveryFilter, reprocess
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.store.tables import audit_events, caps_ledger, records
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, canonical_submission, make_person
from tests.conftest import SECRET_KEY
from tests.support.delivery import MakeWorker, drain
from tests.support.keys import KEYS
from tests.support.servers import cli, uvicorn_thread

NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)  # the CE year 2026 is open







def _sub(person: GenPerson, sid: str, hours: str, title: str, day: int) -> dict[str, Any]:
    """A professional training of ``hours`` on 2026-03-``day`` (distinct days: no overlaps)."""
    sub = canonical_submission(random.Random(sid), sid, person, hours=hours, title=title)
    sub["activity"].update(started_on=f"2026-03-{day:02d}", completed_on=f"2026-03-{day:02d}")
    return sub


def _put(engine: Engine, partner: Partner, *subs: dict[str, Any]) -> dict[str, str]:
    """Ingest; source record id → record id."""
    answers = ingest(engine, PartnerRef(partner.partner_id, "canonical"), list(subs), now=NOW)
    assert all(a.status.value in ("accepted", "corrected") for a in answers), \
        [(a.status, a.errors) for a in answers]
    return {s["source_record_id"]: str(a.record_id) for s, a in zip(subs, answers, strict=True)}


def _report(engine: Engine, person: GenPerson) -> dict[str, Any]:
    """The report, checked against its HTTP schema, and the statements it took."""
    statements: list[str] = []
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")  # the connection's own set-up is not the report's

        def seen(*args: Any) -> None:
            statements.append(str(args[2]))

        event.listen(engine, "before_cursor_execute", seen)
        try:
            result = compliance.report(conn, person.id_number, 2026, keys=KEYS)
        finally:
            event.remove(engine, "before_cursor_execute", seen)
    # Two indexed queries, never one per record: the person's pins (caps.refused_pins), then
    # the records.  For the rare records whose current version was refused, two more read what
    # the management system applied of them (caps.last_applied): their deliveries, then the
    # payloads of those it applied; and for a pinned one whose current version was never sent,
    # one more reads the refusal of the last one sent (caps.refusals).  Then two look-ups by
    # person key, whatever the records: the approved deferrals (七(二)) and an award that
    # covers the tenure's professional hours (R7); none of these people has either.
    assert len(statements) <= 7, statements
    assert statements[0].lstrip().startswith("SELECT refused_pins.record_id"), statements
    assert all(s.lstrip().startswith(("SELECT outbox.", "SELECT record_versions."))
               for s in statements[2:-2]), statements
    assert statements[-2].lstrip().startswith("SELECT reference_deferrals."), statements
    assert statements[-1].lstrip().startswith("SELECT records.") and \
        "covers_professional" in statements[-1], statements
    assert compliance.ComplianceReport.model_validate(result).model_dump(mode="json") == result
    return result


def _counted(result: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """Counted records: source record id → (delivery, delivery code)."""
    return {r["source_record_id"]: (r["delivery"], r["delivery_code"]) for r in result["records"]}


def test_a_refused_record_is_not_counted_and_a_retries_exhausted_one_still_is(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker,
) -> None:
    _, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(7))
    ids = _put(engine, partner, _sub(person, "OK", "24", "高原生态修复技术研修班", 2),
               _sub(person, "REJ", "12", "[REJECT] 数字政府建设实务", 4))
    drain(make_worker())

    ids |= _put(engine, partner, _sub(person, "EXH", "16", "工程项目管理实务", 6))
    faults.error_rate = 1.0  # the management system is down for every attempt we may make
    drain(make_worker(delivery_max_attempts=1))
    faults.error_rate = 0.0
    ids |= _put(engine, partner, _sub(person, "PEN", "8", "水资源保护专题研修", 8))  # not sent yet

    result = _report(engine, person)
    # Counted: 24 + 16 + 8 = 48 h; the refused 12 h is out of every total.
    assert _counted(result) == {"OK": ("delivered", None), "EXH": ("dead", "RETRIES_EXHAUSTED"),
                                "PEN": ("pending", None)}
    assert result["credited"] == {"total": "48.0", "public": "0.0", "professional": "48.0"}
    assert result["claimed"] == {"public": "0.0", "professional": "48.0"}
    assert result["by_type"] == {"training": {"claimed": "48.0", "credited": "48.0"}}
    assert result["by_partner"] == {partner.partner_id: "48.0"}
    assert result["missing"] == {"public": "45.0", "professional": "42.0", "total": "87.0"}
    assert result["not_counted"] == [{
        "record_id": ids["REJ"], "version": 1, "partner_id": partner.partner_id,
        "adapter": "canonical", "source_record_id": "REJ", "category": "professional",
        "activity_type": "training", "completed_on": "2026-03-04", "hours": "12.0",
        "credited_hours": "12.0", "delivery": "dead", "delivery_code": "DOWNSTREAM_REJECTED",
        "reason": "activity title carries [REJECT]", "applied_version": None,
        "applied_hours": None}]


def test_a_refused_record_reprocessed_and_delivered_counts_again(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker,
) -> None:
    _, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(8))
    _put(engine, partner, _sub(person, "OK", "24", "高原生态修复技术研修班", 2),
         _sub(person, "REJ", "12", "[REJECT] 数字政府建设实务", 4))
    worker = make_worker()
    drain(worker)
    before = _report(engine, person)
    assert [r["source_record_id"] for r in before["not_counted"]] == ["REJ"]
    assert before["credited"]["total"] == "24.0"

    faults.reject_title_marker = "[NEVER]"  # the management system fixed its side
    done = reprocess(engine, DeliveryFilter(error_code="DOWNSTREAM_REJECTED"), dry_run=False,
                     reason="下游已修复", actor="op-test")
    assert done.requeued == 1
    queued = _report(engine, person)  # queued again: no longer refused, so it counts
    assert queued["not_counted"] == []
    assert _counted(queued) == {"OK": ("delivered", None), "REJ": ("pending", None)}
    assert queued["credited"]["total"] == "36.0"

    drain(worker)
    after = _report(engine, person)
    assert after["not_counted"] == []
    assert _counted(after) == {"OK": ("delivered", None), "REJ": ("delivered", None)}
    assert after["credited"]["total"] == "36.0"
    assert after["missing"]["professional"] == "54.0"


def test_only_the_current_version_is_judged(
    engine: Engine, new_partner: Callable[..., Partner], make_worker: MakeWorker,
) -> None:
    partner = new_partner(engine)
    person = make_person(random.Random(9))
    worker = make_worker()
    ids = _put(engine, partner, _sub(person, "V", "24", "高原生态修复技术研修班", 2),
               _sub(person, "W", "12", "[REJECT] 数字政府建设实务", 4))
    drain(worker)
    # V: version 1 delivered, its correction refused.  W: version 1 refused, its correction
    # delivered.  V as we hold it now was refused, but the management system still counts its
    # version 1, and so does the report (as applied hours); W's refused first version is history.
    _put(engine, partner, _sub(person, "V", "20", "[REJECT] 高原生态修复技术研修班", 2),
         _sub(person, "W", "12", "数字政府建设实务", 4))
    drain(worker)

    result = _report(engine, person)
    assert _counted(result) == {"W": ("delivered", None)}
    assert result["credited"]["total"] == "36.0"
    assert result["by_type"] == {"training": {"claimed": "36.0", "credited": "36.0"}}
    [refused] = result["not_counted"]
    assert (refused["record_id"], refused["version"], refused["hours"]) == (ids["V"], 2, "20.0")
    assert (refused["applied_version"], refused["applied_hours"]) == (1, "24.0")


def test_a_withdrawal_the_management_system_refuses_is_listed_until_reprocessed(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker, db_url: str,
) -> None:
    """It may still count the withdrawn record's hours; the report must say so, not go quiet."""
    url, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(10))
    ids = _put(engine, partner, _sub(person, "KEEP", "24", "高原生态修复技术研修班", 2),
               _sub(person, "GONE", "12", "数字政府建设实务", 4))
    worker = make_worker()
    drain(worker)
    assert _report(engine, person)["refused_changes"] == []

    faults.reject_ids = {ids["GONE"]}  # the management system refuses every change of it now
    assert withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "GONE", now=NOW)
    drain(worker)
    refused = _report(engine, person)
    assert _counted(refused) == {"KEEP": ("delivered", None)}
    # The management system still counts GONE's version 1, and so do the totals.
    assert refused["credited"]["total"] == "36.0" and refused["not_counted"] == []
    [change] = refused["refused_changes"]
    assert (change["record_id"], change["version"], change["status"], change["delivery_code"]) == (
        ids["GONE"], 2, "withdrawn", "DOWNSTREAM_REJECTED")
    assert change["hours"] == "12.0" and change["reason"]
    assert (change["applied_version"], change["applied_hours"]) == (1, "12.0")
    printed = cli({"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY},
                  "compliance", person.id_number, "2026")
    assert printed.returncode == 0 and "GONE" in printed.stdout and "管理系统拒收的变更" in printed.stdout
    assert "v1 12.0 h" in printed.stdout

    faults.reject_ids = set()
    assert reprocess(engine, DeliveryFilter(error_code="DOWNSTREAM_REJECTED"), dry_run=False,
                     reason="下游已修复", actor="op-test").requeued == 1
    drain(worker)
    resolved = _report(engine, person)
    assert resolved["refused_changes"] == [] and resolved["credited"]["total"] == "24.0"
    assert [v["version"] for v in httpx.get(f"{url}/_mock/applied/{ids['GONE']}").json()["versions"]
            ] == [1, 2]


def _downstream(person: GenPerson) -> httpx.Client:
    """A management system whose refusals quote the identity number, as a real one may.

    A title with ``[ID]`` gets a per-record ``rejected`` receipt; a request carrying a title
    with ``[400]`` is refused whole (400), so the worker bisects to that record alone.
    """
    seq = iter(range(1, 1000))

    def handle(request: httpx.Request) -> httpx.Response:
        sent = orjson.loads(request.content)["records"]
        if any("[400]" in r["activity"]["title"] for r in sent):
            return httpx.Response(400, text=f"record of {person.id_number}: certificate unreadable")
        receipts = [{"record_id": r["record_id"], "version": r["version"], "status": "rejected",
                     "receipt_no": None,
                     "reason": f"身份证号 {r['person']['id_number']} 与姓名不符 (id/name mismatch)"}
                    if "[ID]" in r["activity"]["title"] else
                    {"record_id": r["record_id"], "version": r["version"], "status": "accepted",
                     "receipt_no": f"CE2026-{next(seq):08d}", "reason": None} for r in sent]
        return httpx.Response(200, json={"receipts": receipts})

    return httpx.Client(transport=httpx.MockTransport(handle), base_url="http://ce-system.test")


def test_a_refused_withdrawal_of_a_record_never_applied_is_not_a_refused_change(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker,
) -> None:
    """The management system counts nothing of it, as the report does: nothing to resolve."""
    _, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(11))
    ids = _put(engine, partner, _sub(person, "NEVER", "12", "数字政府建设实务", 4),
               _sub(person, "ONCE", "8", "高原生态修复技术研修班", 2))
    faults.reject_ids = {ids["NEVER"]}
    worker = make_worker()
    drain(worker)
    faults.reject_ids = {ids["NEVER"], ids["ONCE"]}
    for source_id in ("NEVER", "ONCE"):
        assert withdraw(engine, PartnerRef(partner.partner_id, "canonical"), source_id, now=NOW)
    drain(worker)
    result = _report(engine, person)
    assert [(c["source_record_id"], c["applied_version"], c["applied_hours"])
            for c in result["refused_changes"]] == [("ONCE", 1, "8.0")]
    assert result["credited"]["total"] == "8.0"  # ONCE's version 1, still counted there


def test_refusal_reasons_are_masked_in_the_report_the_api_and_the_cli(
    db_url: str, engine: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], new_operator: Callable[..., str],
    make_worker: MakeWorker,
) -> None:
    partner = new_partner(engine)
    person = make_person(random.Random(10))
    _put(engine, partner, _sub(person, "RCPT", "12", "[ID] 数字政府建设实务", 4),
         _sub(person, "HTTP400", "8", "[400] 工程项目管理实务", 6),
         _sub(person, "OK", "24", "高原生态修复技术研修班", 2))
    drain(make_worker(client=_downstream(person)))

    result = _report(engine, person)
    masked = mask_id(person.id_number)
    assert _counted(result) == {"OK": ("delivered", None)}
    reasons = {r["source_record_id"]: (r["delivery_code"], r["reason"]) for r in result["not_counted"]}
    assert reasons == {
        "RCPT": ("DOWNSTREAM_REJECTED", f"身份证号 {masked} 与姓名不符 (id/name mismatch)"),
        "HTTP400": ("DOWNSTREAM_REJECTED", f"HTTP 400: record of {masked}: certificate unreadable"),
    }
    assert result["credited"]["total"] == "24.0"

    token = new_operator(engine, role="viewer")
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        resp = httpx.get(f"{url}/v1/compliance/{person.id_number}/2026",
                         headers={"Authorization": f"Bearer {token}"})
        spec = httpx.get(f"{url}/openapi.json").json()
    assert resp.status_code == 200, resp.text
    assert resp.json() == result
    assert person.id_number not in resp.text and masked in resp.text
    answer = spec["paths"]["/v1/compliance/{id_number}/{year}"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/ComplianceReport")
    assert {"ComplianceRecord", "NotCountedRecord"} <= set(spec["components"]["schemas"])

    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "COLUMNS": "250"}
    as_json = cli(env, "compliance", person.id_number, "2026", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == result
    shown = cli(env, "compliance", person.id_number, "2026")
    assert shown.returncode == 0, shown.stderr
    assert person.id_number not in shown.stdout + shown.stderr
    assert "not counted" in shown.stdout and "RCPT" in shown.stdout and "HTTP400" in shown.stdout
    assert f"身份证号 {masked}" in shown.stdout and "DOWNSTREAM_REJECTED" in shown.stdout


# -- a refused record holds no share of its cap (R10) -------------------------------------------

def _paper(person: GenPerson, sid: str, title: str, month: int) -> dict[str, Any]:
    """A sole-authored paper: 10 h, under the 20 h a person-year of papers (R3)."""
    return {"source_record_id": sid,
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region},
            "year": 2026, "category": "professional", "activity_type": "paper",
            "activity": {"title": title, "completed_on": f"2026-{month:02d}-15"},
            "claimed": {"quantity": "1", "unit": "papers", "details": {"authorship": "sole"}}}


def _papers(engine: Engine, partner: Partner, person: GenPerson, first_title: str) -> dict[str, str]:
    """Papers A, B, C in that order: A and B take the cap's 20 h, C is cut to 0."""
    return _put(engine, partner, _paper(person, "A", first_title, 3),
                _paper(person, "B", "三江源湿地碳汇研究", 4),
                _paper(person, "C", "高寒草甸退化机理研究", 5))


def _credited(engine: Engine, ids: dict[str, str]) -> dict[str, tuple[int, str]]:
    """Source record id → (current version, credited hours) as stored."""
    with engine.connect() as conn:
        rows = conn.execute(select(records.c.record_id, records.c.current_version,
                                   records.c.credited_hours)
                            .where(records.c.record_id.in_(list(ids.values())))).all()
    by_record = {r.record_id: (int(r.current_version), f"{Decimal(r.credited_hours):.1f}") for r in rows}
    return {sid: by_record[rid] for sid, rid in ids.items()}


def _applied(url: str, record_id: str) -> list[tuple[int, str]]:
    """What the mock management system applied of a record: (version, credited hours), in order."""
    versions = httpx.get(f"{url}/_mock/applied/{record_id}").json()["versions"]
    return [(int(v["version"]), f"{Decimal(v['record']['credited_hours']):.1f}") for v in versions]


def _events(engine: Engine, kind: str) -> list[tuple[str | None, int | None]]:
    with engine.connect() as conn:
        return [(r.record_id, r.version) for r in conn.execute(
            select(audit_events.c.record_id, audit_events.c.version)
            .where(audit_events.c.kind == kind).order_by(audit_events.c.seq))]


def test_a_refused_paper_gives_its_cap_share_to_the_next_and_takes_it_back_when_requeued(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker,
) -> None:
    url, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(21))
    ids = _papers(engine, partner, person, "[REJECT] 柴达木盆地盐湖资源研究")
    assert _credited(engine, ids) == {"A": (1, "10.0"), "B": (1, "10.0"), "C": (1, "0.0")}

    worker = make_worker()
    drain(worker)
    # A was refused for good: it counts nowhere, so C gets the cap's other 10 h, forwarded.
    assert _credited(engine, ids) == {"A": (1, "10.0"), "B": (1, "10.0"), "C": (2, "10.0")}
    assert _applied(url, ids["C"]) == [(1, "0.0"), (2, "10.0")]
    assert _applied(url, ids["A"]) == []
    result = _report(engine, person)
    assert [r["source_record_id"] for r in result["not_counted"]] == ["A"]
    assert result["by_type"] == {"paper": {"claimed": "20.0", "credited": "20.0"}}
    assert _events(engine, "cap_reallocated") == [(ids["A"], 1)]
    assert _events(engine, "recredited") == [(ids["C"], 2)]
    with engine.connect() as conn:
        assert Decimal(conn.execute(select(caps_ledger.c.credited).where(
            caps_ledger.c.cap_type == "paper")).scalar_one()) == 20

    faults.reject_title_marker = "[NEVER]"  # the management system fixed its side
    done = reprocess(engine, DeliveryFilter(error_code="DOWNSTREAM_REJECTED"), dry_run=False,
                     reason="下游已修复", actor="op-test")
    assert done.requeued == 1
    # A is queued again and takes its share back, in arrival order: C returns to 0 h.
    assert _credited(engine, ids) == {"A": (1, "10.0"), "B": (1, "10.0"), "C": (3, "0.0")}
    drain(worker)
    assert _applied(url, ids["A"]) == [(1, "10.0")]
    assert _applied(url, ids["C"]) == [(1, "0.0"), (2, "10.0"), (3, "0.0")]
    after = _report(engine, person)
    assert after["not_counted"] == []
    assert after["by_type"] == {"paper": {"claimed": "30.0", "credited": "20.0"}}
    assert _events(engine, "cap_reallocated") == [(ids["A"], 1), (ids["A"], 1)]


def test_a_training_corrected_into_a_refused_paper_holds_no_paper_share(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker,
) -> None:
    """The management system counts its applied training, nothing of papers (model walk 93)."""
    url, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(22))
    ids = _put(engine, partner, _sub(person, "T", "8", "高原生态修复技术研修班", 2))
    worker = make_worker()
    drain(worker)
    assert _applied(url, ids["T"]) == [(1, "8.0")]
    faults.reject_ids = {ids["T"]}  # its paper version is refused for good
    ids |= _put(engine, partner, _paper(person, "T", "柴达木盆地盐湖资源研究", 3))
    ids |= _put(engine, partner, _paper(person, "B", "三江源湿地碳汇研究", 4),
                _paper(person, "C", "高寒草甸退化机理研究", 5))
    drain(worker)
    # T counts 8 h of training there and no paper: B and C share the paper cap's 20 h.
    assert _applied(url, ids["T"]) == [(1, "8.0")]
    assert {sid: h for sid, (_, h) in _credited(engine, ids).items() if sid != "T"} == {
        "B": "10.0", "C": "10.0"}
    assert [_applied(url, ids[sid])[-1][1] for sid in ("B", "C")] == ["10.0", "10.0"]


def test_a_refused_correction_leaves_the_cap_to_what_the_management_system_counts(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker,
) -> None:
    """A paper applied at 10 h, then corrected to 5 h and refused, still counts 10 h there.

    So the next papers share the other 10 h, not 15 (model walk, seed 133).
    """
    url, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(23))
    ids = _put(engine, partner, _paper(person, "A", "柴达木盆地盐湖资源研究", 3))
    worker = make_worker()
    drain(worker)
    faults.reject_ids = {ids["A"]}
    co = _paper(person, "A", "柴达木盆地盐湖资源研究", 3)
    co["claimed"]["details"] = {"authorship": "co"}
    _put(engine, partner, co)
    drain(worker)
    ids |= _put(engine, partner, _paper(person, "B", "三江源湿地碳汇研究", 4),
                _paper(person, "C", "高寒草甸退化机理研究", 5))
    drain(worker)
    held = {sid: _applied(url, rid)[-1][1] for sid, rid in ids.items()}
    assert held == {"A": "10.0", "B": "10.0", "C": "0.0"}
    result = _report(engine, person)
    assert result["by_type"]["paper"]["credited"] == "20.0"
    [refused] = result["not_counted"]
    assert (refused["source_record_id"], refused["hours"], refused["applied_hours"]) == (
        "A", "5.0", "10.0")


def test_a_record_dead_for_retries_keeps_its_share(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker,
) -> None:
    """RETRIES_EXHAUSTED is ours or transient: ops reprocess it, and it still counts."""
    _, faults = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(22))
    ids = _papers(engine, partner, person, "柴达木盆地盐湖资源研究")
    faults.error_rate = 1.0
    drain(make_worker(delivery_max_attempts=1))
    faults.error_rate = 0.0
    assert _credited(engine, ids) == {"A": (1, "10.0"), "B": (1, "10.0"), "C": (1, "0.0")}
    assert _events(engine, "cap_reallocated") == []
    assert _report(engine, person)["by_type"] == {"paper": {"claimed": "30.0", "credited": "20.0"}}


def test_the_refusal_of_a_version_no_longer_current_moves_no_share(
    engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
    make_worker: MakeWorker,
) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    person = make_person(random.Random(23))
    ids = _papers(engine, partner, person, "[REJECT] 柴达木盆地盐湖资源研究")
    # Corrected before delivery: version 1 is refused, version 2 (current) is applied.
    _put(engine, partner, _paper(person, "A", "柴达木盆地盐湖资源研究", 3))
    drain(make_worker())
    assert _applied(url, ids["A"]) == [(2, "10.0")]
    assert _credited(engine, ids) == {"A": (2, "10.0"), "B": (1, "10.0"), "C": (1, "0.0")}
    assert _events(engine, "cap_reallocated") == []
    result = _report(engine, person)
    assert result["not_counted"] == []
    assert result["by_type"] == {"paper": {"claimed": "30.0", "credited": "20.0"}}
