"""Review of 95df472: a chunk locks and re-checks what its decisions read.

Chunk._check_reads locks and compares, Chunk.run locks its rows' cap groups before reading,
and withdraw() locks its record and key.

1. Deterministic failures of the check: single-threaded, every ``_KeyRaceLost`` the check
   raises is one the retry meets again (nothing else writes), so the partner gets a 500.
   Walked: several persons, corrections moving records between persons and activities,
   failed assessments, several rows of one source in a chunk, withdrawals, ops resolve.
2. PostgreSQL deadlocks the new locks add (retried, but each costs ``deadlock_timeout``).
3. Threads of batch-like chunks for overlapping persons with capped papers: nothing escapes.

Held: 120 single-threaded walks (60 seeds x SQLite/PostgreSQL) never failed the check; the
batch threads raised nothing (1-3 deadlocks a run, retried; no check failure).  Found, and
fixed since: two deadlocks the new lock order added — a chunk locked the groups its stored
records leave after the ones its rows join (now: all before deciding, sorted, or the chunk
starts again locking them first), and withdraw() locked its record before its cap group
(now: group, record, key, as chunks).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.config import Settings
from gateway.ops.common import OpsConflict
from gateway.ops.records import resolve_conflict
from gateway.pipeline import ingest as ingest_module
from gateway.pipeline import writer_retry
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.store.tables import records
from mock_partners.generators import GenPerson, make_person
from tests.integration.test_counted_versions import NOW, _ref
from tests.integration.test_succession_review import _sub, violations
from tests.integration.test_succession_review2 import _pg_only, _threads

NewPartner = Callable[..., Partner]


class _Races:
    """Counts what the writers' retries met: check failures and PostgreSQL deadlocks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lost: list[str] = []
        self.deadlocks = 0
        self._lock = threading.Lock()
        real_check = ingest_module.Chunk._check_reads
        real_retry = writer_retry._may_retry

        def check(chunk: Any) -> None:
            try:
                real_check(chunk)
            except writer_retry._KeyRaceLost as exc:
                with self._lock:
                    self.lost.append(str(exc))
                raise

        def may_retry(exc: BaseException) -> bool:
            if getattr(getattr(exc, "orig", None), "sqlstate", None) == "40P01":
                with self._lock:
                    self.deadlocks += 1
            return real_retry(exc)

        monkeypatch.setattr(ingest_module.Chunk, "_check_reads", check)
        monkeypatch.setattr(writer_retry, "_may_retry", may_retry)


# -- 1. single-threaded: the check never fails ------------------------------------------------

def _walk(engine: Engine, partners: list[PartnerRef], settings: Settings,
          persons: list[GenPerson], seed: int, steps: int) -> list[str]:
    rng = random.Random(seed)
    log: list[str] = []
    for step in range(steps):
        p, op = rng.randrange(len(partners)), rng.random()
        if op < 0.12:
            withdraw(engine, partners[p], f"S{rng.randrange(3)}", now=NOW)
            log.append(f"{step}: p{p} withdraw")
            continue
        if op < 0.2:
            with engine.connect() as conn:
                held = sorted(conn.execute(select(records.c.record_id)
                                           .where(records.c.status == "conflict")).scalars())
            if held:
                try:
                    resolve_conflict(engine, settings, rng.choice(held),
                                     keep=rng.choice(["this", "existing"]), reason="复核",
                                     actor="op")
                except OpsConflict:
                    pass
            log.append(f"{step}: resolve")
            continue
        # Rows of a chunk: the same source may come twice (a correction in the chunk), a row
        # may move its record to the other person or activity, or fail its assessment.
        rows = [(f"S{rng.randrange(3)}", rng.randrange(len(persons)), rng.randrange(1, 3),
                 rng.choice(["sole", "co"]), rng.random() < 0.2, rng.randrange(2))
                for _ in range(rng.choice([1, 2, 3, 4]))]
        items = [_sub(sid, persons[who], n, a, failed=f, cert=c) for sid, who, n, a, f, c in rows]
        try:
            answers = ingest(engine, partners[p], items, now=NOW)
        except Exception as exc:  # noqa: BLE001 - the finding
            return [*log, f"{step}: p{p} {rows} RAISED {exc!r}"]
        log.append(f"{step}: p{p} {rows} -> {[a.status.value for a in answers]}")
        broken = violations(engine, liveness=False)
        if broken:
            return [*log, "broken:", *broken]
    return []


@pytest.mark.parametrize("seed", range(int(os.environ.get("CE_GATEWAY_WALK_SEEDS", "3"))))
def test_single_threaded_walk_never_loses_a_race(
        engine: Engine, db_url: str, new_partner: NewPartner,
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
        seed: int) -> None:
    """Nothing else writes, so a check failure would recur on every retry (a 500)."""
    races = _Races(monkeypatch)
    partners = [_ref(new_partner(engine)) for _ in range(3)]
    persons = [make_person(random.Random(seed * 7 + k)) for k in range(2)]
    broken = _walk(engine, partners, make_settings(db_url), persons, 7000 + seed, 40)
    assert not broken, "\n".join(broken)
    assert not races.lost, races.lost


# -- 2. PostgreSQL: deadlocks the new locks add ------------------------------------------------

@pytest.mark.postgres
def test_withdraw_and_a_chunk_judging_against_its_record_do_not_deadlock(
        engine: Engine, db_url: str, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _pg_only(db_url)
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    person = make_person(random.Random(91))
    [held] = ingest(engine, a, [_sub("A-1", person, 1, "sole")], now=NOW)
    assert held.status == "accepted"
    races = _Races(monkeypatch)
    decided, go = threading.Event(), threading.Event()
    real = ingest_module.Chunk._write

    def late(self: Any, *args: Any, **kwargs: Any) -> None:
        if self.partner.partner_id == b.partner_id and not decided.is_set():
            decided.set()  # B holds its cap group (locked in run) and judged B-1 against A-1
            assert go.wait(20)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ingest_module.Chunk, "_write", late)

    def withdraw_meanwhile() -> None:
        assert decided.wait(20)
        threading.Timer(0.5, go.set).start()  # withdraw() is waiting on the group by then
        withdraw(engine, a, "A-1", now=NOW)

    errors = _threads(lambda: ingest(engine, b, [_sub("B-1", person, 1, "sole")], now=NOW),
                      withdraw_meanwhile)
    assert not errors, [repr(e)[:300] for e in errors]
    assert not violations(engine)
    assert races.deadlocks == 0, f"{races.deadlocks} deadlock(s), retried"


@pytest.mark.postgres
def test_chunks_leaving_each_others_cap_groups_do_not_deadlock(
        engine: Engine, db_url: str, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _pg_only(db_url)
    a, b = _ref(new_partner(engine)), _ref(new_partner(engine))
    p1, p2 = make_person(random.Random(92)), make_person(random.Random(93))
    assert ingest(engine, a, [_sub("A-1", p1, 1, "sole")], now=NOW)[0].status == "accepted"
    assert ingest(engine, b, [_sub("B-1", p2, 1, "sole")], now=NOW)[0].status == "accepted"
    races = _Races(monkeypatch)
    barrier = threading.Barrier(2, timeout=20)
    real, first = ingest_module.Chunk._load, threading.local()

    def synchronised(self: Any, *args: Any, **kwargs: Any) -> None:
        if not getattr(first, "done", False):  # both hold their rows' groups, neither read
            first.done = True
            barrier.wait()
        real(self, *args, **kwargs)

    monkeypatch.setattr(ingest_module.Chunk, "_load", synchronised)
    # A: a paper of p2, and A-1 (p1's) fails; B: a paper of p1, and B-1 (p2's) fails.
    errors = _threads(
        lambda: ingest(engine, a, [_sub("A-2", p2, 2, "co"), _sub("A-1", p1, 1, "sole", True)],
                       now=NOW),
        lambda: ingest(engine, b, [_sub("B-2", p1, 2, "co"), _sub("B-1", p2, 1, "sole", True)],
                       now=NOW))
    assert not errors, [repr(e)[:300] for e in errors]
    assert not violations(engine)
    assert races.deadlocks == 0, f"{races.deadlocks} deadlock(s), retried"


# -- 3. PostgreSQL: concurrent batch-like chunks, overlapping persons, capped papers -------------

@pytest.mark.postgres
def test_concurrent_batches_of_overlapping_persons_raise_nothing(
        engine: Engine, db_url: str, new_partner: NewPartner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three partners' batches for the same 30 persons' papers, twice, in chunks of 40 rows.

    The second pass repeats, corrects (authorship, person) and fails rows; plus withdrawals.
    """
    _pg_only(db_url)
    races = _Races(monkeypatch)
    partners = [_ref(new_partner(engine)) for _ in range(3)]
    persons = [make_person(random.Random(300 + k)) for k in range(30)]
    escaped: list[str] = []
    start = threading.Barrier(len(partners), timeout=20)

    def play(index: int, partner: PartnerRef) -> None:
        rng = random.Random(77 + index)
        start.wait()
        for run in range(2):
            rows = []
            for k in range(120):
                who, n = k % 30, 1 + k // 30
                a = "sole" if run == 0 or rng.random() < 0.6 else "co"
                if run and rng.random() < 0.1:
                    who = rng.randrange(30)  # corrected to another person
                rows.append(_sub(f"S{k}", persons[who], n, a,
                                 failed=bool(run) and rng.random() < 0.08))
            rng.shuffle(rows)
            for part in range(0, len(rows), 40):
                try:
                    ingest(engine, partner, rows[part:part + 40], now=NOW,
                           batch_id=f"b{index}-{run}")
                except Exception as exc:  # noqa: BLE001 - a failed batch: the finding
                    escaped.append(f"p{index} run {run}: {exc!r}"[:300])
            for k in rng.sample(range(120), 5):
                try:
                    withdraw(engine, partner, f"S{k}", now=NOW)
                except Exception as exc:  # noqa: BLE001
                    escaped.append(f"p{index} withdraw: {exc!r}"[:300])

    t0 = time.monotonic()
    _threads(*(lambda i=i, p=p: play(i, p) for i, p in enumerate(partners)), timeout=600)
    print(f"\nconcurrent batches: {time.monotonic() - t0:.1f}s, "
          f"{len(races.lost)} check failures, {races.deadlocks} deadlocks (retried)")
    assert not escaped, escaped
    assert not violations(engine)
