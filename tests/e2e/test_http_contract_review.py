"""Review of the HTTP surface against /openapi.json and SPEC §5–§7 (the ``httpc`` review).

A real gateway (uvicorn on 127.0.0.1, no delivery worker) on SQLite and PostgreSQL.  The
schemathesis run in test_schemathesis.py only checks "no 5xx" and the response schemas; this
file turns what the other checks (status codes, headers) and hand probing found into focused,
deterministic requests.  Each ``xfail(strict=True)`` is a bug: it fails today and passes once
fixed.  The plain tests pin behaviour that was checked and is right.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine

from contracts.errors import CATALOGUE
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import SigningClient
from mock_partners.generators import canonical_submission
from tests.support.servers import uvicorn_thread

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]
BASE_CODE = "QHJD001"
# Starlette's own English phrases, which must not stand in a Chinese message.
_LATIN_WORDS = re.compile(r"[A-Za-z]{3,}")


@dataclass(frozen=True)
class Gateway:
    url: str
    canonical: Partner
    base: Partner
    operator: dict[str, str]
    viewer: dict[str, str]


@pytest.fixture
def gateway(db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
            new_operator: Callable[..., str]) -> Iterator[Gateway]:
    canonical = new_partner(store)
    base = new_partner(store, adapter="training_base", base_code=BASE_CODE)
    operator = {"Authorization": f"Bearer {new_operator(store, role='operator')}"}
    viewer = {"Authorization": f"Bearer {new_operator(store, role='viewer')}"}
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        yield Gateway(url, canonical, base, operator, viewer)


def _coded(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The project's refusal body (SPEC §6): a code, an English and a Chinese message."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"code", "field", "message", "message_zh"}, error
    assert error["message"] and error["message_zh"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- wrong methods, unknown paths: Starlette's defaults through the coded handler --------------


def test_wrong_method_names_the_allowed_ones(gateway: Gateway) -> None:
    resp = httpx.put(f"{gateway.url}/v1/records", content=b"{}")
    _coded(resp, 405)
    assert "POST" in resp.headers.get("allow", ""), dict(resp.headers)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/records"), ("POST", "/healthz"), ("GET", "/v1/records/JD/2026/1")])
def test_wrong_method_is_not_called_a_record_schema_error(gateway: Gateway, method: str,
                                                         path: str) -> None:
    resp = httpx.request(method, f"{gateway.url}{path}", headers=gateway.operator)
    error = _coded(resp, 405)
    assert error["code"] != "SCHEMA", error
    assert error["code"] in CATALOGUE, error


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/no-such-thing", 404), ("PUT", "/v1/records", 405)])
def test_default_refusals_have_a_chinese_message_zh(gateway: Gateway, method: str, path: str,
                                                    status: int) -> None:
    error = _coded(httpx.request(method, f"{gateway.url}{path}", headers=gateway.operator), status)
    assert not _LATIN_WORDS.search(error["message_zh"]), error["message_zh"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_probes_answer_head(gateway: Gateway, path: str) -> None:
    resp = httpx.head(f"{gateway.url}{path}")
    assert resp.status_code == 200, (resp.status_code, dict(resp.headers))


# -- ops JSON bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/deliveries/reprocess", "/v1/records/revalidate",
                                  "/v1/conflicts/R1/resolve"])
def test_ops_body_that_is_not_utf8_is_a_declared_schema_refusal(gateway: Gateway,
                                                                path: str) -> None:
    resp = httpx.post(f"{gateway.url}{path}", content=b'{"reason": "\xff"}',
                      headers={**gateway.operator, "Content-Type": "application/json"})
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    declared = spec["paths"][path.replace("R1", "{record_id}")]["post"]["responses"]
    assert str(resp.status_code) in declared, (resp.status_code, sorted(declared))
    _coded(resp, 422, "SCHEMA")


def test_partner_body_that_is_not_utf8_is_a_schema_refusal(gateway: Gateway) -> None:
    """The reference the ops routes should match: the partner route answers 422 SCHEMA."""
    with SigningClient(gateway.url, gateway.canonical.app_key, gateway.canonical.secret) as c:
        resp = c.post("/v1/records", content=b'{"records": ["\xff"]}',
                      headers={"Content-Type": "application/json"})
    _coded(resp, 422, "SCHEMA")


# -- ops lists: filters, cursors, roles ----------------------------------------------------


def test_rejections_read_empty_filter_fields_as_any_as_deliveries_do(gateway: Gateway) -> None:
    query = "adapter=&partner_id=&error_code=&batch_id=&since=&until=&status="
    deliveries = httpx.get(f"{gateway.url}/v1/deliveries?{query.rsplit('&batch_id', 1)[0]}",
                           headers=gateway.viewer)
    assert deliveries.status_code == 200, deliveries.text
    rejections = httpx.get(f"{gateway.url}/v1/rejections?{query}", headers=gateway.viewer)
    assert rejections.status_code == 200, rejections.text
    assert set(rejections.json()) == {"items", "total", "next"}


def test_deliveries_pages_neither_skip_nor_repeat_when_rows_arrive_between_pages(
        gateway: Gateway) -> None:
    """Newest first by outbox id, keyset cursor: rows added meanwhile land before page one."""
    rng = random.Random(7)
    with SigningClient(gateway.url, gateway.canonical.app_key, gateway.canonical.secret) as c:
        first = c.submit([canonical_submission(rng, f"PG-{i}") for i in range(5)])
        assert first.status_code == 200 and first.json()["counts"]["accepted"] == 5, first.text
        url = f"{gateway.url}/v1/deliveries"
        page = httpx.get(url, params={"limit": 2, "partner_id": gateway.canonical.partner_id},
                         headers=gateway.viewer).json()
        assert page["total"] == 5 and len(page["items"]) == 2 and page["next"]
        seen = [item["id"] for item in page["items"]]
        more = c.submit([canonical_submission(rng, f"PG-late-{i}") for i in range(3)])
        assert more.status_code == 200, more.text
        while page["next"]:
            page = httpx.get(url, params={"limit": 2, "cursor": page["next"],
                                          "partner_id": gateway.canonical.partner_id},
                             headers=gateway.viewer).json()
            seen += [item["id"] for item in page["items"]]
    assert len(seen) == len(set(seen)) == 5, seen
    assert page["total"] == 8  # counted at the later page's moment
    # A filter that matches nothing counts nothing.
    none = httpx.get(url, params={"partner_id": "nobody"}, headers=gateway.viewer).json()
    assert none == {"items": [], "total": 0, "next": None}


@pytest.mark.parametrize("cursor", ["garbage", "eyJ4Ijox", "WyJjb25mbGljdHMiLCJ4Il0",
                                    "WyJkZWxpdmVyaWVzIiwieCJd"])
def test_a_tampered_cursor_is_a_coded_422_not_a_restart(gateway: Gateway, cursor: str) -> None:
    resp = httpx.get(f"{gateway.url}/v1/deliveries", params={"cursor": cursor},
                     headers=gateway.viewer)
    assert _coded(resp, 422, "SCHEMA")["field"] == "cursor"


def test_viewer_acting_is_403_forbidden_and_no_token_is_401(gateway: Gateway) -> None:
    body = {"reason": "check", "dry_run": False}
    _coded(httpx.post(f"{gateway.url}/v1/deliveries/reprocess", json=body,
                      headers=gateway.viewer), 403, "FORBIDDEN")
    _coded(httpx.post(f"{gateway.url}/v1/records/revalidate", json=body,
                      headers=gateway.viewer), 403, "FORBIDDEN")
    _coded(httpx.post(f"{gateway.url}/v1/deliveries/reprocess", json=body), 401,
           "UNAUTHENTICATED")


# -- the per-record answer: canonical and native -------------------------------------------


_ANSWER_KEYS = {"index", "source_record_id", "status", "record_id", "errors", "warnings"}


def test_canonical_and_native_record_answers_have_one_shape(gateway: Gateway) -> None:
    """SPEC §5: every record answer has the same keys; errors carry code/field/messages."""
    rng = random.Random(11)
    native = {"base_code": BASE_CODE, "plan_id": "PL-1", "results": [{"result_id": "T-1"}]}
    with SigningClient(gateway.url, gateway.canonical.app_key, gateway.canonical.secret) as c:
        canonical = c.submit([canonical_submission(rng, "A-1"), {"source_record_id": "A-2"}])
    with SigningClient(gateway.url, gateway.base.app_key, gateway.base.secret) as c:
        pushed = c.post("/v1/partners/training_base/records", content=orjson.dumps(native),
                        headers={"Content-Type": "application/json"})
    for resp in (canonical, pushed):
        assert resp.status_code == 200, resp.text
        for answer in resp.json()["results"]:
            assert _ANSWER_KEYS <= set(answer), answer
            for note in answer["errors"]:
                assert {"code", "field", "message", "message_zh"} <= set(note), note
    assert [a["index"] for a in canonical.json()["results"]] == [0, 1]
    assert pushed.json()["results"][0]["index"] == 0


@pytest.mark.parametrize("body", [b"[]", b'{"base_code": "QHJD001", "plan_id": "P", "results": []}'])
def test_native_envelope_that_is_no_document_is_refused_whole(gateway: Gateway,
                                                              body: bytes) -> None:
    with SigningClient(gateway.url, gateway.base.app_key, gateway.base.secret) as c:
        resp = c.post("/v1/partners/training_base/records", content=body,
                      headers={"Content-Type": "application/json"})
    filed = httpx.get(f"{gateway.url}/v1/rejections", headers=gateway.viewer).json()
    assert filed["total"] == 0, filed
    _coded(resp, 422, "SCHEMA")


def test_native_push_without_base_code_is_a_schema_error_not_a_scope_violation(
        gateway: Gateway) -> None:
    body = {"plan_id": "PL-1", "results": [{"result_id": "T-1"}]}
    with SigningClient(gateway.url, gateway.base.app_key, gateway.base.secret) as c:
        resp = c.post("/v1/partners/training_base/records", content=orjson.dumps(body),
                      headers={"Content-Type": "application/json"})
    assert resp.status_code != 403, resp.text
    if resp.status_code == 422:
        assert _coded(resp, 422, "SCHEMA")["field"] == "base_code"
    else:  # or a per-record SCHEMA answer naming base_code, as the other missing fields get
        assert resp.status_code == 200, resp.text
        fields = {e["field"] for a in resp.json()["results"] for e in a["errors"]}
        assert "base_code" in fields, resp.text
