"""``GET /metrics`` on a real gateway: every family is exposed and its values move (issue 5 §6).

One gateway with its delivery worker runs against the mock management system.  An outage
opens the circuit and holds a backlog; when it ends the backlog drains, one record is
dead-lettered (the mock rejects its title) and a batch file is processed.  Counters are
process-wide, so they are compared before and after for this test's own partners and outcomes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, insert

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import SigningClient
from gateway.store.tables import pull_state
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission
from tests.fixtures import make_golden
from tests.support.servers import poll, uvicorn_thread

FAMILIES = {  # family name → type, as the text exposition declares them
    "ce_gateway_ingested_records": "counter", "ce_gateway_delivery_attempts": "counter",
    "ce_gateway_delivery_latency_seconds": "histogram", "ce_gateway_backlog_records": "gauge",
    "ce_gateway_backlog_oldest_age_seconds": "gauge", "ce_gateway_dead_letters": "gauge",
    "ce_gateway_circuit_state": "gauge", "ce_gateway_batch_rows_processed": "counter",
    "ce_gateway_pull_lag_seconds": "gauge", "ce_gateway_store_up": "gauge",
    "ce_gateway_writer_retries": "counter",
}
ID_NUMBER = re.compile(r"\d{17}[\dXx]")


class Scrape:
    def __init__(self, url: str) -> None:
        resp = httpx.get(f"{url}/metrics")  # no token: inside the network boundary
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == CONTENT_TYPE_LATEST
        self.text = resp.text
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def value(self, sample: str, **labels: str) -> float:
        """The sum of ``sample``'s values whose labels include ``labels`` (0 when none)."""
        return sum(s.value for f in self.families.values() for s in f.samples
                   if s.name == sample and labels.items() <= s.labels.items())


def test_metrics_families_move_with_ingest_delivery_dead_letters_and_batches(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults]) -> None:
    mock_url, faults = mock_ce
    base = new_partner(engine)
    health = new_partner(engine, adapter="health")
    rng = random.Random(7)
    subs = [canonical_submission(rng, f"M-{i}") for i in range(3)]
    subs[1]["activity"]["title"] = "[REJECT] 高原医学专题讲座"
    settings = make_settings(db_url, mock_url, circuit_failure_threshold=2, circuit_reset_seconds=1,
                             delivery_max_attempts=100, batch_dir=tmp_path / "batches")
    faults.start_outage()

    with uvicorn_thread(create_app(settings, run_worker=True)) as url, \
            SigningClient(url, base.app_key, base.secret) as client, \
            SigningClient(url, health.app_key, health.secret) as uploader:
        before = Scrape(url)
        assert {name: before.families[name].type for name in FAMILIES} == FAMILIES
        assert before.value("ce_gateway_store_up") == 1
        assert before.value("ce_gateway_backlog_records") == 0
        assert before.value("ce_gateway_pull_lag_seconds") == 0  # no pull has run yet

        answers = client.submit(subs).json()["results"]
        assert [a["status"] for a in answers] == ["accepted"] * 3
        assert client.submit(subs[:1]).json()["results"][0]["status"] == "duplicate"

        # The outage: retries, a held backlog, the circuit open.
        def outage_seen() -> Scrape | None:
            now = Scrape(url)
            return now if now.value("ce_gateway_circuit_state") == 2 else None

        during = poll(outage_seen, 30, what="the circuit to open")
        assert during.value("ce_gateway_backlog_records") == 3
        assert during.value("ce_gateway_backlog_oldest_age_seconds") > 0
        # Two failed posts open the circuit (threshold 2), and a scrape reads the circuit before
        # the counters, so one showing it open counts both.  The outage answers 503, counted as
        # rate_limited; a post that ended otherwise (a transport error) counts toward it too.
        failed = {outcome: during.value("ce_gateway_delivery_attempts_total", outcome=outcome)
                  - before.value("ce_gateway_delivery_attempts_total", outcome=outcome)
                  for outcome in ("rate_limited", "retry", "transport_error")}
        assert failed["rate_limited"] >= 1, failed
        assert sum(failed.values()) >= 2, failed

        faults.stop_outage()

        def drained() -> Scrape | None:
            now = Scrape(url)
            done = (now.value("ce_gateway_backlog_records") == 0
                    and now.value("ce_gateway_circuit_state") == 0)
            return now if done else None

        after = poll(drained, 30, what="the backlog to drain")
        assert after.value("ce_gateway_dead_letters") == 1  # the rejected title
        assert after.value("ce_gateway_backlog_oldest_age_seconds") == 0

        batch = uploader.upload_batch(make_golden.HEALTH_CSV, adapter="health", kind="monthly",
                                      period="2026-03")
        assert batch.status_code == 202, batch.text
        batch_id = batch.json()["batch_id"]

        def batch_done() -> dict[str, Any] | None:
            body: dict[str, Any] = uploader.get(f"/v1/batches/{batch_id}").json()
            return body if body["status"] == "done" else None

        status = poll(batch_done, 60, what="the batch to finish")
        poll(drained, 30, what="the batch's records delivered")  # the worker is idle again
        with engine.begin() as conn:
            conn.execute(insert(pull_state).values(
                source="cadre_college", cursor=None, pulled_total=0,
                last_success_at=datetime.now(UTC) - timedelta(seconds=120), updated_at=datetime.now(UTC)))
        end = Scrape(url)

    def delta(sample: str, **labels: str) -> float:
        return end.value(sample, **labels) - before.value(sample, **labels)

    mine = {"partner_id": base.partner_id, "adapter": "canonical"}
    assert delta("ce_gateway_ingested_records_total", **mine, status="accepted") == 3
    assert delta("ce_gateway_ingested_records_total", **mine, status="duplicate") == 1
    rows = status["counts"]["rows"]
    assert rows > 0
    assert delta("ce_gateway_batch_rows_processed_total", partner_id=health.partner_id,
                 adapter="health") == rows
    assert delta("ce_gateway_ingested_records_total", partner_id=health.partner_id) == rows
    assert delta("ce_gateway_ingested_records_total", partner_id=health.partner_id,
                 status="rejected") == status["counts"]["rejected"]
    delivered = delta("ce_gateway_delivery_attempts_total", outcome="delivered")
    attempts = delta("ce_gateway_delivery_attempts_total")
    assert delivered >= 1 and attempts > delivered
    assert delta("ce_gateway_delivery_latency_seconds_count") == attempts
    assert delta("ce_gateway_delivery_latency_seconds_sum") > 0
    assert 120 <= end.value("ce_gateway_pull_lag_seconds", source="cadre_college") < 600

    # Never personal data: no identity number (nor record id) anywhere in the exposition.
    for scrape in (before, during, after, end):
        label_values = {v for f in scrape.families.values() for s in f.samples for v in s.labels.values()}
        assert not [v for v in label_values if ID_NUMBER.search(v)]
        assert not any(a["record_id"] in scrape.text for a in answers)
    assert all(sub["person"]["id_number"] not in end.text for sub in subs)


def test_metrics_registries_are_per_app(sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    """Two apps in one process each serve their own registry; no worker, no circuit sample."""
    settings = make_settings(sqlite_url)
    first, second = (create_app(settings, run_worker=False), create_app(settings, run_worker=False))
    with uvicorn_thread(first) as one, uvicorn_thread(second) as two:
        scrapes = [Scrape(one), Scrape(two)]
    for scrape in scrapes:
        assert scrape.families["ce_gateway_circuit_state"].samples == []
        assert scrape.value("ce_gateway_store_up") == 1

