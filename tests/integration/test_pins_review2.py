"""Second review of 401620b / 4219525: refused pins on the paths the first review left out.

Real ingest, the real batch processor and the real delivery worker against the mock
management system on uvicorn (127.0.0.1), on SQLite and PostgreSQL.  The invariant attacked:
after a full drain, for each person, CE year and type, what the management system counts (the
last applied version of every record) stays within the cap, equals the compliance report's
``by_type`` credited, and nothing acknowledged is lost (a record behind a freed share gets it).

Covered here: a succession (another source's report withdrawn) handing the activity to a
pinned duplicate; a training-base roster batch correcting a counted result into a refused one
and then reporting it failed (R9, ``Chunk._withdraw_failed``), refused again or not; payload
retention after a year closes and a correction that moves a record to the next CE year, refused;
a refused move across CE years, the old year closed, then the pin's withdrawal; the CLI
compliance output with pinned records.
"""

from __future__ import annotations

import csv
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

import gateway.cli as cli_module
import gateway.cli.reports as cli_reports
from gateway.accounts import Partner
from gateway.batch_requests import NewBatch, record_batch
from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.ops.records import resolve_conflict
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.withdraw import withdraw
from gateway.retention import prune
from gateway.signing import file_sha256
from gateway.store.tables import batches, records
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from mock_partners.generators import GenPerson, make_person
from tests.integration.test_batches_api import _directory
from tests.integration.test_pins_review import _three_papers
from tests.integration.test_refused_caps_review import CAPS, NOW, _applied, _item, _put, _reprocess
from tests.integration.test_refused_pins import _pins, _report
from tests.integration.test_s16caps_review import _credited, _downstream
from tests.support.delivery import MakeWorker, drain
from tests.support.servers import poll

PAPER = CAPS["paper"]


# -- harness ------------------------------------------------------------------------------------

def _holds(engine: Engine, url: str, ids: dict[str, str], person: GenPerson, kind: str = "paper",
           year: int = 2026) -> Decimal:
    """The invariant for ``person``'s ``kind`` in ``year``; returns what the MS counts."""
    there = _downstream(url, ids, kind, person, year)
    if kind in CAPS:
        assert there <= CAPS[kind], f"the MS counts {there} h of {kind} (cap {CAPS[kind]})"
    got = _report(engine, person, year)["by_type"].get(kind, {}).get("credited", "0")
    assert Decimal(got) == there, (kind, year, got, there)
    return there


# -- a succession hands the activity to a pinned duplicate ----------------------------------------

@pytest.mark.parametrize("how", ["succession", "ops_resolve_conflict"])
def test_a_pinned_duplicate_taking_over_by_succession_frees_its_old_group(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        make_settings: Callable[..., Settings], how: str) -> None:
    """A, pinned in q's papers, takes over p's activity X and counts for p there.

    ``succession``: X withdrawn, A (its duplicate) takes over.  ``ops_resolve_conflict``: A
    moved onto X with other hours (a conflict), ops keep A's version.
    """
    url, faults = mock_ce
    partner, theirs = new_partner(engine), new_partner(engine)
    q, p = make_person(random.Random(3101)), make_person(random.Random(3102))
    ids = _three_papers(engine, partner, q)
    ids |= _put(engine, theirs, _item(p, "X", "冻土", 6))
    worker = make_worker()
    drain(worker)
    faults.reject_ids = {ids["A"]}
    onto = _item(p, "A", "冻土", 6, authorship="sole" if how == "succession" else "co")
    [moved] = ingest(engine, PartnerRef(partner.partner_id, "canonical"), [onto], now=NOW)
    assert moved.status.value == ("duplicate" if how == "succession" else "conflict"), moved
    drain(worker)
    assert list(_pins(engine)) == [ids["A"]]
    assert _credited(engine, ids)["C"] == "0.0"
    assert _holds(engine, url, ids, q) == PAPER
    faults.reject_ids = set()
    if how == "succession":  # X withdrawn: A, its duplicate, takes over and counts for p
        withdraw(engine, PartnerRef(theirs.partner_id, "canonical"), "X", now=NOW)
    else:  # ops keep A's report of the activity (X becomes the held one)
        resolve_conflict(engine, make_settings(db_url, url), ids["A"], keep="this",
                         reason="review", actor="op-review")
    drain(worker)
    assert _applied(url, ids["A"])[-1]["record"]["person"]["id_number"] == p.id_number
    assert _holds(engine, url, ids, p) == (10 if how == "succession" else 5)
    # The management system counts B alone of q's papers now: C should have A's freed 10 h.
    assert _credited(engine, ids)["C"] == "10.0"
    assert _holds(engine, url, ids, q) == PAPER
    assert _pins(engine) == {}


def test_a_pinned_duplicate_of_its_own_persons_report_taking_over_claims_its_hours_there(
        engine: Engine, new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """As above, but A's new activity is q's own (Y, another source).

    Pinned and held in one group; taking over, A claims its hours there like any record.
    """
    url, faults = mock_ce
    partner, theirs = new_partner(engine), new_partner(engine)
    q = make_person(random.Random(3103))
    ids = _three_papers(engine, partner, q)
    ids |= _put(engine, theirs, _item(q, "Y", "冻土", 6))
    worker = make_worker()
    drain(worker)
    faults.reject_ids = {ids["A"]}
    [moved] = ingest(engine, PartnerRef(partner.partner_id, "canonical"),
                     [_item(q, "A", "冻土", 6)], now=NOW)
    assert moved.status.value == "duplicate", moved
    drain(worker)
    assert list(_pins(engine)) == [ids["A"]]
    assert _holds(engine, url, ids, q) == PAPER
    faults.reject_ids = set()
    withdraw(engine, PartnerRef(theirs.partner_id, "canonical"), "Y", now=NOW)
    drain(worker)
    assert _applied(url, ids["A"])[-1]["record"]["activity"]["title"] == "冻土"
    assert _credited(engine, ids) == {"A": "10.0", "B": "10.0", "C": "0.0", "Y": "0.0"}
    assert _holds(engine, url, ids, q) == PAPER
    assert _pins(engine) == {}


# -- the batch path: a training-base roster --------------------------------------------------------

ROSTER_HEADERS = ("result_id", "id_no", "name", "employer", "region", "hours", "started_on",
                  "completed_on", "passed", "certificate_no", "base_code", "plan_id", "title")


def _result(person: GenPerson, rid: str, hours: int, title: str, passed: str = "是",
            day: int = 13) -> dict[str, str]:
    return {"result_id": rid, "id_no": person.id_number, "name": person.name,
            "employer": "海东市平安区第一中学", "region": "630200", "hours": str(hours),
            "started_on": "2026-05-10", "completed_on": f"2026-05-{day:02d}", "passed": passed,
            "certificate_no": f"JD{rid}", "base_code": "QHJD-001", "plan_id": "QHJD-001-2026-01",
            "title": title}


def _roster_batch(engine: Engine, settings: Settings, base: Partner, tmp_path: Path,
                  rows: list[dict[str, str]]) -> dict[str, Any]:
    """Upload ``rows`` as a roster batch (as the API records it) and process it to its end."""
    path = tmp_path / f"roster-{uuid.uuid4().hex[:8]}.csv"
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, ROSTER_HEADERS)
        writer.writeheader()
        writer.writerows(rows)
    # The same rows again are the same bytes: a resend, answered by the batch that took them.
    batch_id = record_batch(engine, NewBatch(
        "B" + uuid.uuid4().hex[:24], base.partner_id, "training_base", "roster", "2026", path,
        "csv", path.stat().st_size, file_sha256(path)), "test").batch_id
    processor = BatchProcessor(engine, settings, name="review")

    def ended() -> dict[str, Any] | None:
        processor.run_once()
        with engine.connect() as conn:
            row = dict(conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                       .mappings().one())
        return row if row["status"] in ("done", "failed") else None

    row: dict[str, Any] = poll(ended, 30, interval=0.05, what="the roster batch to end")
    assert row["status"] == "done", row
    return row


def _ids_of(engine: Engine, partner: Partner) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(records.c.source_record_id, records.c.record_id)
                                 .where(records.c.partner_id == partner.partner_id)).all())


@pytest.mark.parametrize("then", ["failed_refused", "failed_applied"])
def test_a_roster_correcting_a_result_to_another_person_refused_then_failed(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        make_settings: Callable[..., Settings], tmp_path: Path, then: str) -> None:
    """R-1 (q, 8 h) moved to p by a roster row refused downstream: q's report keeps its 8 h.

    Then a roster reports R-1 failed (R9): the record is withdrawn (``_withdraw_failed``) from
    its refused version.  Refused again, q keeps the 8 h there and in the report; applied,
    they go.
    """
    url, faults = mock_ce
    base = new_partner(engine, adapter="training_base", base_code="QHJD-001")
    _directory(engine, tmp_path)
    settings = make_settings(db_url, url, batch_chunk_rows=40, batch_parse_workers=0,
                             batch_lease_seconds=30, batch_dir=tmp_path / "b")
    q, p = make_person(random.Random(3201)), make_person(random.Random(3202))
    first = _roster_batch(engine, settings, base, tmp_path, [
        _result(q, "R-1", 8, "高原生态修复技术研修班"), _result(q, "R-2", 16, "湿地保护研修班", day=20)])
    assert (first["accepted"], first["rejected"]) == (2, 0), first
    ids = _ids_of(engine, base)
    worker = make_worker()
    drain(worker)
    assert _holds(engine, url, ids, q, "training") == 24
    moved = _roster_batch(engine, settings, base, tmp_path,
                          [_result(p, "R-1", 8, "[REJECT] 高原生态修复技术研修班")])
    assert moved["corrected"] == 1, moved
    drain(worker)
    assert list(_pins(engine)) == [ids["R-1"]]
    assert _holds(engine, url, ids, q, "training") == 24
    assert _holds(engine, url, ids, p, "training") == 0
    if then == "failed_applied":
        faults.reject_title_marker = "[NEVER]"
    failed = _roster_batch(engine, settings, base, tmp_path,
                           [_result(p, "R-1", 8, "[REJECT] 高原生态修复技术研修班", passed="否")])
    assert failed["rejected"] == 1, failed
    with engine.connect() as conn:
        assert conn.execute(select(records.c.withdrawn).where(
            records.c.record_id == ids["R-1"])).scalar_one() is True
    drain(worker)
    last = _applied(url, ids["R-1"])[-1]
    if then == "failed_refused":
        assert last["version"] == 1
        assert list(_pins(engine)) == [ids["R-1"]]
        assert _holds(engine, url, ids, q, "training") == 24
        [change] = _report(engine, q)["refused_changes"]
        assert (change["source_record_id"], change["applied_hours"]) == ("R-1", "8.0")
    else:
        assert last["record"]["withdrawn"] is True
        assert _pins(engine) == {}
        assert _holds(engine, url, ids, q, "training") == 16
    assert _holds(engine, url, ids, p, "training") == 0
    # A resend of the failed row changes nothing (the record is withdrawn already).
    again = _roster_batch(engine, settings, base, tmp_path,
                          [_result(p, "R-1", 8, "[REJECT] 高原生态修复技术研修班", passed="否")])
    assert again["rejected"] == 1, again
    drain(worker)
    assert _holds(engine, url, ids, q, "training") == (24 if then == "failed_refused" else 16)


# -- retention and moves across CE years ------------------------------------------------------------

IN_2025 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)  # the CE year 2025 open
AFTER_RETENTION = datetime(2028, 1, 15, 8, 0, tzinfo=UTC)  # 400 days past any delivery here


def _training(person: GenPerson, sid: str, year: int, title: str, hours: str,
              days: tuple[date, date]) -> dict[str, Any]:
    sub = gen.canonical_submission(random.Random(sid), sid, person, year=year, hours=hours,
                                   title=title)
    sub["activity"] = {**sub["activity"], "started_on": days[0].isoformat(),
                       "completed_on": days[1].isoformat()}
    return sub


def test_a_pruned_closed_year_record_moved_to_the_next_year_and_refused_keeps_its_old_year(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        make_settings: Callable[..., Settings]) -> None:
    url, _ = mock_ce
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    q = make_person(random.Random(3301))
    march = (date(2025, 3, 10), date(2025, 3, 11))
    answers = ingest(engine, partner, [_training(q, "T1", 2025, "高原病防治新进展", "8", march)],
                     now=IN_2025)
    assert answers[0].status.value == "accepted", answers
    ids = {"T1": str(answers[0].record_id)}
    drain(make_worker())
    assert _holds(engine, url, ids, q, "training", 2025) == 8
    result = prune(engine, make_settings(db_url, url), now=AFTER_RETENTION)
    assert 2025 in result.closed_years and result.versions == 1, result
    assert _holds(engine, url, ids, q, "training", 2025) == 8  # pruned: still counted
    # The partner's date was wrong: the course ran in January 2026 (refused downstream).
    moved = _training(q, "T1", 2026, "[REJECT] 高原病防治新进展", "8",
                      (date(2026, 1, 5), date(2026, 1, 6)))
    [answer] = ingest(engine, partner, [moved], now=NOW)
    assert answer.status.value == "corrected", answer
    drain(make_worker())
    assert [v["version"] for v in _applied(url, ids["T1"])] == [1]
    assert _holds(engine, url, ids, q, "training", 2026) == 0
    assert _holds(engine, url, ids, q, "training", 2025) == 8


def test_a_refused_move_to_the_next_year_after_the_close_then_retention_then_withdrawal(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        make_settings: Callable[..., Settings]) -> None:
    """Papers A, B, C of q in 2025 (C cut to 0 h); 2025 closes; A moved to 2026, refused.

    q's 2025 paper group keeps A's applied 10 h (pinned), its report counts them; retention
    after the close prunes what it may and changes none of that; then A is withdrawn (its row
    is of the open 2026), refused again, and finally accepted after a requeue: C takes A's
    10 h in the closed year, as the management system then counts.
    """
    url, faults = mock_ce
    partner = new_partner(engine)
    ref = PartnerRef(partner.partner_id, "canonical")
    q = make_person(random.Random(3401))

    def paper(sid: str, title: str, month: int, year: int = 2025) -> dict[str, Any]:
        item = _item(q, sid, title, month)
        return {**item, "year": year,
                "activity": {**item["activity"], "completed_on": f"{year}-{month:02d}-15"}}

    answers = ingest(engine, ref, [paper("A", "盐湖", 3), paper("B", "湿地", 4),
                                   paper("C", "草甸", 5)], now=IN_2025)
    ids = {a.source_record_id: str(a.record_id) for a in answers}
    worker = make_worker()
    drain(worker)
    assert _credited(engine, ids) == {"A": "10.0", "B": "10.0", "C": "0.0"}
    [moved] = ingest(engine, ref, [paper("A", "[REJECT] 盐湖", 1, year=2026)], now=NOW)
    assert moved.status.value == "corrected", moved
    drain(worker)
    assert list(_pins(engine)) == [ids["A"]]
    assert _credited(engine, ids)["C"] == "0.0"
    assert _holds(engine, url, ids, q, "paper", 2025) == PAPER
    assert _holds(engine, url, ids, q, "paper", 2026) == 0
    result = prune(engine, make_settings(db_url, url), now=AFTER_RETENTION)
    assert 2025 in result.closed_years, result
    assert _holds(engine, url, ids, q, "paper", 2025) == PAPER
    withdraw(engine, ref, "A", now=NOW)  # refused downstream ([REJECT] in its title)
    drain(worker)
    assert _applied(url, ids["A"])[-1]["version"] == 1
    assert list(_pins(engine)) == [ids["A"]]
    assert _credited(engine, ids)["C"] == "0.0"
    assert _holds(engine, url, ids, q, "paper", 2025) == PAPER
    faults.reject_title_marker = "[NEVER]"
    assert _reprocess(engine, error_code="DOWNSTREAM_REJECTED") >= 1
    drain(worker)
    assert _pins(engine) == {}
    assert _applied(url, ids["A"])[-1]["record"]["withdrawn"] is True
    assert _credited(engine, ids)["C"] == "10.0"
    assert _holds(engine, url, ids, q, "paper", 2025) == PAPER


# -- the CLI compliance output ----------------------------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_compliance_output_of_a_pinned_person_matches_the_report(
        db_url: str, engine: Engine, new_partner: Callable[..., Partner],
        mock_ce: tuple[str, Faults], make_worker: MakeWorker,
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = mock_ce
    partner = new_partner(engine)
    q, p = make_person(random.Random(3501)), make_person(random.Random(3502))
    ids = _three_papers(engine, partner, q)
    drain(make_worker())
    _put(engine, partner, _item(p, "A", "[REJECT] 盐湖", 3))
    drain(make_worker())
    assert _holds(engine, url, ids, q) == PAPER
    settings = make_settings(db_url, url)
    monkeypatch.setattr(cli_reports, "_settings", lambda: settings)
    runner = CliRunner()
    as_json = runner.invoke(cli_module.app, ["compliance", q.id_number, "2026", "--json"])
    assert as_json.exit_code == 0, as_json.output[-500:]
    got = json.loads(as_json.output)
    assert got == _report(engine, q)
    assert got["by_type"]["paper"]["credited"] == "20.0"
    assert [n["source_record_id"] for n in got["not_counted"]] == ["A"]
    table = runner.invoke(cli_module.app, ["compliance", q.id_number, "2026"])
    assert table.exit_code == 0, table.output[-500:]
    assert "v1 10.0 h" in table.output and "[REJECT]" in table.output
    for shown in (as_json.output, table.output):
        assert q.id_number not in shown and p.id_number not in shown
    # p's report lists A as not counted there, with none of its hours.
    theirs = runner.invoke(cli_module.app, ["compliance", p.id_number, "2026", "--json"])
    assert json.loads(theirs.output)["credited"]["total"] == "0.0"
