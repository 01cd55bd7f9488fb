"""SRE review: docs/metrics-and-alerts.md and docs/operations.md "Probes, metrics, alerts".

What an SRE wires Prometheus rules on, checked on a real gateway (uvicorn on 127.0.0.1) and
the real mocks, beyond tests/integration/test_metrics.py (families, types, the outage and the
dead letter), test_docs_review.py (the docs' table against what is served, the worker's
``--metrics-port``) and test_alerts*.py (each alert condition):

* ``ce_gateway_store_up == 0`` (docs/operations.md's suggested rule) can only fire if a scrape
  still answers while the store is gone: the scrape must answer 200 with ``store_up 0``,
  not fail (a failed scrape is ``up == 0``, a different rule);
* pulls are counted in ``ce_gateway_ingested_records_total`` ("API, batch files, pulls") with
  bounded labels, and ``ce_gateway_pull_lag_seconds`` is reset by a successful pull;
* the ``already_applied`` outcome of ``ce_gateway_delivery_attempts_total`` moves on a 409
  (SPEC §5: "409 on the batch = already applied (success)").
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.pipeline.ingest import ingest
from gateway.pull.cadre_college import PARTNER, pull_once
from gateway.store.db import make_engine
from gateway.store.tables import outbox
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission
from tests.integration.test_cadre_pull import College, college, pull_settings  # noqa: F401
from tests.support.delivery import MakeWorker, drain
from tests.support.servers import uvicorn_thread

ID_NUMBER = re.compile(r"\d{17}[\dXx]")
# Label values an SRE may see: bounded sets (partner ids, adapters, statuses, outcomes, causes,
# pull sources, histogram buckets).  A record id, source id, URL or error text is none of these.
BOUNDED_LABELS = {"partner_id", "adapter", "status", "outcome", "cause", "source", "le"}


class Scrape:
    """One ``GET /metrics`` (no token), parsed."""

    def __init__(self, url: str) -> None:
        resp = httpx.get(f"{url}/metrics")
        assert resp.status_code == 200, resp.text
        self.text = resp.text
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def value(self, sample: str, **labels: str) -> float:
        return sum(s.value for f in self.families.values() for s in f.samples
                   if s.name == sample and labels.items() <= s.labels.items())

    def names(self) -> set[str]:
        return {s.name for f in self.families.values() for s in f.samples}

    def label_values(self) -> set[str]:
        return {v for f in self.families.values() for s in f.samples for v in s.labels.values()}

    def label_names(self) -> set[str]:
        return {k for f in self.families.values() for s in f.samples for k in s.labels}


def test_a_scrape_with_the_store_gone_answers_store_up_zero_and_recovers(
        sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    """docs/operations.md: alert on ``ce_gateway_store_up == 0``.

    docs/metrics-and-alerts.md: "1 if the store answered the scrape's queries".  With the
    store unreachable the scrape still answers 200 — the counters and ``store_up 0``, no
    stale store gauge — and reads 1 again once the store is back.
    """
    path = Path(make_url(sqlite_url).database or "")
    app = create_app(make_settings(sqlite_url), run_worker=False)
    with uvicorn_thread(app) as url:
        assert Scrape(url).value("ce_gateway_store_up") == 1
        engine: Engine = app.state.gateway.engine
        engine.dispose()  # the pool's open files would still read the moved-away store
        aside = path.with_name(path.name + ".aside")
        os.replace(path, aside)
        path.mkdir()  # the store's path is now something SQLite cannot open
        try:
            down = Scrape(url)
        finally:
            path.rmdir()
            os.replace(aside, path)
        assert down.value("ce_gateway_store_up") == 0
        for gauge in ("ce_gateway_backlog_records", "ce_gateway_backlog_oldest_age_seconds",
                      "ce_gateway_dead_letters", "ce_gateway_pull_lag_seconds"):
            assert gauge not in down.names(), f"{gauge}: a stale value while the store is down"
        assert "ce_gateway_delivery_latency_seconds" in down.families  # the counters still served
        engine.dispose()
        assert Scrape(url).value("ce_gateway_store_up") == 1


def test_pulled_completions_are_counted_with_bounded_labels_and_reset_the_pull_lag(
        sqlite_url: str, college: College,  # noqa: F811
        make_settings: Callable[..., Settings]) -> None:
    """Pulled completions count as ingested, and a successful pull resets the pull lag.

    docs/metrics-and-alerts.md: ingested records are counted for "API, batch files, pulls";
    pull lag is "seconds since a pull source's last successful run"; labels never carry a
    record or source id.
    """
    college_url, mock = college(seed=11, initial=60)
    settings = pull_settings(make_settings, sqlite_url, college_url)
    with uvicorn_thread(create_app(make_settings(sqlite_url), run_worker=False)) as url:
        before = Scrape(url)
        store = make_engine(sqlite_url)
        try:
            result = pull_once(store, settings)
        finally:
            store.dispose()
        assert result.error is None and result.accepted == 60
        after = Scrape(url)

    mine = {"partner_id": PARTNER.partner_id, "adapter": PARTNER.adapter}
    assert (after.value("ce_gateway_ingested_records_total", **mine, status="accepted")
            - before.value("ce_gateway_ingested_records_total", **mine, status="accepted")) == 60
    assert 0 <= after.value("ce_gateway_pull_lag_seconds", source="cadre_college") < 60
    assert after.label_names() <= BOUNDED_LABELS
    values = after.label_values()
    assert not [v for v in values if ID_NUMBER.search(v) or "://" in v or " " in v]
    assert not set(mock.all_ids()) & values  # the college's completion ids stay out


def test_a_409_on_a_replayed_batch_is_counted_as_already_applied(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults],
        make_worker: MakeWorker) -> None:
    """A 409 on a replayed batch counts as ``already_applied`` and the record as delivered.

    docs/metrics-and-alerts.md: ``outcome`` includes ``already_applied``; SPEC §5: 409 on the
    batch = already applied (success).  A lost reply (503) is retried with the same key, and
    the management system answers 409.
    """
    _, faults = mock_ce
    faults.lost_reply_rate, faults.replay_conflict = 1.0, True
    partner = new_partner(engine)
    ingest(engine, partner, [canonical_submission(random.Random(5), "SRE-409")])
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        before = Scrape(url)
        drain(make_worker())
        after = Scrape(url)
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all())
    assert statuses == {"delivered": 1}

    def delta(outcome: str) -> float:
        return (after.value("ce_gateway_delivery_attempts_total", outcome=outcome)
                - before.value("ce_gateway_delivery_attempts_total", outcome=outcome))

    assert delta("already_applied") == 1
    assert delta("rate_limited") + delta("retry") >= 1  # the lost reply
    assert after.value("ce_gateway_backlog_records") == 0
