"""The Cadre Network College pull against the mock college on a real uvicorn, on both stores.

Every completion the college serves must end up in ``records`` exactly once: across pages,
across runs as the college grows, through 503/429 bursts, through an outage, and through a
SIGKILL of the pulling process in mid-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Connection, Engine, func, select, update

from gateway.config import Settings
from gateway.pull import cadre_college as cadre
from gateway.pull.cadre_college import PARTNER, pull_once, read_state
from gateway.store.tables import (
    audit_events,
    outbox,
    pull_state,
    record_versions,
    records,
    rejections,
)
from mock_partners.cadre_college import CollegeState, Faults, create_app, decode_cursor
from tests.support.servers import poll, uvicorn_thread

REPO = Path(__file__).resolve().parents[2]
College = Callable[..., tuple[str, CollegeState]]


@pytest.fixture
def college() -> Iterator[College]:
    """Start a mock college on a real uvicorn: ``college(**create_app kwargs)`` → (url, state)."""
    with ExitStack() as stack:
        def start(**kwargs: Any) -> tuple[str, CollegeState]:
            kwargs.setdefault("faults", Faults(seed=1))
            app = create_app(**kwargs)
            return stack.enter_context(uvicorn_thread(app)), app.state.mock

        yield start


def pull_settings(make_settings: Callable[..., Settings], db_url: str, url: str,
                  **overrides: Any) -> Settings:
    values: dict[str, Any] = {"cadre_college_url": url, "pull_page_size": 50, "pull_retries": 4,
                              "pull_retry_max_wait_seconds": 0.2, "pull_timeout_seconds": 10}
    values.update(overrides)
    return make_settings(db_url, **values)


def source_ids(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(records.c.source_record_id)
                                    .where(records.c.partner_id == PARTNER.partner_id)).scalars())


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_pull_ingests_every_page_and_stores_the_cursor(
        db_url: str, engine: Engine, college: College,
        make_settings: Callable[..., Settings]) -> None:
    url, mock = college(seed=5, initial=230)
    settings = pull_settings(make_settings, db_url, url)

    result = pull_once(engine, settings)

    assert (result.pages, result.fetched, result.accepted) == (5, 230, 230)
    assert (result.duplicate, result.rejected, result.error, result.has_more) == (0, 0, None, False)
    state = read_state(engine)
    assert state is not None and state.cursor == result.cursor
    assert decode_cursor(state.cursor or "") == 230
    assert state.pulled_total == 230 and state.last_error is None and state.last_success_at
    ids = source_ids(engine)
    assert set(ids) == set(mock.all_ids()) and max(ids.values()) == 1
    assert count(engine, outbox) == 230  # accepted records are queued for the management system
    with engine.connect() as conn:
        stored = orjson.loads(conn.execute(select(record_versions.c.payload).limit(1)).scalar_one())
    assert (stored["category"], stored["activity_type"]) == ("public", "online_course")
    assert stored["source"]["adapter"] == "cadre_college"
    assert stored["source"]["source_record_id"] in ids

    again = pull_once(engine, settings)  # nothing new: one empty page, cursor unchanged
    assert (again.pages, again.fetched, again.accepted, again.cursor) == (1, 0, 0, result.cursor)
    assert sum(source_ids(engine).values()) == 230


def test_a_second_pull_takes_only_what_is_new(
        db_url: str, engine: Engine, college: College,
        make_settings: Callable[..., Settings]) -> None:
    # Completions keep appearing while we pull: 5 more at every page request.
    url, mock = college(seed=6, initial=100, growth_per_call=5)
    settings = pull_settings(make_settings, db_url, url)

    first = pull_once(engine, settings)
    assert first.error is None and not first.has_more
    assert first.fetched == first.accepted == mock.stats()["total"] == 115
    requests_before = mock.stats()["requests"]

    assert httpx.post(f"{url}/_mock/grow", json={"n": 35}).json() == {"total": 150}
    second = pull_once(engine, settings)

    assert second.error is None
    assert (second.fetched, second.accepted, second.duplicate) == (40, 40, 0)  # 35 + 5 grown
    ids = source_ids(engine)
    assert sum(ids.values()) == len(ids) == 155 and set(ids) == set(mock.all_ids())
    # The second run started where the first stopped: the stored cursor was sent.
    log = mock.stats()["log"][requests_before:]
    assert log[0]["cursor"] == first.cursor and log[0]["after"] == 115
    assert mock.stats()["items_served"] == 155  # nothing was fetched twice


def test_503_and_429_are_retried_and_the_pull_completes(
        db_url: str, engine: Engine, college: College,
        make_settings: Callable[..., Settings]) -> None:
    faults = Faults(fail_next=2, rate_limit_every=3, retry_after="0", bad_item_every=40)
    url, mock = college(seed=7, initial=150, faults=faults)
    settings = pull_settings(make_settings, db_url, url, pull_retries=5)

    result = pull_once(engine, settings)

    assert result.error is None and not result.has_more
    assert (result.pages, result.fetched) == (3, 150)
    # Items 40, 80, 120 carry a broken id: rejected on their own, the cursor still moves on.
    assert (result.accepted, result.rejected) == (147, 3)
    assert count(engine, rejections) == 3
    by_status = mock.stats()["by_status"]
    assert by_status["503"] == 2 and by_status["429"] >= 2 and by_status["200"] == 3
    state = read_state(engine)
    assert state is not None and state.pulled_total == 150 and state.last_error is None
    with engine.connect() as conn:
        errors = conn.execute(select(rejections.c.errors)).scalars().all()
    assert {e["field"] for raw in errors for e in orjson.loads(raw)} == {"sfzh"}


def test_retry_after_is_honoured_or_ends_the_run(
        db_url: str, engine: Engine, college: College,
        make_settings: Callable[..., Settings]) -> None:
    faults = Faults(fail_next=1, retry_after="1")
    url, mock = college(seed=8, initial=10, faults=faults)
    settings = pull_settings(make_settings, db_url, url, pull_retry_max_wait_seconds=5)

    started = time.monotonic()
    result = pull_once(engine, settings)
    assert result.error is None and result.fetched == 10
    assert time.monotonic() - started >= 0.9  # waited the second the college asked for

    # Asked to come back in a minute: the run ends at once and says why.
    mock.update_faults({"fail_next": 1, "retry_after": "60"})
    mock.grow(5)
    requests_before = mock.stats()["requests"]
    ended = pull_once(engine, settings)
    assert ended.error is not None and "503" in ended.error and ended.fetched == 0
    assert mock.stats()["requests"] == requests_before + 1
    state = read_state(engine)
    assert state is not None and state.last_error == ended.error


def test_a_persistent_outage_records_last_error_and_keeps_the_cursor(
        db_url: str, engine: Engine, college: College,
        make_settings: Callable[..., Settings]) -> None:
    url, mock = college(seed=9, initial=60, faults=Faults(retry_after=""))
    settings = pull_settings(make_settings, db_url, url, pull_retries=3)
    first = pull_once(engine, settings)
    assert first.fetched == 60

    mock.grow(20)
    mock.update_faults({"outage": True})
    requests_before = mock.stats()["requests"]
    failed = pull_once(engine, settings)

    assert failed.error is not None and "503" in failed.error
    assert (failed.pages, failed.fetched, failed.cursor) == (0, 0, first.cursor)
    assert mock.stats()["requests"] - requests_before == 3  # pull_retries attempts, then stop
    state = read_state(engine)
    assert state is not None
    assert (state.cursor, state.pulled_total) == (first.cursor, 60)
    assert state.last_error == failed.error

    mock.update_faults({"outage": False})
    recovered = pull_once(engine, settings)
    assert (recovered.fetched, recovered.accepted, recovered.error) == (20, 20, None)
    state = read_state(engine)
    assert state is not None and state.last_error is None and state.pulled_total == 80
    assert sum(source_ids(engine).values()) == 80


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    from gateway.config import Settings
    from gateway.pull.cadre_college import pull_once
    from gateway.store.db import make_engine
    db_url, college_url = sys.argv[1], sys.argv[2]
    settings = Settings(database_url=db_url, cadre_college_url=college_url, pull_page_size=20)
    print(pull_once(make_engine(db_url), settings), flush=True)
""")


def test_a_pull_killed_mid_run_loses_and_duplicates_nothing(
        db_url: str, engine: Engine, college: College, tmp_path: Path,
        make_settings: Callable[..., Settings]) -> None:
    url, mock = college(seed=10, initial=300, faults=Faults(latency_ms=60))
    log_path = tmp_path / "puller.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, db_url, url], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        def committed() -> int:
            state = read_state(engine)
            assert proc.poll() is None, log_path.read_text()
            return state.pulled_total if state and state.pulled_total >= 60 else 0

        poll(committed, 60, interval=0.01, what="a few committed pages")
    finally:
        proc.kill()  # SIGKILL: no cleanup, possibly inside a page's transaction
        proc.wait(timeout=30)
    assert proc.returncode == -9
    state = read_state(engine)
    assert state is not None and 60 <= state.pulled_total < 300

    mock.update_faults({"latency_ms": 0})
    settings = pull_settings(make_settings, db_url, url, pull_page_size=20)
    result = pull_once(engine, settings)
    assert result.error is None and not result.has_more

    served = httpx.get(f"{url}/_mock/served").json()["ids"]
    ids = source_ids(engine)
    assert sorted(ids) == sorted(served) == sorted(mock.all_ids())
    assert set(ids.values()) == {1}  # every completion exactly once
    state = read_state(engine)
    # The cursor moved with the records: pages counted once each, though one may be re-fetched.
    assert state is not None and state.pulled_total == 300
    assert count(engine, outbox) == 300 and count(engine, rejections) == 0


def test_a_failure_inside_the_page_transaction_rolls_records_and_cursor_back(
        db_url: str, engine: Engine, college: College, monkeypatch: pytest.MonkeyPatch,
        make_settings: Callable[..., Settings]) -> None:
    url, _mock = college(seed=12, initial=120)
    settings = pull_settings(make_settings, db_url, url)
    real_advance = cadre._advance
    pages = Counter[str]()

    def crashing_advance(*args: Any) -> Callable[[Connection, list[Any]], None]:
        step = real_advance(*args)

        def in_tx(conn: Connection, answers: list[Any]) -> None:
            step(conn, answers)  # records written, cursor moved — then the process "dies"
            pages["seen"] += 1
            if pages["seen"] == 2:
                raise RuntimeError("crash before commit")

        return in_tx

    monkeypatch.setattr(cadre, "_advance", crashing_advance)
    with pytest.raises(RuntimeError, match="crash before commit"):
        pull_once(engine, settings)
    state = read_state(engine)
    assert state is not None and state.pulled_total == 50
    assert sum(source_ids(engine).values()) == 50 and count(engine, outbox) == 50

    monkeypatch.setattr(cadre, "_advance", real_advance)
    result = pull_once(engine, settings)
    assert (result.fetched, result.accepted, result.duplicate) == (70, 70, 0)
    ids = source_ids(engine)
    assert sum(ids.values()) == len(ids) == 120


def test_a_stale_cursor_cannot_advance_twice(
        db_url: str, engine: Engine, college: College, monkeypatch: pytest.MonkeyPatch,
        make_settings: Callable[..., Settings]) -> None:
    """Two pullers that both slipped past the job lease: the second's page is rolled back."""
    url, _mock = college(seed=13, initial=120)
    settings = pull_settings(make_settings, db_url, url)
    first = pull_once(engine, settings, max_pages=1)
    assert (first.pages, first.fetched, first.has_more) == (1, 50, True)

    monkeypatch.setattr(cadre, "read_state", lambda _engine: None)  # it read before we wrote
    stale = pull_once(engine, settings)
    assert stale.error is not None and "another pull" in stale.error and stale.fetched == 0
    monkeypatch.undo()
    state = read_state(engine)
    assert state is not None
    assert (state.cursor, state.pulled_total, state.last_error) == (first.cursor, 50, None)
    assert sum(source_ids(engine).values()) == 50


ID_IN_ANSWER = "630102198704139126"


def test_a_refused_pull_is_coded_masked_and_fails_the_command(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings]) -> None:
    """The college's answer may quote an identity number: stored and printed masked (SPEC §7).

    A pull that stops on an error is PULL_FAILED in both languages, and the CLI exits 1.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from tests.conftest import SECRET_KEY
    from tests.support.servers import cli

    refusing = FastAPI()

    @refusing.get("/api/completions")
    def refuse() -> JSONResponse:
        return JSONResponse({"msg": f"bad request for {ID_IN_ANSWER}"}, status_code=400)

    with uvicorn_thread(refusing) as url:
        failed = pull_once(engine, pull_settings(make_settings, db_url, url))
        ran = cli({"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
                   "CE_GATEWAY_CADRE_COLLEGE_URL": url}, "pull", "cadre-college", "--json")
    assert failed.error is not None and "400" in failed.error and ID_IN_ANSWER not in failed.error
    assert failed.error_code == "PULL_FAILED" and failed.error_zh and "干部网络学院" in failed.error_zh
    state = read_state(engine)
    assert state is not None and state.last_error and ID_IN_ANSWER not in state.last_error
    assert ran.returncode == 1 and "PULL_FAILED" in ran.stderr, ran.stderr
    assert ID_IN_ANSWER not in ran.stdout + ran.stderr


def test_a_pulled_completion_rejected_unparsed_keeps_the_colleges_id(
        engine: Engine) -> None:
    from adapters.cadre_college import CadreCollegeAdapter
    from gateway.pipeline.ingest import ingest_items

    items = cadre._items([{"xh": "KC-BAD-1", "xs": "not hours"}], CadreCollegeAdapter())
    [answer] = ingest_items(engine, PARTNER, items)
    assert (answer.status, answer.source_record_id) == ("rejected", "KC-BAD-1")
    with engine.connect() as conn:
        assert conn.execute(select(rejections.c.source_record_id)).scalars().all() == ["KC-BAD-1"]


def test_a_cursor_the_college_no_longer_accepts_is_reset_from_the_cli(
        db_url: str, engine: Engine, college: College,
        make_settings: Callable[..., Settings]) -> None:
    """Every run stops on an expired cursor; ``--from-start`` pulls again, adding only what is new.

    The reset is an operator action: refused without a reason, audited with actor and reason.
    """
    from tests.conftest import SECRET_KEY
    from tests.support.servers import cli

    url, mock = college(seed=17, initial=60)
    settings = pull_settings(make_settings, db_url, url)
    assert pull_once(engine, settings).error is None
    with engine.begin() as conn:  # the college rebuilt its store: our cursor means nothing there
        conn.execute(update(pull_state).values(cursor="expired-cursor"))
    assert pull_once(engine, settings).error is not None
    mock.grow(5)
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_CADRE_COLLEGE_URL": url, "CE_GATEWAY_PULL_PAGE_SIZE": "50"}
    refused = cli(env, "pull", "cadre-college", "--from-start")
    assert refused.returncode != 0 and "reason" in refused.stderr
    ran = cli(env, "pull", "cadre-college", "--from-start", "--reason", "学院重建了数据",
              "--actor", "op-li", "--json")
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert (result["fetched"], result["duplicate"], result["accepted"]) == (65, 60, 5)
    assert sum(source_ids(engine).values()) == 65 and max(source_ids(engine).values()) == 1
    state = read_state(engine)
    assert state is not None and state.cursor not in (None, "expired-cursor")
    assert state.last_error is None
    with engine.connect() as conn:
        reset = conn.execute(select(audit_events).where(
            audit_events.c.kind == "pull_cursor_reset")).mappings().one()
    assert reset["actor"] == "op-li"
    assert json.loads(reset["detail"])["previous_cursor"] == "expired-cursor"


def test_a_college_that_trickles_its_page_ends_the_run_not_holds_it(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings]) -> None:
    """Each page's GET has a deadline of its own: httpx times out each read, never a request."""
    from tests.integration.test_ops_jobs_review import Trickle  # a raw socket below HTTP

    college = Trickle()  # trickles on until the pull hangs up on it
    settings = pull_settings(make_settings, db_url, college.url, pull_timeout_seconds=1.0,
                             pull_retries=2, pull_retry_max_wait_seconds=0.01)
    started = time.monotonic()
    try:
        result = pull_once(engine, settings)
    finally:
        college.close()
    took = time.monotonic() - started
    assert took < 2 * (3 * 1.0 + 1.0) + 3, f"the pull took {took:.1f} s"
    assert college.requests == 2 and result.error is not None and "AnswerCutOff" in result.error
    state = read_state(engine)
    assert state is not None and state.cursor is None and state.last_error == result.error
