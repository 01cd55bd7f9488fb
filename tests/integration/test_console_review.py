"""Review: the operator console's actions and pages while the gateway goes on working.

Three of the console's acting forms decide on what one request showed and act in another: the
reprocess preview ("将重新投递 N 条") and its confirmation, the edit form of a dead record and
its POST, the conflict page and its resolution.  Between the two a partner's correction or the
delivery worker commits.  These cases are sequential (a real write between two real HTTP
requests), so they run on SQLite and PostgreSQL alike.

Two pages read several statements on PostgreSQL's READ COMMITTED (on SQLite the gateway's
engine reads under ``BEGIN IMMEDIATE``, so nothing commits in between): a real gateway write is
committed from another engine at a scripted statement of the page's read, the technique of
``tests/integration/test_snapshot_review.py``, on the engine of the app that serves the page.
That same ``BEGIN IMMEDIATE`` makes the console's audit check hold SQLite's write lock for its
whole walk.

Each finding was a strict xfail naming the bug, failing on the code before its fix (now fixed:
the reprocess ceiling is the audit head at the preview; the edit and conflict forms carry the
version shown, RECORD_CHANGED otherwise; the record page and dashboard read one snapshot; the
audit check reads through ``store.db.reading``):
1. a reprocess confirmation requeued a delivery that died after its preview;
2. an edit form submitted after a partner's correction reverted the correction;
3. a conflict was resolved for a version the operator was not shown;
4. the record page shows one version's content with another version's delivery (PostgreSQL);
5. the dashboard's backlog tile and status table disagree (PostgreSQL);
6. the audit check holds SQLite's write lock for its whole walk;
7. a list (deliveries, rejections; API and console) counted one moment and showed another's
   rows on PostgreSQL, and held SQLite's write lock while it read (now read in one snapshot);
8. /readyz, /metrics and operators' sign-in read under SQLite's write lock, so a long write
   held them up to the 60 s busy timeout (now read through ``reading`` or ``snapshot``).

Hostile input (integers past 2**63, NUL, over-long and non-UTF-8 values in query strings, form
fields, raw urlencoded and multipart bodies, cookies) was tried on every console route: none
answered a 500; ``test_hostile_input_never_answers_500`` keeps that set.
"""

from __future__ import annotations

import copy
import random
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
import pytest
from sqlalchemy import Engine, event, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.ops.edits import SUBMISSION_KEYS
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.tables import outbox, record_versions, records, rejections
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.integration.test_console import (
    CSRF,
    World,
    _client,
    _logged_in,
    _login,
    world,
)
from tests.support.servers import uvicorn_thread

__all__ = ["world"]  # the fixture, imported from test_console

MakeSettings = Callable[..., Settings]
HIDDEN_CEILING = re.compile(r'name="ceiling" value="(\d+)"')
MATCHED = re.compile(r'id="matched">(\d+)<')
FORM_FIELD = re.compile(r'name="([a-z_.]+)" type="[a-z]+" value="([^"]*)"')
SHOWN_VERSION = re.compile(r'<input type="hidden" name="version" value="(\d+)">')


def _current(engine: Engine, record_id: str) -> tuple[str, int, dict[str, Any]]:
    """The record's partner, current version and that version's payload."""
    with engine.connect() as conn:
        partner_id, version = conn.execute(select(records.c.partner_id, records.c.current_version)
                                           .where(records.c.record_id == record_id)).one()
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == record_id,
            record_versions.c.version == version)).scalar_one()
    return str(partner_id), int(version), orjson.loads(payload)


def _partner_resends(engine: Engine, record_id: str, change: Callable[[dict[str, Any]], None]
                     ) -> Any:
    """The record's partner sends it again, changed by ``change``: a correction (ingest)."""
    partner_id, _, stored = _current(engine, record_id)
    sub = copy.deepcopy({"source_record_id": stored["source"]["source_record_id"],
                         **{k: stored[k] for k in SUBMISSION_KEYS if k in stored}})
    change(sub)
    [answer] = ingest(engine, PartnerRef(partner_id, "canonical"), [sub])
    return answer


def _statuses(engine: Engine, record_id: str) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [(int(r.version), str(r.status)) for r in conn.execute(
            select(outbox.c.version, outbox.c.status).where(outbox.c.record_id == record_id)
            .order_by(outbox.c.version))]


# -- 1. a reprocess confirmation requeues a delivery that died after its preview --------------

def test_a_reprocess_confirmation_requeues_only_what_its_preview_counted(world: World) -> None:
    client, csrf = _logged_in(world, world.operator_token)
    # A record queued before the preview; the management system will refuse its title.
    partner_id, _, _ = _current(world.engine, world.delivered)
    late = gen.canonical_submission(random.Random(9101), "REV-LATE")
    late["activity"]["title"] = "[REJECT] 数字政府建设实务"
    world.id_numbers.append(late["person"]["id_number"])
    [queued] = ingest(world.engine, PartnerRef(partner_id, "canonical"), [late])
    assert _statuses(world.engine, queued.record_id) == [(1, "pending")]

    preview = client.post("/ops/deliveries/reprocess", data={"csrf": csrf, "step": "preview"})
    assert preview.status_code == 200, preview.text
    matched, ceiling = MATCHED.search(preview.text), HIDDEN_CEILING.search(preview.text)
    assert matched is not None and ceiling is not None
    assert int(matched.group(1)) == 2  # the two dead letters of the world, nothing else

    world.drain()  # meanwhile the worker sends the queued record: refused for good, dead
    assert _statuses(world.engine, queued.record_id) == [(1, "dead")]

    done = client.post("/ops/deliveries/reprocess", data={
        "csrf": csrf, "step": "confirm", "ceiling": ceiling.group(1), "reason": "下游已修复"})
    assert done.status_code == 200, done.text
    # Right: the two the operator was shown go back to pending, the new dead letter stays.
    assert _statuses(world.engine, queued.record_id) == [(1, "dead")], (
        "a delivery that died after the preview was requeued")
    assert "已重新排队 <strong>2</strong> 条" in done.text


# -- 2. the edit form of a dead record, submitted after a partner's correction ----------------

def test_an_edit_form_submitted_after_a_partner_correction_does_not_revert_it(
        world: World) -> None:
    client, csrf = _logged_in(world, world.operator_token)
    form = client.get(f"/ops/records/{world.dead_title}/edit")
    assert form.status_code == 200
    shown = dict(FORM_FIELD.findall(form.text))
    assert shown["activity.title"].startswith("[REJECT]") and shown["claimed.quantity"]
    before = Decimal(shown["claimed.quantity"])
    corrected = before * 2

    # The partner corrects the hours (the title still refused): version 2, dead again.
    def more_hours(sub: dict[str, Any]) -> None:
        sub["claimed"]["quantity"] = str(corrected)

    answer = _partner_resends(world.engine, world.dead_title, more_hours)
    assert (answer.status.value, answer.version) == ("corrected", 2)
    world.drain()
    assert _statuses(world.engine, world.dead_title) == [(1, "dead"), (2, "dead")]

    # The operator submits the form as they were shown it, the title fixed, nothing else.
    # (Its hidden version included, as a browser sends it.)
    version_shown = SHOWN_VERSION.search(form.text)
    assert version_shown is not None and version_shown.group(1) == "1"
    edited = client.post(f"/ops/records/{world.dead_title}/edit", data={
        **shown, "activity.title": "高原医学专题讲座", "csrf": csrf, "reason": "去掉误加的标记",
        "version": version_shown.group(1)})
    _, version, payload = _current(world.engine, world.dead_title)
    # Right: refused as stale (409), or an edit of the title alone; the partner's hours stand.
    assert edited.status_code in (200, 409), edited.text
    assert Decimal(payload["claimed"]["quantity"]) == corrected, (
        version, payload["claimed"], edited.status_code)


# -- 3. a conflict resolved in favour of a version nobody was shown ---------------------------

def test_a_conflict_is_not_resolved_for_a_version_the_operator_was_not_shown(
        world: World) -> None:
    client, csrf = _logged_in(world, world.operator_token)
    page = client.get(f"/ops/conflicts/{world.conflict}/resolve",
                      params={"other": world.delivered})
    assert page.status_code == 200 and "99" in page.text
    _, shown_version, shown = _current(world.engine, world.conflict)
    assert Decimal(shown["claimed"]["quantity"]) == 99

    def other_hours(sub: dict[str, Any]) -> None:
        sub["claimed"]["quantity"] = "150"

    answer = _partner_resends(world.engine, world.conflict, other_hours)
    assert (answer.status.value, answer.version) == ("conflict", shown_version + 1)

    version_shown = SHOWN_VERSION.search(page.text)  # the form's hidden field, as sent
    assert version_shown is not None and int(version_shown.group(1)) == shown_version
    resolved = client.post(f"/ops/conflicts/{world.conflict}/resolve", data={
        "csrf": csrf, "keep": "this", "other": world.delivered, "reason": "以本记录为准",
        "version": version_shown.group(1)})
    with world.engine.connect() as conn:
        status, holder_withdrawn = conn.execute(
            select(records.c.status, select(records.c.withdrawn)
                   .where(records.c.record_id == world.delivered).scalar_subquery())
            .where(records.c.record_id == world.conflict)).one()
    # Right: refused (the record changed since it was shown); nothing forwarded or withdrawn.
    assert (resolved.status_code, status, bool(holder_withdrawn)) == (409, "conflict", False), (
        resolved.status_code, status, holder_withdrawn)


# -- pages read in several statements (PostgreSQL READ COMMITTED) -----------------------------

@dataclass
class Live:
    """A gateway on uvicorn whose console reads through ``reader`` (the app's own engine)."""

    engine: Engine  # the test's: the injected writes commit through it
    reader: Engine
    client: httpx.Client
    partner: PartnerRef
    token: str  # the viewer's, for the API's ``Authorization: Bearer``


@pytest.fixture
def served(db_url: str, engine: Engine, make_settings: MakeSettings,
           new_partner: Callable[..., Partner], new_operator: Callable[..., str],
           mock_ce: tuple[str, Faults]) -> Iterator[Live]:
    """A viewer logged in to a gateway's console (no worker of its own)."""
    partner = PartnerRef(new_partner(engine).partner_id, "canonical")
    app = create_app(make_settings(db_url, mock_ce[0]), run_worker=False)
    with uvicorn_thread(app) as url, \
            httpx.Client(base_url=url, follow_redirects=False, timeout=30) as client:
        page = client.get("/ops/login")
        found = CSRF.search(page.text)
        assert found is not None
        token = new_operator(engine, "viewer")
        logged = client.post("/ops/login", data={"token": token, "csrf": found.group(1),
                                                 "next": "/ops"})
        assert logged.status_code == 303
        yield Live(engine, app.state.gateway.engine, client, partner, token)


@pytest.fixture
def live(db_url: str, served: Live) -> Live:
    if not db_url.startswith("postgresql"):
        pytest.skip("READ COMMITTED between statements: PostgreSQL only (on SQLite the console "
                    "reads under BEGIN IMMEDIATE, so the injected write would wait)")
    return served


def _inject(reader: Engine, due: Callable[[str], bool], write: Callable[[], None]) -> list[str]:
    """Run ``write`` once, before the first statement of ``reader`` for which ``due`` holds."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "<injected>" not in seen and due(statement):
            write()
            seen.append("<injected>")
        seen.append(statement)

    event.listen(reader, "before_cursor_execute", before)
    return seen


def test_a_record_page_never_shows_a_version_with_another_versions_delivery(
        live: Live, make_worker: Callable[..., Any]) -> None:
    sub = gen.canonical_submission(random.Random(9103), "PAGE-1")
    sub["activity"]["title"] = "[REJECT] 高原医学专题讲座"
    [first] = ingest(live.engine, live.partner, [sub])
    worker = make_worker()
    while worker.run_once():
        pass
    assert _statuses(live.engine, first.record_id) == [(1, "dead")]

    def partner_corrects() -> None:
        fixed = copy.deepcopy(sub)
        fixed["activity"]["title"] = "高原医学专题讲座"
        [answer] = ingest(live.engine, live.partner, [fixed])
        assert (answer.status.value, answer.version) == ("corrected", 2)

    # After the page read the records row, before it reads the versions.
    seen = _inject(live.reader, lambda sql: "FROM record_versions" in sql and
                   "record_versions.content_hash" in sql, partner_corrects)
    page = live.client.get(f"/ops/records/{first.record_id}")
    assert "<injected>" in seen and page.status_code == 200, page.text
    status = re.search(r'id="record-status" data-status="([a-z]+)"', page.text)
    version = re.search(r"（第 (\d+) 版）", page.text)
    assert status is not None and version is not None
    shown = (status.group(1), int(version.group(1)))
    # Right: one moment's record, before the correction or after it.
    assert shown in (("dead", 1), ("pending", 2)), shown


def test_the_dashboard_backlog_tile_and_status_table_agree(
        live: Live, make_worker: Callable[..., Any]) -> None:
    rng = random.Random(9104)
    ingest(live.engine, live.partner, [gen.canonical_submission(rng, f"DASH-{i}") for i in range(2)])
    worker = make_worker()

    def delivered() -> None:
        while worker.run_once():
            pass

    # After the outbox's counts by status, before the backlog's count.
    seen = _inject(live.reader, lambda sql: "coalesce(outbox.queued_at" in sql, delivered)
    page = live.client.get("/ops")
    assert "<injected>" in seen and page.status_code == 200, page.text
    tile = re.search(r'id="backlog-size">(\d+)<', page.text)
    table = re.search(r'status=pending">待投递</a></td><td class="num">(\d+)<', page.text)
    assert tile is not None and table is not None, page.text
    assert int(tile.group(1)) == int(table.group(1)), (tile.group(1), table.group(1))


# -- lists: the count and the page's rows at one moment ----------------------------------------

# (path, what the new submission is, how the page's rows are counted): the API answers JSON,
# the console a table whose rows carry the listed thing's id.
LISTS = [
    ("/v1/deliveries", "queued", None),
    ("/v1/rejections", "rejected", None),
    ("/ops/deliveries?status=pending", "queued", re.compile(r'<tr data-record="')),
    ("/ops/rejections", "rejected", re.compile(r'<tr data-rejection="')),
]


def _listed(served: Live, path: str, rows: re.Pattern[str] | None) -> tuple[int, int]:
    """(the total the list says, the rows it shows)."""
    if rows is None:
        answer = served.client.get(path, headers={"Authorization": f"Bearer {served.token}"})
        assert answer.status_code == 200, answer.text
        return int(answer.json()["total"]), len(answer.json()["items"])
    page = served.client.get(path)
    total = re.search(r'<strong id="total">(\d+)<', page.text)
    assert page.status_code == 200 and total is not None, page.text
    return int(total.group(1)), len(rows.findall(page.text))


@pytest.mark.parametrize(("path", "kind", "rows"), LISTS, ids=[p for p, _, _ in LISTS])
def test_a_list_counts_the_rows_it_shows_while_the_gateway_writes(
        db_url: str, served: Live, path: str, kind: str, rows: re.Pattern[str] | None) -> None:
    rng = random.Random(9105)

    def submission(n: int) -> dict[str, Any]:
        sub = gen.canonical_submission(rng, f"LIST-{kind}-{n}")
        if kind == "rejected":  # an identity number whose check digit is wrong
            last = sub["person"]["id_number"][-1]
            sub["person"]["id_number"] = sub["person"]["id_number"][:-1] + ("1" if last == "0" else "0")
        return sub

    [first] = ingest(served.engine, served.partner, [submission(0)])
    assert first.status.value == ("rejected" if kind == "rejected" else "accepted"), first
    assert _listed(served, path, rows) == (1, 1)
    landed: list[str] = []

    def a_partner_submits() -> None:
        try:
            [answer] = ingest(served.engine, served.partner, [submission(1)])
            landed.append(answer.status.value)
        except Exception as exc:  # SQLite: the list's read holds the write lock
            landed.append(f"{type(exc).__name__}: {exc}")

    counted: list[str] = []

    def after_the_count(sql: str) -> bool:  # the statement after the list's count: its rows
        if counted:
            return True
        counted.extend([sql] if "count(*)" in sql.lower() else [])
        return False

    seen = _inject(served.reader, after_the_count, a_partner_submits)
    listed = _listed(served, path, rows)
    assert "<injected>" in seen, seen
    # The submission is not held up by the read (on SQLite a list read under BEGIN IMMEDIATE
    # held the write lock: 'database is locked'), and the page is one moment's: its total counts
    # the rows it shows (before the submission: 1 and 1; PostgreSQL READ COMMITTED gave 1 and 2).
    assert landed == [first.status.value], landed
    assert listed == (1, 1), listed
    assert _listed(served, path, rows) == (2, 2)


# -- the audit check holds SQLite's write lock for its whole walk ------------------------------

def test_the_console_audit_check_does_not_hold_the_sqlite_write_lock(
        db_url: str, served: Live) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock (PostgreSQL readers take none)")
    path = db_url.removeprefix("sqlite:///")
    outcome: list[str] = []

    def a_writer_meanwhile() -> None:
        other = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            outcome.append("wrote")
        except sqlite3.OperationalError as exc:
            outcome.append(str(exc))
        finally:
            other.close()

    # While the walk reads the trail: a writer (ingest, the worker) wants the lock.
    seen = _inject(served.reader, lambda sql: "FROM audit_events" in sql, a_writer_meanwhile)
    page = served.client.get("/ops/audit")
    assert "<injected>" in seen and page.status_code == 200, page.text
    assert outcome == ["wrote"], outcome


# -- reads never queue behind a writer's lock (SQLite) --------------------------------------------

READS = ["/readyz", "/metrics", "/v1/deliveries", "/v1/rejections", "/v1/conflicts",
         "/ops/deliveries", "/ops/rejections", "/ops/conflicts", "/ops/batches"]


def test_reads_answer_while_a_writer_holds_the_sqlite_lock(db_url: str, served: Live) -> None:
    """Probes, scrapes, operators' sign-in and lists read on while a writer holds the lock.

    A batch chunk or a long ingest holds SQLite's write lock.  Each read here began ``BEGIN
    IMMEDIATE`` and waited up to the 60 s busy timeout (readyz then said 503 'not ready').
    """
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock (PostgreSQL readers take none)")
    writer = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        for path in READS:
            headers = {"Authorization": f"Bearer {served.token}"} if path.startswith("/v1") else {}
            try:
                answer = served.client.get(path, headers=headers)
            except httpx.TimeoutException:
                pytest.fail(f"{path} waited on the writer's lock")
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    finally:
        writer.execute("ROLLBACK")
        writer.close()


# -- hostile input: never a 500 ----------------------------------------------------------------

BIG = str(2**80)


def test_hostile_input_never_answers_500(world: World) -> None:
    client, csrf = _logged_in(world, world.operator_token)
    gets = [
        f"/ops/batches?page={BIG}", f"/ops/batches/{world.batch_id}?cursor={BIG}",
        "/ops/batches?page=" + "9" * 5000, "/ops/batches/%00", "/ops/batches/" + "B" * 5000,
        "/ops/batches?partner_id=%FF%FE", f"/ops/reconciliation?year={BIG}",
        f"/ops/deliveries?limit={BIG}", "/ops/deliveries?record_id=" + "x" * 40,
        "/ops/deliveries?record_id=%FF", "/ops/deliveries?cursor=" + "A" * 199,
        "/ops/deliveries?since=2026-01-01T00:00%2B99:00", "/ops/deliveries?since=%FF",
        "/ops/deliveries?since=2999-12-31T23:59:59-23:59", "/ops/records/%FF%FE/edit",
        "/ops/records/" + "R" * 5000, f"/ops/conflicts/{world.conflict}/resolve?other=%00",
        "/ops/conflicts?cursor=" + "A" * 200, f"/ops/rejections?limit={BIG}",
        # a cursor holding 2**80: refused by gateway.ops.common.decode_cursor, not the driver
        "/ops/rejections?cursor=WyJyZWplY3Rpb25zIiwxMjA4OTI1ODE5NjE0NjI5MTc0NzA2MTc2XQ",
        "/ops/rejections/99999999999999999999/edit", "/ops/rejections/%EF%BC%91/edit",
        "/ops/rejections?batch_id=%00", "/ops/revalidate?since=2999-12-31T23:59%2B14:00",
        "/ops/login?next=%00", "/ops/login?next=/ops%FF",
    ]
    for path in gets:
        resp = client.get(path)
        assert resp.status_code < 500, (path, resp.status_code)
    posts: list[tuple[str, dict[str, Any]]] = [
        ("/ops/deliveries/reprocess", {"step": "preview", "ceiling": BIG}),
        ("/ops/deliveries/reprocess", {"step": "preview", "record_id": "a" * 33}),
        ("/ops/deliveries/reprocess", {"step": "confirm", "reason": "x\x00"}),
        ("/ops/deliveries/reprocess", {"step": "preview", "since": "\x00"}),
        # (with the version the form carries, so the fields themselves are judged)
        (f"/ops/records/{world.dead_id}/edit",
         {"activity.title": "x" * 100_000, "reason": "r", "version": "1"}),
        (f"/ops/records/{world.dead_id}/edit", {"claimed.quantity": BIG, "reason": "r",
                                                "version": "1"}),
        (f"/ops/records/{world.dead_id}/edit", {"activity.started_on": "9999-99-99",
                                                "reason": "r", "version": "1"}),
        (f"/ops/records/{world.dead_id}/edit", {"reason": "r", "version": BIG}),
        (f"/ops/conflicts/{world.conflict}/resolve", {"keep": "this\x00", "reason": "r"}),
        (f"/ops/conflicts/{world.conflict}/resolve", {"keep": "this", "reason": "r",
                                                      "version": "-1"}),
        ("/ops/revalidate", {"reason": "r", "since": BIG}),
        ("/ops/revalidate", {"reason": "r", "batch_id": "é" * 65}),
    ]
    # A rejection's edit: typed back to a stored number's type, 2**80 is an int, 1e999 no float.
    sub = gen.canonical_submission(random.Random(9105), "HOSTILE-1")
    good = sub["person"]["id_number"]
    sub["person"]["id_number"] = gen.corrupt_check_digit(good)
    world.id_numbers += [good, sub["person"]["id_number"]]
    partner_id, _, _ = _current(world.engine, world.delivered)
    [rejected] = ingest(world.engine, PartnerRef(partner_id, "canonical"), [sub])
    assert rejected.status.value == "rejected"
    with world.engine.connect() as conn:
        rid = conn.execute(select(rejections.c.id)
                           .where(rejections.c.source_record_id == "HOSTILE-1")).scalar_one()
    for name, value in (("f:year", BIG), ("f:claimed.quantity", "1e999"),
                        ("f:claimed.quantity", "9" * 40), ("new_path_0", "a\x00b")):
        posts.append((f"/ops/rejections/{rid}/edit",
                      {name: value, "new_value_0": "x", "f:person.id_number": good, "reason": "r"}))
    for path, data in posts:
        resp = client.post(path, data={**data, "csrf": csrf})
        assert resp.status_code < 500, (path, sorted(data), resp.status_code)
    # Too many record ids: past the console's cap (500) a 400 naming it; past the form's
    # 1,000 fields Starlette's own 400.
    for n, says in ((600, "一次最多"), (10_000, "")):
        many = urlencode([("csrf", csrf), ("step", "preview"),
                          *(("record_id", f"R{i:031d}") for i in range(n))])
        resp = client.post("/ops/deliveries/reprocess", content=many,
                           headers={"content-type": "application/x-www-form-urlencoded"})
        assert resp.status_code == 400 and says in resp.text, (n, resp.status_code)
    multipart = (b"--XX\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n" + csrf.encode()
                 + b"\r\n--XX\r\nContent-Disposition: form-data; name=\"reason\"\r\n\r\n\xff\xfe"
                 b"\r\n--XX--\r\n")
    bodies = [(b"csrf=" + csrf.encode() + b"&step=preview&reason=\xff%FE",
               "application/x-www-form-urlencoded"),
              (multipart, "multipart/form-data; boundary=XX"),
              (b"garbage", "multipart/form-data")]
    for body, kind in bodies:
        for path in ("/ops/deliveries/reprocess", "/ops/login", "/ops/revalidate"):
            resp = client.post(path, content=body, headers={"content-type": kind})
            assert resp.status_code < 500, (path, kind, resp.status_code)
    anonymous = _client(world)
    for cookie in ("%FF", "a" * 4000, "e30.00"):
        resp = anonymous.get("/ops", headers={"cookie": f"ce_ops_session={cookie}"})
        assert resp.status_code == 303, (cookie[:8], resp.status_code)
    assert _login(anonymous, "\x00" * 10).status_code == 401
