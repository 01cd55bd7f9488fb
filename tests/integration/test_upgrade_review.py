"""A province upgrading a live store: data the OLD code wrote, read and extended by this code.

Each scenario exports the tree of a commit from before a data-bearing migration (``git
archive``, into tmp_path), drives that code in a subprocess (this venv's interpreter with the old
tree first on ``PYTHONPATH``) to migrate a store to its own head and ingest and deliver into it,
then upgrades the store with this code (``gateway.store.db.upgrade``) and checks what partners and
ops see: resends and corrections, pending deliveries, caps, compliance, the record page, the audit
chain, and ``db upgrade`` run again.  SQLite and PostgreSQL (a schema of its own per test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.engine import make_url

from gateway import audit, compliance
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.ops.records import record_view
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.store.db import code_revisions, make_engine, normalize_url, reading, upgrade
from gateway.store.tables import outbox, records
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, make_person
from tests.support.delivery import drain
from tests.support.keys import KEYS

REPO = Path(__file__).resolve().parents[2]
PG_ENV = "CE_GATEWAY_TEST_POSTGRES_URL"
SECRET_KEY = "test-secret-key"

# The parent of the commit that added each migration: the code a province ran before it.
BEFORE_0013 = "c9083d9"  # store at 0012: quantities hashed as spelled, plain person keys
BEFORE_0019 = "8614844"  # store at 0018: a refused correction leaves no pin
BEFORE_0023 = "4973661"  # store at 0022: covers_professional not kept

DRIVER = r'''
import json, sys
from datetime import datetime
spec = json.load(open(sys.argv[1]))
import gateway
from gateway.accounts import add_partner
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.pipeline.ingest import PartnerRef, ingest
from gateway.secrets_box import SecretBox
from gateway.store.db import make_engine, upgrade
url = spec["url"]
upgrade(url)
engine = make_engine(url)
out = {"gateway": gateway.__file__, "answers": {}}
for step in spec["steps"]:
    if step["op"] == "partner":
        add_partner(engine, SecretBox(spec["secret"]), step["id"], "canonical", None)
    elif step["op"] == "ingest":
        ref = PartnerRef(step["partner"], "canonical", None)
        now = datetime.fromisoformat(step["now"]) if step.get("now") else None
        for sub, a in zip(step["subs"], ingest(engine, ref, step["subs"], now=now)):
            out["answers"].setdefault(sub["source_record_id"], []).append(
                {"status": str(getattr(a.status, "value", a.status)),
                 "record_id": a.record_id, "version": a.version})
    elif step["op"] == "deliver":
        worker = DeliveryWorker(engine, Settings(
            database_url=url, downstream_url=spec["ce"], secret_key=spec["secret"],
            retry_schedule=(1, 1, 1), inline_retries=1, circuit_failure_threshold=50))
        try:
            while worker.run_once():
                pass
        finally:
            worker.close()
engine.dispose()
print(json.dumps(out))
'''


# -- the old code ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_trees(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``rev`` → a directory holding that commit's ``gateway``, ``contracts``, ``mock_partners``."""
    made: dict[str, Path] = {}

    def tree(rev: str) -> Path:
        if rev not in made:
            where = tmp_path_factory.mktemp(f"old_{rev}")
            archive = where / "src.tar"
            done = subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev,
                                   "gateway", "contracts", "mock_partners"],
                                  capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                pytest.skip(f"cannot export {rev} from git: {done.stderr.strip()}")
            with tarfile.open(archive) as tar:
                tar.extractall(where, filter="data")
            made[rev] = where
        return made[rev]

    return tree


def run_old(tree: Path, url: str, ce_url: str, steps: list[dict[str, Any]],
            tmp_path: Path, driver_source: str = DRIVER) -> dict[str, Any]:
    """Run ``steps`` with the old code in ``tree`` (``driver_source`` reads them); its output."""
    spec = tmp_path / f"spec_{uuid.uuid4().hex[:6]}.json"
    spec.write_text(json.dumps({"url": url, "ce": ce_url, "secret": SECRET_KEY, "steps": steps}))
    driver = tmp_path / f"driver_{uuid.uuid4().hex[:6]}.py"
    driver.write_text(driver_source)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("CE_GATEWAY_DATABASE_URL", None)
    done = subprocess.run([sys.executable, str(driver), str(spec)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["gateway"].startswith(str(tree)), out["gateway"]  # really the old code
    return out


# -- stores: empty, not migrated (the old code migrates them) ----------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def bare_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'live.sqlite3'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"needs {PG_ENV}")
    schema = f"up_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield make_url(normalize_url(base)).update_query_dict(
            {"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def ce(mock_ce: tuple[str, Faults]) -> tuple[str, Faults]:
    return mock_ce


def applied(ce_url: str) -> dict[str, Any]:
    reply = httpx.get(f"{ce_url}/_mock/applied")
    reply.raise_for_status()
    out: dict[str, Any] = reply.json()
    return out


def settings_for(url: str, ce_url: str) -> Settings:
    return Settings(database_url=url, downstream_url=ce_url, secret_key=SECRET_KEY,
                    retry_schedule=(1, 1, 1), inline_retries=1, delivery_poll_seconds=0.05,
                    circuit_failure_threshold=50, downstream_timeout_seconds=30,
                    pull_interval_seconds=0, reference_sync_interval_seconds=0,
                    retention_interval_seconds=0, alert_interval_seconds=0)


def deliver_now(engine: Engine, url: str, ce_url: str) -> None:
    worker = DeliveryWorker(engine, settings_for(url, ce_url))
    try:
        drain(worker)
    finally:
        worker.close()


# -- submissions -------------------------------------------------------------------------------


def _person(p: GenPerson) -> dict[str, Any]:
    return {"id_type": "resident_id", "id_number": p.id_number, "name": p.name,
            "region_code": p.region}


def training(source_id: str, person: GenPerson, title: str, quantity: str, day: str,
             ) -> dict[str, Any]:
    return {"source_record_id": source_id, "person": _person(person), "year": 2026,
            "category": "professional", "activity_type": "training",
            "activity": {"title": title, "mode": "offline", "started_on": day,
                         "completed_on": day},
            "claimed": {"quantity": quantity, "unit": "hours"}}


def paper(source_id: str, person: GenPerson, n: int, quantity: str = "1",
          title: str | None = None) -> dict[str, Any]:
    return {"source_record_id": source_id, "person": _person(person), "year": 2026,
            "category": "professional", "activity_type": "paper",
            "activity": {"title": title or f"高寒草甸退化机理研究（第{n}篇）",
                         "completed_on": f"2026-0{1 + n}-1{n}"},
            "claimed": {"quantity": quantity, "unit": "papers",
                        "details": {"authorship": "sole"}}}


def _rng(seed: int) -> Any:
    import random
    return random.Random(seed)


# -- the big jump: a store the code before 0013 wrote, upgraded through 0013..head -------------


def _old_store_before_0013(url: str, ce_url: str, tree: Path, tmp_path: Path,
                           ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], GenPerson]:
    alice = make_person(_rng(11))
    subs = {
        "T-1": training("T-1", alice, "高原生态保护专题培训", "2.50", "2026-03-02"),
        "T-2": training("T-2", alice, "草原监测技术研修班", "8", "2026-04-07"),
        "T-3": training("T-3", alice, "湿地修复实务研讨", "6.0", "2026-05-11"),
        "P-1": paper("P-1", alice, 1, quantity="1.0"),
        "P-2": paper("P-2", alice, 2),
    }
    late = {"T-4": training("T-4", alice, "野生动物疫源疫病监测培训", "4", "2026-06-15"),
            "P-3": paper("P-3", alice, 3)}
    out = run_old(tree, url, ce_url, [
        {"op": "partner", "id": "p-old"},
        {"op": "ingest", "partner": "p-old", "subs": list(subs.values())},
        {"op": "deliver"},
        # Acknowledged before the upgrade, still pending when the old release stops.
        {"op": "ingest", "partner": "p-old", "subs": list(late.values())},
    ], tmp_path)
    return out, {**subs, **late}, alice


def test_store_written_before_0013_upgrades_and_serves(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    """Upgrade is clean and idempotent; pending rows deliver once; caps, compliance, audit hold."""
    ce_url = ce[0]
    out, subs, alice = _old_store_before_0013(bare_url, ce_url, old_trees(BEFORE_0013), tmp_path)
    answers = {k: v[0] for k, v in out["answers"].items()}
    assert {a["status"] for a in answers.values()} == {"accepted"}, answers
    before = applied(ce_url)
    assert len(before["applied"]) == 5

    upgrade(bare_url)
    upgrade(bare_url)  # `db upgrade` again: nothing to do, nothing refused
    engine = make_engine(bare_url)
    try:
        with engine.connect() as conn:
            at = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        assert at == code_revisions()[0]

        # The audit chain the old code wrote still verifies after the migrations.
        with reading(engine) as conn:
            verified = audit.verify(conn)
        assert verified.ok, verified.as_dict()

        # Pending deliveries acknowledged before the upgrade go out once, after it.
        deliver_now(engine, bare_url, ce_url)
        after = applied(ce_url)
        sent = [(a["record_id"], a["version"]) for a in after["applied"]]
        assert len(sent) == 7 and len(set(sent)) == 7, sent
        assert after["double_applied"] == [] and after["out_of_order"] == []
        with engine.connect() as conn:
            states = conn.execute(select(outbox.c.status)).scalars().all()
        assert set(states) == {"delivered"}

        ref = PartnerRef("p-old", "canonical", None)
        # A resend of every record as the partner sent it: duplicates, none forwarded again.
        again = ingest(engine, ref, list(subs.values()))
        assert [(a.status, a.version) for a in again] == [("duplicate", 1)] * len(subs), \
            [(a.source_record_id, a.status) for a in again]
        # A resend spelling a quantity otherwise: still the same claim.
        respelt = dict(subs["T-2"], claimed={"quantity": "8.00", "unit": "hours"})
        [same] = ingest(engine, ref, [respelt])
        assert (same.status, same.version) == ("duplicate", 1)

        # R10 across the upgrade: two sole papers (20 h) before it fill the cap; P-3 came after.
        with engine.connect() as conn:
            credited = dict(conn.execute(select(records.c.source_record_id,
                                                records.c.credited_hours)).all())
        assert Decimal(credited["P-1"]) + Decimal(credited["P-2"]) + Decimal(credited["P-3"]) \
            == Decimal(20), credited
        p4 = paper("P-4", alice, 4)
        [new_paper] = ingest(engine, ref, [p4])
        assert new_paper.status == "accepted"
        with engine.connect() as conn:
            p4_hours = conn.execute(select(records.c.credited_hours).where(
                records.c.record_id == new_paper.record_id)).scalar_one()
        assert Decimal(p4_hours) == 0
        # A pre-upgrade paper withdrawn after it gives its share to the next one.
        assert withdraw(engine, ref, "P-1") is not None

        # A correction of a pre-upgrade record is corrected v2 and forwarded.
        fixed = dict(subs["T-1"], claimed={"quantity": "3", "unit": "hours"})
        [corr] = ingest(engine, ref, [fixed])
        assert (corr.status, corr.record_id, corr.version) == (
            "corrected", answers["T-1"]["record_id"], 2)
        deliver_now(engine, bare_url, ce_url)
        final = applied(ce_url)
        assert final["double_applied"] == [] and final["out_of_order"] == []
        t1 = [a["version"] for a in final["applied"]
              if a["record_id"] == answers["T-1"]["record_id"]]
        assert t1 == [1, 2]

        with engine.connect() as conn:
            view = record_view(conn, answers["T-1"]["record_id"])
            report = compliance.report(conn, alice.id_number, 2026, keys=KEYS)
            credited = dict(conn.execute(select(records.c.source_record_id,
                                                records.c.credited_hours)).all())
        assert view is not None and view["current_version"] == 2
        assert [v["version"] for v in view["versions"]] == [1, 2]
        assert view["status"] == "delivered", view["status"]
        kinds = [e["kind"] for e in view["timeline"]]
        assert kinds.count("delivered") == 2, kinds
        papers = sum(Decimal(credited[k]) for k in ("P-2", "P-3", "P-4"))
        assert papers == Decimal(20), credited
        hours = Decimal(3) + 8 + 6 + 4 + papers
        assert Decimal(str(report["credited"]["total"])) == hours, report

        with reading(engine) as conn:
            verified = audit.verify(conn)
        assert verified.ok, verified.as_dict()
    finally:
        engine.dispose()


# -- 0019: a correction the management system refused before the upgrade ----------------------


def test_refusal_before_0019_keeps_its_cap_share_after_upgrade(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    ce_url, _faults = ce
    carol = make_person(_rng(19))
    p1, p2 = paper("P-1", carol, 1), paper("P-2", carol, 2)
    moved = {**p1, "activity_type": "training",
             "activity": {"title": "[REJECT] 高原生态保护专题培训", "mode": "offline",
                          "started_on": "2026-02-11", "completed_on": "2026-02-11"},
             "claimed": {"quantity": "10", "unit": "hours"}}
    out = run_old(old_trees(BEFORE_0019), bare_url, ce_url, [
        {"op": "partner", "id": "p-old"},
        {"op": "ingest", "partner": "p-old", "subs": [p1, p2]},
        {"op": "deliver"},
        {"op": "ingest", "partner": "p-old", "subs": [moved]},
        {"op": "deliver"},
    ], tmp_path)
    assert [a["status"] for a in out["answers"]["P-1"]] == ["accepted", "corrected"]
    rid = out["answers"]["P-1"][0]["record_id"]
    upgrade(bare_url)
    engine = make_engine(bare_url)
    try:
        with engine.connect() as conn:
            refused = conn.execute(select(outbox.c.status, outbox.c.receipt_status).where(
                outbox.c.record_id == rid, outbox.c.version == 2)).one()
        assert refused.status == "dead", refused  # CE refused v2: v1 (a 10 h paper) counts
        [p3] = ingest(engine, PartnerRef("p-old", "canonical", None), [paper("P-3", carol, 3)])
        with engine.connect() as conn:
            credited = conn.execute(select(records.c.credited_hours).where(
                records.c.record_id == p3.record_id)).scalar_one()
        assert Decimal(credited) == 0, f"P-3 credited {credited} h over the 20 h paper cap"
    finally:
        engine.dispose()


def _kinds(conn: Any) -> list[str]:
    return list(conn.execute(text("SELECT kind FROM audit_events ORDER BY seq")).scalars())


def test_repair_takes_back_the_share_the_old_code_gave_away_and_runs_once(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    """The repair queued by 0024 re-allocates the group too, not only later arrivals.

    P-1 and P-2 fill the 20 h paper cap and P-0 is cut to 0 h; CE refuses P-1's correction, so
    CE still counts P-1's 10 h, but the code before 0019 gave P-1's share to P-0 (re-issued at
    10 h and delivered: 30 h counted at CE).  The upgrade's repair pins P-1 and re-issues P-0
    at 0 h; until it has run, the store is behind (every command names db upgrade); a second
    upgrade changes nothing.
    """
    from gateway.store.db import revision_behind

    ce_url, _faults = ce
    erin = make_person(_rng(24))
    p1, p2, p0 = paper("P-1", erin, 1), paper("P-2", erin, 2), paper("P-0", erin, 4)
    moved = {**p1, "activity_type": "training",
             "activity": {"title": "[REJECT] 高原生态保护专题培训", "mode": "offline",
                          "started_on": "2026-02-11", "completed_on": "2026-02-11"},
             "claimed": {"quantity": "10", "unit": "hours"}}
    out = run_old(old_trees(BEFORE_0019), bare_url, ce_url, [
        {"op": "partner", "id": "p-old"},
        {"op": "ingest", "partner": "p-old", "subs": [p1, p2, p0]},
        {"op": "deliver"},
        {"op": "ingest", "partner": "p-old", "subs": [moved]},
        {"op": "deliver"},
        {"op": "deliver"},  # P-0's re-issue at 10 h, queued by the refusal's re-allocation
    ], tmp_path)
    p0_id = out["answers"]["P-0"][0]["record_id"]
    engine = make_engine(bare_url)
    try:
        with engine.connect() as conn:
            before = conn.execute(select(records.c.credited_hours, records.c.current_version)
                                  .where(records.c.record_id == p0_id)).one()
        assert Decimal(before.credited_hours) == 10, before  # the old code's over-credit
        from alembic import command

        from gateway.store.db import alembic_config
        command.upgrade(alembic_config(bare_url, Settings().person_key_secret), "head")
        with reading(engine) as conn:
            behind = revision_behind(conn)
        assert behind is not None and "refused_pins" in str(behind[0]), behind
        upgrade(bare_url)  # `db upgrade` again: the queued repair runs
        with reading(engine) as conn:
            assert revision_behind(conn) is None
            after = conn.execute(select(records.c.credited_hours, records.c.current_version)
                                 .where(records.c.record_id == p0_id)).one()
            kinds = _kinds(conn)
        assert Decimal(after.credited_hours) == 0, after
        assert after.current_version == before.current_version + 1
        assert kinds.count("store_repaired") == 1
        upgrade(bare_url)
        with engine.connect() as conn:
            assert _kinds(conn).count("store_repaired") == 1
        deliver_now(engine, bare_url, ce_url)
        with engine.connect() as conn:
            assert conn.execute(select(outbox.c.status).where(
                outbox.c.record_id == p0_id, outbox.c.version == after.current_version)
            ).scalar_one() == "delivered"
    finally:
        engine.dispose()


# -- 0023: a competition award stored before the column existed --------------------------------


def _award(person: GenPerson) -> dict[str, Any]:
    return {"source_record_id": "C-1", "person": _person(person), "year": 2025,
            "category": "professional", "activity_type": "competition",
            "activity": {"title": "全国职业技能大赛", "completed_on": "2025-09-20"},
            "claimed": {"quantity": "1", "unit": "award",
                        "details": {"tier": "national", "award": "excellence"}}}


def _award_store_before_0023(url: str, ce_url: str, tree: Path, tmp_path: Path,
                             ) -> tuple[str, GenPerson]:
    dora = make_person(_rng(23))
    out = run_old(tree, url, ce_url, [
        {"op": "partner", "id": "p-old"},
        {"op": "ingest", "partner": "p-old", "subs": [_award(dora)],
         "now": "2025-10-01T08:00:00+00:00"},
        {"op": "deliver"},
    ], tmp_path)
    [answer] = out["answers"]["C-1"]
    assert answer["status"] == "accepted", answer
    return answer["record_id"], dora


def test_award_before_0023_covers_later_years_after_upgrade(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    """The payload still there: the read-model reads the rule note the old code wrote."""
    rid, dora = _award_store_before_0023(bare_url, ce[0], old_trees(BEFORE_0023), tmp_path)
    upgrade(bare_url)
    engine = make_engine(bare_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(records.c.covers_professional).where(
                records.c.record_id == rid)).scalar() is None  # no backfill, by design
            report = compliance.report(conn, dora.id_number, 2026, keys=KEYS)
        assert report["professional_covered_by"] is not None, report["notes"]
        assert report["professional_covered_by"]["record_id"] == rid
    finally:
        engine.dispose()


def test_award_before_0023_still_covers_once_retention_prunes_it(
        bare_url: str, ce: tuple[str, Faults], old_trees: Callable[[str], Path],
        tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from gateway.retention import prune

    rid, dora = _award_store_before_0023(bare_url, ce[0], old_trees(BEFORE_0023), tmp_path)
    upgrade(bare_url)
    engine = make_engine(bare_url)
    try:
        later = datetime(2028, 3, 1, 8, 0, tzinfo=UTC)  # 2025 closed, 400 days after delivery
        result = prune(engine, settings_for(bare_url, ce[0]), now=later)
        with engine.connect() as conn:
            pruned = conn.execute(text(
                "SELECT pruned_at FROM record_versions WHERE record_id = :r"), {"r": rid}).scalar()
            report = compliance.report(conn, dora.id_number, 2026, keys=KEYS)
        assert pruned is not None, result  # the closed year's award was pruned
        assert report["professional_covered_by"] is not None, report["notes"]
    finally:
        engine.dispose()


# -- controls: the same stories written by this code, no upgrade --------------------------------


def test_control_refusal_on_current_code_keeps_its_cap_share(
        db_url: str, engine: Engine, ce: tuple[str, Faults], box: Any) -> None:
    """What the 0019 xfail expects is what this code does on a store it wrote itself."""
    from gateway.accounts import add_partner

    add_partner(engine, box, "p-new", "canonical", None)
    ref = PartnerRef("p-new", "canonical", None)
    carol = make_person(_rng(19))
    p1, p2 = paper("P-1", carol, 1), paper("P-2", carol, 2)
    ingest(engine, ref, [p1, p2])
    deliver_now(engine, db_url, ce[0])
    moved = {**p1, "activity_type": "training",
             "activity": {"title": "[REJECT] 高原生态保护专题培训", "mode": "offline",
                          "started_on": "2026-02-11", "completed_on": "2026-02-11"},
             "claimed": {"quantity": "10", "unit": "hours"}}
    [corr] = ingest(engine, ref, [moved])
    assert corr.status == "corrected"
    deliver_now(engine, db_url, ce[0])
    [p3] = ingest(engine, ref, [paper("P-3", carol, 3)])
    with engine.connect() as conn:
        credited = conn.execute(select(records.c.credited_hours).where(
            records.c.record_id == p3.record_id)).scalar_one()
    assert Decimal(credited) == 0


def test_control_award_on_current_code_still_covers_once_pruned(
        db_url: str, engine: Engine, ce: tuple[str, Faults], box: Any) -> None:
    """What the 0023 xfail expects is what this code does on a store it wrote itself."""
    from datetime import UTC, datetime

    from gateway.accounts import add_partner
    from gateway.retention import prune

    add_partner(engine, box, "p-new", "canonical", None)
    dora = make_person(_rng(23))
    [a] = ingest(engine, PartnerRef("p-new", "canonical", None), [_award(dora)],
                 now=datetime(2025, 10, 1, 8, 0, tzinfo=UTC))
    assert a.status == "accepted"
    deliver_now(engine, db_url, ce[0])
    prune(engine, settings_for(db_url, ce[0]), now=datetime(2028, 3, 1, 8, 0, tzinfo=UTC))
    with engine.connect() as conn:
        pruned = conn.execute(text(
            "SELECT pruned_at FROM record_versions WHERE record_id = :r"),
            {"r": a.record_id}).scalar()
        report = compliance.report(conn, dora.id_number, 2026, keys=KEYS)
    assert pruned is not None
    assert report["professional_covered_by"] is not None
