"""Adversarial review of succession (f0615fd) and its in-chunk fixes (182452f).

SPEC §7 "Dedup": another source's report of an activity is a duplicate of the first; when the
first stops holding the activity, the earliest live duplicate takes over (gateway succeed()).
These tests walk random sequences and probe the edges; invariants checked after every step:

- at most one accepted, not withdrawn record per natural key, and ``natural_keys`` names it;
- what the management system was last sent of a record says what the gateway counts of it
  (the highest queued version's credited hours, or nothing once withdrawn / not counted);
- caps (R10): the ledger equals the group's credited total and never exceeds the cap;
- an activity with a live duplicate is counted by somebody (succession lost nothing);
- the audit chain verifies.

Its findings (a newcomer's key lost to a released one, keys freed twice in one chunk, a
holder row naming a repeat, keep-this superseding a moved record, a crosswise deadlock) were
fixed since.  ``CE_GATEWAY_WALK_SEEDS`` walks more seeds than ``make test``'s 6 (``make walks``: 24; 300 walks passed on SQLite, 120 on
PostgreSQL, when fixed).  SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import os
import random
import threading
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, select

from gateway import audit
from gateway.accounts import Partner
from gateway.compliance import report
from gateway.config import Settings
from gateway.ops.common import OpsConflict
from gateway.ops.records import resolve_conflict
from gateway.pipeline import ingest as ingest_module
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.store.tables import caps_ledger, natural_keys, outbox, record_versions, records
from mock_partners.generators import GenPerson, make_person
from tests.integration.test_caps_ledger import paper
from tests.integration.test_counted_versions import NOW, _ref
from tests.integration.test_counted_versions import _row as _row_of
from tests.support.keys import KEYS

CAPS = {"paper": Decimal(20), "book": Decimal(40), "lecture": Decimal(30),
        "exam_setting": Decimal(30)}


# -- invariants ----------------------------------------------------------------------------------

def violations(engine: Engine, *, liveness: bool = True) -> list[str]:
    """Every broken invariant of the store, as text (empty: all hold)."""
    out: list[str] = []
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(records)).mappings()]
        keys = dict(conn.execute(select(natural_keys.c.natural_key, natural_keys.c.record_id)).all())
        sent: dict[str, int] = {}
        for rid, version in conn.execute(select(outbox.c.record_id, outbox.c.version)):
            sent[rid] = max(sent.get(rid, 0), int(version))
        payloads = {(r.record_id, int(r.version)): json.loads(r.payload) for r in conn.execute(
            select(record_versions.c.record_id, record_versions.c.version,
                   record_versions.c.payload))}
        ledger = {(r.person_key, int(r.year), r.cap_type): Decimal(r.credited)
                  for r in conn.execute(select(caps_ledger))}
        chain = audit.verify(conn)
    if not chain.ok:
        out.append(f"audit chain broken: {chain}")
    live = [r for r in rows if r["status"] == "accepted" and not r["withdrawn"]]
    by_key: dict[str, list[str]] = defaultdict(list)
    for r in live:
        by_key[r["natural_key"]].append(r["record_id"])
    for key, rids in by_key.items():
        if len(rids) > 1:
            out.append(f"double count: {rids} accepted for one activity {key[:8]}")
        elif keys.get(key) != rids[0]:
            out.append(f"natural_keys names {keys.get(key)} for {key[:8]}, held by {rids[0]}")
    for r in rows:  # what the management system last heard of the record
        rid = r["record_id"]
        counted = (Decimal(r["credited_hours"] or "0")
                   if r["status"] == "accepted" and not r["withdrawn"] else Decimal(0))
        if rid not in sent:
            if counted:
                out.append(f"{rid} counts {counted} h here but nothing was queued")
            continue
        last = payloads[(rid, sent[rid])]
        downstream = Decimal(0) if last.get("withdrawn") else Decimal(str(last["credited_hours"]))
        if downstream != counted:
            out.append(f"{rid} ({r['status']}, withdrawn={r['withdrawn']}): counts {counted} h "
                       f"here, last queued v{sent[rid]} says {downstream} h")
    groups: dict[tuple[str, int, str], Decimal] = defaultdict(Decimal)
    for r in live:
        if r["cap_type"]:
            # the activity's year, not the year it counts toward (caps.group_of)
            groups[(r["person_key"], int(r["year"]), r["cap_type"])] += Decimal(
                r["credited_hours"])
    for group, total in groups.items():
        if total > CAPS[group[2]]:
            out.append(f"cap exceeded: {group[2]} {total}")
        if ledger.get(group, Decimal(0)) > CAPS[group[2]]:  # the ledger total is written, not read
            out.append(f"ledger over the cap: {group[2]} {ledger[group]}")
    if liveness:
        for r in rows:
            if (r["status"] == "duplicate" and not r["withdrawn"]
                    and r["natural_key"] not in by_key):
                out.append(f"lost: duplicate {r['record_id']} of {r['duplicate_of']} while no "
                           f"live record counts its activity")
    return out


def _row(engine: Engine, record_id: str | None) -> dict[str, Any]:
    return dict(_row_of(engine, str(record_id)))


def _person_total(engine: Engine, person: GenPerson) -> Decimal:
    with engine.connect() as conn:
        return Decimal(report(conn, person.id_number, 2026, keys=KEYS)["credited"]["total"])


WALK_SEEDS = int(os.environ.get("CE_GATEWAY_WALK_SEEDS", "6"))


# -- a random walk -------------------------------------------------------------------------------

def _sub(sid: str, person: GenPerson, n: int, authorship: str, failed: bool = False,
         cert: int = 0) -> dict[str, Any]:
    """A paper (R3: sole 10 h, co 5 h; capped at 20 h a year): n picks the activity."""
    sub = paper(sid, person, n, authorship)
    sub["evidence"] = {"certificate_no": f"C{cert}", "assessment": "failed" if failed else "passed"}
    return sub


def _ops(seed: int, steps: int, partners: int = 3) -> list[tuple[Any, ...]]:
    """A seeded sequence of partner and ops actions (data, so a failing walk can be shrunk)."""
    rng = random.Random(seed)
    ops: list[tuple[Any, ...]] = []
    for _ in range(steps):
        p, op = rng.randrange(partners), rng.random()
        if op < 0.12:
            ops.append(("withdraw", p, f"S{rng.randrange(3)}"))
        elif op < 0.2:
            ops.append(("resolve", rng.randrange(100), rng.choice(["this", "existing"])))
        else:
            ops.append(("ingest", p, tuple(
                (f"S{rng.randrange(3)}", rng.randrange(1, 4), rng.choice(["sole", "sole", "co"]),
                 rng.random() < 0.15, rng.randrange(2))
                for _ in range(rng.choice([1, 1, 2, 3])))))
    return ops


def _run(engine: Engine, partners: list[PartnerRef], settings: Settings, person: GenPerson,
         ops: list[tuple[Any, ...]], liveness: bool) -> list[str]:
    """Play ``ops``; the log and the first broken invariants (empty list: all held)."""
    log: list[str] = []
    for step, op in enumerate(ops):
        if op[0] == "withdraw":
            withdraw(engine, partners[op[1]], op[2], now=NOW)
            log.append(f"{step}: p{op[1]} withdraw {op[2]}")
        elif op[0] == "resolve":
            with engine.connect() as conn:
                held = sorted(conn.execute(select(records.c.record_id)
                                           .where(records.c.status == "conflict")).scalars())
            if not held:
                continue
            rid = held[op[1] % len(held)]
            try:
                resolve_conflict(engine, settings, rid, keep=op[2], reason="复核", actor="op")
            except OpsConflict as exc:  # keep=existing when no record holds it any more
                log.append(f"{step}: resolve {rid[-6:]} keep={op[2]} refused {exc.code}")
                continue
            log.append(f"{step}: resolve {rid[-6:]} keep={op[2]}")
        else:
            items = [_sub(sid, person, n, a, failed=f, cert=c) for sid, n, a, f, c in op[2]]
            desc = [f"{sid}:n={n}/{a}{'/FAILED' if f else ''}/c{c}" for sid, n, a, f, c in op[2]]
            try:
                answers = ingest(engine, partners[op[1]], items, now=NOW)
            except Exception as exc:
                log.append(f"{step}: p{op[1]} {desc} RAISED {exc!r}")
                return [*log, "broken:", f"raised {exc!r}"]
            log.append(f"{step}: p{op[1]} " + ", ".join(
                f"{d}->{a.status}({(a.record_id or '')[-6:]})"
                for d, a in zip(desc, answers, strict=True)))
        broken = violations(engine, liveness=liveness)
        if broken:
            return [*log, "broken:", *broken]
    if _person_total(engine, person) > Decimal(20):
        return [*log, "broken:", "person over the paper cap"]
    return []


def _walk(engine: Engine, partners: list[PartnerRef], settings: Settings, seed: int,
          steps: int, liveness: bool) -> None:
    person = make_person(random.Random(seed))
    broken = _run(engine, partners, settings, person, _ops(seed, steps, len(partners)), liveness)
    assert not broken, "\n".join(broken)




@pytest.mark.parametrize("seed", range(WALK_SEEDS))
def test_random_walk_keeps_one_count_per_activity(
        engine: Engine, db_url: str, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings], seed: int) -> None:
    partners = [_ref(new_partner(engine)) for _ in range(3)]
    _walk(engine, partners, make_settings(db_url), 1000 + seed, 40, liveness=False)


@pytest.mark.parametrize("seed", range(WALK_SEEDS))
def test_random_walk_loses_no_activity(
        engine: Engine, db_url: str, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings], seed: int) -> None:
    partners = [_ref(new_partner(engine)) for _ in range(3)]
    _walk(engine, partners, make_settings(db_url), 2000 + seed, 40, liveness=True)


# -- findings ------------------------------------------------------------------------------------

def _training(seed: int, sid: str = "A-1", hours: str = "8") -> dict[str, Any]:
    from mock_partners import generators as gen
    return gen.canonical_submission(random.Random(seed), sid, hours=hours)


def _as(sub: dict[str, Any], sid: str, **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(sub) | {"source_record_id": sid}
    for section, values in changes.items():
        out[section] = {**out[section], **values}
    return out


def _other_day(sub: dict[str, Any], sid: str | None = None) -> dict[str, Any]:
    return _as(sub, sid or sub["source_record_id"],
               activity={"title": "另一期高原医学研修班", "completed_on": "2026-11-02",
                         "started_on": None})


def _accepted_for(engine: Engine, record_id: str | None) -> list[str]:
    """The accepted, live records of ``record_id``'s activity (its natural key)."""
    key = _row(engine, str(record_id))["natural_key"]
    with engine.connect() as conn:
        return sorted(conn.execute(select(records.c.record_id).where(
            records.c.natural_key == key, records.c.status == "accepted",
            records.c.withdrawn.is_(False))).scalars())


def test_withdrawn_record_corrected_away_beside_a_newcomer_leaves_its_activity_unheld(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(61)
    [held] = ingest(engine, a, [mine], now=NOW)
    assert withdraw(engine, a, "A-1", now=NOW) is not None
    # One request: a new id for the activity, and the withdrawn id sent again for another day.
    newcomer, moved = ingest(engine, a, [_as(mine, "A-2"), _other_day(mine)], now=NOW)
    assert (newcomer.status, moved.status) == ("accepted", "corrected")
    [theirs] = ingest(engine, b, [_as(mine, "B-1")], now=NOW)
    assert theirs.status == "duplicate"  # actual: accepted (no natural_keys row for the activity)
    assert _accepted_for(engine, newcomer.record_id) == [newcomer.record_id]


def test_succession_in_the_chunk_that_gives_the_activity_to_a_newcomer_counts_it_twice(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(62)
    [held] = ingest(engine, a, [mine], now=NOW)
    [dup] = ingest(engine, b, [_as(mine, "B-1")], now=NOW)
    assert dup.status == "duplicate"
    failed = _as(mine, "A-1", evidence={"assessment": "failed"})
    refused, newcomer, moved = ingest(engine, a, [failed, _as(mine, "A-2"), _other_day(mine)],
                                      now=NOW)
    assert (refused.status, newcomer.status, moved.status) == ("rejected", "accepted", "corrected")
    # Expected: A-2 holds the activity and B's report repeats it.  Actual: both count.
    assert _accepted_for(engine, newcomer.record_id) == [newcomer.record_id]
    assert not violations(engine)


@pytest.mark.parametrize("order", ["holder-moved-then-dup-failed", "holder-failed-then-dup-moved"])
def test_two_records_of_one_partner_freeing_one_key_in_a_chunk_still_hand_it_on(
        engine: Engine, new_partner: Callable[..., Partner], order: str) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(63)
    holder, own_dup = ingest(engine, a, [mine, _as(mine, "A-2")], now=NOW)
    [theirs] = ingest(engine, b, [_as(mine, "B-1")], now=NOW)
    assert (holder.status, own_dup.status, theirs.status) == ("accepted", "duplicate", "duplicate")
    if order == "holder-moved-then-dup-failed":
        batch = [_other_day(mine), _as(mine, "A-2", evidence={"assessment": "failed"})]
    else:
        batch = [_as(mine, "A-1", evidence={"assessment": "failed"}),
                 _other_day(mine, "A-2") | {"claimed": {**mine["claimed"], "quantity": "4"}}]
    ingest(engine, a, batch, now=NOW)
    # Nobody from A reports the activity any more: B's report must count it.
    assert _row(engine, theirs.record_id)["status"] == "accepted"  # actual: duplicate
    assert not violations(engine)


def test_holder_and_its_own_duplicate_moved_together_free_the_activity(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(64)
    holder, own_dup = ingest(engine, a, [mine, _as(mine, "A-2")], now=NOW)
    assert own_dup.status == "duplicate"
    ingest(engine, a, [_other_day(mine), _other_day(mine, "A-2")], now=NOW)
    [theirs] = ingest(engine, b, [_as(mine, "B-1")], now=NOW)
    assert theirs.status == "accepted"  # actual: duplicate of A-1, which is on another day now
    assert not violations(engine)


def test_moving_a_holder_and_its_duplicate_while_a_newcomer_takes_the_key_does_not_fail(
        engine: Engine, new_partner: Callable[..., Partner]) -> None:
    a = _ref(new_partner(engine))
    mine = _training(65)
    holder, own_dup = ingest(engine, a, [mine, _as(mine, "A-2")], now=NOW)
    assert own_dup.status == "duplicate"
    answers = ingest(engine, a, [_other_day(mine), _as(mine, "A-3"),
                                 _as(mine, "A-2", activity={"completed_on": "2026-11-20",
                                                            "started_on": None})], now=NOW)
    assert [x.status for x in answers] == ["corrected", "accepted", "corrected"]
    assert not violations(engine)


def test_keep_this_after_the_holder_moved_away_does_not_withdraw_the_moved_record(
        engine: Engine, db_url: str, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings]) -> None:
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(66)
    [held] = ingest(engine, a, [mine], now=NOW)
    [conflict] = ingest(engine, b, [_as(mine, "B-1", claimed={"quantity": "6"})], now=NOW)
    assert conflict.status == "conflict"
    [moved] = ingest(engine, a, [_other_day(mine)], now=NOW)
    assert moved.status == "corrected"  # A-1 reports another activity now; B's is alone
    result = resolve_conflict(engine, make_settings(db_url), str(conflict.record_id), keep="this",
                              reason="复核", actor="op")
    assert result["status"] == "accepted"
    assert result["superseded"] is None  # actual: A-1 (another activity) is superseded
    assert _row(engine, held.record_id)["withdrawn"] is False
    assert not violations(engine)


def test_keep_existing_when_the_existing_is_withdrawn_is_refused(
        engine: Engine, db_url: str, new_partner: Callable[..., Partner],
        make_settings: Callable[..., Settings]) -> None:
    """keep=existing on a withdrawn holder would count nothing: ops are told to keep this one."""
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    mine = _training(67)
    [held] = ingest(engine, a, [mine], now=NOW)
    [conflict] = ingest(engine, b, [_as(mine, "B-1", claimed={"quantity": "6"})], now=NOW)
    assert withdraw(engine, a, "A-1", now=NOW) is not None
    assert _row(engine, conflict.record_id)["status"] == "conflict"  # held for ops: fine
    with pytest.raises(OpsConflict) as refused:
        resolve_conflict(engine, make_settings(db_url), str(conflict.record_id), keep="existing",
                         reason="复核", actor="op")
    assert refused.value.code == "NOT_A_CONFLICT" and "keep this one" in refused.value.message
    assert _row(engine, conflict.record_id)["status"] == "conflict"  # still held, unchanged
    result = resolve_conflict(engine, make_settings(db_url), str(conflict.record_id), keep="this",
                              reason="复核", actor="op")
    assert result["status"] == "accepted" and result["superseded"] is None
    assert _accepted_for(engine, conflict.record_id) == [conflict.record_id]
    assert _row(engine, held.record_id)["withdrawn"] is True
    assert not violations(engine)


@pytest.mark.postgres
def test_two_chunks_handing_activities_to_each_others_records_do_not_deadlock(
        engine: Engine, db_url: str, new_partner: Callable[..., Partner],
        monkeypatch: pytest.MonkeyPatch) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("row locks: PostgreSQL only (SQLite has one writer)")
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    p1, p2 = make_person(random.Random(71)), make_person(random.Random(72))
    h1, e2 = _sub("A-1", p1, 1, "sole"), _sub("A-2", p2, 2, "sole")
    h2, d1 = _sub("B-2", p2, 2, "sole"), _sub("B-1", p1, 1, "sole")
    assert [x.status for x in ingest(engine, a, [h1], now=NOW)] == ["accepted"]
    assert [x.status for x in ingest(engine, b, [h2, d1], now=NOW)] == ["accepted", "duplicate"]
    assert [x.status for x in ingest(engine, a, [e2], now=NOW)] == ["duplicate"]
    # Both chunks start at once, each handing an activity to the other's record: the
    # interleaving of two replicas.  Forced at _write (both decided, neither written) this
    # deadlocked on the audit head and the records; a chunk now locks its records' cap groups
    # before it reads (Chunk.run), so here the second waits for the first and then decides.
    barrier = threading.Barrier(2, timeout=10)
    real, first = ingest_module.Chunk.run, threading.local()

    def synchronised(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ingest_module.Chunk, "run", synchronised)
    errors: list[BaseException] = []

    def run(partner: PartnerRef, batch: list[dict[str, Any]]) -> None:
        try:
            ingest(engine, partner, batch, now=NOW)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    recert = {"certificate_no": "C9", "assessment": "passed"}
    t1 = threading.Thread(target=run, args=(a, [_as(h1, "A-1", evidence={"assessment": "failed"}),
                                                _as(e2, "A-2", evidence=recert)]))
    t2 = threading.Thread(target=run, args=(b, [_as(h2, "B-2", evidence={"assessment": "failed"}),
                                                _as(d1, "B-1", evidence=recert)]))
    for t in (t1, t2):
        t.start()
    for t in (t1, t2):
        t.join(60)
    assert not errors, [repr(e)[:300] for e in errors]
