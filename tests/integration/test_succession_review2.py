"""Second review of succession (5dc2506): paths the random walks of test_succession_review missed.

Batch files, PostgreSQL concurrency, retention and deferral; invariants are
``test_succession_review.violations``.  Fixed since: a conflict (or duplicate) corrected under
the same key was judged against its stored ``duplicate_of`` even when that record had moved
to another activity (found by the batch walk, seed 9); two newcomers after a withdrawn holder
both counted (the key row was moved without checking whom it named).

Fixed since too, PostgreSQL only: chunks decided from unlocked READ COMMITTED reads, so a
report judged against a holder withdrawn meanwhile was lost, and a duplicate corrected while
it was promoted overwrote the promotion (Chunk._check_reads locks and checks what the
decisions read; withdraw() locks its record and key).

Held: cross-adapter (health batch vs canonical) walks, a pruned duplicate is skipped,
a deferred successor joins the next year's cap group, no exception escaped ingest in most runs.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from gateway import audit
from gateway.accounts import Partner
from gateway.config import Settings
from gateway.pipeline import ingest as ingest_module
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef, RulesContext
from gateway.pipeline.rules_tables import DeferralInfo, RulesConfig
from gateway.pipeline.succession import _pruned
from gateway.pipeline.withdraw import withdraw
from gateway.reference import StoreReference
from gateway.retention import prune, stub
from gateway.store.tables import outbox, record_versions
from mock_partners.files import HEALTH_HEADERS, write_csv
from mock_partners.generators import GenPerson, make_person
from tests.integration.test_counted_versions import NOW, _ref
from tests.integration.test_reconciliation import YEAR as BATCH_YEAR
from tests.integration.test_succession_review import (
    WALK_SEEDS,
    _accepted_for,
    _as,
    _other_day,
    _row,
    _training,
    violations,
)
from tests.support.keys import KEYS

NewPartner = Callable[..., Partner]


def _pg_only(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("row locks and READ COMMITTED: PostgreSQL only (SQLite has one writer)")


def _held_before_write(monkeypatch: pytest.MonkeyPatch, parties: int) -> threading.Barrier:
    """Each thread's first chunk decides, then waits for the others before writing."""
    barrier = threading.Barrier(parties, timeout=20)
    real, first = ingest_module.Chunk._write, threading.local()

    def synchronised(self: Any, *args: Any, **kwargs: Any) -> None:
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()
        real(self, *args, **kwargs)

    monkeypatch.setattr(ingest_module.Chunk, "_write", synchronised)
    return barrier


def _threads(*jobs: Callable[[], Any], timeout: float = 60) -> list[BaseException]:
    """Run ``jobs`` each in a thread; the exceptions they raised."""
    errors: list[BaseException] = []

    def run(job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


# -- 2. concurrency on PostgreSQL ------------------------------------------------------------------

@pytest.mark.postgres
def test_two_newcomers_after_a_withdrawn_holder_do_not_both_count(
        engine: Engine, db_url: str, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _pg_only(db_url)
    a, b, c = (_ref(new_partner(engine)) for _ in range(3))
    mine = _training(81)
    [held] = ingest(engine, a, [mine], now=NOW)
    assert withdraw(engine, a, "A-1", now=NOW) is not None
    _held_before_write(monkeypatch, 2)
    errors = _threads(lambda: ingest(engine, b, [_as(mine, "B-1")], now=NOW),
                      lambda: ingest(engine, c, [_as(mine, "C-1")], now=NOW))
    assert not errors, [repr(e)[:300] for e in errors]
    assert not violations(engine)


def _withdraw_a1_once_b_decided(monkeypatch: pytest.MonkeyPatch, engine: Engine, a: PartnerRef,
                                b: PartnerRef, b_request: Callable[[], Any],
                                decisions_only: bool = False) -> list[BaseException]:
    """B's request and A's withdrawal of A-1, as two replicas: B decides, then writes after.

    B's chunk writes only once the withdrawal committed.  Returns the errors they raised.
    """
    decided, withdrawn = threading.Event(), threading.Event()
    real = ingest_module.Chunk._write

    def late(self: Any, *args: Any, **kwargs: Any) -> None:
        if self.partner.partner_id == b.partner_id and (self.pending or not decisions_only):
            decided.set()
            assert withdrawn.wait(20)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ingest_module.Chunk, "_write", late)

    def withdraw_after_decision() -> None:
        assert decided.wait(20)
        try:
            withdraw(engine, a, "A-1", now=NOW)
        finally:
            withdrawn.set()

    return _threads(b_request, withdraw_after_decision)


@pytest.mark.postgres
def test_a_report_decided_against_a_holder_withdrawn_meanwhile_is_not_lost(
        engine: Engine, db_url: str, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _pg_only(db_url)
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(82)
    [held] = ingest(engine, a, [mine], now=NOW)
    errors = _withdraw_a1_once_b_decided(monkeypatch, engine, a, b,
                                         lambda: ingest(engine, b, [_as(mine, "B-1")], now=NOW))
    assert not errors, [repr(e)[:300] for e in errors]
    assert not violations(engine)


def _concurrent_walk(engine: Engine, partners: list[PartnerRef], seed: int, steps: int,
                     ) -> tuple[list[str], list[str]]:
    """Each partner's thread plays its own random ops on one person's few activities.

    Returns (exceptions that escaped ingest or withdraw, broken invariants once quiescent).
    """
    from tests.integration.test_succession_review import _sub
    person = make_person(random.Random(seed))
    escaped: list[str] = []
    start = threading.Barrier(len(partners), timeout=20)

    def play(index: int, partner: PartnerRef) -> None:
        rng = random.Random(seed * 31 + index)
        start.wait()
        for _ in range(steps):
            what = "withdraw" if rng.random() < 0.2 else "ingest"
            try:
                if what == "withdraw":
                    withdraw(engine, partner, f"S{rng.randrange(3)}", now=NOW)
                else:
                    ingest(engine, partner, [
                        _sub(f"S{rng.randrange(3)}", person, rng.randrange(1, 3),
                             rng.choice(["sole", "sole", "co"]), failed=rng.random() < 0.15,
                             cert=rng.randrange(2))
                        for _ in range(rng.choice([1, 1, 2]))], now=NOW)
            except Exception as exc:  # noqa: BLE001 - a 500 for the partner: reported
                escaped.append(f"p{index} {what}: {exc!r}"[:400])

    _threads(*(lambda i=i, p=p: play(i, p) for i, p in enumerate(partners)))
    return escaped, violations(engine)


CONCURRENT_SEEDS = int(os.environ.get("CE_GATEWAY_WALK_SEEDS", "6"))


@pytest.mark.postgres
def test_concurrent_partners_raise_nothing_and_keep_the_audit_chain(
        engine: Engine, db_url: str, new_partner: NewPartner) -> None:
    """Deadlocks and unique violations are retried inside ingest: no partner gets a 500."""
    _pg_only(db_url)
    escaped: list[str] = []
    for seed in range(CONCURRENT_SEEDS):
        partners = [_ref(new_partner(engine)) for _ in range(3)]
        escaped += _concurrent_walk(engine, partners, 5000 + seed, 25)[0]
    assert not escaped, escaped
    with engine.connect() as conn:
        assert audit.verify(conn).ok


@pytest.mark.postgres
def test_concurrent_partners_keep_the_invariants(
        engine: Engine, db_url: str, new_partner: NewPartner) -> None:
    """Walks of 3 threads (CE_GATEWAY_WALK_SEEDS, 6): 5 of 12 broke an invariant before the locks."""
    _pg_only(db_url)
    broken: list[str] = []
    for seed in range(CONCURRENT_SEEDS):
        partners = [_ref(new_partner(engine)) for _ in range(3)]
        broken += _concurrent_walk(engine, partners, 5000 + seed, 25)[1]
    assert not broken, broken


@pytest.mark.postgres
def test_a_duplicate_corrected_while_it_is_promoted_stays_consistent(
        engine: Engine, db_url: str, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _pg_only(db_url)
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(83)
    ingest(engine, a, [mine], now=NOW)
    [dup] = ingest(engine, b, [_as(mine, "B-1")], now=NOW)
    assert dup.status == "duplicate"
    recert = _as(mine, "B-1", evidence={"certificate_no": "QH-NEW"})
    errors = _withdraw_a1_once_b_decided(monkeypatch, engine, a, b,
                                         lambda: ingest(engine, b, [recert], now=NOW),
                                         decisions_only=True)
    assert not errors, [repr(e)[:300] for e in errors]
    assert not violations(engine)


# -- 1. batch files beside a canonical partner --------------------------------------------------

_TITLES = ("高原病防治新进展", "急诊急救技能培训", "基层慢病管理")


def _health_row(sid: str, person: GenPerson, n: int, credits: str) -> dict[str, Any]:
    """A health file row of activity ``n`` (a CME project, completed in month n + 1)."""
    return {"记录编号": sid, "身份证号": person.id_number, "姓名": person.name, "工作单位": "青海省人民医院",
            "地区代码": person.region, "项目编号": f"CME-{n}", "项目名称": _TITLES[n],
            "学分类别": "Ⅰ类", "学分": credits, "开始日期": "",
            "完成日期": f"{BATCH_YEAR}-{n + 1:02d}-10", "证书编号": ""}


def _canonical_cme(sid: str, person: GenPerson, n: int, credits: str,
                   failed: bool = False) -> dict[str, Any]:
    """The same activity as :func:`_health_row` from a canonical partner (credits: health only)."""
    return {"source_record_id": sid,
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region, "industry": "health"},
            "year": BATCH_YEAR, "category": "professional", "activity_type": "training",
            "activity": {"title": _TITLES[n], "plan_id": f"CME-{n}", "mode": "offline",
                         "completed_on": f"{BATCH_YEAR}-{n + 1:02d}-10"},
            "claimed": {"quantity": credits, "unit": "credits", "details": {"credit_class": "I"}},
            "evidence": {"certificate_no": "CME-C", "assessment": "failed" if failed else "passed"}}


def _batch_ops(seed: int, steps: int) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    ops: list[tuple[Any, ...]] = []
    for _ in range(steps):
        op = rng.random()
        rows = tuple((rng.randrange(3), rng.randrange(3), rng.choice(["5", "5", "5", "4"]),
                      rng.random() < 0.15) for _ in range(rng.choice([1, 2, 3])))
        if op < 0.15:
            ops.append(("withdraw", rng.randrange(3), rng.randrange(3)))
        elif op < 0.45:
            ops.append(("monthly", rng.randrange(2), rng.randrange(1, 4), rows))
        elif op < 0.6:
            ops.append(("annual", rng.randrange(2), rows))
        else:
            ops.append(("canonical", 2, rows))
    return ops


def _batch_walk(engine: Engine, settings: Settings, tmp_path: Path, partners: list[Partner],
                seed: int, steps: int) -> list[str]:
    from tests.integration.test_reconciliation import _ingest as run_batch
    person = make_person(random.Random(seed))
    prefixes = ("H1-", "H2-", "C-")
    log: list[str] = []
    for step, op in enumerate(_batch_ops(seed, steps)):
        if op[0] == "withdraw":
            withdraw(engine, _ref(partners[op[1]]), f"{prefixes[op[1]]}{op[2]}")
        elif op[0] == "canonical":
            answers = ingest(engine, _ref(partners[2]), [
                _canonical_cme(f"C-{s}", person, n, c, f) for s, n, c, f in op[1 + 1]])
            op = (*op[:2], op[2], [a.status.value for a in answers])
        else:
            by_sid = {f"{prefixes[op[1]]}{s}": _health_row(f"{prefixes[op[1]]}{s}", person, n, c)
                      for s, n, c, _ in op[-1]}  # one row per record number in a file
            path = tmp_path / f"step{step}.csv"
            write_csv(path, list(by_sid.values()), HEALTH_HEADERS)
            period = f"{BATCH_YEAR}-{op[2]:02d}" if op[0] == "monthly" else str(BATCH_YEAR)
            run_batch(engine, settings, partners[op[1]], path, op[0], period)
        log.append(f"{step}: {op}")
        broken = violations(engine)
        if broken:
            return [*log, "broken:", *broken]
    return []


@pytest.mark.parametrize("seed", [
    *range(max(WALK_SEEDS // 2, 5))])
def test_batch_walk_with_a_canonical_partner_keeps_the_invariants(
        engine: Engine, db_url: str, tmp_path: Path, new_partner: NewPartner,
        make_settings: Callable[..., Settings], seed: int) -> None:
    partners = [new_partner(engine, adapter="health"), new_partner(engine, adapter="health"),
                new_partner(engine)]
    broken = _batch_walk(engine, make_settings(db_url, batch_dir=tmp_path / "batches"), tmp_path,
                         partners, 7000 + seed, 25)
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("hours", ["8", "7"], ids=["same-claim-as-the-moved-holder", "other-claim"])
def test_a_conflict_corrected_after_its_holder_moved_away_takes_the_free_activity(
        engine: Engine, new_partner: NewPartner, hours: str) -> None:
    """Found by the batch walk (seed 7009, step 13); shown here with canonical records."""
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(84, hours="8")
    [held] = ingest(engine, a, [mine], now=NOW)
    [conflict] = ingest(engine, b, [_as(mine, "B-1", claimed={"quantity": "6"})], now=NOW)
    assert conflict.status == "conflict"
    [moved] = ingest(engine, a, [_other_day(mine)], now=NOW)
    assert moved.status == "corrected"  # only B-1 reports the activity now: held for ops, fine
    [fixed] = ingest(engine, b, [_as(mine, "B-1", claimed={"quantity": hours})], now=NOW)
    # Nobody holds the activity: B-1's correction takes it.  Actual: judged against A-1 (on
    # another day now): "duplicate" (lost: nobody counts the activity) or "conflict".
    assert fixed.status == "corrected"
    assert _accepted_for(engine, conflict.record_id) == [conflict.record_id]
    assert not violations(engine)


# -- 3. retention ---------------------------------------------------------------------------------

IN_2025 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
LATER = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)  # 2025 closed


def _deliver_all(engine: Engine, record_id: str | None = None) -> None:
    with engine.begin() as conn:
        query = update(outbox).values(status="delivered", delivered_at=IN_2025)
        if record_id is not None:
            query = query.where(outbox.c.record_id == record_id)
        conn.execute(query)


def test_a_duplicate_whose_payload_was_pruned_is_not_promoted(
        engine: Engine, db_url: str, new_partner: NewPartner,
        make_settings: Callable[..., Settings]) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(85, hours="8") | {"year": 2025}
    mine["activity"] = {**mine["activity"], "started_on": None, "completed_on": "2025-03-10"}
    [held] = ingest(engine, a, [mine], now=IN_2025)
    # B-1 counted once (another day), then was corrected to A-1's activity: a duplicate whose
    # current version (no hours, NOT_COUNTED) was forwarded and delivered.
    elsewhere = _as(mine, "B-1", activity={"title": "另一期高原医学研修班", "completed_on": "2025-11-02"})
    [first] = ingest(engine, b, [elsewhere], now=IN_2025)
    assert first.status == "accepted"
    [dup] = ingest(engine, b, [_as(mine, "B-1")], now=IN_2025)
    assert dup.status == "duplicate"
    _deliver_all(engine, str(dup.record_id))  # A-1's delivery stays pending: not pruned
    assert not violations(engine)
    result = prune(engine, make_settings(db_url, retention_payload_days=30), now=LATER)
    assert 2025 in result.closed_years and result.versions == 1  # B-1's superseded v1 only
    rec = _row(engine, dup.record_id)
    with engine.connect() as conn:
        assert not _pruned(conn, rec)  # retention keeps a live duplicate's current payload
    # A store pruned before retention kept it: the current version is a stub.
    with engine.begin() as conn:
        conn.execute(update(record_versions).where(
            record_versions.c.record_id == rec["record_id"],
            record_versions.c.version == rec["current_version"]).values(
            payload=stub(rec["record_id"], int(rec["current_version"]), rec["content_hash"],
                         LATER, None, KEYS), pruned_at=LATER))
        assert _pruned(conn, rec)
    # A-1 goes from the activity: a correction to another course, after 2025 closed, of a person
    # with an approved deferral (七(二); a withdrawal is refused YEAR_CLOSED by then, R11).
    deferred = RulesContext(StoreReference.of(KEYS, deferrals=[(mine["person"]["id_number"], DeferralInfo(
        2025, "illness", date(2025, 12, 1)))]), RulesConfig(person_keys=KEYS))
    [moved] = ingest(engine, a, [_as(mine, "A-1", activity={"title": "另一期高原医学研修班（补报）"})],
                     now=LATER, rules=deferred)
    assert moved.status == "corrected"
    after = _row(engine, dup.record_id)
    assert (after["status"], after["current_version"]) == ("duplicate", 2)  # skipped, unchanged
    # Nobody counts the activity now: by design (a pruned payload cannot be forwarded).
    # (violations() itself cannot read a pruned version's hours: checked by hand.)
    assert _accepted_for(engine, dup.record_id) == []
    with engine.connect() as conn:
        assert not _ever_promoted(conn, str(dup.record_id))
        assert audit.verify(conn).ok


def _ever_promoted(conn: Any, record_id: str) -> bool:
    from gateway.store.tables import audit_events
    return conn.execute(select(audit_events.c.seq).where(
        audit_events.c.record_id == record_id, audit_events.c.kind == "succeeded")).first() is not None


# -- 4. deferral: the successor counts toward another CE year --------------------------------------

def test_a_deferred_successor_keeps_its_own_years_cap_group(
        engine: Engine, new_partner: NewPartner) -> None:
    """R11 deferral: a 2025 paper reported after 2025 closed counts toward 2026, capped in 2025.

    Its hours count in 2026 (七(二)), but under 2025's cap (四(二)1 "当年…发表", "每年最多折算为
    20 学时"): 2026's papers, which fill 2026's cap, do not cut it.
    """
    from tests.integration.test_succession_review import _sub
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    person = make_person(random.Random(86))
    deferred = RulesContext(StoreReference.of(KEYS, deferrals=[(person.id_number, DeferralInfo(
        2025, "illness", date(2025, 12, 1)))]), RulesConfig(person_keys=KEYS))

    def in_2025(sid: str, n: int) -> dict[str, Any]:
        sub = _sub(sid, person, n, "sole") | {"year": 2025}
        sub["activity"] = {**sub["activity"], "completed_on": f"2025-0{n}-10"}
        return sub

    [held] = ingest(engine, a, [in_2025("A-1", 1)], now=IN_2025)
    # 2026 papers fill 2026's cap (20 h): not the deferred record's group (2025's)
    fill = ingest(engine, a, [_sub("A-2", person, 2, "sole"), _sub("A-3", person, 3, "sole")],
                  now=LATER)
    assert [f.status for f in fill] == ["accepted", "accepted"]
    [dup] = ingest(engine, b, [in_2025("B-1", 1)], now=LATER, rules=deferred)
    assert dup.status == "duplicate"
    assert int(_row(engine, dup.record_id)["counts_year"]) == 2026
    assert int(_row(engine, held.record_id)["counts_year"]) == 2025
    # A-1 goes from the activity: corrected to another paper after 2025 closed, under the same
    # deferral (a withdrawal is refused YEAR_CLOSED by then, R11); it stays in 2025's group.
    [moved] = ingest(engine, a, [in_2025("A-1", 2)], now=LATER, rules=deferred)
    assert moved.status == "corrected"
    after = _row(engine, dup.record_id)
    assert after["status"] == "accepted"
    assert Decimal(after["credited_hours"]) == 10  # 2025's cap (20 h): A-1's 10 h and B-1's 10 h
    assert not violations(engine)
    # 2026's cap group is not the successor's: a 2026 paper going changes nothing of it
    assert withdraw(engine, a, "A-2", now=LATER) is not None
    assert Decimal(_row(engine, dup.record_id)["credited_hours"]) == 10
    assert not violations(engine)
