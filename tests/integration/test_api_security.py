"""Partner authentication, scope, size limits and masking (SPEC §7) against a real gateway.

Requests are built by hand with :func:`gateway.signing.signed_headers` where a test needs to
break one part of the signature, and sent with plain httpx so nothing re-signs them.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.masking import mask_id
from gateway.signing import SigningClient, signed_headers
from gateway.store.db import make_engine
from gateway.store.tables import audit_events, records
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission, corrupt_check_digit
from tests.support.servers import poll, uvicorn_thread

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]
CJK = re.compile(r"[\u4e00-\u9fff]")
RECORDS = "/v1/records"
JSON = {"Content-Type": "application/json"}


@contextmanager
def gateway(settings: Settings, *, run_worker: bool = False) -> Iterator[str]:
    with uvicorn_thread(create_app(settings, run_worker=run_worker)) as url:
        yield url


@contextmanager
def engine_for(url: str) -> Iterator[Engine]:
    eng = make_engine(url)
    try:
        yield eng
    finally:
        eng.dispose()


def _body(source_id: str = "S-1", seed: int = 21) -> bytes:
    return orjson.dumps({"records": [canonical_submission(random.Random(seed), source_id)]})


def _assert_coded(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert CJK.search(error["message_zh"]), error


# Each case breaks exactly one thing about an otherwise valid POST /v1/records.
def _unsigned(url: str, p: Partner) -> httpx.Response:
    return httpx.post(url + RECORDS, content=_body(), headers=JSON)


def _wrong_secret(url: str, p: Partner) -> httpx.Response:
    with SigningClient(url, p.app_key, p.secret[::-1]) as client:
        return client.submit(orjson.loads(_body())["records"])


def _unknown_app_key(url: str, p: Partner) -> httpx.Response:
    with SigningClient(url, "ak-nobody", p.secret) as client:
        return client.submit(orjson.loads(_body())["records"])


def _body_altered(url: str, p: Partner) -> httpx.Response:
    headers = signed_headers(p.app_key, p.secret, "POST", RECORDS, _body())
    return httpx.post(url + RECORDS, content=_body("S-2"), headers={**JSON, **headers})


def _path_altered(url: str, p: Partner) -> httpx.Response:
    headers = signed_headers(p.app_key, p.secret, "DELETE", "/v1/records/S-1", b"")
    return httpx.delete(url + "/v1/records/S-2", headers=headers)


def _query_altered(url: str, p: Partner) -> httpx.Response:
    headers = signed_headers(p.app_key, p.secret, "POST", RECORDS + "?trace=1", _body())
    return httpx.post(url + RECORDS + "?trace=2", content=_body(), headers={**JSON, **headers})


def _skewed(seconds: int) -> Callable[[str, Partner], httpx.Response]:
    # Rounded away from now, so the gateway sees at least |seconds| of skew, never 300.4.
    def send(url: str, p: Partner) -> httpx.Response:
        now = time.time()
        base = math.ceil(now) if seconds > 0 else math.floor(now)
        headers = signed_headers(p.app_key, p.secret, "POST", RECORDS, _body(),
                                 timestamp=base + seconds)
        return httpx.post(url + RECORDS, content=_body(), headers={**JSON, **headers})

    return send


def _nonce(nonce: str) -> Callable[[str, Partner], httpx.Response]:
    def send(url: str, p: Partner) -> httpx.Response:
        headers = signed_headers(p.app_key, p.secret, "POST", RECORDS, _body(), nonce=nonce)
        return httpx.post(url + RECORDS, content=_body(), headers={**JSON, **headers})

    return send


def _timestamp_not_a_number(url: str, p: Partner) -> httpx.Response:
    headers = signed_headers(p.app_key, p.secret, "POST", RECORDS, _body())
    return httpx.post(url + RECORDS, content=_body(),
                      headers={**JSON, **headers, "X-CE-Timestamp": "yesterday"})


REFUSED = {
    "unsigned": _unsigned,
    "wrong-secret": _wrong_secret,
    "unknown-app-key": _unknown_app_key,
    "body-altered": _body_altered,
    "path-altered": _path_altered,
    "query-altered": _query_altered,
    "timestamp-301s-old": _skewed(-301),
    "timestamp-301s-ahead": _skewed(301),
    "timestamp-not-a-number": _timestamp_not_a_number,
    "nonce-15-chars": _nonce("n" * 15),
}


@pytest.fixture
def signed_gateway(
    sqlite_url: str, make_settings: MakeSettings, new_partner: NewPartner
) -> Iterator[tuple[str, Partner, Engine]]:
    with engine_for(sqlite_url) as eng:
        partner = new_partner(eng)
        with gateway(make_settings(sqlite_url)) as url:
            yield url, partner, eng


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_broken_signature_is_401_and_stores_nothing(
    signed_gateway: tuple[str, Partner, Engine], case: str
) -> None:
    url, partner, eng = signed_gateway
    _assert_coded(REFUSED[case](url, partner), 401, "UNAUTHENTICATED")
    with eng.connect() as conn:
        assert conn.execute(select(records.c.record_id)).first() is None


@pytest.mark.parametrize(("skew", "nonce"), [(-290, None), (290, None), (0, "n" * 16)])
def test_the_edges_of_the_window_are_accepted(
    signed_gateway: tuple[str, Partner, Engine], skew: int, nonce: str | None
) -> None:
    url, partner, _ = signed_gateway
    headers = signed_headers(partner.app_key, partner.secret, "POST", RECORDS, _body(),
                             timestamp=int(time.time()) + skew, nonce=nonce)
    resp = httpx.post(url + RECORDS, content=_body(), headers={**JSON, **headers})
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["status"] == "accepted"


def test_an_exact_replay_is_refused(
    db_url: str, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    with engine_for(db_url) as eng:
        partner = new_partner(eng)
        body = _body("R-1")
        headers = {**JSON, **signed_headers(partner.app_key, partner.secret, "POST", RECORDS, body)}
        with gateway(make_settings(db_url)) as url:
            first = httpx.post(url + RECORDS, content=body, headers=headers)
            assert first.status_code == 200, first.text
            assert first.json()["results"][0]["status"] == "accepted"
            _assert_coded(httpx.post(url + RECORDS, content=body, headers=headers), 401, "REPLAYED")
            # A fresh signature over another body cannot reuse the nonce either.
            other = _body("R-2", seed=22)
            again = signed_headers(partner.app_key, partner.secret, "POST", RECORDS, other,
                                   nonce=headers["X-CE-Nonce"])
            _assert_coded(httpx.post(url + RECORDS, content=other, headers={**JSON, **again}),
                          401, "REPLAYED")
        with eng.connect() as conn:
            assert len(conn.execute(select(records.c.record_id)).all()) == 1


def test_a_partner_outside_its_adapter_is_403(
    sqlite_url: str, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    with engine_for(sqlite_url) as eng:
        base = new_partner(eng, adapter="training_base", base_code="QHJD001")
        with gateway(make_settings(sqlite_url)) as url, \
                SigningClient(url, base.app_key, base.secret) as client:
            _assert_coded(client.submit(orjson.loads(_body())["records"]), 403, "SCOPE_VIOLATION")
        with eng.connect() as conn:
            assert conn.execute(select(records.c.record_id)).first() is None


def test_a_body_over_the_limit_is_413(
    sqlite_url: str, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    small = _body("B-1")
    limit = len(small) + 100
    big = orjson.dumps({"records": [canonical_submission(random.Random(40 + i), f"B-{i}")
                                    for i in range(10)]})
    assert len(big) > limit
    with engine_for(sqlite_url) as eng:
        partner = new_partner(eng)
        with gateway(make_settings(sqlite_url, max_body_bytes=limit)) as url, \
                SigningClient(url, partner.app_key, partner.secret) as client:
            _assert_coded(client.post(RECORDS, content=big, headers=JSON), 413, "PAYLOAD_TOO_LARGE")
            # Chunked, without a Content-Length: the stream is counted as it arrives.
            headers = signed_headers(partner.app_key, partner.secret, "POST", RECORDS, big)
            chunks = iter([big[i:i + 512] for i in range(0, len(big), 512)])
            chunked = httpx.post(url + RECORDS, content=chunks, headers={**JSON, **headers})
            _assert_coded(chunked, 413, "PAYLOAD_TOO_LARGE")
            ok = client.post(RECORDS, content=small, headers=JSON)
            assert ok.status_code == 200, ok.text


def test_identity_numbers_never_reach_logs_or_audit_text(
    db_url: str, make_settings: MakeSettings, new_partner: NewPartner,
    mock_ce: tuple[str, Faults], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mock_url, _ = mock_ce
    rng = random.Random(50)
    good = canonical_submission(rng, "M-1")
    bad = canonical_submission(rng, "M-2")
    bad["person"]["id_number"] = corrupt_check_digit(bad["person"]["id_number"])
    ids = [good["person"]["id_number"], bad["person"]["id_number"]]

    access = logging.getLogger("uvicorn.access")
    with engine_for(db_url) as eng:
        partner = new_partner(eng)
        with gateway(make_settings(db_url, mock_url), run_worker=True) as url, \
                SigningClient(url, partner.app_key, partner.secret) as client:
            # The access log is on for this test, and a partner that uses the identity
            # number as its own record id puts it into a logged URL.
            level = access.level
            access.setLevel(logging.INFO)
            access.addHandler(caplog.handler)
            try:
                resp = client.submit([good, bad])
                assert [a["status"] for a in resp.json()["results"]] == ["accepted", "rejected"]
                for id_number in ids:
                    _assert_coded(client.delete(f"/v1/records/{id_number}"), 404, "NOT_FOUND")
                record_id = resp.json()["results"][0]["record_id"]
                poll(lambda: httpx.get(f"{mock_url}/_mock/applied/{record_id}",
                                       timeout=5).json()["versions"], 30, what="delivery")
            finally:
                access.removeHandler(caplog.handler)
                access.setLevel(level)
        with eng.connect() as conn:
            details = list(conn.execute(select(audit_events.c.detail)).scalars())

    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for id_number in ids:
        assert mask_id(id_number) in logged  # the URLs were logged, masked
        assert id_number not in logged
    audit_text = "\n".join(details)
    assert mask_id(ids[0]) in audit_text  # the received event names the person, masked
    for id_number in ids:
        assert id_number not in audit_text
