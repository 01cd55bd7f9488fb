"""Rolling releases: the previous release's code running beside this one on one store.

docs/operations.md ("Releases and migrations") calls 0022, 0023 and 0024 rolling releases: the
store is migrated to the head once, while replicas and workers of the previous release keep
ingesting, correcting and delivering beside the new ones until the roll ends.  Each scenario
migrates a store to this code's head, then interleaves steps of the OLD code (the parent of the
commit that added the migration, exported with ``git archive`` and driven in a subprocess, as
tests/integration/test_upgrade_review.py does) with steps of this code, and checks what the
promise says: nothing lost or doubled at the management system (the mock's read-back), versions
in order, caps (R10) hold there, compliance reads right, the audit chain verifies, the old code
serves a store ahead of it.  0014's backfill is checked with batches the code before it wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, text

from gateway import audit, compliance, reconcile
from gateway.config import Settings
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.withdraw import withdraw
from gateway.reference import ReferenceCache, import_csv, sync
from gateway.store.db import make_engine, reading, revision_behind, upgrade
from gateway.store.tables import batch_repeats, outbox, records, reference_bases
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, make_person
from tests.integration import test_upgrade_review as upgrade_review
from tests.integration.test_revref_review import BASE, DIRECTORY_BASE, T1, T2, _mock_reference
from tests.integration.test_upgrade_review import (
    SECRET_KEY,
    _award,
    _rng,
    applied,
    deliver_now,
    paper,
    run_old,
    training,
)
from tests.support.keys import KEYS

# The upgrade review's fixtures: a bare store (SQLite, a PostgreSQL schema), the mock management
# system, an old commit's exported tree.
bare_url = upgrade_review.bare_url
ce = upgrade_review.ce
old_trees = upgrade_review.old_trees

# The parent of the commit that added each migration: the previous release's code.
BEFORE_0014 = "085bef4"  # store at 0013: reconciliation reads records.last_batch_id only
BEFORE_0022 = "5d81493"  # store at 0021: pull_state.seen not kept
BEFORE_0023 = "4973661"  # store at 0022: covers_professional not written
BEFORE_0024 = "d87cb76"  # store at 0023: no store_repairs

DRIVER = r'''
import json, sys
from datetime import datetime
spec = json.load(open(sys.argv[1]))
import gateway
from gateway.config import Settings
from gateway.store import db
from gateway.store.db import make_engine
url = spec["url"]
engine = make_engine(url)
out = {"gateway": gateway.__file__, "answers": {}, "gaps": []}
for step in spec["steps"]:
    op = step["op"]
    now = datetime.fromisoformat(step["now"]) if step.get("now") else None
    if op == "gap":
        # What the old replica's /readyz and start-up check say of a store ahead of it.
        with db.reading(engine) as conn:
            out["gaps"].append(db.migration_gap(conn))
        if hasattr(db, "upgrade_if_behind"):  # its start on SQLite
            db.upgrade_if_behind(engine, url, person_key_secret=Settings().person_key_secret)
    elif op == "partner":
        from gateway.accounts import add_partner
        from gateway.secrets_box import SecretBox
        add_partner(engine, SecretBox(spec["secret"]), step["id"], step.get("adapter", "canonical"),
                    None)
    elif op == "batch":
        from sqlalchemy import text
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO batches (batch_id, partner_id, adapter, kind, period, status, "
                "file_path, file_format, file_size, sha256, rows_done, accepted, duplicate, "
                "corrected, conflict, rejected, credits_total, created_at) VALUES (:b, :p, :a, "
                ":k, :per, 'done', '/nonexistent', 'csv', 1, :sha, 0, 0, 0, 0, 0, 0, '0', :t)"),
                {"b": step["batch_id"], "p": step["partner"], "a": step["adapter"],
                 "k": step["kind"], "per": step["period"], "sha": step["batch_id"].ljust(64, "0"),
                 "t": now or datetime.now()})
    elif op in ("ingest", "withdraw"):
        from gateway.pipeline.ingest import PartnerRef, ingest, withdraw
        ref = PartnerRef(step["partner"], step.get("adapter", "canonical"), None)
        if op == "ingest":
            kw = {"batch_id": step["batch_id"]} if step.get("batch_id") else {}
            if step.get("rules"):  # the store's reference data, as the API and CLI judge with
                from gateway.pipeline.ingest import RulesContext
                from gateway.pipeline.rules_tables import RulesConfig
                from gateway.reference import ReferenceCache
                config = RulesConfig.from_settings(Settings())
                kw["rules"] = RulesContext(ReferenceCache(engine, config.keys).current(), config)
            got = list(zip([s["source_record_id"] for s in step["subs"]],
                           ingest(engine, ref, step["subs"], now=now, **kw)))
        else:
            got = [(step["sid"], withdraw(engine, ref, step["sid"], now=now))]
        for sid, a in got:
            out["answers"].setdefault(sid, []).append(
                None if a is None else {"status": str(getattr(a.status, "value", a.status)),
                                        "record_id": a.record_id, "version": a.version,
                                        "codes": [e.code for e in (a.errors or ())]})
    elif op == "sync":
        from gateway.reference import sync
        got = sync(engine, Settings(database_url=url, downstream_url=spec["ce"],
                                    secret_key=spec["secret"], pull_retries=2,
                                    pull_retry_max_wait_seconds=0.01))
        out.setdefault("syncs", []).append({"ok": got.ok, "version": got.version})
    elif op == "deliver":
        from gateway.delivery.worker import DeliveryWorker
        worker = DeliveryWorker(engine, Settings(
            database_url=url, downstream_url=spec["ce"], secret_key=spec["secret"],
            retry_schedule=(1, 1, 1), inline_retries=1, circuit_failure_threshold=50))
        try:
            while worker.run_once():
                pass
        finally:
            worker.close()
    else:
        raise SystemExit(f"unknown op {op}")
engine.dispose()
print(json.dumps(out))
'''


def old(tree: Path, url: str, ce_url: str, steps: list[dict[str, Any]], tmp_path: Path,
        ) -> dict[str, Any]:
    """Run ``steps`` with the old code in ``tree``; it never migrates the store itself."""
    return run_old(tree, url, ce_url, steps, tmp_path, driver_source=DRIVER)


def _at_head(url: str) -> Engine:
    upgrade(url)
    engine = make_engine(url)
    with reading(engine) as conn:
        assert revision_behind(conn) is None
    return engine


def _ce_bodies(ce_url: str, record_id: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{ce_url}/_mock/applied/{record_id}")
    reply.raise_for_status()
    got = reply.json()
    return list(got if isinstance(got, list) else got.get("versions", got.get("applied", [])))


def _ce_counts(ce_url: str, record_id: str) -> Decimal:
    """The hours the management system counts for a record: its last applied version's."""
    bodies = _ce_bodies(ce_url, record_id)
    if not bodies:
        return Decimal(0)
    last = bodies[-1]["record"]
    return Decimal(0) if last.get("withdrawn") else Decimal(str(last["credited_hours"]))


def _delivered_once_in_order(engine: Engine, ce_url: str) -> dict[str, Any]:
    """Every version of every record went to the management system once, in order."""
    got = applied(ce_url)
    assert got["double_applied"] == [] and got["out_of_order"] == [], got
    with engine.connect() as conn:
        states = conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all()
        current = _pairs(conn, records.c.record_id, records.c.current_version)
    assert {s for s, _ in states} <= {"delivered", "superseded"}, states
    sent: dict[str, list[int]] = {}
    for a in got["applied"]:
        sent.setdefault(a["record_id"], []).append(a["version"])
    for rid, versions in sent.items():
        assert versions == sorted(versions), (rid, versions)
        assert versions[-1] == current[rid], (rid, versions, current[rid])
    assert set(sent) == set(current), set(current) - set(sent)
    return got


def _rules(engine: Engine) -> RulesContext:
    """What the API and the CLI judge with: the store's reference data, the settings' rules."""
    config = RulesConfig.from_settings(Settings())
    return RulesContext(ReferenceCache(engine, config.keys).current(), config)


def _pairs(conn: Any, key: Any, value: Any) -> dict[Any, Any]:
    return {row[0]: row[1] for row in conn.execute(select(key, value))}


def _chain_ok(engine: Engine) -> None:
    with reading(engine) as conn:
        verified = audit.verify(conn)
    assert verified.ok, verified.as_dict()


def _credited(engine: Engine) -> dict[str, Decimal]:
    with engine.connect() as conn:
        return {sid: Decimal(h) for sid, h in conn.execute(
            select(records.c.source_record_id, records.c.credited_hours))}


# -- 0024: this code and the release before it, interleaved on a store at 0024 ------------------


def test_0024_mixed_fleet_nothing_lost_or_doubled_caps_hold(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    """The previous release (head 0023) serves a store at 0024 and writes beside this code."""
    ce_url = ce[0]
    tree = old_trees(BEFORE_0024)
    engine = _at_head(bare_url)
    try:
        ana = make_person(_rng(2401))
        t1 = training("T-1", ana, "高原生态保护专题培训", "6", "2026-03-02")
        p1, p2, p3, p4 = (paper(f"P-{n}", ana, n) for n in (1, 2, 3, 4))
        first = old(tree, bare_url, ce_url, [
            {"op": "gap"},
            {"op": "partner", "id": "p-mix"},
            {"op": "ingest", "partner": "p-mix", "subs": [t1, p1, p2]},
            {"op": "deliver"},
        ], tmp_path)
        assert first["gaps"] == [None], first["gaps"]  # a store ahead of it is served
        assert [v[0]["status"] for v in first["answers"].values()] == ["accepted"] * 3
        ref = PartnerRef("p-mix", "canonical", None)
        # This code: a third paper (0 h: the cap is full), a correction of the old code's record.
        [new_p3] = ingest(engine, ref, [p3])
        [corr] = ingest(engine, ref, [dict(t1, claimed={"quantity": "7", "unit": "hours"})])
        assert (new_p3.status, corr.status, corr.version) == ("accepted", "corrected", 2)
        assert _credited(engine)["P-3"] == 0
        # The old code again: withdraws P-1 (its share goes to P-3), adds P-4, corrects T-1.
        second = old(tree, bare_url, ce_url, [
            {"op": "withdraw", "partner": "p-mix", "sid": "P-1"},
            {"op": "ingest", "partner": "p-mix", "subs": [p4]},
            {"op": "ingest", "partner": "p-mix",
             "subs": [dict(t1, claimed={"quantity": "8", "unit": "hours"})]},
            {"op": "deliver"},
        ], tmp_path)
        assert second["answers"]["T-1"][0]["version"] == 3, second["answers"]
        credited = _credited(engine)
        assert credited["P-2"] + credited["P-3"] + credited["P-4"] == 20, credited
        # This code withdraws P-2 (P-4 takes its share), then delivers; the old code resends all.
        assert withdraw(engine, ref, "P-2") is not None
        deliver_now(engine, bare_url, ce_url)
        third = old(tree, bare_url, ce_url, [
            {"op": "ingest", "partner": "p-mix", "subs": [p3, p4]},
            {"op": "deliver"},
        ], tmp_path)
        assert [v[0]["status"] for v in third["answers"].values()] == ["duplicate"] * 2
        deliver_now(engine, bare_url, ce_url)

        _delivered_once_in_order(engine, ce_url)
        with engine.connect() as conn:
            ids = _pairs(conn, records.c.source_record_id, records.c.record_id)
        at_ce = {sid: _ce_counts(ce_url, rid) for sid, rid in ids.items()}
        assert sum(at_ce[f"P-{n}"] for n in (1, 2, 3, 4)) == 20, at_ce  # R10 where it counts
        assert at_ce["T-1"] == 8
        with engine.connect() as conn:
            report = compliance.report(conn, ana.id_number, 2026, keys=KEYS)
        assert Decimal(str(report["credited"]["total"])) == 28, report["credited"]
        _chain_ok(engine)
        with reading(engine) as conn:
            assert revision_behind(conn) is None
    finally:
        engine.dispose()


def test_0024_repair_on_a_store_whose_refusals_the_previous_release_pinned_changes_nothing(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    """0024's repair on a store whose refusals the previous release pinned moves nothing.

    0024 queues it on any store holding a refusal for good, also one the release before it
    wrote (which pins refusals since 0019); the old replicas keep writing beside it after.
    """
    ce_url = ce[0]
    tree = old_trees(BEFORE_0024)
    bo = make_person(_rng(2402))
    p1, p2, p0 = paper("P-1", bo, 1), paper("P-2", bo, 2), paper("P-0", bo, 4)
    moved = {**p1, "activity_type": "training",
             "activity": {"title": "[REJECT] 高原生态保护专题培训", "mode": "offline",
                          "started_on": "2026-02-11", "completed_on": "2026-02-11"},
             "claimed": {"quantity": "10", "unit": "hours"}}
    spec_upgrade = tmp_path / "old_upgrade.py"
    spec_upgrade.write_text("import sys\nfrom gateway.store.db import upgrade\nupgrade(sys.argv[1])\n")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(spec_upgrade), bare_url], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = old(tree, bare_url, ce_url, [
        {"op": "partner", "id": "p-old"},
        {"op": "ingest", "partner": "p-old", "subs": [p1, p2, p0]},
        {"op": "deliver"},
        {"op": "ingest", "partner": "p-old", "subs": [moved]},
        {"op": "deliver"},
        {"op": "deliver"},
    ], tmp_path)
    engine = make_engine(bare_url)
    try:
        credited = _credited(engine)
        assert credited["P-0"] == 0, credited  # the previous release pinned P-1's 10 h
        with engine.connect() as conn:
            rows_before = conn.execute(select(func.count()).select_from(outbox)).scalar_one()
            versions_before = _pairs(conn, records.c.source_record_id, records.c.current_version)
        upgrade(bare_url)  # `db upgrade` of the release: 0024, then its queued repair
        with reading(engine) as conn:
            assert revision_behind(conn) is None
            rows_after = conn.execute(select(func.count()).select_from(outbox)).scalar_one()
            versions_after = _pairs(conn, records.c.source_record_id, records.c.current_version)
            kinds = list(conn.execute(text("SELECT kind FROM audit_events ORDER BY seq")).scalars())
        assert (rows_after, versions_after) == (rows_before, versions_before)
        assert kinds.count("store_repaired") == 1
        # The old replicas go on: a later paper of the full group gets 0 h, delivered once.
        later = old(tree, bare_url, ce_url, [
            {"op": "gap"},
            {"op": "ingest", "partner": "p-old", "subs": [paper("P-5", bo, 5)]},
            {"op": "deliver"},
        ], tmp_path)
        assert later["gaps"] == [None]
        assert _credited(engine)["P-5"] == 0
        got = applied(ce_url)
        assert got["double_applied"] == [] and got["out_of_order"] == []
        rid = out["answers"]["P-0"][0]["record_id"]
        assert _ce_counts(ce_url, rid) == 0
        _chain_ok(engine)
    finally:
        engine.dispose()


# -- 0022: the reference watermark's items, with a sync by the release before it -------------


def _base_status(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(reference_bases.c.status).where(
            reference_bases.c.code == BASE)).scalar_one())


def _relist(engine: Engine, tmp_path: Path) -> None:
    """Ops re-list the base from a CSV file (the revocation was entered in error)."""
    fixed = tmp_path / "bases.csv"
    fixed.write_text("code,name,level,status,assessed_on\n"
                     f"{BASE},{DIRECTORY_BASE['name']},provincial,active,2025-06-01\n",
                     encoding="utf-8")
    imported = import_csv(engine, "bases", fixed, actor="ops-ma", keys=KEYS)
    assert imported.ok and imported.updated == 1, imported.as_dict()


def test_0022_a_sync_by_the_previous_release_costs_at_most_one_reapply(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    """A sync by the code before 0022 costs one re-apply at most, and loses nothing.

    docs: until every worker runs 0022, "one sync may re-apply the items at the watermark as
    before"; after that, this code's quiet syncs leave an ops import alone, and an item stamped
    at the old code's watermark is taken.
    """
    ce_url = ce[0]
    tree = old_trees(BEFORE_0022)
    engine = _at_head(bare_url)
    settings = Settings(database_url=bare_url, downstream_url=ce_url, secret_key=SECRET_KEY,
                        pull_retries=2, pull_retry_max_wait_seconds=0.01)
    try:
        _mock_reference(ce_url, "bases", [DIRECTORY_BASE | {"updated_at": T1}])
        assert sync(engine, settings).ok  # this code: watermark T1, its item seen
        _mock_reference(ce_url, "bases", [DIRECTORY_BASE | {"status": "revoked",
                                                             "updated_at": T2}])
        first = old(tree, bare_url, ce_url, [{"op": "gap"}, {"op": "sync"}], tmp_path)
        assert first["gaps"] == [None] and first["syncs"][0]["ok"], first
        assert _base_status(engine) == "revoked"  # the old code moved the watermark to T2
        _relist(engine, tmp_path)
        sync(engine, settings)  # the one re-apply the docs allow: `seen` names T1, not T2
        _relist(engine, tmp_path)
        quiet = sync(engine, settings)
        assert quiet.ok and quiet.version is None, quiet.as_dict()
        assert _base_status(engine) == "active"
        # A second base stamped at the same moment comes later: taken, not skipped.
        other = DIRECTORY_BASE | {"code": "QHJD-099", "name": "青海省另一基地"}
        _mock_reference(ce_url, "bases", [DIRECTORY_BASE | {"status": "revoked",
                                                             "updated_at": T2},
                                          other | {"updated_at": T2}])
        old(tree, bare_url, ce_url, [{"op": "sync"}], tmp_path)
        with engine.connect() as conn:
            codes = set(conn.execute(select(reference_bases.c.code)).scalars())
        assert codes == {BASE, "QHJD-099"}
        _chain_ok(engine)
    finally:
        engine.dispose()


# -- 0023: covers_professional with the release before it writing beside this code ------------


def test_0023_mixed_fleet_award_cover_reads_right(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    """Compliance reads a competition award right whichever release wrote it.

    An award the old code inserts covers (null column); one this code inserted and the old
    code corrected to a provincial award (the column stays true) no longer covers.
    """
    ce_url = ce[0]
    tree = old_trees(BEFORE_0023)
    engine = _at_head(bare_url)
    try:
        dora, eli = make_person(_rng(2301)), make_person(_rng(2302))
        first = old(tree, bare_url, ce_url, [
            {"op": "gap"},
            {"op": "partner", "id": "p-mix"},
            {"op": "ingest", "partner": "p-mix", "subs": [_award(dora)],
             "now": "2025-10-01T08:00:00+00:00"},
            {"op": "deliver"},
        ], tmp_path)
        assert first["gaps"] == [None]
        dora_rid = first["answers"]["C-1"][0]["record_id"]
        ref = PartnerRef("p-mix", "canonical", None)
        eli_award = dict(_award(eli), source_record_id="C-2")
        [mine] = ingest(engine, ref, [eli_award], now=datetime(2025, 10, 1, 8, tzinfo=UTC))
        assert mine.status == "accepted"
        provincial = dict(eli_award, claimed={"quantity": "1", "unit": "award",
                                              "details": {"tier": "provincial",
                                                          "award": "excellence"}})
        second = old(tree, bare_url, ce_url, [
            {"op": "ingest", "partner": "p-mix", "subs": [provincial],
             "now": "2025-10-02T08:00:00+00:00"},
            {"op": "deliver"},
        ], tmp_path)
        assert second["answers"]["C-2"][0]["status"] == "corrected", second["answers"]
        deliver_now(engine, bare_url, ce_url)
        with engine.connect() as conn:
            column = _pairs(conn, records.c.source_record_id, records.c.covers_professional)
            for_dora = compliance.report(conn, dora.id_number, 2026, keys=KEYS)
            for_eli = compliance.report(conn, eli.id_number, 2026, keys=KEYS)
        assert column == {"C-1": None, "C-2": True}, column  # the docs' stated caveat
        assert for_dora["professional_covered_by"] is not None
        assert for_dora["professional_covered_by"]["record_id"] == dora_rid
        assert for_eli["professional_covered_by"] is None, for_eli["professional_covered_by"]
        _delivered_once_in_order(engine, ce_url)
        _chain_ok(engine)
    finally:
        engine.dispose()


@pytest.mark.xfail(strict=True, reason=(
    "KNOWN LIMIT (docs/operations.md, Releases and migrations: moving from code that groups "
    "caps by the CE year is not a rolling release; stop the cluster): the code up to the first "
    "release with 0023 (4973661) groups caps by counts_year, the code after a91a5b0 by the "
    "activity's year, so an old replica judging a late paper of a deferred person during a roll "
    "credits it from 2026's cap: 30 h of 2025 papers at the management system against the 20 h "
    "cap (SPEC §4 R10, §7; notice 四(二)1, 七(二)). The review found the docs had put this "
    "change in 0020's release and called 0023 rolling"))
def test_0023_mixed_fleet_deferred_paper_stays_under_its_years_cap(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    ce_url = ce[0]
    tree = old_trees(BEFORE_0023)
    engine = _at_head(bare_url)
    try:
        fei: GenPerson = make_person(_rng(2303))
        deferrals = tmp_path / "deferrals.csv"  # imported as ops do: a reference version
        deferrals.write_text("id_number,from_year,reason,approved_on\n"
                             f"{fei.id_number},2025,illness,2025-12-01\n", encoding="utf-8")
        imported = import_csv(engine, "deferrals", deferrals, actor="test", keys=KEYS)
        assert imported.ok, imported.as_dict()
        in_2025, in_2026 = "2025-10-01T02:00:00+00:00", "2026-03-01T02:00:00+00:00"
        papers = [dict(paper(f"P25-{n}", fei, n), year=2025,
                       activity={"title": f"冻土工程论文（第{n}篇）",
                                 "completed_on": f"2025-0{1 + n}-15"}) for n in (1, 2, 3)]
        old(tree, bare_url, ce_url, [{"op": "partner", "id": "p-mix"}], tmp_path)
        ref = PartnerRef("p-mix", "canonical", None)
        # Two 2025 papers filed in time by this code: 2025's paper cap is full.
        got = ingest(engine, ref, papers[:2], now=datetime.fromisoformat(in_2025),
                     rules=_rules(engine))
        assert [a.status for a in got] == ["accepted"] * 2
        deliver_now(engine, bare_url, ce_url)
        # The third 2025 paper arrives late, at an old replica: deferred, counts toward 2026.
        late = old(tree, bare_url, ce_url, [
            {"op": "ingest", "partner": "p-mix", "subs": [papers[2]], "now": in_2026,
             "rules": True},
            {"op": "deliver"},
        ], tmp_path)
        assert late["answers"]["P25-3"][0]["status"] == "accepted", late["answers"]
        with engine.connect() as conn:
            rows = {r.source_record_id: r for r in conn.execute(select(records))}
        assert int(rows["P25-3"].counts_year) == 2026  # the deferral applied
        at_ce = sum(_ce_counts(ce_url, r.record_id) for r in rows.values())
        assert at_ce <= 20, {sid: r.credited_hours for sid, r in rows.items()}
    finally:
        engine.dispose()


# -- 0014: batches the code before it wrote, reconciled after the upgrade -----------------------


def test_0014_backfill_reconciles_batches_the_old_code_wrote(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    """Batches written before 0014 reconcile after the upgrade as this code's would.

    March's batch, then the annual repeating it and adding a row, and the annual resent as
    another batch (the code before 0014 moved records.last_batch_id to it).
    """
    ce_url = ce[0]
    tree = old_trees(BEFORE_0014)
    prep = tmp_path / "old_upgrade.py"
    prep.write_text("import sys\nfrom gateway.store.db import upgrade\nupgrade(sys.argv[1])\n")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(prep), bare_url], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    gu = make_person(_rng(1401))
    rows = [training(f"H-{n}", gu, f"卫生健康继续医学教育项目{n}", "4", f"2026-03-0{n}")
            for n in (1, 2, 3)]
    month, annual, again = "B" + "m" * 24, "B" + "a" * 24, "B" + "r" * 24
    old(tree, bare_url, ce_url, [
        {"op": "partner", "id": "p-health", "adapter": "health"},
        {"op": "batch", "batch_id": month, "partner": "p-health", "adapter": "health",
         "kind": "monthly", "period": "2026-03", "now": "2026-04-02T02:00:00+00:00"},
        {"op": "ingest", "partner": "p-health", "adapter": "health", "batch_id": month,
         "subs": rows[:2]},
        {"op": "batch", "batch_id": annual, "partner": "p-health", "adapter": "health",
         "kind": "annual", "period": "2026", "now": "2026-12-20T02:00:00+00:00"},
        {"op": "ingest", "partner": "p-health", "adapter": "health", "batch_id": annual,
         "subs": rows},
        {"op": "batch", "batch_id": again, "partner": "p-health", "adapter": "health",
         "kind": "annual", "period": "2026", "now": "2026-12-21T02:00:00+00:00"},
        {"op": "ingest", "partner": "p-health", "adapter": "health", "batch_id": again,
         "subs": rows},
    ], tmp_path)
    upgrade(bare_url)
    engine = make_engine(bare_url)
    try:
        with engine.connect() as conn:
            repeats = conn.execute(select(batch_repeats.c.batch_id, func.count())
                                   .group_by(batch_repeats.c.batch_id)).all()
            rep = reconcile.report(conn, "health", 2026,
                                   today=datetime(2027, 1, 10, tzinfo=UTC))
        assert dict(repeats) == {again: 3}, repeats  # what last_batch_id still told
        total = rep["totals"]
        counts = {k: (len(v) if isinstance(v, list) else v) for k, v in total.items()
                  if k in reconcile.CATEGORIES}
        assert counts.get("lacking", 0) == 0, rep
        assert counts.get("repeated") == 2 and counts.get("added") == 1, counts
    finally:
        engine.dispose()
