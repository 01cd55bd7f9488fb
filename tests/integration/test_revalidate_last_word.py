"""Revalidation replays only a partner's last word on a source id (gateway/last_word.py).

The review's cases (tests/integration/test_revref_review.py) cover a correction and a
withdrawal sent after the rejection, in other requests.  These pin the rest: the dry run and
the run agree, words of one request keep their order, a resend and another partner's record,
a correction landing while the run works, and an ops edit of an overtaken rejection.  On SQLite
and PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select

from gateway import revalidate as revalidation
from gateway.accounts import Partner
from gateway.config import Settings
from gateway.ops.common import OpsConflict
from gateway.ops.edits import edit_rejection
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.revalidate import RevalidationFilter, default_rules, revalidate
from gateway.store.tables import audit_events, outbox, records, rejections
from mock_partners.generators import canonical_submission
from mock_partners.training_base import plan_period
from tests.support.reference import load_base_and_plan

BASE, PLAN, LATE_PLAN = "QHJD-041", "PLAN-2026-041", "PLAN-2026-042"
NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
NewPartner = Callable[..., Partner]


def _relay(new_partner: NewPartner, engine: Engine) -> PartnerRef:
    partner = new_partner(engine, base_code=BASE)
    return PartnerRef(partner.partner_id, "canonical", BASE)


def _training(rng: random.Random, source_id: str, hours: str = "8") -> dict[str, Any]:
    sub = canonical_submission(rng, source_id, hours=hours, within=plan_period())
    sub["activity"] |= {"provider_code": BASE, "plan_id": PLAN}
    return sub


def _unfiled(sub: dict[str, Any], hours: str) -> dict[str, Any]:
    """A correction naming the plan not filed yet (refused until it is)."""
    late = copy.deepcopy(sub)
    late["activity"]["plan_id"], late["claimed"]["quantity"] = LATE_PLAN, hours
    return late


def _send(engine: Engine, partner: PartnerRef, subs: list[dict[str, Any]],
          now: datetime | None = None) -> list[Any]:
    """As the gateway takes a request: judged with the reference data stored now."""
    return ingest(engine, partner, subs, now=now, rules=default_rules(engine))


def _record(engine: Engine, source_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(records).where(
            records.c.source_record_id == source_id)).mappings().one())


def _statuses(engine: Engine) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for sid, status in conn.execute(select(rejections.c.source_record_id, rejections.c.status)
                                        .order_by(rejections.c.id)):
            out.setdefault(sid, []).append(status)
    return out


def _queued(engine: Engine, record_id: str) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(outbox.c.version).where(
            outbox.c.record_id == record_id)).scalars())


def test_the_dry_run_counts_what_the_run_closes_and_both_are_audited(
        store: Engine, new_partner: NewPartner) -> None:
    relay = _relay(new_partner, store)
    load_base_and_plan(store, BASE, PLAN)
    rng = random.Random(51)
    first, other = _training(rng, "L-1"), _training(rng, "L-2")
    assert _send(store, relay, [first])[0].status == "accepted"
    assert _send(store, relay, [_unfiled(first, "12")])[0].status == "rejected"  # overtaken:
    assert _send(store, relay, [_unfiled(first, "16")])[0].status == "rejected"  # by this one
    assert _send(store, relay, [_unfiled(other, "8")])[0].status == "rejected"
    load_base_and_plan(store, BASE, LATE_PLAN)

    dry = revalidate(store, RevalidationFilter(), actor="ops", dry_run=True)
    done = revalidate(store, RevalidationFilter(), actor="ops-wang", reason="plan 042 filed")

    assert (dry.matched, dry.superseded, dry.would_pass) == (3, 1, 2), dry.as_dict()
    assert dry.as_dict()["superseded"] == 1
    assert (done.matched, done.superseded, done.corrected, done.accepted) == (3, 1, 1, 1)
    assert _record(store, "L-1")["hours"] == "16.0"  # the last correction, not the one before
    assert _statuses(store) == {"L-1": ["superseded", "revalidated"], "L-2": ["revalidated"]}
    with store.connect() as conn:
        detail = json.loads(conn.execute(select(audit_events.c.detail).where(
            audit_events.c.kind == "revalidation")).scalar_one())
    assert detail["counts"]["superseded"] == 1 and "stopped" not in detail


@pytest.mark.parametrize("order", ["refused_last", "refused_first"])
def test_two_words_in_one_request_keep_their_order(
        store: Engine, new_partner: NewPartner, order: str) -> None:
    """One request (one ``now``): the audit trail orders a rejection and a correction in it."""
    relay = _relay(new_partner, store)
    load_base_and_plan(store, BASE, PLAN)
    rng = random.Random(52)
    first = _training(rng, "L-3")
    assert _send(store, relay, [first], now=NOW)[0].status == "accepted"
    better = copy.deepcopy(first)
    better["claimed"]["quantity"] = "10"
    pair = [better, _unfiled(first, "12")]
    if order == "refused_first":
        pair.reverse()
    answers = _send(store, relay, pair, now=NOW)
    assert sorted(a.status for a in answers) == ["corrected", "rejected"]
    load_base_and_plan(store, BASE, LATE_PLAN)

    done = revalidate(store, RevalidationFilter(), actor="ops", reason="plan 042 filed")

    rec = _record(store, "L-3")
    if order == "refused_last":  # the partner's last word was the refused one: it applies now
        assert (done.corrected, done.superseded, rec["hours"]) == (1, 0, "12.0")
        assert _queued(store, rec["record_id"]) == [1, 2, 3]
    else:  # corrected after it in the same request: the correction stands
        assert (done.corrected, done.superseded, rec["hours"]) == (0, 1, "10.0")
        assert _queued(store, rec["record_id"]) == [1, 2]


def test_a_resend_of_the_accepted_version_overtakes_a_refused_correction(
        store: Engine, new_partner: NewPartner) -> None:
    relay = _relay(new_partner, store)
    load_base_and_plan(store, BASE, PLAN)
    first = _training(random.Random(53), "L-4")
    statuses = [_send(store, relay, [sub])[0].status
                for sub in (first, _unfiled(first, "12"), first)]
    assert statuses == ["accepted", "rejected", "duplicate"]  # the partner stands by v1
    load_base_and_plan(store, BASE, LATE_PLAN)

    done = revalidate(store, RevalidationFilter(), actor="ops", reason="plan 042 filed")

    assert (done.superseded, done.corrected) == (1, 0)
    assert _record(store, "L-4")["current_version"] == 1


def test_another_partners_record_of_the_same_source_id_overtakes_nothing(
        store: Engine, new_partner: NewPartner) -> None:
    relay, other = _relay(new_partner, store), _relay(new_partner, store)
    load_base_and_plan(store, BASE, PLAN)
    rng = random.Random(54)
    mine = _training(rng, "L-5")
    assert _send(store, relay, [_unfiled(mine, "8")])[0].status == "rejected"
    assert _send(store, other, [_training(rng, "L-5")])[0].status == "accepted"
    load_base_and_plan(store, BASE, LATE_PLAN)

    done = revalidate(store, RevalidationFilter(partner_id=relay.partner_id), actor="ops",
                      reason="plan 042 filed")

    assert (done.accepted, done.superseded) == (1, 0)


def test_a_correction_landing_while_the_run_works_is_not_undone(
        store: Engine, new_partner: NewPartner, monkeypatch: pytest.MonkeyPatch) -> None:
    """The partner corrects the record after the run read the rejection, before it stored it."""
    relay = _relay(new_partner, store)
    load_base_and_plan(store, BASE, PLAN)
    first = _training(random.Random(55), "L-6")
    assert _send(store, relay, [first])[0].status == "accepted"
    assert _send(store, relay, [_unfiled(first, "12")])[0].status == "rejected"
    load_base_and_plan(store, BASE, LATE_PLAN)
    latest = copy.deepcopy(first)
    latest["claimed"]["quantity"] = "16"
    read = revalidation.group_entries

    def read_then_partner_corrects(*args: Any, **kwargs: Any) -> Any:
        runs = read(*args, **kwargs)
        assert _send(store, relay, [latest])[0].status == "corrected"
        return runs

    monkeypatch.setattr(revalidation, "group_entries", read_then_partner_corrects)
    done = revalidate(store, RevalidationFilter(), actor="ops", reason="plan 042 filed")

    assert (done.corrected, done.superseded) == (0, 1), done.as_dict()
    rec = _record(store, "L-6")
    assert (rec["hours"], rec["current_version"]) == ("16.0", 2)
    assert _statuses(store) == {"L-6": ["superseded"]}


def test_an_ops_edit_of_an_overtaken_rejection_is_refused(
        db_url: str, store: Engine, new_partner: NewPartner,
        make_settings: Callable[..., Settings]) -> None:
    relay = _relay(new_partner, store)
    load_base_and_plan(store, BASE, PLAN)
    first = _training(random.Random(56), "L-7")
    assert _send(store, relay, [first])[0].status == "accepted"
    assert _send(store, relay, [_unfiled(first, "12")])[0].status == "rejected"
    assert _send(store, relay, [_unfiled(first, "16") | {
        "activity": first["activity"] | {"plan_id": PLAN}}])[0].status == "corrected"
    with store.connect() as conn:
        rejection_id = conn.execute(select(rejections.c.id)).scalar_one()

    with pytest.raises(OpsConflict) as refused:
        edit_rejection(store, make_settings(db_url), rejection_id,
                       {"activity.plan_id": PLAN}, reason="plan typo", actor="ops-li",
                       rules=default_rules(store))

    assert refused.value.code == "NOT_EDITABLE"
    rec = _record(store, "L-7")
    assert (rec["hours"], rec["current_version"]) == ("16.0", 2)
    assert _statuses(store) == {"L-7": ["open"]}
