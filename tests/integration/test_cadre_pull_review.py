"""Review of the Cadre Network College pull: page boundaries, odd items, races, crashes.

Pages come from the real mock college (``mock_partners.cadre_college``) on uvicorn where it can
say what is needed, else from a small scripted college on uvicorn that answers fixed bodies
per cursor (raw bytes, so a page may carry what a real college's JSON can carry).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import Engine, select

from gateway.config import Settings
from gateway.pull.cadre_college import pull_once, read_state
from gateway.scheduling import PULL_CADRE_COLLEGE, run_job
from gateway.store.tables import (
    audit_events,
    job_locks,
    outbox,
    record_versions,
    records,
    rejections,
)
from mock_partners.cadre_college import CollegeState, Faults, create_app, decode_cursor
from tests.integration.test_cadre_pull import count, source_ids
from tests.integration.test_cadre_pull import pull_settings as base_pull_settings
from tests.support.servers import poll, uvicorn_thread

REPO = Path(__file__).resolve().parents[2]
BEIJING = ZoneInfo("Asia/Shanghai")


def completions(n: int, seed: int = 31) -> list[dict[str, Any]]:
    """``n`` valid completions as the mock college generates them (year 2026, open)."""
    state = CollegeState(seed=seed, initial=n, growth_per_call=0, faults=Faults(), year=2026)
    return [state.completion(i) for i in range(1, n + 1)]


def page(data: list[Any] | str, next_cursor: str | None, has_more: bool) -> bytes:
    """A page body; ``data`` may be raw JSON text (to carry what orjson will not write)."""
    raw = data if isinstance(data, str) else orjson.dumps(data).decode()
    return (f'{{"data": {raw}, "next_cursor": {orjson.dumps(next_cursor).decode()}, '
            f'"has_more": {"true" if has_more else "false"}}}').encode()


class Scripted:
    """A college answering a fixed body per cursor ("" = no cursor); others get 410 expired."""

    def __init__(self, pages: dict[str, bytes | tuple[int, bytes]]) -> None:
        self.pages = dict(pages)
        self.asked: list[str] = []
        self.app = FastAPI()

        @self.app.get("/api/completions")
        def serve(request: Request) -> Response:
            cursor = request.query_params.get("cursor", "")
            self.asked.append(cursor)
            answer = self.pages.get(cursor)
            if answer is None:
                return Response(b'{"error": "cursor expired"}', status_code=410,
                                media_type="application/json")
            status, body = answer if isinstance(answer, tuple) else (200, answer)
            return Response(body, status_code=status, media_type="application/json")


@pytest.fixture
def serve_app() -> Iterator[Callable[[Any], str]]:
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(uvicorn_thread(app))


def pull_settings(make_settings: Callable[..., Settings], db_url: str, url: str,
                  **overrides: Any) -> Settings:
    """test_cadre_pull's settings with one retry fewer: outages here end sooner."""
    return base_pull_settings(make_settings, db_url, url, **{"pull_retries": 3, **overrides})


# -- findings ---------------------------------------------------------------------------------

def _lone_surrogate_name(item: dict[str, Any]) -> str:
    # A name with a CJK Extension B character (a surrogate pair in UTF-16) cut in half by a
    # college that truncates UTF-16 strings: JSON escapes it as a lone "\ud840".
    body = orjson.dumps({**item, "xm": "PLACEHOLDER"}).decode()
    return body.replace("PLACEHOLDER", "\u5f20\\ud840")


def _lone_surrogate_title(item: dict[str, Any]) -> str:
    # The same cut in a course title, which no name rule looks at.
    body = orjson.dumps({**item, "kcmc": "PLACEHOLDER"}).decode()
    return body.replace("PLACEHOLDER", "\u4e60\\ud840")


def _huge_numeric_xh(item: dict[str, Any]) -> str:
    # Ids sent as numbers are read (SPEC §8 adapters); a 20-digit one above 2**64, on an item
    # whose id number is broken (so it is rejected and its raw item filed).
    body = orjson.dumps({**item, "xh": 0, "sfzh": item["sfzh"][:-1] + "0"}).decode()
    return body.replace('"xh":0', '"xh":20261127000000000001')


@pytest.mark.parametrize("bad", [_lone_surrogate_name, _lone_surrogate_title, _huge_numeric_xh],
                         ids=["lone-surrogate-name", "lone-surrogate-title", "xh-above-2**64"])
def test_one_unfileable_item_does_not_stop_the_pull(
        bad: Callable[[dict[str, Any]], str], db_url: str, engine: Engine,
        serve_app: Callable[[Any], str], make_settings: Callable[..., Settings]) -> None:
    good = completions(4)
    data = f"[{orjson.dumps(good[0]).decode()}, {bad(good[1])}, {orjson.dumps(good[2]).decode()}]"
    college = Scripted({"": page(data, "c1", True), "c1": page([good[3]], "c2", False)})
    url = serve_app(college.app)

    result = None
    try:
        result = pull_once(engine, pull_settings(make_settings, db_url, url))
    finally:
        state = read_state(engine)
        ids = source_ids(engine)
    assert result is not None and result.error is None
    # The three good ones count; the odd one is answered on its own (filed, not lost).
    assert result.fetched == 4 and result.accepted >= 3
    assert result.accepted + result.rejected == 4
    assert state is not None and state.cursor == "c2"
    assert {good[0]["xh"], good[2]["xh"], good[3]["xh"]} <= set(ids)
    assert len(ids) + count(engine, rejections) == 4


def test_a_completion_made_before_the_year_close_and_pulled_after_it_counts(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    # The year (as extended by the department) closed at the end of yesterday, Beijing time;
    # the course was finished two minutes before that and the pull runs now.
    closed_on = datetime.now(BEIJING).date() - timedelta(days=1)
    [item] = completions(1)
    item = {**item, "wcsj": f"{closed_on.isoformat()} 23:58:00",
            "zsbh": f"QHGBWY{closed_on.year}00000001"}
    college = Scripted({"": page([item], "c1", False)})
    settings = pull_settings(make_settings, db_url, serve_app(college.app),
                             year_close_extensions={closed_on.year: closed_on})

    result = pull_once(engine, settings)

    assert result.error is None and result.fetched == 1
    with engine.connect() as conn:
        codes = [e["code"] for raw in conn.execute(select(rejections.c.errors)).scalars()
                 for e in orjson.loads(raw)]
    assert codes == [] and result.accepted == 1


def test_a_failed_scheduled_pull_releases_its_lease(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    app = create_app(seed=35, initial=10, faults=Faults(seed=1, outage=True, retry_after=""))
    settings = pull_settings(make_settings, db_url, serve_app(app), pull_retries=1,
                             pull_interval_seconds=3600)

    run_job(engine, settings, PULL_CADRE_COLLEGE)

    state = read_state(engine)
    assert state is not None and state.last_error is not None  # the pull did fail
    with engine.connect() as conn:
        until = conn.execute(select(job_locks.c.until)
                             .where(job_locks.c.name == PULL_CADRE_COLLEGE.name)).scalar_one()
    assert until <= datetime.now(UTC) + timedelta(seconds=5)  # free for the next tick


# -- probes that held -------------------------------------------------------------------------

def test_a_completion_the_college_corrects_and_resends_is_a_corrected_version(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    """Same ``xh`` served again past the cursor with new hours: version 2, queued after 1.

    Resent unchanged on a later page (a college re-sending a page), it is a duplicate and
    nothing new is queued.
    """
    first, other = completions(2)
    fixed = {**first, "xs": first["xs"] + 1}
    college = Scripted({"": page([first, other], "c1", False), "c1": page([], "c1", False)})
    settings = pull_settings(make_settings, db_url, serve_app(college.app))
    assert pull_once(engine, settings).accepted == 2

    college.pages["c1"] = page([fixed], "c2", True)
    college.pages["c2"] = page([fixed, other], "c3", False)  # the same page sent again
    result = pull_once(engine, settings)

    assert result.error is None and (result.corrected, result.duplicate) == (1, 2)
    with engine.connect() as conn:
        rid, version = conn.execute(select(records.c.record_id, records.c.current_version)
                                    .where(records.c.source_record_id == first["xh"])).one()
        queued = conn.execute(select(outbox.c.version).where(outbox.c.record_id == rid)
                              .order_by(outbox.c.version)).scalars().all()
        payload = orjson.loads(conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == rid, record_versions.c.version == 2)).scalar_one())
    assert version == 2 and queued == [1, 2]
    assert payload["claimed"]["quantity"] == str(fixed["xs"])
    assert sum(source_ids(engine).values()) == 2 and count(engine, outbox) == 3
    state = read_state(engine)
    assert state is not None and state.cursor == "c3"


@pytest.mark.parametrize(("answer", "moves_to"), [
    # has_more with an empty page that moves the cursor: follow it.
    (page([], "c1", True), "c2"),
    # has_more with no next_cursor, or the same one: refuse, keep the cursor.
    (page([], None, True), None),
    (page(completions(1), "", True), None),
    (page(completions(1), "c0", True), None),
    # The college no longer knows the cursor (expired): coded, cursor kept, nothing lost.
    ((410, b'{"error": "cursor expired"}'), None),
])
def test_page_boundary_answers(answer: bytes | tuple[int, bytes], moves_to: str | None,
                               db_url: str, engine: Engine, serve_app: Callable[[Any], str],
                               make_settings: Callable[..., Settings]) -> None:
    start = completions(3)
    college = Scripted({"": page(start[:1], "c0", False), "c1": page(start[1:], "c2", False)})
    settings = pull_settings(make_settings, db_url, serve_app(college.app))
    assert pull_once(engine, settings).cursor == "c0"
    college.pages["c0"] = answer

    result = pull_once(engine, settings)

    state = read_state(engine)
    assert state is not None
    if moves_to is None:
        assert result.error is not None and result.error_code == "PULL_FAILED"
        assert (state.cursor, state.pulled_total) == ("c0", 1)
        assert state.last_error == result.error
        assert set(source_ids(engine)) == {start[0]["xh"]}
    else:
        assert result.error is None and (result.pages, result.fetched) == (2, 2)
        assert state.cursor == moves_to and state.last_error is None
        assert set(source_ids(engine)) == {c["xh"] for c in start}


def test_a_college_slower_than_the_timeout_keeps_the_cursor_then_recovers(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    app = create_app(seed=32, initial=40, faults=Faults(seed=1))
    mock: CollegeState = app.state.mock
    settings = pull_settings(make_settings, db_url, serve_app(app), pull_page_size=20,
                             pull_timeout_seconds=0.3, pull_retries=2)
    assert pull_once(engine, settings, max_pages=1).fetched == 20
    mock.update_faults({"latency_ms": 1500})

    slow = pull_once(engine, settings)

    # A read timed out (0.3 s), or on a loaded machine the answer's whole deadline (3 × 0.3 s)
    # ran out first: either way the college was slower than the bound and the cursor stays.
    assert slow.error is not None and slow.fetched == 0
    assert "Timeout" in slow.error or "AnswerCutOff" in slow.error
    state = read_state(engine)
    assert state is not None and decode_cursor(state.cursor or "") == 20
    assert state.last_error == slow.error
    mock.update_faults({"latency_ms": 0})
    again = pull_once(engine, settings)
    assert again.error is None and again.fetched == 20
    ids = source_ids(engine)
    assert set(ids) == set(mock.all_ids()) and set(ids.values()) == {1}


def test_pullers_racing_on_one_cursor_ingest_each_completion_once(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    """An on-demand pull while the scheduled one runs (or two replicas): the CAS on the cursor.

    Both run for real against one college that grows as they pull; neither raises, the cursor
    only moves forward, and every completion is stored and queued once.
    """
    app = create_app(seed=33, initial=200, growth_per_call=2, faults=Faults(latency_ms=20, seed=1))
    mock: CollegeState = app.state.mock
    settings = pull_settings(make_settings, db_url, serve_app(app), pull_page_size=20)
    seen: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            state = read_state(engine)
            if state is not None and state.cursor:
                seen.append(decode_cursor(state.cursor))
            done.wait(0.005)

    def puller() -> None:
        start.wait()
        try:
            for _ in range(200):
                result = pull_once(engine, settings)
                if result.error is None and not result.has_more:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=puller) for _ in range(2)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    watcher.join(10)

    assert not errors and not any(t.is_alive() for t in threads)
    assert seen == sorted(seen)  # never backwards
    state = read_state(engine)
    assert state is not None
    pulled = decode_cursor(state.cursor or "")
    ids = source_ids(engine)
    assert len(ids) == pulled == state.pulled_total and set(ids.values()) == {1}
    assert set(ids) == set(mock.all_ids()[:pulled])
    assert count(engine, outbox) == pulled


HANG_IN_TX_SCRIPT = textwrap.dedent("""
    import sys, time
    from gateway.config import Settings
    from gateway.pull import cadre_college as cadre
    from gateway.store.db import make_engine
    db_url, college_url, hang_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_advance, pages = cadre._advance, [0]

    def advance(*args):
        step = real_advance(*args)

        def in_tx(conn, answers):
            step(conn, answers)  # the page's records are written and the cursor moved
            pages[0] += 1
            if pages[0] == hang_at:
                print("IN_TX", flush=True)
                time.sleep(120)  # killed here, before the commit

        return in_tx

    cadre._advance = advance
    settings = Settings(database_url=db_url, cadre_college_url=college_url, pull_page_size=25)
    cadre.pull_once(make_engine(db_url), settings)
""")


@pytest.mark.parametrize("hang_at", [1, 3])
def test_a_puller_killed_inside_a_page_transaction_commits_nothing_of_that_page(
        hang_at: int, db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """SIGKILL of a real process holding an open page transaction (locks on both stores).

    The next pull is not blocked by the dead one's locks, and every completion ends up stored
    and queued exactly once; ``pulled_total`` counts each committed page once.
    """
    app = create_app(seed=34, initial=110, faults=Faults(seed=1))
    mock: CollegeState = app.state.mock
    url = serve_app(app)
    log_path = tmp_path / "puller.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", HANG_IN_TX_SCRIPT, db_url, url,
                                 str(hang_at)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        def hanging() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return "IN_TX" in log_path.read_text()

        poll(hanging, 60, interval=0.02, what="the puller inside a page transaction")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -9
    state = read_state(engine)
    committed = 25 * (hang_at - 1)
    assert (state.pulled_total if state else 0) == committed
    assert len(source_ids(engine)) == committed

    started = time.monotonic()
    result = pull_once(engine, pull_settings(make_settings, db_url, url, pull_page_size=25))
    assert time.monotonic() - started < 20  # not stuck behind the dead transaction's locks
    assert result.error is None and result.fetched == 110 - committed
    ids = source_ids(engine)
    assert set(ids) == set(mock.all_ids()) and set(ids.values()) == {1}
    state = read_state(engine)
    assert state is not None and state.pulled_total == 110
    assert count(engine, outbox) == 110


def test_bad_items_in_a_page_are_coded_alone_and_no_identity_number_is_logged(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture) -> None:
    """Every third item has a broken id: rejected on its own, coded; logs and audit masked."""
    caplog.set_level(logging.DEBUG)
    app = create_app(seed=36, initial=60, faults=Faults(seed=1, bad_item_every=3,
                                                        rate_limit_every=2, retry_after="0"))
    mock: CollegeState = app.state.mock
    settings = pull_settings(make_settings, db_url, serve_app(app), pull_page_size=20,
                             pull_retries=4)

    result = pull_once(engine, settings)

    assert result.error is None and (result.accepted, result.rejected) == (40, 20)
    with engine.connect() as conn:
        codes = {e["code"] for raw in conn.execute(select(rejections.c.errors)).scalars()
                 for e in orjson.loads(raw)}
        audit_text = " ".join(str(row) for row in conn.execute(select(audit_events)).all())
    assert codes == {"ID_NUMBER_INVALID"}
    served = {mock._served_item(n)["sfzh"] for n in range(1, 61)}
    assert not [i for i in served if i in caplog.text or i in audit_text]


def test_a_page_far_larger_than_the_limit_asked_for_is_taken_whole(
        db_url: str, engine: Engine, serve_app: Callable[[Any], str],
        make_settings: Callable[..., Settings]) -> None:
    """A college that ignores ``limit``: 3,000 items in one page, one transaction, all stored."""
    data = completions(3000, seed=37)
    college = Scripted({"": page(data, "c1", False)})
    settings = pull_settings(make_settings, db_url, serve_app(college.app), pull_page_size=50)

    result = pull_once(engine, settings)

    assert result.error is None and (result.pages, result.accepted) == (1, 3000)
    assert len(source_ids(engine)) == 3000 and count(engine, outbox) == 3000
    state = read_state(engine)
    assert state is not None and (state.cursor, state.pulled_total) == ("c1", 3000)
