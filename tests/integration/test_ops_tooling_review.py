"""Review of the ops tooling as the Ops team of SPEC §2 uses it.

The CLI of SPEC §5 in real processes on a real store, beside the console it must agree with.

Findings are ``xfail(strict=True)`` tests that pass once the bug is fixed; a few plain tests pin
behaviour that is right (an audited reprocess names who, when and the filter).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

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

ZONE = "Asia/Shanghai"
BAD_ID = "630102198704139127"  # check digit wrong: ID_NUMBER_INVALID


def _env(db_url: str) -> dict[str, str]:
    return {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
            "CE_GATEWAY_TIMEZONE": ZONE}


def _dead_letter(engine: Engine, worker: DeliveryWorker, partner: PartnerRef,
                 rng: random.Random, source_id: str) -> str:
    """A record the management system refuses for good (the mock's ``[REJECT]`` marker)."""
    sub = canonical_submission(rng, source_id)
    sub["activity"]["title"] = "[REJECT] 数字政府建设实务"
    [answer] = ingest(engine, partner, [sub])
    assert worker.run_once() == 1
    return answer.record_id


# -- deliveries reprocess: the dry-run count, then the run ------------------------------------

def test_cli_reprocess_can_be_held_to_its_dry_run_count(
    db_url: str, engine: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
) -> None:
    mock_url, _ = mock_ce
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    rng = random.Random(11)
    env = _env(db_url)
    args = ("deliveries", "reprocess", "--status", "dead", "--error-code", "DOWNSTREAM_REJECTED",
            "--reason", "下游已修复", "--operator", "wang", "--json")
    worker = DeliveryWorker(engine, make_settings(db_url, mock_url))
    try:
        counted = _dead_letter(engine, worker, partner, rng, "CEIL-1")
        dry = cli(env, *args, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        preview = json.loads(dry.stdout)
        assert preview["matched"] == 1
        later = _dead_letter(engine, worker, partner, rng, "CEIL-2")  # dies after the count
        done = cli(env, *args, "--yes", "--ceiling", str(preview["ceiling"]))
    finally:
        worker.close()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["requeued"] == 1
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(outbox.c.record_id, outbox.c.status)).all())
    assert statuses == {counted: "pending", later: "dead"}


def test_cli_reprocess_is_audited_with_who_when_and_the_whole_filter(
    db_url: str, engine: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
) -> None:
    """SPEC §7: every operator action (who, when, what filter) is recorded; --json is pure."""
    mock_url, _ = mock_ce
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    worker = DeliveryWorker(engine, make_settings(db_url, mock_url))
    try:
        _dead_letter(engine, worker, partner, random.Random(12), "AUD-1")
    finally:
        worker.close()
    done = cli(_env(db_url), "deliveries", "reprocess", "--status", "dead", "--adapter",
               "canonical", "--since", "2026-01-01", "--reason", "下游已修复", "--operator",
               "li", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is the JSON alone
    assert (result["matched"], result["requeued"]) == (1, 1)
    with engine.connect() as conn:
        [event] = conn.execute(select(audit_events.c.actor, audit_events.c.detail,
                                      audit_events.c.occurred_at)
                               .where(audit_events.c.kind == "ops_reprocess")).all()
    detail = orjson.loads(event.detail)
    assert event.actor == "cli:li" and event.occurred_at is not None
    assert detail["reason"] == "下游已修复"
    assert detail["filter"]["status"] == "dead" and detail["filter"]["adapter"] == "canonical"
    assert detail["filter"]["since"].startswith("2026-01-01T00:00:00+08:00")


# -- revalidate: the same filter in the console and the CLI ------------------------------------

def test_cli_revalidate_until_a_date_selects_what_the_console_counts(
    db_url: str, engine: Engine, new_partner: Callable[..., Partner],
) -> None:
    from gateway.console.forms import rejection_query
    from gateway.revalidate import count

    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    sub = canonical_submission(random.Random(13), "REV-1")
    sub["person"]["id_number"] = BAD_ID
    [answer] = ingest(engine, partner, [sub])
    assert answer.status.value == "rejected"
    today = datetime.now(ZoneInfo(ZONE)).date().isoformat()
    console_count = count(engine, rejection_query({"until": today}, ZoneInfo(ZONE)).filter)
    assert console_count == 1  # the console: through today
    done = cli(_env(db_url), "revalidate", "--until", today, "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["matched"] == console_count


# -- bad input: a coded refusal in both languages, never a traceback --------------------------

def test_revalidate_refuses_bad_filters_coded_in_both_languages(db_url: str, engine: Engine) -> None:
    env = _env(db_url)
    for args, zh in ((("--error-code", "NOPE"), "未知的错误代码"),
                     (("--adapter", "bogus"), "未知的适配器"),
                     (("--since", "yesterday"), "不是 ISO 8601")):
        done = cli(env, "revalidate", *args, "--dry-run", "--json")
        assert done.returncode == 2 and done.stdout == "", (args, done.stderr)
        assert "SCHEMA" in done.stderr and zh in done.stderr, (args, done.stderr)


def test_bad_filter_text_is_refused_coded_not_with_a_traceback(db_url: str, engine: Engine) -> None:
    env = _env(db_url)
    for args, code in ((("deliveries", "list", "--since", "[/x]", "--json"), "SCHEMA"),
                       (("revalidate", "--since", "[/x]", "--dry-run", "--json"), "SCHEMA"),
                       (("records", "show", "[/x]", "--json"), "NOT_FOUND"),
                       (("conflicts", "resolve", "[/x]", "--keep", "this", "--reason", "x",
                         "--json"), "NOT_FOUND")):
        done = cli(env, *args)
        assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr, args
        assert done.returncode in (1, 2) and code in done.stderr, (args, done.stderr[-500:])


def test_cli_revalidate_audits_who_ran_it(db_url: str, engine: Engine) -> None:
    done = cli({**_env(db_url), "USER": "zhang", "LOGNAME": "zhang"},
               "revalidate", "--reason", "参考数据已修正", "--json")
    assert done.returncode == 0, done.stderr
    with engine.connect() as conn:
        [actor] = conn.execute(select(audit_events.c.actor)
                               .where(audit_events.c.kind == "revalidation")).scalars()
    assert actor == "cli:zhang"


# -- alerts: "deliveries still failing close to the year close" --------------------------------

DEC_27 = datetime(2026, 12, 27, 2, 0, tzinfo=ZoneInfo("UTC"))  # 3 days before the 30 Dec close


def test_year_close_alert_ignores_a_dead_version_whose_correction_was_delivered(
    db_url: str, engine: Engine, make_settings: Callable[..., Settings],
    new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
) -> None:
    from gateway.alerts import evaluate

    mock_url, _ = mock_ce
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    rng = random.Random(14)
    worker = DeliveryWorker(engine, make_settings(db_url, mock_url))
    try:
        sub = canonical_submission(rng, "YC-1")
        good_title = sub["activity"]["title"]
        sub["activity"]["title"] = "[REJECT] " + good_title
        [first] = ingest(engine, partner, [sub])
        assert worker.run_once() == 1
        sub["activity"]["title"] = good_title  # the partner corrects it
        [second] = ingest(engine, partner, [sub])
        assert second.status.value == "corrected" and second.record_id == first.record_id
        while worker.run_once():
            pass
    finally:
        worker.close()
    with engine.connect() as conn:
        rows = sorted(conn.execute(select(outbox.c.version, outbox.c.status)).all())
    assert [tuple(r) for r in rows] == [(1, "dead"), (2, "delivered")]
    settings = make_settings(db_url, alert_year_close_days=7, year_close_extensions={})
    result = evaluate(engine, settings, DEC_27)
    assert [c.kind for c in result.active if c.kind == "year_close"] == []


# -- db upgrade: the one command docs/operations.md runs from a CI job --------------------------

def test_db_upgrade_refuses_an_unreachable_store_coded() -> None:
    done = cli({"CE_GATEWAY_DATABASE_URL": "postgresql://ops:pw@127.0.0.1:9/ce"}, "db", "upgrade")
    assert "Traceback" not in done.stderr
    assert done.returncode == 2 and "STORE_UNAVAILABLE (CE_GATEWAY_DATABASE_URL)" in done.stderr
    assert "pw@" not in done.stderr


# -- audit verify: the anchor docs/retention-and-audit.md tells ops to keep ---------------------

def _rewrite_from(engine: Engine, first: int) -> None:
    """Someone with write access and the formula rewrites every event from ``first`` on."""
    from sqlalchemy import update

    from gateway import audit
    from gateway.store.tables import audit_head

    with engine.begin() as conn:
        rows = [dict(r) for r in conn.execute(select(audit_events).where(
            audit_events.c.seq >= first).order_by(audit_events.c.seq)).mappings()]
        prev = rows[0]["prev_hash"]
        for row in rows:
            if row["seq"] == first:
                row["actor"] = "mallory"
            digest = audit._hash(prev, row["seq"], row)
            conn.execute(update(audit_events).where(audit_events.c.seq == row["seq"]).values(
                actor=row["actor"], prev_hash=prev, hash=digest))
            prev = digest
        conn.execute(update(audit_head).values(last_hash=prev))


def test_audit_verify_checks_a_kept_anchor(db_url: str, engine: Engine) -> None:
    env = _env(db_url)
    assert cli(env, "operator", "add", "--name", "wang", "--json").returncode == 0
    first = cli(env, "audit", "verify", "--json")
    anchor = json.loads(first.stdout)
    assert first.returncode == 0 and anchor["ok"]
    assert cli(env, "operator", "add", "--name", "li", "--json").returncode == 0
    _rewrite_from(engine, anchor["head_seq"])
    plain = cli(env, "audit", "verify", "--json")
    assert plain.returncode == 0 and json.loads(plain.stdout)["ok"]  # the documented limit
    anchored = cli(env, "audit", "verify", "--anchor",
                   f"{anchor['head_seq']}:{anchor['head_hash']}", "--json")
    assert anchored.returncode == 1, anchored.stderr
    assert json.loads(anchored.stdout)["first_bad_seq"] == anchor["head_seq"]


# -- ingest: "exactly as an upload would be processed" ------------------------------------------

def test_cli_ingest_refuses_a_partner_of_another_adapter(
    db_url: str, engine: Engine, new_partner: Callable[..., Partner],
) -> None:
    from pathlib import Path

    from gateway.store.tables import batches

    health = new_partner(engine, adapter="health")
    finance_file = Path(__file__).parents[1] / "fixtures" / "finance_2026-03_utf8bom.csv"
    done = cli(_env(db_url), "ingest", str(finance_file), "--adapter", "finance", "--kind",
               "monthly", "--period", "2026-03", "--partner-id", health.partner_id, "--json")
    with engine.connect() as conn:
        filed = conn.execute(select(batches.c.partner_id, batches.c.adapter)).all()
    assert done.returncode == 2 and "SCOPE_VIOLATION" in done.stderr, (done.returncode, filed)
    assert filed == []


def test_registration_refuses_a_bad_adapter_or_role_coded_in_both_languages(
    db_url: str, engine: Engine,
) -> None:
    env = _env(db_url)
    for args in (("partner", "add", "--id", "qh-x", "--adapter", "bogus", "--json"),
                 ("operator", "add", "--name", "wang", "--role", "admin", "--json")):
        done = cli(env, *args)
        assert done.returncode == 2 and done.stdout == "", args
        assert "SCHEMA" in done.stderr and any("\u4e00" <= ch <= "\u9fff" for ch in done.stderr), (
            args, done.stderr)
