"""Review of session 21's whole change (0d1466b..c227c8b): last word, masking, 0023 rolling.

The review wrote four strict xfails, each asserting the correct behaviour and failing on the
code of 778ed0a on the bug named below; all four are fixed (fix-mask2, fix-s21b):

- an identity number written with tabs (which ``gateway.masking`` says it masks), with a gap of
  five spaces or with a line break in the cell — all of which the adapters fold into a valid
  number — shows whole in the ops rejection list, which masks the payload's JSON *text* (where a
  tab or line break is a backslash and a letter);
- a partner's ``DELETE`` of a source id the gateway only holds as a rejection is answered 404
  and leaves no trace, so revalidation later accepts and forwards the record the partner
  withdrew (the docs say a withdrawal overtakes an older rejection);
- in the rolling release of migration 0023, a correction written by a replica still on the
  previous code leaves ``records.covers_professional`` true on a record whose current version
  no longer covers the tenure, and the compliance report keeps counting it (the docs say a
  record an older replica writes leaves the column null and is read from its payload);
- revalidation replays in rejection-id order, called arrival order, but a rejection judged
  again gets a fresh, higher id with its old arrival time: after a filtered run a later paper
  is replayed first and takes the yearly cap from the one that arrived before it.

All run on the real store (SQLite and PostgreSQL) and the real pipeline.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from gateway import compliance
from gateway.accounts import Partner
from gateway.masking import mask_text
from gateway.pipeline import chunk_writes
from gateway.pipeline import ingest as ingest_module
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.withdraw import withdraw
from gateway.reference import StoreReference, import_csv
from gateway.revalidate import RevalidationFilter, default_rules, revalidate
from gateway.store.tables import audit_events, outbox, records, rejections
from mock_partners.generators import canonical_submission, make_person
from mock_partners.training_base import plan_period
from tests.support.keys import KEYS
from tests.support.reference import load_base_and_plan
from tests.support.years import fixture_rules_config

NewPartner = Callable[..., Partner]
BASE, PLAN, LATE_PLAN = "QHJD-031", "PLAN-2026-031", "PLAN-2026-032"


# -- 1. identity numbers with tabs, wide gaps or a line break: cases of
# test_revref_review.py::test_the_rejection_list_masks_an_identity_number_written_with_spaces


# -- 2. a DELETE of a source id held only as a rejection ---------------------------------------


def _training(rng: random.Random, source_id: str, plan: str) -> dict[str, Any]:
    sub = canonical_submission(rng, source_id, year=2026, hours="8", within=plan_period(2026))
    sub["activity"] |= {"provider_code": BASE, "plan_id": plan}
    return sub


def test_revalidation_does_not_forward_a_rejected_record_its_partner_then_deleted(
        store: Engine, new_partner: NewPartner) -> None:
    partner = new_partner(store, base_code=BASE)
    relay = PartnerRef(partner.partner_id, "canonical", BASE)
    load_base_and_plan(store, BASE, PLAN)
    sub = _training(random.Random(2101), "S-DEL", LATE_PLAN)  # a plan not filed yet
    [answer] = ingest(store, relay, [sub], rules=default_rules(store))
    assert answer.status == "rejected"
    # The partner withdraws it: DELETE /v1/records/S-DEL (answered 404, nothing to withdraw).
    assert withdraw(store, relay, "S-DEL") is None
    load_base_and_plan(store, BASE, LATE_PLAN)

    revalidate(store, RevalidationFilter(), actor="ops-wang", reason="plan 032 filed")

    with store.connect() as conn:
        forwarded = conn.execute(select(outbox.c.record_id).join(
            records, records.c.record_id == outbox.c.record_id).where(
            records.c.source_record_id == "S-DEL", records.c.withdrawn.is_(False))).all()
        still = conn.execute(select(rejections.c.status).where(
            rejections.c.source_record_id == "S-DEL")).scalars().all()
    assert forwarded == [], "the record the partner deleted was forwarded"
    assert "revalidated" not in still


def test_a_delete_of_a_rejected_source_id_closes_its_rejections_with_an_audit_event(
        store: Engine, new_partner: NewPartner) -> None:
    """The pin beside the fix above: 404 as before, the rejections closed, the partner named."""
    partner = new_partner(store, base_code=BASE)
    relay = PartnerRef(partner.partner_id, "canonical", BASE)
    load_base_and_plan(store, BASE, PLAN)
    for seed in (2105, 2106):  # refused twice
        [answer] = ingest(store, relay, [_training(random.Random(seed), "S-DEL2", LATE_PLAN)],
                          rules=default_rules(store))
        assert answer.status == "rejected"
    assert withdraw(store, relay, "S-DEL2") is None
    assert withdraw(store, relay, "S-NONE") is None  # nothing at all: nothing written
    with store.connect() as conn:
        statuses = conn.execute(select(rejections.c.status).where(
            rejections.c.source_record_id == "S-DEL2")).scalars().all()
        events = conn.execute(select(audit_events.c.actor, audit_events.c.detail).where(
            audit_events.c.kind == "rejection_withdrawn")).all()
    assert statuses == ["superseded", "superseded"]
    [(actor, detail)] = events
    assert actor == mask_text(partner.partner_id)
    assert json.loads(detail)["source_record_id"] == "S-DEL2"
    assert len(json.loads(detail)["rejection_ids"]) == 2


# -- 3. migration 0023 in a rolling release ------------------------------------------------------

RULES = RulesContext(StoreReference.of(KEYS), fixture_rules_config())
COLLEGE = PartnerRef("cadre-college", "cadre_college")
IN_2026 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def _award(person: dict[str, Any], tier: str, award: str) -> dict[str, Any]:
    return {"source_record_id": "C-ROLL", "person": person, "year": 2026,
            "category": "professional", "activity_type": "competition",
            "activity": {"title": "全国职业技能大赛", "completed_on": "2026-02-20"},
            "claimed": {"quantity": "1", "unit": "award",
                        "details": {"tier": tier, "award": award}}}


def _as_before_0023(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingest as the code before 0023 wrote a record: its rules columns without the new one."""
    old_columns = tuple(c for c in chunk_writes.RULES_COLUMNS if c != "covers_professional")
    new_rules_columns = ingest_module._rules_columns

    def old_rules_columns(sub: Any) -> dict[str, Any]:
        return {k: v for k, v in new_rules_columns(sub).items() if k != "covers_professional"}

    monkeypatch.setattr(chunk_writes, "RULES_COLUMNS", old_columns)  # read by Chunk._write
    monkeypatch.setattr(ingest_module, "_rules_columns", old_rules_columns)  # by its decisions


def test_an_award_corrected_by_an_older_replica_stops_covering_the_tenure(
        store: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_person(random.Random(2102))
    person = {"id_type": "resident_id", "id_number": p.id_number, "name": p.name,
              "region_code": p.region}
    # A new replica takes the award: national excellence covers the tenure (R7).
    [first] = ingest(store, COLLEGE, [_award(person, "national", "excellence")], now=IN_2026,
                     rules=RULES)
    assert first.status == "accepted", first
    with store.connect() as conn:
        assert compliance.report(conn, p.id_number, 2026, keys=KEYS)[
            "professional_covered_by"] is not None
    # The college corrects it to a provincial third prize (60 h, no tenure cover); the request
    # lands on a replica still running the code before 0023.
    with monkeypatch.context() as m:
        _as_before_0023(m)
        corrected = copy.deepcopy(_award(person, "provincial_joint", "third"))
        [second] = ingest(store, COLLEGE, [corrected], now=IN_2026, rules=RULES)
    assert second.status == "corrected", second

    with store.connect() as conn:
        answer = compliance.report(conn, p.id_number, 2026, keys=KEYS)
    assert answer["professional_covered_by"] is None, answer["professional_covered_by"]
    assert answer["missing"]["professional"] != "0.0"


def test_an_award_corrected_by_the_current_code_stops_covering_the_tenure(store: Engine) -> None:
    """The pin beside the finding above: with every replica on 0023 the correction is right."""
    p = make_person(random.Random(2103))
    person = {"id_type": "resident_id", "id_number": p.id_number, "name": p.name,
              "region_code": p.region}
    for tier, award, status in (("national", "excellence", "accepted"),
                                ("provincial_joint", "third", "corrected")):
        [answer] = ingest(store, COLLEGE, [_award(person, tier, award)], now=IN_2026, rules=RULES)
        assert answer.status == status, answer
    with store.connect() as conn:
        answer = compliance.report(conn, p.id_number, 2026, keys=KEYS)
        assert conn.execute(select(records.c.covers_professional).where(
            records.c.source_record_id == "C-ROLL")).scalar_one() is False
    assert answer["professional_covered_by"] is None


# -- 4. "arrival (id) order" after a filtered run judged a rejection again -------------------


def _paper(person: dict[str, Any], sid: str, papers: str) -> dict[str, Any]:
    return {"source_record_id": sid, "person": person, "year": 2025, "category": "professional",
            "activity_type": "paper",
            "activity": {"title": f"高原医学论文 {sid}", "completed_on": "2025-06-01"},
            "claimed": {"quantity": papers, "unit": "papers", "details": {"authorship": "sole"}}}


def test_revalidation_replays_in_arrival_order_after_a_filtered_run(
        store: Engine, new_partner: NewPartner, tmp_path: Path) -> None:
    partner = new_partner(store)
    ref = PartnerRef(partner.partner_id, "canonical")
    p = make_person(random.Random(2104))
    person = {"id_type": "resident_id", "id_number": p.id_number, "name": p.name,
              "region_code": p.region}
    first_at = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    then_at = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
    # 2025 closed on 30 Dec: both refused YEAR_CLOSED.  P-1 (2 papers, 20 h) came first.
    for sub, at in ((_paper(person, "P-1", "2"), first_at), (_paper(person, "P-2", "1"), then_at)):
        [answer] = ingest(store, ref, [sub], now=at, rules=default_rules(store))
        assert answer.status == "rejected", answer
    # Ops try the first one alone before the deferral is filed: judged again, refused again.
    narrow = revalidate(store, RevalidationFilter(until=datetime(2026, 3, 1, 2, 30, tzinfo=UTC)),
                        actor="ops-wang", reason="try the first")
    assert narrow.rejected_again == 1
    deferrals = tmp_path / "deferrals.csv"
    deferrals.write_text(f"id_number,from_year,reason,approved_on\n{p.id_number},2025,illness,"
                         "2025-11-20\n", encoding="utf-8")
    assert import_csv(store, "deferrals", deferrals, actor="ops-wang", keys=KEYS).ok

    done = revalidate(store, RevalidationFilter(), actor="ops-wang", reason="deferral filed")

    assert done.accepted == 2, done.as_dict()
    with store.connect() as conn:
        credited = dict(conn.execute(select(records.c.source_record_id,
                                            records.c.credited_hours)).all())
    # The cap (20 h a year, 四(二)1) goes in arrival order: P-1 first.
    assert (Decimal(credited["P-1"]), Decimal(credited["P-2"])) == (20, 0), credited
