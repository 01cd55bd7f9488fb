"""Third review of refused pins (05cf66f, 74f2853, 8badda6): a refusal stands until a send.

"A refusal stands until a later version is sent".

Real ingest, the real delivery worker, ops reprocess and the API/CLI/console against the mock
management system on uvicorn (127.0.0.1), on SQLite and PostgreSQL.  The invariant attacked:
after a full drain, per person and capped type, what the management system counts (each
record's last applied version) equals the compliance report's ``by_type`` credited and stays
within the cap (or the hours refused records hold there).

Covered: a pinned record (its withdrawal or 0-hour version refused) corrected into a version
that is never sent, then into one that is sent — in separate requests and within one request;
an unsent correction moving the records row to another person, then ops reprocess of the
refused last-sent version (not the current one); the report of such records through the API
and the CLI; the console record page; the worker landing an older version behind a refused one
on PostgreSQL while a correction races it.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from gateway import compliance
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.masking import mask_id
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.store.tables import outbox, records
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, make_person
from tests.conftest import SECRET_KEY
from tests.integration.test_pins_review import _three_papers
from tests.integration.test_pins_review2 import _holds, _pins, _report
from tests.integration.test_refused_caps_review import CAPS, NOW, _applied, _item, _put, _reprocess
from tests.integration.test_s16caps_review import _credited
from tests.support.delivery import MakeWorker, drain
from tests.support.servers import cli, uvicorn_thread

PAPER = CAPS["paper"]


def _queued_versions(engine: Engine, rid: str) -> dict[int, str]:
    with engine.connect() as conn:
        return {int(r.version): r.status for r in conn.execute(
            select(outbox.c.version, outbox.c.status).where(outbox.c.record_id == rid))}


def _row(engine: Engine, rid: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(records).where(records.c.record_id == rid))
                    .mappings().one())


def _training(person: GenPerson, sid: str, title: str, hours: str = "8") -> dict[str, Any]:
    return {"source_record_id": sid,
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region},
            "year": 2026, "category": "professional", "activity_type": "training",
            "activity": {"title": title, "completed_on": "2026-05-15",
                         "started_on": "2026-05-14"},
            "claimed": {"quantity": hours, "unit": "hours", "details": {}}}


def _pinned_by_a_refused_withdrawal(
        engine: Engine, mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        new_partner: Callable[..., Partner], seed: int,
) -> tuple[dict[str, str], PartnerRef, GenPerson, GenPerson, Any]:
    """Papers A, B, C of q (10, 10, 0 h); r's paper H (another partner); A's withdrawal refused.

    The mock keeps A's version 1 (10 h of q's papers): A is pinned there, C stays at 0 h.
    """
    url, faults = mock_ce
    partner, theirs = new_partner(engine), new_partner(engine)
    q, r = make_person(random.Random(seed)), make_person(random.Random(seed + 1))
    ids = _three_papers(engine, partner, q)
    ids |= _put(engine, theirs, _item(r, "H", "冻土", 6))
    worker = make_worker()
    drain(worker)
    assert _credited(engine, ids) == {"A": "10.0", "B": "10.0", "C": "0.0", "H": "10.0"}
    faults.reject_ids = {ids["A"]}
    ref = PartnerRef(partner.partner_id, "canonical")
    withdraw(engine, ref, "A", now=NOW)
    drain(worker)
    assert _queued_versions(engine, ids["A"]) == {1: "delivered", 2: "dead"}
    assert list(_pins(engine)) == [ids["A"]]
    assert _credited(engine, ids)["C"] == "0.0"
    assert _holds(engine, url, ids, q) == PAPER
    return ids, ref, q, r, worker


# -- a pinned record: an unsent correction, then a sent one ------------------------------------

@pytest.mark.parametrize("how", ["two_requests", "one_request"])
@pytest.mark.parametrize("into", ["training", "paper_of_q"])
def test_a_pinned_record_corrected_unsent_then_sent_frees_its_old_group_once(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker, how: str, into: str) -> None:
    """A pinned, corrected unsent, then corrected sent: its old group is freed once.

    A is pinned (refused withdrawal); A → a repeat of r's H (not sent: A was not counted);
    then A → a counted version (sent): the pin ends, q's papers are allocated again once.

    ``training``: A becomes q's training, so C takes A's 10 h of papers.  ``paper_of_q``: A
    becomes another paper of q, first in arrival order: it claims its 10 h again, C stays 0.
    """
    url, faults = mock_ce
    ids, ref, q, r, worker = _pinned_by_a_refused_withdrawal(
        engine, mock_ce, make_worker, new_partner, 4101)
    before = len(_applied(url, ids["C"]))  # 0, 10 (A's withdrawal in flight), 0 (refused)
    repeat = _item(r, "A", "冻土", 6)
    counted = (_training(q, "A", "高原病防治") if into == "training"
               else _item(q, "A", "雪山", 7))
    if how == "two_requests":
        [first] = ingest(engine, ref, [repeat], now=NOW)
        assert first.status.value == "duplicate", first
        assert _queued_versions(engine, ids["A"]) == {1: "delivered", 2: "dead"}
        assert list(_pins(engine)) == [ids["A"]]  # not sent: the refusal stands
        [rep] = _report(engine, q)["refused_changes"]
        assert (rep["version"], rep["delivery"], rep["applied_hours"]) == (2, "dead", "10.0")
        assert _holds(engine, url, ids, q) == PAPER
        faults.reject_ids = set()
        [second] = ingest(engine, ref, [counted], now=NOW)
    else:
        faults.reject_ids = set()
        first, second = ingest(engine, ref, [repeat, counted], now=NOW)
        assert first.status.value == "duplicate", first
    assert second.status.value == "corrected", (second.status, second.errors)
    assert _queued_versions(engine, ids["A"]) == {1: "delivered", 2: "dead", 4: "pending"}
    assert _pins(engine) == {}
    drain(worker)
    assert _applied(url, ids["A"])[-1]["version"] == 4
    want_c = "10.0" if into == "training" else "0.0"
    assert _credited(engine, ids) == {"A": "10.0" if into == "paper_of_q" else "8.0",
                                      "B": "10.0", "C": want_c, "H": "10.0"}
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, r) == 10
    assert _holds(engine, url, ids, q, "training") == (8 if into == "training" else 0)
    report = _report(engine, q)
    assert report["refused_changes"] == [] and report["not_counted"] == []
    # C was re-issued once at most (10 h freed once, never lifted and cut back).
    c_versions = [v["record"]["credited_hours"] for v in _applied(url, ids["C"])[before:]]
    assert c_versions == (["10.0"] if into == "training" else []), c_versions


# -- an unsent correction moving the row, then ops reprocess of the refused last-sent version -----

@pytest.mark.parametrize("refused", ["withdrawal", "not_counted"])
def test_reprocessing_the_refused_last_sent_version_behind_an_unsent_move_ends_the_pin(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker, refused: str) -> None:
    """Ops reprocess a refused version that is not the record's current one.

    A's last sent version (a withdrawal, or the 0-hour version of A turned into a conflict
    of r's H) is refused: pinned at q's papers.  A is then corrected into a repeat of r's G (not
    sent: A does not count); its records row is r's now.  Ops reprocess the refused version
    (not A's current one): it is allowed (nothing later was queued), the mock applies it, the
    pin ends and q's papers are allocated again.  Then G is withdrawn: A takes over for r.
    """
    url, faults = mock_ce
    partner, theirs = new_partner(engine), new_partner(engine)
    q, r = make_person(random.Random(4201)), make_person(random.Random(4202))
    ids = _three_papers(engine, partner, q)
    ids |= _put(engine, theirs, _item(r, "H", "冻土", 6), _item(r, "G", "冰川", 7))
    worker = make_worker()
    drain(worker)
    ref = PartnerRef(partner.partner_id, "canonical")
    faults.reject_ids = {ids["A"]}
    if refused == "withdrawal":
        withdraw(engine, ref, "A", now=NOW)
    else:  # another authorship, same paper: a conflict of H, sent as a 0-hour version
        [conflict] = ingest(engine, ref, [_item(r, "A", "冻土", 6, authorship="co")], now=NOW)
        assert conflict.status.value == "conflict", conflict
    drain(worker)
    assert _queued_versions(engine, ids["A"]) == {1: "delivered", 2: "dead"}
    assert list(_pins(engine)) == [ids["A"]]
    assert _holds(engine, url, ids, q) == PAPER
    [repeat] = ingest(engine, ref, [_item(r, "A", "冰川", 7)], now=NOW)
    assert repeat.status.value == "duplicate", repeat
    assert _queued_versions(engine, ids["A"]) == {1: "delivered", 2: "dead"}
    assert _row(engine, ids["A"])["current_version"] == 3
    assert list(_pins(engine)) == [ids["A"]]
    [change] = _report(engine, q)["refused_changes"]
    assert (change["record_id"], change["version"], change["delivery"], change["status"],
            change["applied_version"], change["applied_hours"]) == (
        ids["A"], 2, "dead", "duplicate", 1, "10.0")
    assert _report(engine, r)["refused_changes"] == []
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, r) == PAPER
    faults.reject_ids = set()
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 1
    assert _queued_versions(engine, ids["A"]) == {1: "delivered", 2: "pending"}
    assert _pins(engine) == {}
    drain(worker)
    assert _applied(url, ids["A"])[-1]["version"] == 2
    assert _credited(engine, ids)["C"] == "10.0"
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, r) == PAPER
    assert _report(engine, q)["refused_changes"] == []
    # G withdrawn: A (its repeat) takes over and counts for r (H 10 h, A 10 h).
    withdraw(engine, PartnerRef(theirs.partner_id, "canonical"), "G", now=NOW)
    drain(worker)
    last = _applied(url, ids["A"])[-1]["record"]
    assert (last["person"]["id_number"] == r.id_number, last["activity"]["title"],
            last["credited_hours"]) == (True, "冰川", "10.0")
    assert _holds(engine, url, ids, r) == PAPER
    assert _holds(engine, url, ids, q) == PAPER
    assert _pins(engine) == {}


# -- the report of such a record through the API, the CLI and the console -------------------------

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_pinned_record_behind_an_unsent_move_in_the_api_cli_and_console(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        make_settings: Callable[..., Settings], new_operator: Callable[..., str]) -> None:
    """The state of the test above before the reprocess, read from outside.

    q's report lists A under ``refused_changes`` with version 2 (the refused withdrawal, the
    last sent) and ``delivery`` "dead", and counts its 10 h; the API's answer validates against
    its schema and equals the report; the CLI prints the same; A's console page opens.
    """
    url, faults = mock_ce
    ids, ref, q, r, _ = _pinned_by_a_refused_withdrawal(
        engine, mock_ce, make_worker, new_partner, 4301)
    [repeat] = ingest(engine, ref, [_item(r, "A", "冻土", 6)], now=NOW)
    assert repeat.status.value == "duplicate", repeat
    want = _report(engine, q)
    [change] = want["refused_changes"]
    assert (change["version"], change["delivery"], change["delivery_code"],
            change["status"], change["applied_hours"]) == (2, "dead", "DOWNSTREAM_REJECTED",
                                                           "duplicate", "10.0")
    assert want["by_type"]["paper"]["credited"] == "20.0"
    viewer = new_operator(engine, role="viewer")
    operator = new_operator(engine)
    with uvicorn_thread(create_app(make_settings(db_url, url), run_worker=False)) as gw:
        resp = httpx.get(f"{gw}/v1/compliance/{q.id_number}/2026",
                         headers={"Authorization": f"Bearer {viewer}"})
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert compliance.ComplianceReport.model_validate(got).model_dump(mode="json") == got
        assert got == want
        assert q.id_number not in resp.text
        for who in (r,):  # A's row is r's now; r's report does not list it
            other = httpx.get(f"{gw}/v1/compliance/{who.id_number}/2026",
                              headers={"Authorization": f"Bearer {viewer}"}).json()
            assert other["refused_changes"] == [] and other["by_type"]["paper"]["credited"] == "10.0"
        with httpx.Client(base_url=gw, follow_redirects=False) as client:
            page = client.get("/ops/login", params={"next": "/ops"})
            token = CSRF.search(page.text)
            assert token is not None
            assert client.post("/ops/login", data={"token": operator, "csrf": token.group(1),
                                                   "next": "/ops"}).status_code == 303
            for path in (f"/ops/records/{ids['A']}", f"/ops/records/{ids['C']}",
                         "/ops/deliveries?status=dead"):
                shown = client.get(path)
                assert shown.status_code == 200, (path, shown.status_code, shown.text[-800:])
                assert q.id_number not in shown.text and r.id_number not in shown.text
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "COLUMNS": "250"}
    as_json = cli(env, "compliance", q.id_number, "2026", "--json")
    assert as_json.returncode == 0, as_json.stderr[-800:]
    assert json.loads(as_json.stdout) == want
    table = cli(env, "compliance", q.id_number, "2026")
    assert table.returncode == 0, table.stderr[-800:]
    assert q.id_number not in table.stdout + table.stderr
    assert "v2" in table.stdout and "v1 10.0 h" in table.stdout, table.stdout
    assert "DOWNSTREAM_REJECTED" in table.stdout and "duplicate" in table.stdout
    assert mask_id(q.id_number) in table.stdout


# -- the worker pins a record when an older version lands behind a refused one ---------------------

def _landing_setup(engine: Engine, new_partner: Callable[..., Partner],
                   mock_ce: tuple[str, Faults], make_worker: MakeWorker, seed: int,
                   ) -> tuple[dict[str, str], PartnerRef, GenPerson, GenPerson, Any]:
    """A's version 1 dead RETRIES_EXHAUSTED, its withdrawal refused, then an unsent repeat.

    Version 1 died in an outage; the withdrawal was refused; then A is corrected into a
    repeat of r's H (not sent: A is withdrawn, not counted).

    The mock has none of A; B and C count 10 h each of q's papers.
    """
    url, faults = mock_ce
    partner, theirs = new_partner(engine), new_partner(engine)
    q, r = make_person(random.Random(seed)), make_person(random.Random(seed + 1))
    ids = _three_papers(engine, partner, q)
    ids |= _put(engine, theirs, _item(r, "H", "冻土", 6))
    faults.error_rate = 1.0
    drain(make_worker(delivery_max_attempts=1))
    faults.error_rate = 0.0
    with engine.connect() as conn:
        assert set(conn.execute(select(outbox.c.error_code).where(
            outbox.c.record_id.in_(list(ids.values())))).scalars()) == {"RETRIES_EXHAUSTED"}
    assert _reprocess(engine, error_code="RETRIES_EXHAUSTED",
                      record_ids=(ids["B"], ids["C"], ids["H"])) == 3
    worker = make_worker()
    drain(worker)
    faults.reject_ids = {ids["A"]}
    ref = PartnerRef(partner.partner_id, "canonical")
    withdraw(engine, ref, "A", now=NOW)
    drain(worker)
    faults.reject_ids = set()
    assert _queued_versions(engine, ids["A"]) == {1: "dead", 2: "dead"}
    assert _credited(engine, ids) == {"A": "0.0", "B": "10.0", "C": "10.0", "H": "10.0"}
    assert _holds(engine, url, ids, q) == PAPER
    [repeat] = ingest(engine, ref, [_item(r, "A", "冻土", 6)], now=NOW)
    assert repeat.status.value == "duplicate", repeat
    assert _queued_versions(engine, ids["A"]) == {1: "dead", 2: "dead"}
    return ids, ref, q, r, worker


def test_an_older_version_landing_behind_a_refused_one_and_an_unsent_one_is_pinned(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    url, _ = mock_ce
    ids, _, q, r, worker = _landing_setup(engine, new_partner, mock_ce, make_worker, 4401)
    assert _reprocess(engine, error_code="RETRIES_EXHAUSTED") == 1  # A's version 1
    drain(worker)
    assert [v["version"] for v in _applied(url, ids["A"])] == [1]
    assert list(_pins(engine)) == [ids["A"]]
    assert _credited(engine, ids)["C"] == "0.0"
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, r) == 10
    [change] = _report(engine, q)["refused_changes"]
    assert (change["version"], change["delivery"], change["status"], change["applied_version"],
            change["applied_hours"]) == (2, "dead", "duplicate", 1, "10.0")
    # The refused withdrawal reprocessed (nothing later was sent): applied, the pin ends.
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") == 1
    drain(worker)
    assert _applied(url, ids["A"])[-1]["record"]["withdrawn"] is True
    assert _pins(engine) == {}
    assert _credited(engine, ids)["C"] == "10.0"
    assert _holds(engine, url, ids, q) == PAPER
    assert _report(engine, q)["refused_changes"] == []


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
def test_an_older_version_landing_while_a_correction_is_sent_on_postgresql(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """As above, but A's version 1 lands while the partner corrects A into q's training.

    Whichever commits first, once both are in and the outbox drained the correction is what
    the mock counts last, no pin is left, C has the 10 h and the report agrees with the mock.
    """
    url, _ = mock_ce
    for round_ in range(3):
        ids, ref, q, r, worker = _landing_setup(engine, new_partner, mock_ce, make_worker,
                                                4501 + 10 * round_)
        assert _reprocess(engine, error_code="RETRIES_EXHAUSTED", record_ids=(ids["A"],)) == 1
        gate = threading.Barrier(2, timeout=10)
        failures: list[BaseException] = []

        def deliver(w: Any = worker, gate: threading.Barrier = gate,
                    failures: list[BaseException] = failures) -> None:
            try:
                gate.wait()
                drain(w)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        def correct(partner: PartnerRef = ref, person: GenPerson = q,
                    gate: threading.Barrier = gate,
                    failures: list[BaseException] = failures) -> None:
            try:
                gate.wait()
                [answer] = ingest(engine, partner, [_training(person, "A", "高原病防治")], now=NOW)
                assert answer.status.value == "corrected", (answer.status, answer.errors)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=deliver), threading.Thread(target=correct)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not failures, failures
        drain(worker)
        last = _applied(url, ids["A"])[-1]["record"]
        assert (last["activity_type"], last["withdrawn"]) == ("training", False), (round_, last)
        assert _pins(engine) == {}, round_
        assert _credited(engine, ids)["C"] == "10.0", round_
        assert _holds(engine, url, ids, q) == PAPER
        assert _holds(engine, url, ids, q, "training") == 8
        assert _holds(engine, url, ids, r) == 10
        report = _report(engine, q)
        assert report["refused_changes"] == [] and report["not_counted"] == [], round_


def test_a_pinned_unsent_repeat_taking_over_by_succession_ends_the_pin(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """A pinned unsent repeat that takes its activity over is sent, and its pin ends.

    A pinned (refused withdrawal), then an unsent repeat of r's H; H withdrawn: A takes
    over (accept_held) with its unsent version, which is sent now: q's papers are freed.
    """
    url, faults = mock_ce
    ids, ref, q, r, worker = _pinned_by_a_refused_withdrawal(
        engine, mock_ce, make_worker, new_partner, 4601)
    [repeat] = ingest(engine, ref, [_item(r, "A", "冻土", 6)], now=NOW)
    assert repeat.status.value == "duplicate", repeat
    faults.reject_ids = set()
    with engine.connect() as conn:
        holder = conn.execute(select(records.c.partner_id, records.c.source_record_id).where(
            records.c.record_id == ids["H"])).one()
    withdraw(engine, PartnerRef(holder.partner_id, "canonical"), "H", now=NOW)
    drain(worker)
    assert _pins(engine) == {}
    last = _applied(url, ids["A"])[-1]["record"]
    assert (last["person"]["id_number"] == r.id_number, last["credited_hours"]) == (True, "10.0")
    assert _credited(engine, ids)["C"] == "10.0"
    assert _holds(engine, url, ids, q) == PAPER
    assert _holds(engine, url, ids, r) == 10
    assert _report(engine, q)["refused_changes"] == []
