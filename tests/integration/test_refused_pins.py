"""A refused correction that moved a record leaves it counted where its applied version counts.

The management system keeps a record's last applied version when it refuses a later one
(SPEC §5 downstream).  When the refused correction moved the record to another activity type,
person or CE year, the records row says where the *current* version would count; where the
applied version still counts is pinned (``refused_pins``, :func:`gateway.pipeline.caps.pins_for`):
its cap group keeps the record's share (R10) and its person's compliance report counts it (R1).
The pin goes when a later version of the record is sent (a correction, a withdrawal) or ops queue the
refused version again, and its group is allocated again then.

Real ingest and the real delivery worker against the mock management system on uvicorn
(127.0.0.1), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, select

from gateway import compliance
from gateway.accounts import Partner
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.store.tables import refused_pins
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, make_person
from tests.integration.test_compliance_delivery import _sub
from tests.integration.test_refused_caps_review import CAPS, NOW, _applied, _item, _put, _reprocess
from tests.integration.test_s16caps_review import _credited, _downstream
from tests.support.delivery import MakeWorker, drain
from tests.support.keys import KEYS


def _pins(engine: Engine) -> dict[str, tuple[str, int, str | None, str]]:
    """The pins: record id → (person key, year, cap type, hours)."""
    with engine.connect() as conn:
        return {r.record_id: (r.person_key, int(r.year), r.cap_type, r.hours)
                for r in conn.execute(select(refused_pins))}


def _report(engine: Engine, person: GenPerson, year: int = 2026) -> dict[str, Any]:
    """The person's compliance report, checked against its HTTP schema."""
    with engine.connect() as conn:
        got = compliance.report(conn, person.id_number, year, keys=KEYS)
    return compliance.ComplianceReport.model_validate(got).model_dump(mode="json")


def _three_papers(engine: Engine, partner: Partner, q: GenPerson) -> dict[str, str]:
    return _put(engine, partner, _item(q, "A", "盐湖", 3), _item(q, "B", "湿地", 4),
                _item(q, "C", "草甸", 5))


def test_a_paper_corrected_into_a_refused_training_keeps_its_paper_share(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q = make_person(random.Random(1701))
    ids = _three_papers(engine, partner, q)
    worker = make_worker()
    drain(worker)
    # An uncapped type: the records row holds no cap group at all now.
    _put(engine, partner, _sub(q, "A", "8", "[REJECT] 盐湖", 3))
    drain(worker)
    assert [v["version"] for v in _applied(url, ids["A"])] == [1]
    assert _credited(engine, ids) == {"A": "8.0", "B": "10.0", "C": "0.0"}
    assert _downstream(url, ids, "paper", q) == CAPS["paper"]
    report = _report(engine, q)
    assert report["by_type"]["paper"]["credited"] == "20.0"
    assert [(n["source_record_id"], n["applied_hours"]) for n in report["not_counted"]] == [
        ("A", "10.0")]
    assert len(_pins(engine)) == 1
    # Corrected again, and this time counted: the pin goes at once and C takes the share.
    _put(engine, partner, _sub(q, "A", "8", "盐湖", 3))
    assert _pins(engine) == {}
    assert _credited(engine, ids) == {"A": "8.0", "B": "10.0", "C": "10.0"}
    drain(worker)
    assert _downstream(url, ids, "paper", q) == CAPS["paper"]
    assert _applied(url, ids["A"])[-1]["record"]["activity_type"] == "training"


def test_requeued_after_a_refused_move_to_another_person_the_first_group_is_freed(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(1702)), make_person(random.Random(1703))
    ids = _three_papers(engine, partner, q)
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3))
    drain(worker)
    assert _credited(engine, ids) == {"A": "10.0", "B": "10.0", "C": "0.0"}
    assert _report(engine, p)["credited"]["total"] == "0.0"
    faults.reject_title_marker = "[NEVER]"
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 1
    assert _pins(engine) == {}
    assert _credited(engine, ids) == {"A": "10.0", "B": "10.0", "C": "10.0"}
    drain(worker)
    assert _applied(url, ids["A"])[-1]["record"]["person"]["id_number"] == p.id_number
    assert _downstream(url, ids, "paper", q) == CAPS["paper"]
    assert Decimal(_report(engine, q)["by_type"]["paper"]["credited"]) == CAPS["paper"]
    assert _report(engine, p)["by_type"]["paper"]["credited"] == "10.0"


def test_withdrawn_after_a_refused_move_to_a_book_the_paper_group_is_freed(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, faults = mock_ce
    partner = new_partner(engine)
    q = make_person(random.Random(1704))
    ids = _three_papers(engine, partner, q)
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _item(q, "A", "[REJECT] 盐湖", 3, "book", "first"))
    drain(worker)
    assert _credited(engine, ids)["C"] == "0.0"
    withdraw(engine, PartnerRef(partner.partner_id, "canonical"), "A", now=NOW)
    assert _pins(engine) == {}
    assert _credited(engine, ids) == {"A": "0.0", "B": "10.0", "C": "10.0"}
    faults.reject_title_marker = "[NEVER]"  # the withdrawal carries the refused title too
    drain(worker)
    assert _applied(url, ids["A"])[-1]["withdrawn"]
    assert _downstream(url, ids, "paper", q) == CAPS["paper"]


def test_a_training_moved_to_another_person_and_refused_counts_for_the_first(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(1705)), make_person(random.Random(1706))
    ids = _put(engine, partner, _sub(q, "T", "16", "高原生态", 3))
    worker = make_worker()
    drain(worker)
    _put(engine, partner, _sub(p, "T", "16", "[REJECT] 高原生态", 3))
    drain(worker)
    assert _applied(url, ids["T"])[-1]["record"]["person"]["id_number"] == q.id_number
    for_q, for_p = _report(engine, q), _report(engine, p)
    assert (for_q["credited"]["total"], for_p["credited"]["total"]) == ("16.0", "0.0")
    assert [(n["source_record_id"], n["applied_hours"]) for n in for_q["not_counted"]] == [
        ("T", "16.0")]
    assert [n["source_record_id"] for n in for_p["not_counted"]] == ["T"]
    # Corrected back to the first person, counted: the pin goes, and nobody counts it twice.
    _put(engine, partner, _sub(q, "T", "16", "高原生态", 3))
    assert _pins(engine) == {}
    for_q, for_p = _report(engine, q), _report(engine, p)
    assert (for_q["credited"]["total"], for_p["credited"]["total"]) == ("16.0", "0.0")
    assert for_q["not_counted"] == [] and for_p["not_counted"] == []
