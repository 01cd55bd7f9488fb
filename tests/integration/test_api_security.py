"""Partner authentication, scope, size limits and masking (SPEC §7) against a real gateway.

Requests are built by hand with :func:`gateway.signing.signed_headers` where a test needs to
break one part of the signature, and sent with plain httpx so nothing re-signs them.

Every refusal of SPEC §7 and issue 6, and where it is tested:

- missing headers, bad or malformed signature, unknown app key, altered body/path/query,
  timestamp 310 s off either way (300 allowed; the margin covers a slow request), short
  nonce: ``test_a_broken_signature_is_401…``;
- a replayed nonce: ``test_an_exact_replay_is_refused``;
- the wrong adapter: ``test_a_partner_outside_its_adapter_is_403`` (API) and
  ``test_batch_limits…`` (a batch upload); the wrong base code: ``test_base_code_scope…``;
  a base partner stored without a base code (pushes, uploads, a roster it queued):
  ``test_a_base_partner_stored_without…``;
- withdrawing outside the partner's scope, and 1,001 canonical records:
  ``tests/integration/test_api_partner.py`` (404 / 413); too many native results:
  ``test_base_code_scope…``;
- a body over MAX_BODY_BYTES: ``test_a_body_over_the_limit_is_413``; a batch over
  MAX_BATCH_ROWS, and refusals before a byte of an upload's body is read: ``test_batch_limits…``;
- over the rate limit (429 + Retry-After): ``test_rate_limit…``;
- no identity number unmasked in logs, audit text, error messages or ``/metrics``:
  ``test_identity_numbers_never_reach…``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from sqlalchemy import Engine, select, update

from contracts.errors import CATALOGUE
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.config import Settings
from gateway.masking import mask_id
from gateway.signing import SigningClient, file_sha256, signed_headers
from gateway.store.db import make_engine
from gateway.store.tables import (
    audit_events,
    batch_errors,
    batches,
    partners,
    record_versions,
    records,
)
from mock_partners.ce_system import Faults
from mock_partners.files import HEALTH_HEADERS, health_rows, write_csv, write_ndjson, write_xlsx
from mock_partners.generators import canonical_submission, corrupt_check_digit
from mock_partners.training_base import results as base_results
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


def _assert_coded(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert CJK.search(error["message_zh"]), error
    return error


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


def _timestamp(value: str) -> Callable[[str, Partner], httpx.Response]:
    def send(url: str, p: Partner) -> httpx.Response:
        headers = signed_headers(p.app_key, p.secret, "POST", RECORDS, _body())
        return httpx.post(url + RECORDS, content=_body(),
                          headers={**JSON, **headers, "X-CE-Timestamp": value})
    return send


REFUSED = {
    "unsigned": _unsigned,
    "wrong-secret": _wrong_secret,
    "unknown-app-key": _unknown_app_key,
    "body-altered": _body_altered,
    "path-altered": _path_altered,
    "query-altered": _query_altered,
    "timestamp-310s-old": _skewed(-310),
    "timestamp-310s-ahead": _skewed(310),
    "timestamp-not-a-number": _timestamp("yesterday"),
    "timestamp-400-digits": _timestamp("9" * 400),  # overflowed into a 500 once (review)
    "timestamp-negative": _timestamp("-1"),
    "nonce-15-chars": _nonce("n" * 15),
    "signature-not-hex": lambda url, p: httpx.post(url + RECORDS, content=_body(), headers={
        **JSON, **signed_headers(p.app_key, p.secret, "POST", RECORDS, _body()),
        "X-CE-Signature": "z" * 64}),
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


def test_a_configured_window_is_the_one_enforced_and_named(
    sqlite_url: str, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    with engine_for(sqlite_url) as eng:
        partner = new_partner(eng)
        with gateway(make_settings(sqlite_url, signature_window_seconds=10)) as url:
            headers = signed_headers(partner.app_key, partner.secret, "POST", RECORDS, _body(),
                                     timestamp=int(time.time()) - 30)
            resp = httpx.post(url + RECORDS, content=_body(), headers={**JSON, **headers})
    error = _assert_coded(resp, 401, "UNAUTHENTICATED")
    assert "10 s window" in error["message"] and "300" not in error["message"]


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


def test_identity_numbers_never_reach_logs_audit_errors_or_metrics(
    db_url: str, tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner,
    mock_ce: tuple[str, Faults], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mock_url, _ = mock_ce
    rng = random.Random(50)
    good = canonical_submission(rng, "M-1")
    bad = canonical_submission(rng, "M-2")
    bad["person"]["id_number"] = corrupt_check_digit(bad["person"]["id_number"])
    # An identity number where the contract wants something else: an echoing validator
    # would put it into the error message.
    misplaced = canonical_submission(rng, "M-3")
    misplaced["hours"] = misplaced["person"]["id_number"]
    year = _open_year()
    rows = list(health_rows(51, 3, year, 3))
    rows[1]["身份证号"] = corrupt_check_digit(str(rows[1]["身份证号"]))
    rows[2]["学分"] = rows[2]["身份证号"]  # a shifted column: the id where a number belongs
    ids = [good["person"]["id_number"], bad["person"]["id_number"],
           misplaced["person"]["id_number"], *(str(r["身份证号"]) for r in rows)]
    batch_file = tmp_path / "health.csv"
    write_csv(batch_file, rows, HEALTH_HEADERS, encoding="gb18030")

    answers: list[str] = []  # every response body: error messages included
    access = logging.getLogger("uvicorn.access")
    settings = make_settings(db_url, mock_url, batch_dir=tmp_path / "batches")
    with engine_for(db_url) as eng:
        partner = new_partner(eng)
        health = new_partner(eng, adapter="health")
        with gateway(settings, run_worker=True) as url, \
                SigningClient(url, partner.app_key, partner.secret) as client, \
                SigningClient(url, health.app_key, health.secret) as files:
            # The access log is on for this test, and a partner that uses the identity
            # number as its own record id puts it into a logged URL.
            level = access.level
            access.setLevel(logging.INFO)
            access.addHandler(caplog.handler)
            try:
                resp = client.submit([good, bad, misplaced])
                answers.append(resp.text)
                assert [a["status"] for a in resp.json()["results"]] == [
                    "accepted", "rejected", "rejected"]
                for id_number in ids[:2]:
                    gone = client.delete(f"/v1/records/{id_number}")
                    answers.append(gone.text)
                    _assert_coded(gone, 404, "NOT_FOUND")
                upload = files.upload_batch(batch_file, adapter="health", kind="monthly",
                                            period=f"{year}-03")
                assert upload.status_code == 202, upload.text
                status = poll(lambda: (r := files.get(f"/v1/batches/{upload.json()['batch_id']}"))
                              .json()["status"] in ("done", "failed") and r, 60, what="batch")
                answers.append(status.text)
                assert status.json()["counts"]["rejected"] >= 1, status.text
                record_id = resp.json()["results"][0]["record_id"]
                poll(lambda: httpx.get(f"{mock_url}/_mock/applied/{record_id}",
                                       timeout=5).json()["versions"], 30, what="delivery")
                metrics = httpx.get(f"{url}/metrics")
                assert metrics.status_code == 200 and "ce_gateway" in metrics.text
            finally:
                access.removeHandler(caplog.handler)
                access.setLevel(level)
        with eng.connect() as conn:
            details = list(conn.execute(select(audit_events.c.detail)).scalars())
            stored_errors = [" ".join((e.message, e.message_zh)) for e in conn.execute(
                select(batch_errors.c.message, batch_errors.c.message_zh))]

    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for id_number in ids[:2]:
        assert mask_id(id_number) in logged  # the URLs were logged, masked
    audit_text = "\n".join(details)
    assert mask_id(ids[0]) in audit_text  # the received event names the person, masked
    scanned = {"logs": logged, "audit text": audit_text, "answers": "\n".join(answers),
               "batch errors": "\n".join(stored_errors), "metrics": metrics.text}
    for where, text in scanned.items():
        for id_number in ids:
            at = text.find(id_number)
            assert at < 0, f"unmasked in the {where}: …{text[max(0, at - 200):at + 40]}"


# -- scope of a training base: its own base code; native results counted --------------------------

NATIVE = "/v1/partners/training_base/records"


def test_base_code_scope_and_native_result_count_are_enforced(
    sqlite_url: str, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    with engine_for(sqlite_url) as eng:
        base = new_partner(eng, adapter="training_base", base_code="QHJD001")
        with gateway(make_settings(sqlite_url, max_records_per_request=2)) as url, \
                SigningClient(url, base.app_key, base.secret) as client:
            def push(base_code: str, n: int) -> httpx.Response:
                body = {"base_code": base_code, "plan_id": "PLAN-1",
                        "results": base_results(random.Random(60), n)}
                return client.post(NATIVE, content=orjson.dumps(body), headers=JSON)

            _assert_coded(push("QHJD999", 1), 403, "SCOPE_VIOLATION")
            _assert_coded(push("QHJD001", 3), 413, "PAYLOAD_TOO_LARGE")
        with eng.connect() as conn:
            assert conn.execute(select(records.c.record_id)).first() is None


def test_a_base_partner_stored_without_a_base_code_may_submit_for_no_base(
    db_url: str, tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    """A base partner added before ``partner add`` required --base-code submits for no base.

    Every submission is 403 (SPEC §7), and a roster it queued back then has every row refused.
    """
    roster = tmp_path / "roster.csv"
    rows = base_results(random.Random(62), 2)
    with roster.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, [*rows[0], "base_code", "plan_id"])
        writer.writeheader()
        writer.writerows({**r, "passed": "是", "base_code": code, "plan_id": "PLAN-1"}
                         for r, code in zip(rows, ("QHJD001", "QHJD002"), strict=True))
    with engine_for(db_url) as eng:
        base = new_partner(eng, adapter="training_base", base_code="QHJD001")
        with eng.begin() as conn:
            conn.execute(update(partners).where(partners.c.partner_id == base.partner_id)
                         .values(base_code=None))
        queued = NewBatch(new_batch_id(), base.partner_id, "training_base", "roster", "2026",
                          roster, "csv", roster.stat().st_size, file_sha256(roster))
        record_batch(eng, queued, actor=base.partner_id)
        settings = make_settings(db_url, batch_dir=tmp_path / "batches")
        with gateway(settings, run_worker=True) as url, \
                SigningClient(url, base.app_key, base.secret) as client:
            for code in ("QHJD001", "QHJD002"):
                body = {"base_code": code, "plan_id": "PLAN-1", "results": rows[:1]}
                _assert_coded(client.post(NATIVE, content=orjson.dumps(body), headers=JSON),
                              403, "SCOPE_VIOLATION")
            _assert_coded(client.upload_batch(roster, adapter="training_base", kind="roster",
                                              period="2026"), 403, "SCOPE_VIOLATION")
            status = poll(lambda: (r := client.get(f"/v1/batches/{queued.batch_id}"))
                          .json()["status"] == "done" and r.json(), 60, what="batch done")
        with eng.connect() as conn:
            assert conn.execute(select(records.c.record_id)).first() is None
            assert list(conn.execute(select(batches.c.batch_id)).scalars()) == [queued.batch_id]
    assert status["counts"]["rejected"] == 2, status
    assert [(r["row"], r["column"], r["code"]) for r in status["rejected_rows"]] == [
        (2, "base_code", "SCOPE_VIOLATION"), (3, "base_code", "SCOPE_VIOLATION")]


# -- batch uploads: refused before the body, and over the row limit -------------------------------


def _open_year() -> int:
    """A CE year still open today (R11 closes one on 30 December, Asia/Shanghai)."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return today.year if (today.month, today.day) <= (12, 30) else today.year + 1


def _raw_upload(url: str, target: str, headers: dict[str, str], content_length: int) -> bytes:
    """Send an upload's head only, no body byte, and read the answer (10 s at most)."""
    parts = urlsplit(url)
    lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}",
             f"Content-Length: {content_length}", "Content-Type: text/csv",
             *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return sock.recv(65536)  # a gateway that waited for the body would time out here


def test_batch_limits_refuse_before_the_body_and_over_the_row_limit(
    sqlite_url: str, tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    year, limit = _open_year(), 5
    period = f"{year}-03"
    target = f"/v1/batches?adapter=health&kind=monthly&period={period}"
    rows = list(health_rows(61, limit + 1, year, 3))
    files = tmp_path / "files"
    files.mkdir()
    over = {"csv": files / "over.csv", "ndjson": files / "over.ndjson", "xlsx": files / "over.xlsx"}
    write_csv(over["csv"], rows, HEALTH_HEADERS, encoding="gb18030")
    write_ndjson(over["ndjson"], rows, HEALTH_HEADERS)
    write_xlsx(over["xlsx"], rows, HEALTH_HEADERS)
    # Exactly at the limit, with more line breaks than rows: quoted cells holding line breaks,
    # blank lines, CR-only line ends.  Counted exactly, they pass.
    at_limit = files / "at_limit.csv"
    with at_limit.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\r", quoting=csv.QUOTE_ALL)
        writer.writerow(HEALTH_HEADERS)
        for row in rows[:limit]:
            writer.writerow([f"{row[h]}\n\n" if h == "工作单位" else row[h] for h in HEALTH_HEADERS])
            out.write("\r\r")

    batch_dir = tmp_path / "batches"
    settings = make_settings(sqlite_url, batch_dir=batch_dir, max_batch_rows=limit,
                             max_batch_bytes=1 << 20)
    with engine_for(sqlite_url) as eng:
        health = new_partner(eng, adapter="health")
        stranger = new_partner(eng)  # a canonical partner
        with gateway(settings) as url, SigningClient(url, health.app_key, health.secret) as client:
            def head(app_key: str, **extra: str) -> dict[str, str]:
                h = signed_headers(app_key, health.secret, "POST", target, b"x" * 100)
                return {**h, **extra}

            # Refused on the head alone (the body is never sent): an unknown app key, a
            # malformed signature, a declared size or row count over the limits.
            assert _raw_upload(url, target, head("ak-nobody"), 100).startswith(b"HTTP/1.1 401")
            assert _raw_upload(url, target, head(health.app_key, **{"X-CE-Signature": "0"}),
                               100).startswith(b"HTTP/1.1 401")
            assert _raw_upload(url, target, head(health.app_key), (1 << 20) + 1).startswith(
                b"HTTP/1.1 413")
            assert _raw_upload(url, target, head(health.app_key, **{"X-CE-Row-Count": "6"}),
                               100).startswith(b"HTTP/1.1 413")
            # Over the row limit, in each format: 413, and no batch.
            for fmt, path in over.items():
                resp = client.upload_batch(path, adapter="health", kind="monthly", period=period)
                _assert_coded(resp, 413, "PAYLOAD_TOO_LARGE")
                assert str(limit) in resp.json()["error"]["message"], fmt
            # A partner of another adapter may not upload health files.
            with SigningClient(url, stranger.app_key, stranger.secret) as other:
                _assert_coded(other.upload_batch(at_limit, adapter="health", kind="monthly",
                                                 period=period), 403, "SCOPE_VIOLATION")
            accepted = client.upload_batch(at_limit, adapter="health", kind="monthly",
                                           period=period)
            assert accepted.status_code == 202, accepted.text
        with eng.connect() as conn:
            assert list(conn.execute(select(batches.c.batch_id)).scalars()) == [
                accepted.json()["batch_id"]]
    assert [p.name for p in batch_dir.iterdir()] == [f"{accepted.json()['batch_id']}.csv"]


def test_a_hostile_batch_file_is_processed_with_every_bad_row_coded(
    sqlite_url: str, tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    """Formula cells, bytes of no encoding, a huge cell, a huge line, a cut last character."""
    year = _open_year()
    rows = list(health_rows(63, 3, year, 3))
    formula, at_sign = "=cmd|' /C calc'!A0", "@SUM(A1:A9)"
    rows[0]["工作单位"], rows[0]["项目名称"] = formula, at_sign
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(HEALTH_HEADERS)
    writer.writerows([row[h] for h in HEALTH_HEADERS] for row in rows)
    good = text.getvalue().encode("gb18030")
    hostile = b"\r\n".join([
        b"\xff\xfe\x00\x81,\x00garbage",          # bytes that are no GB18030 text
        b"H-1," + b"X" * 40_000,                      # a cell over Excel's limit
        b"H-2," + b"Y" * (2 << 20),                   # a line over the record limit
        b"=1+1,+2,-3,@4",                             # formulas, too few columns
        "H-3,张".encode("gb18030")[:-1],              # the last character cut in half
    ])
    path = tmp_path / "hostile.csv"
    path.write_bytes(good + hostile)
    settings = make_settings(sqlite_url, batch_dir=tmp_path / "batches")
    with engine_for(sqlite_url) as eng:
        health = new_partner(eng, adapter="health")
        with gateway(settings, run_worker=True) as url, \
                SigningClient(url, health.app_key, health.secret) as client:
            resp = client.upload_batch(path, adapter="health", kind="monthly", period=f"{year}-03")
            assert resp.status_code == 202, resp.text
            status = poll(lambda: (r := client.get(f"/v1/batches/{resp.json()['batch_id']}"))
                          .json()["status"] == "done" and r.json(), 60, what="batch done")
        with eng.connect() as conn:
            payload = conn.execute(select(record_versions.c.payload).join(
                records, records.c.record_id == record_versions.c.record_id).where(
                records.c.source_record_id == rows[0]["记录编号"])).scalar_one()
    assert status["counts"]["accepted"] == 3 and status["counts"]["rejected"] == 5, status
    rejected = {r["row"] for r in status["rejected_rows"]}
    assert rejected == {5, 6, 7, 8, 9}, status["rejected_rows"]
    assert all(r["code"] in CATALOGUE and r["message_zh"] for r in status["rejected_rows"])
    # Stored as the text it is: never evaluated, never stripped of its leading sign.
    record = orjson.loads(payload)
    assert (record["person"]["employer_name"], record["activity"]["title"]) == (formula, at_sign)


# -- rate limits (429 + Retry-After), shared by replicas ------------------------------------------


def test_rate_limit_is_per_partner_shared_by_replicas_and_spent_only_when_signed(
    db_url: str, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    # One request every 10 s, three at once: the fourth fits only 10 s after the first, so even
    # a loaded machine's slow signed submits cannot let it through (T = 1 s could here, and
    # T = 5 s did on the CI machine, four signed submits taking over 5 s, 2026-11-28).
    settings = make_settings(db_url, rate_limit_per_minute=6, rate_limit_burst=3)
    rng = random.Random(62)
    with engine_for(db_url) as eng:
        partner, other = new_partner(eng), new_partner(eng)
        with gateway(settings) as a, gateway(settings) as b:
            def submit(url: str, who: Partner = partner) -> httpx.Response:
                with SigningClient(url, who.app_key, who.secret) as client:
                    return client.submit([canonical_submission(rng, f"RL-{rng.random()}")])

            # Requests that do not prove the secret spend nothing of the partner's budget.
            for _ in range(5):
                _assert_coded(_wrong_secret(a, partner), 401, "UNAUTHENTICATED")
            first = time.monotonic()
            assert [submit(u).status_code for u in (a, b, a)] == [200, 200, 200]
            refused = submit(b)
            spent = time.monotonic() - first
            _assert_coded(refused, 429, "RATE_LIMITED")
            retry_after = int(refused.headers["Retry-After"])
            # T = 10 s: the next token is due 10 s after the first request, in whole seconds up.
            assert 10 - spent - 0.01 <= retry_after <= 10, (retry_after, spent)
            # A refusal spends nothing and moves nothing: retrying at once is refused again.
            again = submit(a)
            _assert_coded(again, 429, "RATE_LIMITED")
            assert 1 <= int(again.headers["Retry-After"]) <= retry_after
            assert submit(a, other).status_code == 200  # another partner has its own budget
            started = time.monotonic()
            poll(lambda: submit(a).status_code == 200, 25, interval=0.25,
                 what="the next request to fit")
            assert time.monotonic() - started <= retry_after + 5
