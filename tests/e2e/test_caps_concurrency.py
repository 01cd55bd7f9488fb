"""R10 across replicas (SPEC §4): the paper cap holds when two processes credit one person at once.

PostgreSQL only (SQLite has one writer, so it cannot race).  Two OS processes — first bare
``ingest()`` callers released by one barrier, then two real gateway processes receiving signed
requests from two threads at once — submit sole papers (10 h each) for the same person.
Whatever the interleaving, the person-year's papers are credited exactly 20 h, and an observer
polling the store meanwhile never sees more.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, func, select

from gateway.accounts import Partner
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.signing import SigningClient
from gateway.store.db import make_engine
from gateway.store.tables import caps_ledger, records
from mock_partners.generators import make_id_number
from tests.conftest import SECRET_KEY
from tests.support.keys import person_key_of
from tests.support.servers import GatewayProcess

NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
ROUNDS, CHUNKS, PER_CHUNK = 3, 3, 2  # per process and round: 6 sole papers = 60 h claimed
CAP = Decimal(20)  # 青人社厅函〔2022〕394号 四(二)1: "每年最多折算为 20 学时"


def paper(source_id: str, id_number: str, title: str) -> dict[str, Any]:
    return {
        "source_record_id": source_id,
        "person": {"id_type": "resident_id", "id_number": id_number, "name": "才让",
                   "region_code": id_number[:4] + "00"},
        "year": 2026, "category": "professional", "activity_type": "paper",
        "activity": {"title": title, "completed_on": "2026-04-20"},
        "claimed": {"quantity": "1", "unit": "papers", "details": {"authorship": "sole"}},
    }


def _replica(url: str, partner_id: str, people: list[str], barrier: Any) -> None:
    """One "replica": per round, wait for the other, then submit its chunks of papers."""
    engine = make_engine(url)
    partner = PartnerRef(partner_id, "canonical")
    try:
        for r, id_number in enumerate(people):
            barrier.wait(timeout=120)
            for c in range(CHUNKS):
                subs = [paper(f"{partner_id}-{r}-{c}-{i}", id_number,
                              f"{partner_id} 论文 {r}-{c}-{i}") for i in range(PER_CHUNK)]
                answers = ingest(engine, partner, subs, now=NOW)
                assert [a.status for a in answers] == ["accepted"] * PER_CHUNK, answers
    finally:
        engine.dispose()


def _paper_totals(engine: Engine, id_number: str) -> tuple[Decimal, Decimal, int]:
    """(credited, hours) over the person's live papers, and how many there are."""
    with engine.connect() as conn:
        rows = conn.execute(select(records.c.hours, records.c.credited_hours).where(
            records.c.person_key == person_key_of("resident_id", id_number),
            records.c.counts_year == 2026, records.c.activity_type == "paper",
            records.c.status == "accepted", records.c.withdrawn.is_(False))).all()
    return (sum((Decimal(r.credited_hours) for r in rows), Decimal(0)),
            sum((Decimal(r.hours) for r in rows), Decimal(0)), len(rows))


def _assert_capped(engine: Engine, id_number: str, papers: int) -> None:
    credited, hours, count = _paper_totals(engine, id_number)
    assert count == papers and hours == 10 * papers
    assert credited == CAP, f"{credited} h credited for {papers} sole papers"
    with engine.connect() as conn:
        ledger = conn.execute(select(caps_ledger.c.credited).where(
            caps_ledger.c.person_key == person_key_of("resident_id", id_number),
            caps_ledger.c.year == 2026, caps_ledger.c.cap_type == "paper")).scalar_one()
        shares = conn.execute(select(func.count()).select_from(records).where(
            records.c.person_key == person_key_of("resident_id", id_number),
            records.c.credited_hours != "0.0")).scalar_one()
    assert Decimal(ledger) == CAP
    assert shares == 2  # 10 + 10: the first two papers that won the lock, nobody else


@pytest.mark.timeout(180)
def test_two_processes_never_credit_more_than_the_cap(postgres_url: str) -> None:
    rng = random.Random(77)
    people = [make_id_number(rng) for _ in range(ROUNDS)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_replica, args=(postgres_url, name, people, barrier))
             for name in ("replica-a", "replica-b")]
    engine = make_engine(postgres_url)
    try:
        for proc in procs:
            proc.start()
        observed = 0
        while any(proc.is_alive() for proc in procs):
            for id_number in people:  # a single statement sees one committed state
                assert _paper_totals(engine, id_number)[0] <= CAP
            observed += 1
            procs[0].join(timeout=0.01)
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0, 0]
        assert observed > 0
        for id_number in people:
            _assert_capped(engine, id_number, 2 * CHUNKS * PER_CHUNK)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        engine.dispose()


@pytest.mark.timeout(180)
def test_two_gateway_processes_never_credit_more_than_the_cap(
        postgres_url: str, tmp_path: Path, new_partner: Callable[..., Partner]) -> None:
    engine = make_engine(postgres_url)
    partners = [new_partner(engine), new_partner(engine)]
    env = {"CE_GATEWAY_DATABASE_URL": postgres_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_DOWNSTREAM_URL": "http://127.0.0.1:9"}
    gateways = [GatewayProcess(env, tmp_path / f"gateway-{i}.log", "--no-worker")
                for i in range(2)]
    rng = random.Random(78)
    people = [make_id_number(rng) for _ in range(ROUNDS)]
    barrier = threading.Barrier(2, timeout=60)
    failures: list[BaseException] = []

    def send(gateway: GatewayProcess, partner: Partner) -> None:
        try:
            with SigningClient(gateway.url, partner.app_key, partner.secret) as client:
                for r, id_number in enumerate(people):
                    barrier.wait()
                    for c in range(CHUNKS):
                        subs = [paper(f"{partner.partner_id}-{r}-{c}-{i}", id_number,
                                      f"{partner.partner_id} 论文 {r}-{c}-{i}")
                                for i in range(PER_CHUNK)]
                        resp = client.post("/v1/records",
                                           content=orjson.dumps({"records": subs}),
                                           headers={"Content-Type": "application/json"})
                        assert resp.status_code == 200, resp.text
                        assert resp.json()["counts"]["accepted"] == PER_CHUNK, resp.text
        except BaseException as exc:  # reported by the test thread below
            failures.append(exc)
            barrier.abort()

    try:
        for gateway in gateways:
            gateway.start()
        threads = [threading.Thread(target=send, args=(g, p))
                   for g, p in zip(gateways, partners, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not failures, failures
        for id_number in people:
            _assert_capped(engine, id_number, 2 * CHUNKS * PER_CHUNK)
    finally:
        for gateway in gateways:
            gateway.stop()
        engine.dispose()
