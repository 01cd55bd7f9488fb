"""Ops side of the HTTP API (SPEC §5): record timelines, audit, health and OpenAPI.

A real gateway with its delivery worker delivers to the mock management system; the
operator reads the record back with a bearer token, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, select, update

from contracts import CERecord
from gateway.accounts import Partner
from gateway.api.app import ErrorBody, create_app
from gateway.config import Settings
from gateway.signing import SigningClient
from gateway.store.tables import audit_events
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission
from tests.support.servers import poll, uvicorn_thread

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_coded(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code
    assert error["message"] and error["message_zh"]


def test_record_timeline_audit_and_verification(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
    new_operator: Callable[..., str], mock_ce: tuple[str, Faults],
) -> None:
    mock_url, _ = mock_ce
    rng = random.Random(31)
    partner = new_partner(store)
    viewer = _bearer(new_operator(store, role="viewer"))
    mine, neighbour = canonical_submission(rng, "O-1"), canonical_submission(rng, "O-2")

    with uvicorn_thread(create_app(make_settings(db_url, mock_url), run_worker=True)) as url, \
            SigningClient(url, partner.app_key, partner.secret) as client:
        answers = client.submit([mine, neighbour]).json()["results"]
        record_id, other_id = answers[0]["record_id"], answers[1]["record_id"]
        path = f"{url}/v1/records/{record_id}"

        _assert_coded(httpx.get(path), 401, "UNAUTHENTICATED")
        _assert_coded(httpx.get(path, headers=_bearer("not-a-token")), 401, "UNAUTHENTICATED")
        _assert_coded(httpx.get(path, headers={"Authorization": "Basic eDp5"}), 401,
                      "UNAUTHENTICATED")
        # Partner signatures are not operator credentials.
        _assert_coded(client.get(f"/v1/records/{record_id}"), 401, "UNAUTHENTICATED")
        _assert_coded(httpx.get(f"{url}/v1/records/R-unknown", headers=viewer), 404, "NOT_FOUND")
        # A NUL cannot be stored, so it finds nothing (PostgreSQL would refuse the query).
        _assert_coded(httpx.get(f"{url}/v1/records/R%00x", headers=viewer), 404, "NOT_FOUND")
        nul_audit = httpx.get(f"{url}/v1/audit", params={"record_id": "R\x00x"}, headers=viewer)
        assert nul_audit.status_code == 200 and nul_audit.json()["total"] == 0, nul_audit.text

        def delivered() -> dict[str, Any] | None:
            resp = httpx.get(path, headers=viewer)
            assert resp.status_code == 200, resp.text
            view: dict[str, Any] = resp.json()
            return view if view["status"] == "delivered" else None

        view = poll(delivered, 30, what="the record delivered")
        applied = httpx.get(f"{mock_url}/_mock/applied/{record_id}").json()["versions"]

        audit = httpx.get(f"{url}/v1/audit", params={"record_id": record_id}, headers=viewer)
        _assert_coded(httpx.get(f"{url}/v1/audit", params={"record_id": record_id}), 401,
                      "UNAUTHENTICATED")
        _assert_coded(httpx.get(f"{url}/v1/audit", headers=viewer), 422, "SCHEMA")
        verified = httpx.get(f"{url}/v1/audit/verify", headers=viewer)
        assert verified.status_code == 200, verified.text
        assert verified.json()["ok"] is True and verified.json()["checked"] > 0

        # Edit one event behind the gateway's back: verification names it.
        with store.begin() as conn:
            seq = conn.execute(select(audit_events.c.seq).where(
                audit_events.c.record_id == record_id, audit_events.c.kind == "received")
            ).scalar_one()
            conn.execute(update(audit_events).where(audit_events.c.seq == seq)
                         .values(detail='{"credited_hours":"999"}'))
        tampered = httpx.get(f"{url}/v1/audit/verify", headers=viewer).json()
        assert tampered["ok"] is False and tampered["first_bad_seq"] == seq

    record = CERecord.model_validate(view["record"])
    assert (record.record_id, record.version) == (record_id, 1)
    assert record.source.source_record_id == "O-1"
    kinds = [event["kind"] for event in view["timeline"]]
    for kind in ("received", "queued", "delivered"):
        assert kind in kinds
    assert kinds.index("received") < kinds.index("queued") < kinds.index("delivered")
    (receipt,) = [e["detail"]["receipt_no"] for e in view["timeline"] if e["kind"] == "delivered"]
    assert [a["receipt_no"] for a in applied] == [receipt]

    assert audit.status_code == 200, audit.text
    items = audit.json()["items"]
    assert audit.json()["total"] == len(items) > 0
    assert {e["record_id"] for e in items} == {record_id}  # the neighbour's events stay out
    assert other_id != record_id
    assert [e["kind"] for e in items] == kinds


def test_health_readiness_and_openapi(
    db_url: str, make_settings: MakeSettings
) -> None:
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        health = httpx.get(f"{url}/healthz")
        ready = httpx.get(f"{url}/readyz")
        spec = httpx.get(f"{url}/openapi.json")
        refused = httpx.get(f"{url}/v1/deliveries", params={"status": "lost"},
                            headers={"Authorization": "Bearer nobody"})

    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert "post" in paths["/v1/records"]
    assert "delete" in paths["/v1/records/{source_record_id}"]
    assert "get" in paths["/v1/records/{record_id}"]
    assert {"/v1/audit", "/v1/audit/verify", "/healthz", "/readyz"} <= set(paths)
    # Refusals are documented as the coded body the app really sends, not FastAPI's default.
    for status in ("401", "422"):
        declared = paths["/v1/records"]["post"]["responses"][status]
        assert declared["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert refused.status_code == 401
    assert ErrorBody.model_validate(refused.json()).error.code == "UNAUTHENTICATED"


def test_readyz_reports_a_store_that_is_not_migrated(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    app = create_app(make_settings(url), run_worker=False, migrate=False)
    with uvicorn_thread(app) as base:
        resp = httpx.get(f"{base}/readyz")
    assert resp.status_code == 503
    assert resp.json()["status"] == "not ready"
