"""``ce-gateway deliveries …`` as an operator runs it: real processes on a real store.

A record the management system refused is dead; once the downstream is fixed the operator
lists it, counts it with a dry run, requeues it by filter, and a worker delivers it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import orjson
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.tables import audit_events, outbox
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission
from tests.conftest import SECRET_KEY
from tests.support.servers import cli


def test_list_dry_run_and_reprocess_by_filter(
    db_url: str, engine: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
) -> None:
    mock_url, faults = mock_ce
    partner = new_partner(engine)
    rng = random.Random(3)
    subs = [canonical_submission(rng, f"C-{i}") for i in range(2)]
    subs[0]["activity"]["title"] = "[REJECT] 数字政府建设实务"
    bad, good = (a.record_id for a in ingest(engine, PartnerRef(partner.partner_id, "canonical"), subs))
    worker = DeliveryWorker(engine, make_settings(db_url, mock_url))
    try:
        assert worker.run_once() == 2
        env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY}

        listed = cli(env, "deliveries", "list", "--status", "dead", "--json")
        assert listed.returncode == 0, listed.stderr
        page = json.loads(listed.stdout)
        assert page["total"] == 1 and page["items"][0]["record_id"] == bad
        assert page["items"][0]["error_code"] == "DOWNSTREAM_REJECTED"

        faults.reject_title_marker = "[NEVER]"  # the management system fixed its side
        args = ("deliveries", "reprocess", "--error-code", "DOWNSTREAM_REJECTED",
                "--reason", "下游已修复", "--operator", "wang", "--json")
        dry = cli(env, *args, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["matched"] == 1
        done = cli(env, *args, "--yes")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert (result["matched"], result["requeued"], result["dry_run"]) == (1, 1, False)

        assert worker.run_once() == 1
    finally:
        worker.close()
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(outbox.c.record_id, outbox.c.status)).all())
        [event] = conn.execute(select(audit_events.c.actor, audit_events.c.detail)
                               .where(audit_events.c.kind == "ops_reprocess")).all()
    assert statuses == {bad: "delivered", good: "delivered"}
    assert event.actor == "cli:wang"
    detail = orjson.loads(event.detail)
    assert detail["reason"] == "下游已修复" and detail["filter"] == {"error_code": "DOWNSTREAM_REJECTED"}


def test_a_confirmation_requeues_no_delivery_newer_than_its_dry_run(
    db_url: str, engine: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
) -> None:
    """SPEC §2 "dry-run count first": what dies after the count is not in the confirmed run."""
    from gateway.ops.deliveries import DeliveryFilter, reprocess

    mock_url, _ = mock_ce
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    rng = random.Random(4)
    worker = DeliveryWorker(engine, make_settings(db_url, mock_url))
    try:
        first = canonical_submission(rng, "D-1")
        first["activity"]["title"] = "[REJECT] 数字政府建设实务"
        [counted_one] = ingest(engine, partner, [first])
        assert worker.run_once() == 1
        flt = DeliveryFilter(status="dead")
        preview = reprocess(engine, flt, dry_run=True, reason=None, actor="ops")
        assert preview.matched == 1 and preview.ceiling > 0
        later = canonical_submission(rng, "D-2")
        later["activity"]["title"] = "[REJECT] 高原医学专题讲座"
        [arrived_later] = ingest(engine, partner, [later])
        assert worker.run_once() == 1
        done = reprocess(engine, flt, dry_run=False, reason="下游已修复", actor="ops",
                         ceiling=preview.ceiling)
    finally:
        worker.close()
    assert (done.matched, done.requeued) == (1, 1)
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(outbox.c.record_id, outbox.c.status)).all())
    assert statuses == {counted_one.record_id: "pending", arrived_later.record_id: "dead"}


def test_a_dry_run_needs_no_reason_and_a_run_without_one_is_refused_before_it_asks(
        db_url: str) -> None:
    """A count changes nothing, so it asks no reason; a real run asks it first, coded."""
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY}
    counted = cli(env, "deliveries", "reprocess", "--status", "dead", "--dry-run", "--json")
    assert counted.returncode == 0, counted.stderr
    assert json.loads(counted.stdout)["matched"] == 0
    refused = cli(env, "deliveries", "reprocess", "--status", "dead", "--yes")
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    assert "SCHEMA (reason)" in refused.stderr and "原因" in refused.stderr
