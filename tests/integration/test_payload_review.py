"""Review: what the management system receives, read from its side (SPEC §3 CERecord, §5 Downstream).

Earlier reviews checked that each record version arrives once and in order; this one reads the
*content*.  One gateway (uvicorn, delivery worker and batch processor in process) on SQLite and on
PostgreSQL is fed by every partner family at once — canonical POSTs, a training base's native
push, a health GB18030 CSV and a finance XLSX monthly batch, the Cadre Network College pull — and
the bodies the mock management system (``mock_partners/ce_system.py``) received are read back from
``/_mock/applied/{record_id}`` and checked field by field:

- every body validates as the committed contract (``contracts/schema/CERecord.v1.json``: the
  ``jsonschema`` package when installed, else pydantic ``CERecord.model_validate``, which forbids
  unknown keys at every level);
- SPEC §3's fields with the right JSON types: ``record_id`` stable across versions, ``source``
  (``batch_id`` set exactly for batch files, ``received_at`` with an offset), the whole identity
  number, ISO dates, quantities and hours as Decimal-safe JSON (strings, never floats), hours with
  at most one decimal place;
- ``review_authority`` per R13 and the notice's appendix (the five self-reviewing units by
  employer, health → 省卫健委, accountants → 省财政厅, publishing / news, the eight prefectures);
- conversions and caps in ``rule_notes`` (health × 3.6, finance × 1, cadre hours as sent; R3–R6
  CAP_APPLIED), a correction's and a withdrawal's versions.

Findings: ``activity.plan_id`` carries the college's course id and the health commission's CME
project number, not only a base's filed plan (SPEC §3) — kept (it is part of the activity
identity) and now described in the contract; a withdrawn version's ``rule_notes`` still
explained the old hours and none its 0 h — it now carries one ``WITHDRAWN`` note.  Everything else read
right: the contract (no unknown key), whole identity numbers, offsets on every time, hours as
strings with one place (10.85 → "10.9"), R13 for all fifteen appendix offices and the
publishing / news authorities, ×3.6 / ×1 notes, the caps and their re-allocation on withdrawal.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from adapters.normalize import parse_decimal
from contracts import CERecord
from gateway.accounts import Partner, add_partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.pipeline.review import OFFICE_BY_CODE, OFFICES, Route
from gateway.pull.cadre_college import pull_once
from gateway.secrets_box import SecretBox
from gateway.signing import SigningClient
from gateway.store.db import make_engine
from gateway.store.tables import outbox
from mock_partners import cadre_college as college_mock
from mock_partners import files
from mock_partners import training_base as tb
from mock_partners.ce_system import Faults
from mock_partners.ce_system import create_app as create_mock
from mock_partners.generators import make_id_number
from tests.conftest import PG_ENV, SECRET_KEY, _migrated_sqlite
from tests.support.reference import load_base_and_plan
from tests.support.servers import poll, uvicorn_thread

YEAR = 2026
BASE, PLAN = "QHJD-PAY", "PLAN-2026-PAY"
ROOT = Path(__file__).resolve().parents[2]
SEED = Path("/work/shared/seed/000_9628381a5d794783.txt")
ONE_PLACE = re.compile(r"^(0|[1-9][0-9]*)(\.[0-9])?$")
ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")

# R13 by prefecture: the eight Qinghai prefecture codes of SPEC §3 and the appendix's bureau.
PREFECTURES = {"630100": "西宁市人社局", "630200": "海东市人社局", "632200": "海北州人社局",
               "632300": "黄南州人社局", "632500": "海南州人社局", "632600": "果洛州人社局",
               "632700": "玉树州人社局", "632800": "海西州人社局"}
# R13 self-reviewing units (七(四)4 "自主审核单位（青海大学、青海师范大学、青海民族大学、青海开放大学、
# 青海日报社）"): employer name as staff write it → the appendix's unit.
UNITS = {"青海大学": "青海大学", "青海师范大学": "青海师范大学", "青海民族大学": "青海民族大学",
         "青海开放大学": "青海开放大学", "青海日报社": "青海日报社",
         "青海大学医学院": "青海大学",  # a school of the university
         "青海师范大学教育学院": "青海师范大学"}


# -- the world: one gateway, every family --------------------------------------------------------


@dataclass
class World:
    mock_url: str
    partners: dict[str, Partner]
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # canonical sid → answer
    routed: dict[str, tuple[str, str]] = field(default_factory=dict)  # sid → (route, key)
    batches: dict[str, str] = field(default_factory=dict)  # adapter → batch id
    native: dict[str, dict[str, Any]] = field(default_factory=dict)  # (adapter) sid → row
    withdrawn_sid: str = ""
    corrected_sid: str = ""
    _bodies: list[dict[str, Any]] = field(default_factory=list)
    college: college_mock.CollegeState | None = None
    health_withdrawn: str = ""

    def bodies(self) -> list[dict[str, Any]]:
        """Every body the mock applied (read once: nothing is delivered after the drive)."""
        if not self._bodies:
            applied = httpx.get(f"{self.mock_url}/_mock/applied").json()["applied"]
            for rid in dict.fromkeys(a["record_id"] for a in applied):
                self._bodies.extend(self.versions(rid))
        return [json.loads(json.dumps(b)) for b in self._bodies]

    def versions(self, record_id: str) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.mock_url}/_mock/applied/{record_id}").json()
        return [dict(v["record"]) for v in reply["versions"]]

    def by_sid(self, adapter: str, sid: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies()
                if b["source"]["adapter"] == adapter and b["source"]["source_record_id"] == sid]

    def first(self, adapter: str, sid: str) -> dict[str, Any]:
        found = [b for b in self.by_sid(adapter, sid) if b["version"] == 1]
        assert len(found) == 1, (adapter, sid)
        return found[0]

    def last(self, adapter: str, sid: str) -> dict[str, Any]:
        found = self.by_sid(adapter, sid)
        assert found, (adapter, sid)
        return max(found, key=lambda b: b["version"])


def settings_for(db_url: str, mock_url: str, tmp: Path, **more: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url, "downstream_url": mock_url, "secret_key": SECRET_KEY,
        "retry_schedule": (1, 1, 1), "inline_retries": 2, "inline_retry_max_wait_seconds": 0.05,
        "delivery_poll_seconds": 0.05, "delivery_lease_seconds": 5,
        "circuit_failure_threshold": 50, "circuit_reset_seconds": 0.5,
        "downstream_timeout_seconds": 30, "pull_interval_seconds": 0,
        "reference_sync_interval_seconds": 0, "retention_interval_seconds": 0,
        "alert_interval_seconds": 0, "batch_dir": tmp / "batches", "batch_parse_workers": 0,
        "pull_page_size": 25, "pull_retry_max_wait_seconds": 0.2,
    }
    values.update(more)
    return Settings(**values)


def person(n: int, region: str = "630100", employer: str = "西宁市某中学", industry: str | None = None,
           uscc: str | None = None) -> dict[str, Any]:
    born = date(1970, 1, 1).toordinal() + n * 37
    p: dict[str, Any] = {"id_type": "resident_id",
                         "id_number": make_id_number(random.Random(n), region, date.fromordinal(born)),
                         "name": f"测试{n}", "employer_name": employer, "region_code": region}
    if industry:
        p["industry"] = industry
    if uscc:
        p["employer_uscc"] = uscc
    return p


def sub(sid: str, who: dict[str, Any], *, kind: str = "training", qty: str = "8",
        unit: str = "hours", details: dict[str, str] | None = None, day: int = 0,
        title: str | None = None) -> dict[str, Any]:
    done = date(YEAR, 3, 2 + day)
    return {"source_record_id": sid, "person": who, "year": YEAR, "category": "professional",
            "activity_type": kind,
            "activity": {"title": title or f"{kind} {sid}", "mode": "offline",
                         "started_on": done.isoformat(), "completed_on": done.isoformat()},
            "claimed": {"quantity": qty, "unit": unit, "details": details or {}},
            "evidence": {"certificate_no": f"C-{sid}", "assessment": "passed"}}


def canonical_batch(world: World) -> list[dict[str, Any]]:
    out = []
    n = 100
    for region in PREFECTURES:
        n += 1
        sid = f"PREF-{region}"
        out.append(sub(sid, person(n, region=region, employer=f"{region}某局"), day=n % 20))
        world.routed[sid] = ("prefecture", region)
    for employer, unit in UNITS.items():
        n += 1
        sid = f"UNIT-{n}"
        out.append(sub(sid, person(n, region="630100", employer=employer), day=n % 20))
        world.routed[sid] = ("employer", unit)
    for industry in ("health", "accounting", "publishing", "news"):
        n += 1
        sid = f"IND-{industry}"
        out.append(sub(sid, person(n, region="632800", employer="海西州某单位", industry=industry),
                       day=n % 20))
        world.routed[sid] = ("industry", industry)
    # R3–R6 caps for one person: three sole papers (cap 20), lectures 3 + 3 teaching hours
    # (× 6, cap 30), exam setting 20 + 20 (cap 30), books sole + first (cap 40).
    capped = person(200, region="630200", employer="海东市某医院")
    out += [sub(f"PAPER-{i}", capped, kind="paper", qty="1", unit="papers",
                details={"authorship": "sole"}, day=i) for i in range(3)]
    out += [sub(f"LECT-{i}", capped, kind="lecture", qty="3", unit="lecture_hours", day=5 + i)
            for i in range(2)]
    out += [sub(f"EXAM-{i}", capped, kind="exam_setting", qty="20", day=8 + i) for i in range(2)]
    out += [sub("BOOK-0", capped, kind="book", qty="1", unit="books", details={"authorship": "sole"},
                day=11),
            sub("BOOK-1", capped, kind="book", qty="1", unit="books",
                details={"authorship": "first"}, day=12)]
    # Hours with two places: credited with one (SPEC §3); a record corrected, one withdrawn.
    out.append(sub("FRACTION", person(300), qty="10.85", day=1))
    out.append(sub("TO-CORRECT", person(301), qty="8", day=2))
    out.append(sub("TO-WITHDRAW", person(302), qty="6", day=3))
    world.corrected_sid, world.withdrawn_sid = "TO-CORRECT", "TO-WITHDRAW"
    return out


def drive(db_url: str, tmp: Path) -> Iterator[World]:
    engine: Engine = make_engine(db_url)
    box = SecretBox(SECRET_KEY)
    partners = {a: add_partner(engine, box, f"pay-{a}", a, BASE if a == "training_base" else None)
                for a in ("canonical", "training_base", "health", "finance")}
    load_base_and_plan(engine, BASE, PLAN)
    college = college_mock.create_app(seed=5, initial=30, year=YEAR)
    try:
        with uvicorn_thread(create_mock(Faults(seed=1))) as mock_url, \
                uvicorn_thread(college) as college_url:
            world = World(mock_url, partners, college=college.state.mock)
            settings = settings_for(db_url, mock_url, tmp, cadre_college_url=college_url)
            with uvicorn_thread(create_app(settings, run_worker=True)) as url:
                expected = feed(world, engine, settings, url, tmp)
                wait_delivered(engine, mock_url, expected)
            yield world
    finally:
        engine.dispose()


def feed(world: World, engine: Engine, settings: Settings, url: str, tmp: Path) -> int:
    """Every family's records into the gateway; returns the number of versions to deliver."""
    expected = 0
    p = world.partners
    with SigningClient(url, p["canonical"].app_key, p["canonical"].secret) as client:
        submitted = canonical_batch(world)
        reply = client.submit(submitted)
        reply.raise_for_status()
        for answer in reply.json()["results"]:
            world.answers[answer["source_record_id"]] = answer
            assert answer["status"] == "accepted", answer
        expected += len(submitted)
        fix = next(s for s in submitted if s["source_record_id"] == world.corrected_sid)
        fixed = json.loads(json.dumps(fix))
        fixed["claimed"]["quantity"] = "12"
        again = client.submit([fixed])
        again.raise_for_status()
        assert again.json()["results"][0]["status"] == "corrected", again.text
        for sid in (world.withdrawn_sid, "PAPER-0"):
            gone = client.delete(f"/v1/records/{sid}")
            gone.raise_for_status()
            assert gone.json()["version"] == 2, gone.text
        expected += 3  # the correction, two withdrawals (and PAPER-2 re-issued, not counted)
    with SigningClient(url, p["training_base"].app_key, p["training_base"].secret) as client:
        rows = tb.results(random.Random(7), 8, year=YEAR, prefix="PAYTB")
        for row in rows:
            row["passed"] = True
            world.native[row["result_id"]] = row
        answers = tb.push(client, BASE, PLAN, rows)
        assert {a["status"] for a in answers} == {"accepted"}, answers
        expected += len(rows)
    for adapter, make_rows in (("health", files.health_rows), ("finance", files.finance_rows)):
        rows = list(make_rows(seed=31, n=12, year=YEAR, month=6, bad_ratio=0))
        key = "记录编号" if adapter == "health" else "流水号"
        for row in rows:
            world.native[str(row[key])] = row
        if adapter == "health":
            path = tmp / "health_2026-06.csv"
            files.write_csv(path, rows, files.HEALTH_HEADERS, encoding="gb18030")
        else:
            path = tmp / "finance_2026-06.xlsx"
            files.write_xlsx(path, rows, files.FINANCE_HEADERS)
        with SigningClient(url, p[adapter].app_key, p[adapter].secret) as client:
            up = client.upload_batch(path, adapter=adapter, kind="monthly", period=f"{YEAR}-06")
            assert up.status_code == 202, up.text
            batch_id = up.json()["batch_id"]
            world.batches[adapter] = batch_id

            def done(client: SigningClient = client, batch_id: str = batch_id) -> Any:
                body = client.get(f"/v1/batches/{batch_id}").json()
                return body if body["status"] in ("done", "failed") else None

            status = poll(done, 60, what=f"{adapter} batch")
            assert status["counts"]["accepted"] == len(rows), status
            if adapter == "health":
                world.health_withdrawn = str(rows[1]["记录编号"])
                gone = client.delete(f"/v1/records/{world.health_withdrawn}")
                gone.raise_for_status()
                expected += 1
        expected += len(rows)
    pulled = pull_once(engine, settings)
    assert pulled.error is None and pulled.accepted == 30, pulled
    return expected + pulled.accepted


def wait_delivered(engine: Engine, mock_url: str, expected: int) -> None:
    def drained() -> bool:
        with engine.connect() as conn:
            statuses = [r.status for r in conn.execute(select(outbox.c.status))]
        if "pending" in statuses:
            return False
        return len(httpx.get(f"{mock_url}/_mock/applied").json()["applied"]) >= expected

    poll(drained, 120, what=f"{expected} deliveries")


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"payload-{request.param}")
    if request.param == "sqlite":
        url = _migrated_sqlite(request.getfixturevalue("_sqlite_template"), tmp)
        yield from drive(url, tmp)
        return
    import os
    if not os.environ.get(PG_ENV):
        pytest.skip(f"needs {PG_ENV}")
    schemas = request.getfixturevalue("_postgres_schemas")
    url = schemas.take()
    try:
        yield from drive(url, tmp)
    finally:
        schemas.give_back(url)


# -- helpers on bodies ---------------------------------------------------------------------------


def dec(value: Any) -> Decimal:
    return Decimal(str(value))


def notes(body: dict[str, Any], key: str = "rule_notes") -> dict[str, str]:
    return {n["code"]: n["message"] for n in body[key]}


def aware(text: str) -> bool:
    return datetime.fromisoformat(text).utcoffset() is not None


# -- the contract ---------------------------------------------------------------------------------


def test_every_body_is_the_committed_contract_and_nothing_more(world: World) -> None:
    bodies = world.bodies()
    assert len({b["source"]["adapter"] for b in bodies}) == 5
    schema = json.loads((ROOT / "contracts" / "schema" / "CERecord.v1.json").read_text())
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        jsonschema = None
    for body in bodies:
        if jsonschema is not None:
            jsonschema.validate(body, schema)
        CERecord.model_validate(body)  # extra="forbid" at every level: no unknown key
        assert set(body) <= set(schema["properties"]), set(body) - set(schema["properties"])


def test_identity_source_and_times(world: World) -> None:
    for body in world.bodies():
        adapter = body["source"]["adapter"]
        assert isinstance(body["record_id"], str) and body["record_id"]
        assert isinstance(body["version"], int) and body["version"] >= 1
        assert isinstance(body["withdrawn"], bool)
        src = body["source"]
        assert src["partner_id"] == (world.partners[adapter].partner_id
                                     if adapter in world.partners else src["partner_id"])
        assert isinstance(src["received_at"], str) and aware(src["received_at"]), src
        if adapter in ("health", "finance"):
            assert src["batch_id"] == world.batches[adapter]
        else:
            assert src["batch_id"] is None, src
        who = body["person"]
        assert who["id_type"] == "resident_id"
        # downstream needs the whole number: 18 characters, never masked
        assert re.fullmatch(r"[0-9]{17}[0-9X]", who["id_number"]), who["id_number"]
        assert who["name"] and re.fullmatch(r"[0-9]{6}", who["region_code"])
        assert isinstance(body["year"], int) and body["year"] == YEAR
        assert ISO_DATE.match(body["activity"]["completed_on"])
        if body["activity"]["started_on"] is not None:
            assert ISO_DATE.match(body["activity"]["started_on"])
        assert body["activity"]["mode"] in ("online", "offline", "mixed")
        assert body["evidence"]["assessment"] in ("passed", "failed", "none")


def test_record_id_is_stable_across_versions_and_versions_count_up(world: World) -> None:
    for sid in (world.corrected_sid, world.withdrawn_sid):
        found = world.by_sid("canonical", sid)
        assert sorted(b["version"] for b in found) == [1, 2]
        assert {b["record_id"] for b in found} == {world.answers[sid]["record_id"]}


def test_hours_and_quantities_are_decimal_strings_with_one_place(world: World) -> None:
    """SPEC §3: "Hours are Decimal with at most one decimal place, never float"."""
    for body in world.bodies():
        hours, qty = body["credited_hours"], body["claimed"]["quantity"]
        assert isinstance(hours, str), (body["source"], hours)
        assert ONE_PLACE.match(hours), (body["source"], hours)
        assert isinstance(qty, str) and dec(qty) >= 0, (body["source"], qty)
        assert "e" not in qty.lower() and "e" not in hours.lower()


def test_two_place_hours_are_credited_with_one(world: World) -> None:
    body = world.last("canonical", "FRACTION")
    assert body["claimed"]["quantity"] == "10.85"
    assert body["credited_hours"] == "10.9"  # half up, one place


# -- R13 review authority ----------------------------------------------------------------------


def appendix() -> dict[int, tuple[str, str, str]]:
    rows = re.findall(r"^\| (\d+) \| (\S+) \| (\S+) \| (\S+) \|", SEED.read_text(encoding="utf-8"),
                      re.M)
    return {int(seq): (name, division, phone) for seq, name, division, phone in rows}


def test_offices_are_the_notice_s_appendix() -> None:
    listed = appendix()
    assert len(listed) == 15
    ours = {o.seq: (o.name_zh, o.division_zh, o.phone) for o in OFFICES if o.seq is not None}
    assert ours == listed
    for office in OFFICES:
        if office.route is Route.PREFECTURE:
            assert PREFECTURES[office.keys[0]] == office.name_zh


def test_review_authority_of_each_route(world: World) -> None:
    wrong = {}
    for sid, (route, key) in world.routed.items():
        code = world.last("canonical", sid)["review_authority"]
        office = OFFICE_BY_CODE.get(code)
        if route == "prefecture":
            ok = office is not None and office.name_zh == PREFECTURES[key]
        elif route == "employer":
            ok = office is not None and office.name_zh == key
        else:
            ok = office is not None and office.route is Route.INDUSTRY and key in office.keys
        if not ok:
            wrong[sid] = code
    assert wrong == {}
    assert world.last("canonical", "IND-health")["review_authority"] == "QH-HEALTH"
    assert OFFICE_BY_CODE["QH-HEALTH"].name_zh == "省卫健委"
    assert OFFICE_BY_CODE["QH-FINANCE"].name_zh == "省财政厅"


def test_health_and_finance_batches_go_to_their_commission(world: World) -> None:
    for adapter, code in (("health", "QH-HEALTH"), ("finance", "QH-FINANCE")):
        found = [b for b in world.bodies() if b["source"]["adapter"] == adapter]
        assert len({b["record_id"] for b in found}) == 12
        for body in found:
            assert body["review_authority"] == code, (adapter, body["person"]["employer_name"])


def test_other_families_go_by_employer_or_prefecture(world: World) -> None:
    for body in world.bodies():
        if body["source"]["adapter"] not in ("training_base", "cadre_college"):
            continue
        who = body["person"]
        office = OFFICE_BY_CODE[body["review_authority"]]
        if office.route is Route.PREFECTURE:
            assert who["region_code"][:4] in (office.keys[0][:4], "6321"), (who, office.code)
        else:
            assert office.route is Route.EMPLOYER, (who, office.code)
            assert who["employer_name"].startswith(office.keys)


# -- conversions, caps, corrections and withdrawals ---------------------------------------------


def test_health_and_finance_credits_convert_with_the_note(world: World) -> None:
    for adapter, rate in (("health", Decimal("3.6")), ("finance", Decimal(1))):
        for body in (b for b in world.bodies()
                     if b["source"]["adapter"] == adapter and not b["withdrawn"]):
            native = world.native[body["source"]["source_record_id"]]
            credits = parse_decimal(native["学分"])
            assert body["claimed"]["unit"] == "credits"
            assert dec(body["claimed"]["quantity"]) == credits
            want = (credits * rate).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
            assert dec(body["credited_hours"]) == want
            note = notes(body).get("CREDIT_CONVERSION", "")
            assert str(rate) in note and str(want) in note, note
            assert body["person"]["industry"] == ("health" if adapter == "health" else "accounting")
            if adapter == "health":
                assert body["claimed"]["details"].get("credit_class") in ("I", "II")


def test_cadre_hours_as_sent_and_public(world: World) -> None:
    found = [b for b in world.bodies() if b["source"]["adapter"] == "cadre_college"]
    assert len(found) == 30
    for body in found:
        assert (body["category"], body["activity_type"]) == ("public", "online_course")
        assert body["activity"]["mode"] == "online"
        assert body["claimed"]["unit"] == "hours"
        assert dec(body["credited_hours"]) == dec(body["claimed"]["quantity"])


def test_training_base_names_base_and_plan(world: World) -> None:
    found = [b for b in world.bodies() if b["source"]["adapter"] == "training_base"]
    assert len(found) == 8
    for body in found:
        native = world.native[body["source"]["source_record_id"]]
        assert (body["activity"]["provider_code"], body["activity"]["plan_id"]) == (BASE, PLAN)
        assert body["person"]["id_number"] == native["id_no"]
        assert body["person"]["employer_name"] == native["employer"]
        assert (body["activity"]["started_on"], body["activity"]["completed_on"]) == (
            native["started_on"], native["completed_on"])
        assert dec(body["credited_hours"]) == dec(native["hours"])
        assert body["evidence"] == {"certificate_no": native["certificate_no"],
                                    "assessment": "passed"}


@pytest.mark.parametrize(("prefix", "n", "cap", "each"), [
    ("PAPER", 3, "20", "10"), ("LECT", 2, "30", "18"), ("EXAM", 2, "30", "20"),
    ("BOOK", 2, "40", None),
])
def test_caps_reduce_credited_hours_with_a_note(world: World, prefix: str, n: int, cap: str,
                                                each: str | None) -> None:
    found = [world.first("canonical", f"{prefix}-{i}") for i in range(n)]
    total = sum(dec(b["credited_hours"]) for b in found)
    assert total == Decimal(cap), [b["credited_hours"] for b in found]
    cut = [b for b in found if "CAP_APPLIED" in notes(b)]
    assert cut, "no CAP_APPLIED rule note"
    for body in cut:
        assert "CAP_APPLIED" in notes(body, "warnings")
        assert cap in notes(body)["CAP_APPLIED"]
    if each is not None:
        assert dec(found[0]["credited_hours"]) == Decimal(each)


def test_a_correction_carries_the_new_hours(world: World) -> None:
    first, second = sorted(world.by_sid("canonical", world.corrected_sid), key=lambda b: b["version"])
    assert (dec(first["credited_hours"]), dec(second["credited_hours"])) == (8, 12)
    assert dec(second["claimed"]["quantity"]) == 12
    assert second["withdrawn"] is False


def test_a_withdrawal_says_withdrawn_and_zero_hours(world: World) -> None:
    first, second = sorted(world.by_sid("canonical", world.withdrawn_sid), key=lambda b: b["version"])
    assert first["withdrawn"] is False and dec(first["credited_hours"]) == 6
    assert second["withdrawn"] is True
    assert dec(second["credited_hours"]) == 0
    assert second["person"] == first["person"] and second["activity"] == first["activity"]
    assert aware(second["source"]["received_at"])


def test_a_withdrawn_paper_gives_its_capped_hours_back(world: World) -> None:
    """R10: the cap group is allocated again; the re-issued version no longer says it was cut."""
    gone = world.last("canonical", "PAPER-0")
    assert (gone["version"], gone["withdrawn"], dec(gone["credited_hours"])) == (2, True, 0)
    gained = world.last("canonical", "PAPER-2")
    assert gained["version"] == 2 and gained["withdrawn"] is False
    assert gained["record_id"] == world.first("canonical", "PAPER-2")["record_id"]
    assert dec(gained["credited_hours"]) == 10
    assert "CAP_APPLIED" not in notes(gained) and "CAP_APPLIED" not in notes(gained, "warnings")
    assert "CONVERSION" in notes(gained)


def test_cadre_completion_day_is_the_beijing_day_of_wcsj(world: World) -> None:
    assert world.college is not None
    native = {world.college.xh(seq): world.college.completion(seq) for seq in range(1, 31)}
    for body in (b for b in world.bodies() if b["source"]["adapter"] == "cadre_college"):
        item = native[body["source"]["source_record_id"]]
        assert body["activity"]["completed_on"] == item["wcsj"][:10], item["wcsj"]
        assert body["year"] == int(item["wcsj"][:4])
        assert body["person"]["id_number"] == item["sfzh"]
        assert body["person"]["employer_name"] == item["dwmc"]
        assert dec(body["claimed"]["quantity"]) == dec(item["xs"])
        assert body["evidence"]["certificate_no"] == item["zsbh"]


def test_finance_subject_and_study_mode(world: World) -> None:
    modes = {"面授": ("offline", "training"), "网络": ("online", "online_course"),
             "其他": ("mixed", "training")}
    found = [b for b in world.bodies() if b["source"]["adapter"] == "finance"]
    assert {b["category"] for b in found} == {"public", "professional"}
    for body in found:
        native = world.native[body["source"]["source_record_id"]]
        want = "public" if native["科目类别"] == "公需科目" else "professional"
        assert body["category"] == want
        assert (body["activity"]["mode"], body["activity_type"]) == modes[native["学习方式"]]
        assert body["person"]["employer_uscc"] == (native["统一社会信用代码"] or None)


def test_plan_id_is_a_filed_plan_from_a_base_and_the_contract_says_what_it_is_elsewhere(
        world: World) -> None:
    """The review found plan_id carrying the college's course id and the CME project number.

    SPEC §3 names it for a base's filed plan (备案, R9).  The other adapters' numbers stay in it
    (the activity identity, the dedup key, includes it: moving them would re-key every stored
    record), so the contract's field description says what it holds by adapter.
    """
    schema = json.loads((ROOT / "contracts" / "schema" / "CERecord.v1.json").read_text("utf-8"))
    described = schema["$defs"]["Activity"]["properties"]["plan_id"]["description"]
    assert "kcbh" in described and "项目编号" in described and "备案" in described
    seen = {}
    for body in world.bodies():
        seen.setdefault(body["source"]["adapter"], set()).add(body["activity"]["plan_id"])
    assert None not in seen["training_base"] and None not in seen["cadre_college"]
    assert seen["finance"] == {None}


def test_a_withdrawn_health_record_says_withdrawn_with_no_hours(world: World) -> None:
    first, second = sorted(world.by_sid("health", world.health_withdrawn), key=lambda b: b["version"])
    assert first["record_id"] == second["record_id"] and second["version"] == 2
    assert second["withdrawn"] is True and dec(second["credited_hours"]) == 0
    assert second["source"]["batch_id"] == world.batches["health"]  # the batch it came in
    assert aware(second["source"]["received_at"])
    assert (second["person"], second["activity"], second["claimed"]) == (
        first["person"], first["activity"], first["claimed"])


def test_a_withdrawn_version_s_rule_notes_explain_its_zero_hours(world: World) -> None:
    for body in (world.last("health", world.health_withdrawn),
                 world.last("canonical", world.withdrawn_sid)):
        assert body["withdrawn"] is True
        said = " ".join(n["message"] + " " + (n.get("message_zh") or "") for n in body["rule_notes"])
        assert re.search(r"withdr|撤", said, re.I), body["rule_notes"]
        for note in body["rule_notes"]:
            if note["code"] in ("CREDIT_CONVERSION", "CONVERSION"):
                assert "0 h" in note["message"] or "withdr" in note["message"].lower(), note
