"""Reference data: sync from the mock management system, CSV import, versions, lookups.

On SQLite and PostgreSQL, against the mock on a real uvicorn (``mock_ce``), loaded through
``POST /_mock/reference/{kind}``.  Identity numbers must never reach a table in clear.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, Table, func, select

from contracts import CESubmission
from gateway import audit
from gateway.config import Settings
from gateway.pipeline.dedup import person_key
from gateway.reference import (
    REFERENCE_SYNC_JOB,
    BaseInfo,
    DeferralInfo,
    PlanInfo,
    ReferenceCache,
    StoreReference,
    UnknownReferenceKind,
    import_csv,
    sync,
)
from gateway.scheduling import JOBS, build_scheduler
from gateway.store.tables import (
    audit_events,
    pull_state,
    reference_bases,
    reference_deferrals,
    reference_history,
    reference_plans,
    reference_title_applicants,
    reference_versions,
)
from mock_partners.ce_system import Faults
from mock_partners.generators import make_id_number
from tests.support.keys import KEYS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
ID_A, ID_B = "630102198704139126", "63212319900101101X"
T1, T2 = "2026-01-01T08:00:00+08:00", "2026-02-01T08:00:00+08:00"
STORED = (reference_bases, reference_plans, reference_deferrals, reference_title_applicants,
          reference_history, reference_versions, audit_events, pull_state)

BASES = [
    {"code": "QHJD-001", "name": "青海省高原生态继续教育基地", "level": "provincial",
     "status": "active", "assessed_on": "2024-06-30", "updated_at": T1},
    {"code": "QHJD-002", "name": "国家级继续教育基地（青海大学）", "level": "national",
     "status": "active", "assessed_on": "2023-12-01", "updated_at": T1},
]
PLANS = [
    {"plan_id": "PLAN-2026-001", "base_code": "QHJD-001", "title": "高原生态修复技术研修班",
     "category": "professional", "hours": 24.5, "starts_on": "2026-05-10",
     "ends_on": "2026-05-13", "filed_on": "2026-03-01", "updated_at": T1},
]
DEFERRALS = [
    {"id_number": ID_A, "from_year": 2025, "reason": "post_transfer", "approved_on": "2026-01-05",
     "updated_at": T1},
    {"id_number": ID_B, "from_year": 2025, "reason": "illness", "approved_on": "2026-01-06",
     "updated_at": T1},
]
# 250 title applicants: three pages of the mock's 100.
APPLICANTS = [{"id_number": make_id_number(random.Random(i), "630102", date(1980, 1, 1) + timedelta(i)),
               "year": 2026, "updated_at": T1} for i in range(248)]
APPLICANTS += [{"id_number": ID_A, "year": 2026, "updated_at": T1},
               {"id_number": ID_B, "year": 2026, "updated_at": T1}]


def load(url: str, kind: str, items: list[dict[str, Any]]) -> None:
    response = httpx.post(f"{url}/_mock/reference/{kind}", json={"items": items})
    assert response.status_code == 200, response.text


def load_all(url: str) -> None:
    for kind, items in (("bases", BASES), ("plans", PLANS), ("deferrals", DEFERRALS),
                        ("title-applicants", APPLICANTS)):
        load(url, kind, items)


def sync_settings(make_settings: Callable[..., Settings], db_url: str, url: str) -> Settings:
    return make_settings(db_url, url, pull_retries=2, pull_retry_max_wait_seconds=0.01)


def rows(engine: Engine, table: Table) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table)).mappings()]


def count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def audit_kinds(engine: Engine) -> list[tuple[str, str, dict[str, Any]]]:
    with engine.connect() as conn:
        return [(r.kind, r.actor, orjson.loads(r.detail)) for r in conn.execute(
            select(audit_events).order_by(audit_events.c.seq))]


def assert_chain_ok(engine: Engine) -> None:
    with engine.connect() as conn:
        assert audit.verify(conn).ok


def assert_no_clear_ids(engine: Engine, db_url: str, *ids: str) -> None:
    for table in STORED:
        text = repr(rows(engine, table)).upper()
        for id_number in ids:
            assert id_number.upper() not in text, f"{id_number} stored in clear in {table.name}"
    if db_url.startswith("sqlite:///"):  # the bytes on disk, WAL included
        engine.dispose()
        path = Path(db_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        for id_number in ids:
            assert id_number.encode() not in raw and id_number.lower().encode() not in raw


# -- sync -------------------------------------------------------------------------------------

def test_sync_pulls_every_page_once_and_a_quiet_sync_makes_no_version(
        db_url: str, engine: Engine, mock_ce: tuple[str, Faults],
        make_settings: Callable[..., Settings]) -> None:
    url, _ = mock_ce
    load_all(url)
    settings = sync_settings(make_settings, db_url, url)

    first = sync(engine, settings)

    assert first.ok and first.version == "ref-000001"
    applicants = first.kinds["title-applicants"]
    assert (applicants.pages, applicants.fetched, applicants.inserted) == (3, 250, 250)
    assert {k: (r.fetched, r.inserted) for k, r in first.kinds.items()} == {
        "bases": (2, 2), "plans": (1, 1), "deferrals": (2, 2), "title-applicants": (250, 250)}
    assert count(engine, reference_title_applicants) == 250
    assert count(engine, reference_history) == 2 + 1 + 2 + 250
    (version,) = rows(engine, reference_versions)
    assert (version["version_id"], version["source"], version["actor"]) == (
        "ref-000001", "sync", "reference-sync")
    assert version["kinds"] == "bases,plans,deferrals,title-applicants"
    assert orjson.loads(version["cursors"]) == {k: T1 for k in first.kinds}
    marks = {r["source"]: r for r in rows(engine, pull_state)}
    assert marks["reference:bases"]["cursor"] == T1
    assert marks["reference:title-applicants"]["pulled_total"] == 250
    plan = rows(engine, reference_plans)[0]
    assert plan["hours"] == "24.5" and plan["version"] == "ref-000001"

    again = sync(engine, settings)

    # ``since`` is inclusive: the items at the watermark come again and change nothing.
    assert again.ok and again.version is None
    assert again.kinds["title-applicants"].unchanged == 250
    assert count(engine, reference_versions) == 1
    assert [k for k, _, _ in audit_kinds(engine)] == ["reference_synced"]
    assert_chain_ok(engine)


def test_a_revoked_base_makes_a_new_version_and_a_history_row(
        db_url: str, engine: Engine, mock_ce: tuple[str, Faults],
        make_settings: Callable[..., Settings]) -> None:
    url, _ = mock_ce
    load_all(url)
    settings = sync_settings(make_settings, db_url, url)
    assert sync(engine, settings).version == "ref-000001"

    load(url, "bases", [{**BASES[0], "status": "revoked", "updated_at": T2}])
    result = sync(engine, settings)

    assert result.ok and result.version == "ref-000002"
    # ``since`` is inclusive: both bases at T1 come again; the newest item of a code wins.
    bases_run = result.kinds["bases"]
    assert (bases_run.fetched, bases_run.updated, bases_run.unchanged) == (3, 1, 1)
    assert result.kinds["bases"].watermark == T2 and result.kinds["plans"].fetched == 1
    bases = {r["code"]: r for r in rows(engine, reference_bases)}
    assert (bases["QHJD-001"]["status"], bases["QHJD-001"]["version"]) == ("revoked", "ref-000002")
    assert bases["QHJD-002"]["version"] == "ref-000001"
    with engine.connect() as conn:
        history = conn.execute(select(reference_history).where(
            reference_history.c.kind == "bases", reference_history.c.key == "QHJD-001")
            .order_by(reference_history.c.id)).mappings().all()
    assert [(h["version"], orjson.loads(h["payload"])["status"]) for h in history] == [
        ("ref-000001", "active"), ("ref-000002", "revoked")]
    (_, new) = rows(engine, reference_versions)
    assert new["kinds"] == "bases" and orjson.loads(new["counts"])["bases"]["updated"] == 1
    synced = [d for k, _, d in audit_kinds(engine) if k == "reference_synced"]
    assert [d["version"] for d in synced] == ["ref-000001", "ref-000002"]
    assert synced[1]["counts"]["bases"] == {"fetched": 3, "inserted": 0, "updated": 1,
                                            "unchanged": 1, "invalid": 0}
    assert_chain_ok(engine)
    with engine.connect() as conn:
        ref = StoreReference.load(conn, KEYS)
    assert ref.version == "ref-000002" and ref.base("QHJD-001") == BaseInfo(
        "QHJD-001", "青海省高原生态继续教育基地", "provincial", "revoked", date(2024, 6, 30))


def test_an_invalid_item_is_refused_and_the_rest_applied(
        db_url: str, engine: Engine, mock_ce: tuple[str, Faults],
        make_settings: Callable[..., Settings]) -> None:
    url, _ = mock_ce
    load(url, "bases", [*BASES, {**BASES[0], "code": "QHJD-009", "level": "county"}])
    load(url, "deferrals", [{**DEFERRALS[0], "reason": "travel"}])

    result = sync(engine, sync_settings(make_settings, db_url, url))

    assert result.version == "ref-000001" and result.kinds["bases"].inserted == 2
    assert result.kinds["bases"].invalid == [
        "item 2: level: Input should be 'national' or 'provincial'"]
    assert result.kinds["deferrals"].invalid == [
        "item 0: reason: Input should be 'post_transfer', 'illness' or 'pregnancy'"]
    marks = {r["source"]: r for r in rows(engine, pull_state)}
    assert marks["reference:bases"]["last_error"].startswith("1 items refused: item 2: level")
    assert marks["reference:bases"]["cursor"] == T1  # refused items do not hold the watermark
    assert_no_clear_ids(engine, db_url, ID_A)


def test_an_unreachable_system_is_reported_never_raised(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings]) -> None:
    settings = sync_settings(make_settings, db_url, "http://127.0.0.1:9")

    result = sync(engine, settings)

    assert not result.ok and result.version is None and result.error is None
    assert set(result.kinds) == {"bases", "plans", "deferrals", "title-applicants"}
    assert all(r.error and "ConnectError" in r.error for r in result.kinds.values())
    marks = {r["source"]: r for r in rows(engine, pull_state)}
    assert marks["reference:plans"]["cursor"] is None
    assert "ConnectError" in marks["reference:plans"]["last_error"]
    assert count(engine, reference_versions) == 0 and count(engine, audit_events) == 0


def test_transient_answers_are_retried_and_permanent_ones_are_not(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings]) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        kind = request.url.path.rsplit("/", 1)[-1]
        calls.append(kind)
        if kind == "bases" and calls.count("bases") == 1:
            return httpx.Response(503, headers={"Retry-After": "0"})
        if kind == "plans":
            return httpx.Response(404, json={"error": "unknown"})
        items = BASES if kind == "bases" else []
        return httpx.Response(200, json={"items": items, "next": None})

    settings = sync_settings(make_settings, db_url, "http://ce.test")
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        result = sync(engine, settings, client)

    assert calls == ["bases", "bases", "plans", "deferrals", "title-applicants"]
    assert result.kinds["bases"].inserted == 2 and result.kinds["bases"].error is None
    assert result.kinds["plans"].error is not None and result.kinds["plans"].error.startswith(
        "HTTP 404")
    assert result.version == "ref-000001" and not result.ok


def test_a_sync_that_was_overtaken_skips_its_older_data(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings]) -> None:
    revoked = {**BASES[0], "status": "revoked", "updated_at": T2}
    settings = sync_settings(make_settings, db_url, "http://ce.test")

    def newer(request: httpx.Request) -> httpx.Response:
        items = [revoked] if request.url.path.endswith("/bases") else []
        return httpx.Response(200, json={"items": items, "next": None})

    def older(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/bases"):
            # Another replica syncs (and commits) while this one is still fetching.
            with httpx.Client(transport=httpx.MockTransport(newer)) as other:
                assert sync(engine, settings, other, kinds=["bases"]).version == "ref-000001"
            return httpx.Response(200, json={"items": [BASES[0]], "next": None})
        return httpx.Response(200, json={"items": [], "next": None})

    with httpx.Client(transport=httpx.MockTransport(older)) as client:
        result = sync(engine, settings, client, kinds=["bases"])

    assert result.version is None and result.kinds["bases"].error is not None
    (base,) = rows(engine, reference_bases)
    assert base["status"] == "revoked"


def test_an_item_at_the_watermark_is_skipped_only_when_the_last_sync_took_it_unchanged(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """``since`` is inclusive: what the last sync took at the watermark comes again.

    Served again unchanged it is not applied (an ops import made since stays); an item new at
    that timestamp, one changed upstream within it, or a newer one is applied, import or not.
    """
    settings = sync_settings(make_settings, db_url, "http://ce.test")
    served: list[dict[str, Any]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        items = served if request.url.path.endswith("/bases") else []
        since = request.url.params.get("since")
        if since:  # inclusive, as the management system's API is
            items = [i for i in items if date.fromisoformat(i["updated_at"][:10])
                     >= date.fromisoformat(since[:10])]
        return httpx.Response(200, json={"items": items, "next": None})

    def import_status(status: str) -> None:
        path = tmp_path / "bases.csv"
        path.write_text("code,name,level,status,assessed_on\n"
                        f"QHJD-001,{BASES[0]['name']},provincial,{status},2024-06-30\n",
                        encoding="utf-8")
        assert import_csv(engine, "bases", path, actor="ops-ma", keys=KEYS).updated == 1

    def stored() -> dict[str, tuple[str, str]]:
        return {r["code"]: (r["status"], r["name"]) for r in rows(engine, reference_bases)}

    with httpx.Client(transport=httpx.MockTransport(upstream)) as client:
        served[:] = [BASES[0]]
        assert sync(engine, settings, client).version == "ref-000001"
        import_status("revoked")

        # QHJD-001 again as the last sync took it, and QHJD-002 new at the same timestamp.
        served[:] = [BASES[0], BASES[1]]
        result = sync(engine, settings, client)
        assert result.ok and result.version == "ref-000003"
        run = result.kinds["bases"]
        assert (run.fetched, run.inserted, run.updated, run.unchanged) == (2, 1, 0, 1)
        assert stored()["QHJD-001"][0] == "revoked" and "QHJD-002" in stored()
        assert (quiet := sync(engine, settings, client)).ok and quiet.version is None
        assert stored()["QHJD-001"][0] == "revoked"

        # Changed upstream within the same timestamp: upstream's word wins over the import.
        served[:] = [{**BASES[0], "name": "青海省高原生态继续教育基地（更名）"}, BASES[1]]
        assert sync(engine, settings, client).version == "ref-000004"
        assert stored()["QHJD-001"] == ("active", "青海省高原生态继续教育基地（更名）")

        # Changed upstream later (a newer timestamp): it wins over an import made before.
        import_status("revoked")
        served[:] = [{**BASES[0], "status": "active", "updated_at": T2}, BASES[1]]
        result = sync(engine, settings, client)
        assert result.version == "ref-000006" and result.kinds["bases"].watermark == T2
        assert stored()["QHJD-001"] == ("active", BASES[0]["name"])
        import_status("revoked")
        assert sync(engine, settings, client).version is None  # only what it took at T2 again
        assert stored()["QHJD-001"][0] == "revoked"


# -- CSV import -------------------------------------------------------------------------------

def test_import_csv_takes_good_rows_and_names_bad_ones(
        db_url: str, engine: Engine) -> None:
    result = import_csv(engine, "bases", FIXTURES / "bases.csv", actor="op-alice", keys=KEYS)

    assert (result.rows, result.valid, result.inserted, result.version) == (7, 3, 3, "ref-000001")
    assert [(e.row, e.field) for e in result.errors] == [
        (4, "level"), (5, "status"), (5, "assessed_on"), (7, "code"), (8, "code")]
    assert result.errors[0].message == "Input should be 'national' or 'provincial'"
    assert result.errors[2].message == "Value error, must be an ISO date (YYYY-MM-DD)"
    assert result.errors[3].message == "Field required"
    assert result.errors[4].message == "same code as row 2"
    assert not result.ok and result.error is None
    assert {r["code"]: r["status"] for r in rows(engine, reference_bases)} == {
        "QHJD-001": "active", "QHJD-002": "active", "QHJD-005": "revoked"}
    (version,) = rows(engine, reference_versions)
    assert (version["source"], version["kinds"], version["actor"], version["cursors"]) == (
        "import", "bases", "op-alice", None)

    again = import_csv(engine, "bases", FIXTURES / "bases.csv", actor="op-alice", keys=KEYS)

    assert (again.version, again.unchanged, again.inserted) == (None, 3, 0)
    imported = [(a, d) for k, a, d in audit_kinds(engine) if k == "reference_imported"]
    assert [(a, d["version"], d["inserted"], d["refused_rows"]) for a, d in imported] == [
        ("op-alice", "ref-000001", 3, 4), ("op-alice", None, 0, 4)]
    assert imported[0][1]["file"] == "bases.csv"
    assert_chain_ok(engine)


def test_import_plans_deferrals_and_title_applicants(db_url: str, engine: Engine) -> None:
    plans = import_csv(engine, "plans", FIXTURES / "plans.csv", actor="op", keys=KEYS)
    deferrals = import_csv(engine, "deferrals", FIXTURES / "deferrals_gb18030.csv", actor="op", keys=KEYS)
    applicants = import_csv(engine, "title_applicants", FIXTURES / "title_applicants_utf8bom.csv",
                            actor="op", keys=KEYS)

    assert [(e.row, e.field) for e in plans.errors] == [
        (4, "hours"), (4, "ends_on"), (4, "filed_on"), (5, "category"), (5, "hours"),
        (5, "filed_on")]
    assert plans.errors[1].message == "Value error, is before starts_on"
    assert [(e.row, e.field, e.message) for e in deferrals.errors] == [
        (5, "reason", "Input should be 'post_transfer', 'illness' or 'pregnancy'"),
        (6, "id_number", "same id_number and from_year as row 3")]
    assert [(e.row, e.field) for e in applicants.errors] == [(4, "id_number"), (5, "year")]
    assert [(r.kind, r.valid, r.version) for r in (plans, deferrals, applicants)] == [
        ("plans", 2, "ref-000001"), ("deferrals", 3, "ref-000002"),
        ("title-applicants", 2, "ref-000003")]
    assert {r["id_masked"] for r in rows(engine, reference_deferrals)} == {
        "630102********9126", "632123********101X"}
    assert {r["person_key"] for r in rows(engine, reference_title_applicants)} == {
        KEYS.of("resident_id", ID_A), KEYS.of("resident_id", ID_B)}
    assert_chain_ok(engine)
    assert_no_clear_ids(engine, db_url, ID_A, ID_B)


def test_import_refuses_a_file_without_the_columns(tmp_path: Path, engine: Engine) -> None:
    path = tmp_path / "bases.csv"
    path.write_text("code,name\nQHJD-001,x\n", encoding="utf-8")

    result = import_csv(engine, "bases", path, actor="op", keys=KEYS)

    assert result.error == "row 1: missing column(s) level, status, assessed_on"
    assert result.version is None and count(engine, reference_bases) == 0
    assert import_csv(engine, "bases", tmp_path / "nope.csv", actor="op", keys=KEYS).error
    with pytest.raises(UnknownReferenceKind):
        import_csv(engine, "teachers", path, actor="op", keys=KEYS)


# -- read side --------------------------------------------------------------------------------

def test_store_reference_answers_the_rules_lookups(engine: Engine) -> None:
    for kind, name in (("bases", "bases.csv"), ("plans", "plans.csv"),
                       ("deferrals", "deferrals_gb18030.csv"),
                       ("title-applicants", "title_applicants_utf8bom.csv")):
        import_csv(engine, kind, FIXTURES / name, actor="op", keys=KEYS)

    with engine.connect() as conn:
        ref = StoreReference.load(conn, KEYS)

    assert ref.version == "ref-000004"
    assert ref.base("QHJD-002") == BaseInfo("QHJD-002", "国家级专业技术人员继续教育基地（青海大学）",
                                            "national", "active", date(2023, 12, 1))
    assert ref.base("QHJD-404") is None
    assert ref.plan("PLAN-2026-002") == PlanInfo(
        "PLAN-2026-002", "QHJD-002", "公需科目专题讲座", "public", Decimal("12.5"),
        date(2026, 6, 1), date(2026, 6, 2), date(2026, 7, 31))
    assert ref.deferral(ID_A, 2025) == DeferralInfo(2025, "post_transfer", date(2026, 1, 5))
    assert ref.deferral(ID_B.lower(), 2026) == DeferralInfo(2026, "pregnancy", date(2026, 2, 1))
    assert ref.deferral(ID_A, 2026) is None
    assert ref.is_title_applicant(ID_A, 2026) and ref.is_title_applicant(ID_B, 2026)
    assert not ref.is_title_applicant(ID_A, 2025)
    assert StoreReference(KEYS).version == "none"
    built = StoreReference.of(KEYS, deferrals=[(ID_A, DeferralInfo(2025, "illness", date(2026, 1, 1)))],
                              title_applicants=[(ID_B, 2026)])
    assert built.deferral(ID_A, 2025) is not None and built.is_title_applicant(ID_B, 2026)


def test_reference_cache_reloads_only_after_a_new_version(engine: Engine) -> None:
    cache = ReferenceCache(engine, KEYS)
    empty = cache.current()
    assert empty.version == "none" and cache.current() is empty and cache.loads == 1

    import_csv(engine, "bases", FIXTURES / "bases.csv", actor="op", keys=KEYS)
    first = cache.current()
    assert first.version == "ref-000001" and first.base("QHJD-001") is not None
    with engine.connect() as conn:
        assert cache.current(conn) is first
    assert cache.loads == 2

    import_csv(engine, "bases", FIXTURES / "bases.csv", actor="op", keys=KEYS)  # no change, no version
    assert cache.current() is first and cache.loads == 2

    import_csv(engine, "plans", FIXTURES / "plans.csv", actor="op", keys=KEYS)
    seen: list[StoreReference] = []
    threads = [threading.Thread(target=lambda: seen.append(cache.current())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.version for r in seen} == {"ref-000002"} and len({id(r) for r in seen}) == 1
    assert cache.loads == 3


def test_person_keys_join_with_the_records_digest() -> None:
    submission = CESubmission.model_validate({
        "source_record_id": "JD-1", "person": {"id_type": "resident_id", "id_number": ID_B,
                                               "name": "赵伟",
                                               "region_code": "630200"},
        "year": 2026, "category": "professional", "activity_type": "training",
        "activity": {"title": "研修班", "mode": "offline", "started_on": "2026-05-10",
                     "completed_on": "2026-05-13"},
        "claimed": {"quantity": "24", "unit": "hours", "details": {}},
        "evidence": {"assessment": "passed"}})
    assert KEYS.of("resident_id", ID_B.lower()) == person_key(submission, KEYS)


def test_the_sync_job_is_registered(db_url: str, engine: Engine,
                                    make_settings: Callable[..., Settings]) -> None:
    assert JOBS[REFERENCE_SYNC_JOB.name] is REFERENCE_SYNC_JOB
    settings = make_settings(db_url, reference_sync_interval_seconds=3600)
    assert REFERENCE_SYNC_JOB.interval_seconds(settings) == 3600
    assert REFERENCE_SYNC_JOB.interval_seconds(make_settings(db_url)) == 0  # tests' default: off
    scheduler = build_scheduler(engine, settings)
    job = scheduler.get_job("reference:sync")
    assert job is not None and job.args == (engine, settings, REFERENCE_SYNC_JOB)


def test_concurrent_writers_take_distinct_versions(engine: Engine) -> None:
    files = [("bases", "bases.csv"), ("plans", "plans.csv"),
             ("deferrals", "deferrals_gb18030.csv"),
             ("title-applicants", "title_applicants_utf8bom.csv")]
    versions: list[str | None] = []
    barrier = threading.Barrier(len(files))

    def run(kind: str, name: str) -> None:
        barrier.wait()
        versions.append(import_csv(engine, kind, FIXTURES / name, actor="op", keys=KEYS).version)

    threads = [threading.Thread(target=run, args=pair) for pair in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(v or "" for v in versions) == [f"ref-00000{i}" for i in range(1, 5)]
    assert_chain_ok(engine)
