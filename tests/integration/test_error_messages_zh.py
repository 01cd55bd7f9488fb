"""Every refusal's ``message_zh`` is Chinese all through (SPEC §6), against a real gateway.

A coded error's Chinese message is the catalogue's sentence followed by a detail naming the
field or value.  That detail used to be the English one copied in ("请求未签名、签名错误或已过期。
(unknown app key)"); here a representative refusal of each kind — partner signature and scope,
request body, ops filters, lookups, roles, the rate limit — is sent over HTTP and its Chinese
message checked for English prose.  Quoted values ('extra', 'canonical') and ids may stay as
they are: they are what the reader has to find.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import SigningClient, signed_headers
from gateway.store.db import make_engine
from mock_partners.generators import canonical_submission
from tests.support.servers import uvicorn_thread

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]
RECORDS = "/v1/records"
JSON = {"Content-Type": "application/json"}
CJK = re.compile(r"[\u4e00-\u9fff]")
QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
# Two English words in a row ("unknown app", "may only", "line 1 column" has "line" alone):
# prose, not a value.  Single tokens (X-CE-*, AppKey, Bearer, dry_run, status names) pass.
ENGLISH_PROSE = re.compile(r"[A-Za-z]{3,}[\s,;:]+[A-Za-z]{3,}")


def _body(source_id: str, seed: int) -> bytes:
    return orjson.dumps({"records": [canonical_submission(random.Random(seed), source_id)]})


def _chinese(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code, error
    zh: str = error["message_zh"]
    assert CJK.search(zh), error
    prose = ENGLISH_PROSE.search(QUOTED.sub("''", zh))
    assert prose is None, f"English in message_zh: {prose.group()!r} in {zh!r}"
    return zh


def _stale_headers(p: Partner, body: bytes) -> dict[str, str]:
    return signed_headers(p.app_key, p.secret, "POST", RECORDS, body,
                          timestamp=math.floor(time.time()) - 400)


def test_every_refusal_says_in_chinese_what_it_says_in_english(
    db_url: str, make_settings: MakeSettings, new_partner: NewPartner,
    new_operator: Callable[..., str],
) -> None:
    eng: Engine = make_engine(db_url)
    try:
        partner = new_partner(eng)
        health = new_partner(eng, adapter="health")
        viewer = {"Authorization": f"Bearer {new_operator(eng, role='viewer')}"}
        operator = {"Authorization": f"Bearer {new_operator(eng)}"}
        settings = make_settings(db_url, max_records_per_request=2)
        with uvicorn_thread(create_app(settings, run_worker=False)) as url, \
                SigningClient(url, partner.app_key, partner.secret) as client:
            seen: dict[str, str] = {}

            def check(name: str, resp: httpx.Response, status: int, code: str) -> None:
                seen[name] = _chinese(resp, status, code)

            # -- partner authentication (SPEC §7) ------------------------------------------
            body = _body("Z-1", 1)
            check("unsigned", httpx.post(url + RECORDS, content=body, headers=JSON),
                  401, "UNAUTHENTICATED")
            with SigningClient(url, "ak-nobody", partner.secret) as stranger:
                check("unknown app key", stranger.post(RECORDS, content=body, headers=JSON),
                      401, "UNAUTHENTICATED")
            with SigningClient(url, partner.app_key, partner.secret[::-1]) as forger:
                check("bad signature", forger.post(RECORDS, content=body, headers=JSON),
                      401, "UNAUTHENTICATED")
            check("stale timestamp", httpx.post(url + RECORDS, content=body,
                                                headers={**JSON, **_stale_headers(partner, body)}),
                  401, "UNAUTHENTICATED")
            check("short nonce", httpx.post(url + RECORDS, content=body, headers={
                **JSON, **signed_headers(partner.app_key, partner.secret, "POST", RECORDS, body,
                                         nonce="n" * 15)}), 401, "UNAUTHENTICATED")
            replayed = {**JSON, **signed_headers(partner.app_key, partner.secret, "POST",
                                                 RECORDS, body)}
            assert httpx.post(url + RECORDS, content=body, headers=replayed).status_code == 200
            check("replayed nonce", httpx.post(url + RECORDS, content=body, headers=replayed),
                  401, "REPLAYED")

            # -- the request body and the partner's scope ----------------------------------
            check("not JSON", client.post(RECORDS, content=b"{not json", headers=JSON),
                  422, "SCHEMA")
            check("no records list", client.post(RECORDS, content=b'{"items": []}', headers=JSON),
                  422, "SCHEMA")
            extra = orjson.dumps({"records": orjson.loads(_body("Z-2", 2))["records"], "extra": 1})
            check("unknown field", client.post(RECORDS, content=extra, headers=JSON),
                  422, "SCHEMA")
            check("no records", client.submit([]), 422, "SCHEMA")
            three = [canonical_submission(random.Random(10 + i), f"Z-{10 + i}") for i in range(3)]
            check("too many records", client.submit(three), 413, "PAYLOAD_TOO_LARGE")
            with SigningClient(url, health.app_key, health.secret) as outsider:
                check("outside its adapter", outsider.submit(three[:1]), 403, "SCOPE_VIOLATION")
            check("unknown record DELETE", client.delete("/v1/records/NOPE-1"), 404, "NOT_FOUND")

            # -- operators: tokens, roles, filters, lookups --------------------------------
            def get(path: str, headers: dict[str, str] = viewer, **params: Any) -> httpx.Response:
                return httpx.get(url + path, params=params, headers=headers)

            def post(path: str, payload: dict[str, Any],
                     headers: dict[str, str] = operator) -> httpx.Response:
                return httpx.post(url + path, json=payload, headers=headers)

            check("no bearer token", httpx.get(url + "/v1/deliveries"), 401, "UNAUTHENTICATED")
            check("unknown bearer token", get("/v1/deliveries", {"Authorization": "Bearer nope"}),
                  401, "UNAUTHENTICATED")
            check("bad status filter", get("/v1/deliveries", status="stuck"), 422, "SCHEMA")
            check("bad adapter filter", get("/v1/rejections", adapter="fax"), 422, "SCHEMA")
            check("bad time filter", get("/v1/deliveries", since="yesterday"), 422, "SCHEMA")
            check("naive far time", get("/v1/deliveries", until="1900-01-01"), 422, "SCHEMA")
            check("bad error code", get("/v1/deliveries", error_code="NOPE"), 422, "SCHEMA")
            check("bad cursor", get("/v1/conflicts", cursor="garbage"), 422, "SCHEMA")
            check("bad limit", get("/v1/deliveries", limit=0), 422, "SCHEMA")
            check("unknown delivery", get("/v1/deliveries/999999"), 404, "NOT_FOUND")
            check("unknown record", get("/v1/records/NOPE-2"), 404, "NOT_FOUND")
            check("reconciliation of canonical", get("/v1/reconciliation/canonical/2026"),
                  404, "NOT_FOUND")
            check("viewer acts", post("/v1/deliveries/reprocess", {"reason": "x"}, viewer),
                  403, "FORBIDDEN")
            check("viewer revalidates", post("/v1/records/revalidate", {"reason": "x"}, viewer),
                  403, "FORBIDDEN")
            check("revalidate without reason", post("/v1/records/revalidate", {}), 422, "SCHEMA")
            check("revalidate unknown adapter",
                  post("/v1/records/revalidate", {"adapter": "fax", "dry_run": True}),
                  422, "SCHEMA")
            check("reprocess without reason", post("/v1/deliveries/reprocess", {"status": "dead"}),
                  422, "SCHEMA")
            check("reprocess with a blank reason",
                  post("/v1/deliveries/reprocess", {"status": "dead", "reason": "  "}), 422, "SCHEMA")
            check("resolve unknown conflict",
                  post("/v1/conflicts/NOPE-3/resolve", {"keep": "this", "reason": "x"}),
                  404, "NOT_FOUND")
            check("edit unknown record", post("/v1/records/NOPE-4/edit", {
                "changes": {"activity.title": "t"}, "reason": "x"}), 404, "NOT_FOUND")
            check("edit unknown rejection", post("/v1/rejections/999/edit", {
                "changes": {"a": 1}, "reason": "x"}), 404, "NOT_FOUND")
        # The values the English names are named in Chinese too.
        assert "'extra'" in seen["unknown field"] and "NOPE-1" in seen["unknown record DELETE"]
        assert "'health'" in seen["outside its adapter"] and "2" in seen["too many records"]
        assert "stuck" not in seen["bad status filter"] and "dead" in seen["bad status filter"]
        assert "viewer" in seen["viewer acts"] and "999999" in seen["unknown delivery"]

        # -- the rate limit (its own gateway: one request a minute) ----------------------------
        limited = make_settings(db_url, rate_limit_per_minute=1, rate_limit_burst=1)
        with uvicorn_thread(create_app(limited, run_worker=False)) as url, \
                SigningClient(url, partner.app_key, partner.secret) as client:
            assert client.delete("/v1/records/NOPE-5").status_code == 404
            zh = _chinese(client.delete("/v1/records/NOPE-5"), 429, "RATE_LIMITED")
            assert re.search(r"\d+ 秒", zh), zh
    finally:
        eng.dispose()
