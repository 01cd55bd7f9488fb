"""Review: missed-push and annual alerts, job-lease renewal, and one upstream request's bound.

What the day's changes added (gateway/alerts.py, gateway/ops/overview.py missing_pushes,
gateway/scheduling.py ensure_held/LeaseLost, gateway/upstream.py bounded_request, and their
callers in retention, the reference sync and the Cadre College pull), driven on real SQLite and
PostgreSQL stores, the console on a real uvicorn, and raw sockets or uvicorn apps where an
upstream has to misbehave.  Each bug found is a strict xfail naming the cause and the fix; the
other tests pin behaviour that was checked and found right.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy import Engine, func, select, update

from gateway.accounts import Partner
from gateway.alerts import evaluate
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.ops.overview import missing_pushes
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.retention import prune
from gateway.scheduling import LeaseLost, run_exclusive
from gateway.store.tables import partners, record_versions
from gateway.upstream import AnswerCutOff, bounded_request
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.integration.test_alerts import (
    ROBOT_PATH,
    annual_batch,
    monthly_batch,
    registered,
    sink,
    state,
)
from tests.integration.test_console import _login
from tests.integration.test_ops_jobs_review import TEN_DAYS_AGO, Trickle, _held
from tests.integration.test_retention import _corrected, _retention_events
from tests.integration.test_scheduling import _take_over, lease_until
from tests.support.delivery import drain_at
from tests.support.servers import poll, uvicorn_thread

MakeSettings = Callable[..., Settings]
XINING = ZoneInfo("Asia/Shanghai")
__all__ = ["sink"]  # the mock robot on a real uvicorn (fixture of the alerts' tests)


def _owed(result: Any, partner: Partner) -> list[str]:
    return [c.key for c in result.active if c.detail.get("partner_id") == partner.partner_id]


def _local(y: int, m: int, d: int, hour: int = 10) -> datetime:
    return datetime(y, m, d, hour, tzinfo=XINING).astimezone(UTC)


# == missed pushes (gateway/ops/overview.py missing_pushes, gateway/alerts.py) ==================

def test_a_partner_registered_mid_month_keeps_each_awaited_month_until_it_is_pushed(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    """What a new partner owes is fixed at registration; a later month falling due clears nothing.

    Registered on 15 March: February's push was late from 6 March, before the partner existed,
    so March (due by 5 April) is the first it owes.  It used to be told at once of the latest
    due month (February), which the next month's deadline then "cleared" unpushed - an alert
    reading 'recovered' every month while nothing came.
    """
    newcomer = new_partner(engine, adapter="health")
    registered(engine, newcomer, _local(2026, 3, 15))
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}")
    march = f"missed_push:{newcomer.partner_id}:2026-03"

    assert evaluate(engine, settings, _local(2026, 3, 20)).active == []
    assert evaluate(engine, settings, _local(2026, 4, 5)).active == []  # its last day to push
    april = evaluate(engine, settings, _local(2026, 4, 6))
    may = evaluate(engine, settings, _local(2026, 5, 6))

    assert april.fired == [march]
    assert may.cleared == [] and may.fired == [f"missed_push:{newcomer.partner_id}:2026-04"]
    assert march in _owed(may, newcomer) and state(engine)[march]["cleared_at"] is None


def test_a_partner_registered_mid_month_owes_nothing_before_its_first_awaited_month(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    """Registered on the evening of 5 April UTC, already 6 April in Xining: March is not owed.

    The registration day is read in Asia/Shanghai on both stores (SQLite keeps UTC without an
    offset): a UTC reading would put it before March's deadline (late from 6 April) and owe
    March's batch.
    """
    partner = new_partner(engine, adapter="finance")
    registered(engine, partner, datetime(2026, 4, 5, 17, 0, tzinfo=UTC))  # 01:00 on 6 April
    monthly_batch(engine, partner, "2026-04")
    monthly_batch(engine, partner, "2026-05")
    settings = make_settings(db_url)
    with engine.connect() as conn:
        [owed] = [m for m in missing_pushes(conn, settings, _local(2026, 6, 6))
                  if m.partner_id == partner.partner_id]
    assert owed.months == () and owed.annual == ()  # read in UTC: March owed


def test_a_disabled_partner_is_neither_alerted_nor_listed_as_owing_and_its_alerts_clear(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], sink: str) -> None:
    partner = new_partner(engine, adapter="finance")
    registered(engine, partner, _local(2025, 6, 1))
    settings = make_settings(db_url, alert_webhook_url=f"{sink}{ROBOT_PATH}")
    at = _local(2026, 1, 20)
    first = evaluate(engine, settings, at)
    assert f"missed_annual:{partner.partner_id}:2025" in first.fired
    with engine.begin() as conn:
        conn.execute(update(partners).where(partners.c.partner_id == partner.partner_id)
                     .values(active=False))

    later = evaluate(engine, settings, at + timedelta(hours=1))

    assert _owed(later, partner) == [] and later.fired == []
    assert sorted(later.cleared) == sorted(first.fired)
    with engine.connect() as conn:
        assert all(m.partner_id != partner.partner_id for m in missing_pushes(conn, settings, at))


def test_an_annual_batch_alone_settles_the_annual_alert_not_the_months(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner]) -> None:
    """Only a full-year batch came: the annual is settled; the monthly batches are still owed."""
    partner = new_partner(engine, adapter="health")
    registered(engine, partner, _local(2025, 10, 20))
    annual_batch(engine, partner, 2025)
    settings = make_settings(db_url)

    owed = _owed(evaluate(engine, settings, _local(2026, 1, 20)), partner)

    # registered on 20 October: October's push (due by 5 November) is the first it owes
    assert owed == [f"missed_push:{partner.partner_id}:2025-{m}" for m in ("10", "11", "12")]


def _board_row(html: str, partner_id: str) -> str:
    start = html.index(f"<td>{partner_id}</td>")
    return html[start:html.index("</tr>", start)]


def test_the_console_shows_the_overdue_annual_batch_the_robot_is_alerted_about(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], new_operator: Callable[..., str]) -> None:
    partner = new_partner(engine, adapter="finance")
    now = datetime.now(UTC)
    last_year = now.astimezone(XINING).year - 1
    registered(engine, partner, datetime(last_year - 1, 6, 1, tzinfo=UTC))
    for year in (last_year, last_year + 1):
        for month in range(1, 13):
            monthly_batch(engine, partner, f"{year}-{month:02d}")
    # Due on 1 January: whatever today's date, last year's annual batch is overdue.
    settings = make_settings(db_url, alert_annual_push_day=0)
    assert _owed(evaluate(engine, settings, now), partner) == [
        f"missed_annual:{partner.partner_id}:{last_year}"]

    with uvicorn_thread(create_app(settings, run_worker=False, run_scheduler=False)) as url, \
            httpx.Client(base_url=url, follow_redirects=False, timeout=30) as client:
        assert _login(client, new_operator(engine, "viewer")).status_code == 303
        page = client.get("/ops")
        assert page.status_code == 200
        row = _board_row(page.text, partner.partner_id)

    assert str(last_year) in row, row


# == job leases (gateway/scheduling.py) and their callers ======================================

def _prunable(engine: Engine, db_url: str, make_settings: MakeSettings, partner: Partner,
              mock_ce: tuple[str, Faults], n: int) -> None:
    """``n`` records delivered ten days ago, then corrected: ``n`` first versions to prune."""
    ref = PartnerRef(partner.partner_id, "canonical")
    subs = [gen.canonical_submission(random.Random(61), f"LL-{i}") for i in range(n)]
    deliver = make_settings(db_url, mock_ce[0])
    ingest(engine, ref, subs, now=TEN_DAYS_AGO)
    drain_at(engine, deliver, TEN_DAYS_AGO)
    ingest(engine, ref, [_corrected(s) for s in subs], now=TEN_DAYS_AGO)
    drain_at(engine, deliver, TEN_DAYS_AGO)


def test_a_retention_run_stopped_by_a_lost_lease_audits_what_it_pruned(
        db_url: str, engine: Engine, make_settings: MakeSettings,
        new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults]) -> None:
    _prunable(engine, db_url, make_settings, new_partner(engine), mock_ce, 3)
    settings = make_settings(db_url, retention_payload_days=1)
    name, ttl = "retention", 1.0

    def stall_after_the_first_chunk(done: int, _total: int) -> None:
        if done == 1:  # a stall (GC pause, VM pause) past the TTL; another replica takes over
            poll(lambda: (lease_until(engine, name) or datetime.max.replace(tzinfo=UTC))
                 < datetime.now(UTC), 15, what="the lease to lapse")
            _take_over(engine, name)

    with pytest.raises(LeaseLost):
        run_exclusive(engine, name, ttl, lambda: prune(
            engine, settings, actor="scheduler", chunk_size=1,
            progress=stall_after_the_first_chunk), keep_alive=False)

    with engine.connect() as conn:
        pruned = conn.execute(select(func.count()).select_from(record_versions).where(
            record_versions.c.pruned_at.is_not(None))).scalar_one()
    assert pruned == 1  # the first chunk was committed; the run stopped before the second
    audited = sum(json.loads(e["detail"])["versions"] for e in _retention_events(engine))
    assert audited == pruned


# == one upstream request's bound (gateway/upstream.py bounded_request) ========================

def SlowHeaders(every: float = 0.1) -> Trickle:  # noqa: N802 - a server, as the class was
    """An HTTP server below HTTP that sends its status line, then trickles a header line.

    Each byte comes well within the read timeout (a stuck proxy that relays byte by byte).
    """
    return Trickle(every, head=b"HTTP/1.1 200 OK\r\nX-Relay: ", drip=b"x")


def test_a_relay_that_trickles_its_headers_is_cut_off_at_the_deadline() -> None:
    relay = SlowHeaders()
    timeout = 1.0
    with httpx.Client(timeout=timeout) as client:
        held, took, _ = _held(
            lambda: pytest.raises(httpx.HTTPError, bounded_request, client, "GET", relay.url),
            4 * timeout + 3, relay.close)
    assert not held, f"bounded_request still reading headers after {took:.1f} s"


def _upstream_app(body: bytes) -> FastAPI:
    app = FastAPI()

    @app.get("/chunked")
    def chunked() -> StreamingResponse:
        return StreamingResponse(iter([body[:1000], body[1000:]]), media_type="application/json")

    @app.get("/gzip")
    def gzipped() -> Response:
        return Response(gzip.compress(body), media_type="application/json",
                        headers={"Content-Encoding": "gzip"})

    @app.get("/moved")
    def moved() -> RedirectResponse:
        return RedirectResponse("/gzip", status_code=307)

    return app


@pytest.fixture
def upstream() -> Iterator[tuple[str, bytes]]:
    body = json.dumps({"data": ["高原" * 900], "next": None}, ensure_ascii=False).encode()
    with uvicorn_thread(_upstream_app(body)) as url:
        yield url, body


def test_a_chunked_answer_exactly_at_the_cap_is_read_and_one_byte_over_is_cut_off(
        upstream: tuple[str, bytes]) -> None:
    url, body = upstream
    with httpx.Client(timeout=10) as client:
        got = bounded_request(client, "GET", f"{url}/chunked", max_bytes=len(body))
        assert got.content == body and got.json()["next"] is None
        assert "transfer-encoding" not in got.headers
        with pytest.raises(AnswerCutOff, match="outgrew"):
            bounded_request(client, "GET", f"{url}/chunked", max_bytes=len(body) - 1)


def test_a_gzip_answer_is_capped_on_its_decoded_size_over_real_http(
        upstream: tuple[str, bytes]) -> None:
    url, body = upstream
    assert len(gzip.compress(body)) < len(body) // 10
    with httpx.Client(timeout=10) as client:
        with pytest.raises(AnswerCutOff):
            bounded_request(client, "GET", f"{url}/gzip", max_bytes=len(body) - 1)
        got = bounded_request(client, "GET", f"{url}/gzip", max_bytes=len(body))
    assert got.content == body and "content-encoding" not in got.headers


def test_a_redirect_is_handed_back_unfollowed_unless_the_client_follows_and_then_is_capped(
        upstream: tuple[str, bytes]) -> None:
    url, body = upstream
    with httpx.Client(timeout=10) as client:
        moved = bounded_request(client, "GET", f"{url}/moved")
    assert moved.status_code == 307 and moved.headers["location"] == "/gzip"
    with httpx.Client(timeout=10, follow_redirects=True) as client:
        with pytest.raises(AnswerCutOff):
            bounded_request(client, "GET", f"{url}/moved", max_bytes=100)
        assert bounded_request(client, "GET", f"{url}/moved").content == body
