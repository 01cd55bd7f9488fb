r"""A partner's own client, written from the documentation alone, against a real gateway.

The review's angle: an integration engineer at a partner reads SPEC §7 "Partner auth" and the
README's "Partners: signing a request" (the only partner-facing text that names
``X-CE-Signature``) and writes a client in whatever language they use.  So nothing here imports
``gateway.signing``: :func:`doc_signature` is the documented formula, built with hmac, hashlib
and httpx only::

    X-CE-Signature = lowercase hex HMAC-SHA256(secret,
        METHOD "\n" path-with-query "\n" timestamp "\n" nonce "\n" lowercase hex SHA-256(body))

and batch files are "signed over the SHA-256 of the file" (README).  Each documented case must
work, each documented refusal must be coded as documented (docs/error-codes.md: ``{"error":
{code, field, message, message_zh}}``, an English and a Chinese message), and where the docs are
silent the test takes what a partner would reasonably expect: the path-with-query is the request
target exactly as the client sends it (percent-encoded, in the client's own parameter order).

Findings of the review, fixed (the gateway or the README):

- an empty query sent as a trailing ``?`` is signed by the client but dropped by the gateway:
  ``test_a_trailing_question_mark_is_signed_as_sent``;
- a timestamp exactly 300 s behind is refused although the docs refuse only "more than 300 s
  off" (and 300 s ahead is accepted): ``test_a_timestamp_exactly_300_s_behind_is_accepted``;
- a nonce over 128 characters is refused although the docs ask only "16+":
  ``test_a_long_nonce_is_accepted_or_its_limit_documented``;
- the docs never say the path is signed percent-encoded, as sent (what the gateway does):
  ``test_the_docs_say_the_path_is_signed_as_sent``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from sqlalchemy import Engine

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from mock_partners.files import HEALTH_HEADERS, health_rows, write_csv
from tests.support.servers import poll, uvicorn_thread

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]
CJK = re.compile(r"[\u4e00-\u9fff]")
ROOT = Path(__file__).resolve().parents[2]
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# The README's curl example body, verbatim but for the source id.
README_RECORD: dict[str, Any] = {
    "source_record_id": "JD-2026-000123",
    "person": {"id_type": "resident_id", "id_number": "630102198704139126", "name": "赵伟",
               "region_code": "630200"},
    "year": 2026, "category": "professional", "activity_type": "training",
    "activity": {"title": "高原生态修复技术研修班", "mode": "offline", "started_on": "2026-05-10",
                 "completed_on": "2026-05-13"},
    "claimed": {"quantity": "24", "unit": "hours", "details": {}},
    "evidence": {"certificate_no": "QH2026000123", "assessment": "passed"},
}


def doc_signature(secret: str, method: str, target: str, timestamp: str, nonce: str,
                  body_sha256: str) -> str:
    """SPEC §7's formula, as a partner would write it from the text."""
    message = "\n".join([method, target, timestamp, nonce, body_sha256])
    return hmac.new(secret.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


class DocClient:
    """A partner's hand-written client: it signs the request target exactly as it sends it."""

    def __init__(self, base_url: str, partner: Partner) -> None:
        self.base, self.partner = base_url, partner
        self.http = httpx.Client(timeout=30)

    def close(self) -> None:
        self.http.close()

    def headers(self, method: str, target: str, body_sha256: str, *, ts: str | None = None,
                nonce: str | bytes | None = None, signature: str | None = None,
                names: Callable[[str], str] = str) -> dict[str, Any]:
        ts = str(int(time.time())) if ts is None else ts
        nonce = secrets.token_hex(16) if nonce is None else nonce
        text_nonce = nonce.decode("utf-8") if isinstance(nonce, bytes) else nonce
        sig = signature or doc_signature(self.partner.secret, method, target, ts, text_nonce,
                                         body_sha256)
        return {names("X-CE-App-Key"): self.partner.app_key, names("X-CE-Timestamp"): ts,
                names("X-CE-Nonce"): nonce, names("X-CE-Signature"): sig}

    def send(self, method: str, target: str, body: bytes = b"", *,
             extra: dict[str, str] | None = None, **sign: Any) -> httpx.Response:
        headers = {**self.headers(method, target, hashlib.sha256(body).hexdigest(), **sign),
                   **(extra or {})}
        if body:
            headers.setdefault("Content-Type", "application/json")
        return self.http.request(method, self.base + target, content=body or None,
                                 headers=headers)

    def submit(self, records: list[dict[str, Any]], **sign: Any) -> httpx.Response:
        return self.send("POST", "/v1/records", orjson.dumps({"records": records}), **sign)

    def upload(self, path: Path, target: str, *, chunk: int = 4096,
               extra: dict[str, str] | None = None) -> httpx.Response:
        """Stream a file (chunked, no Content-Length), signed over its SHA-256 (README)."""
        digest = hashlib.sha256(path.read_bytes()).hexdigest()

        def blocks() -> Iterator[bytes]:
            with path.open("rb") as handle:
                while block := handle.read(chunk):
                    yield block

        headers = {**self.headers("POST", target, digest),
                   "Content-Type": "application/octet-stream", **(extra or {})}
        return self.http.request("POST", self.base + target, content=blocks(), headers=headers)


@contextmanager
def doc_client(url: str, partner: Partner) -> Iterator[DocClient]:
    client = DocClient(url, partner)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def gateway(settings: Settings, *, run_worker: bool = False) -> Iterator[str]:
    with uvicorn_thread(create_app(settings, run_worker=run_worker)) as url:
        yield url


def record(source_id: str, n: int) -> dict[str, Any]:
    """The README's record under another source id and a distinct activity (no natural dedup)."""
    return {**README_RECORD, "source_record_id": source_id,
            "activity": {**README_RECORD["activity"], "title": f"高原生态修复技术研修班第{n}期"},
            "evidence": {"certificate_no": f"QH2026{n:06d}", "assessment": "passed"}}


def assert_coded(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """docs/error-codes.md: the code, an English message and a Chinese one."""
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code, error
    assert set(error) >= {"code", "field", "message", "message_zh"}, error
    assert error["message"] and not CJK.search(error["message"]), error
    assert CJK.search(error["message_zh"]), error
    return error


def within_one_second(request: Callable[[int], httpx.Response]) -> httpx.Response:
    """``request(now)`` retried until the clock's second did not tick while it ran.

    The docs count whole unix seconds; a try that straddles a second boundary is 1 s off what
    it meant to test, in either direction.
    """
    for _ in range(10):
        now = int(time.time())
        resp = request(now)
        if int(time.time()) == now:
            return resp
    raise AssertionError("ten requests in a row straddled a second boundary")


def retried_on_reset(request: Callable[[], httpx.Response]) -> httpx.Response:
    """A refusal sent before the whole body was read may reach the client as a reset; retry."""
    for _ in range(5):
        try:
            return request()
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            continue
    raise AssertionError("the connection was reset five times in a row")


def _statuses(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [r["status"] for r in resp.json()["results"]]


# --- what works as documented ------------------------------------------------------------------


def test_the_readme_formula_signs_a_submission_in_any_header_case_and_hex_case(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine)
    with gateway(make_settings(db_url)) as url, doc_client(url, partner) as client:
        assert _statuses(client.submit([record("JD-2026-000123", 1)])) == ["accepted"]
        # HTTP header names are case-insensitive: a client that lowercases them still signs.
        assert _statuses(client.submit([record("JD-2026-000124", 2)],
                                       names=str.lower)) == ["accepted"]
        assert _statuses(client.submit([record("JD-2026-000125", 3)],
                                       names=str.upper)) == ["accepted"]
        # SPEC asks lowercase hex; an uppercase one is the same number and is taken.
        body = orjson.dumps({"records": [record("JD-2026-000126", 4)]})
        ts, nonce = str(int(time.time())), secrets.token_hex(16)
        upper = doc_signature(partner.secret, "POST", "/v1/records", ts, nonce,
                              hashlib.sha256(body).hexdigest()).upper()
        resp = client.send("POST", "/v1/records", body, ts=ts, nonce=nonce, signature=upper)
        assert _statuses(resp) == ["accepted"]
        # The same content again is a duplicate, new content a correction (SPEC §7 dedup).
        assert _statuses(client.submit([record("JD-2026-000123", 1)])) == ["duplicate"]
        changed = {**record("JD-2026-000123", 1), "claimed": {"quantity": "16", "unit": "hours",
                                                             "details": {}}}
        assert _statuses(client.submit([changed])) == ["corrected"]


def test_documented_refusals_are_coded_in_english_and_chinese(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    canon = new_partner(engine)
    base = new_partner(engine, adapter="training_base", base_code="QHJD-001")
    settings = make_settings(db_url, max_body_bytes=4096, batch_dir=tmp_path / "b")
    with gateway(settings) as url, doc_client(url, canon) as client, \
            doc_client(url, base) as base_client:
        body = orjson.dumps({"records": [record("R-1", 1)]})
        # unsigned
        assert_coded(client.http.post(url + "/v1/records", content=body,
                                      headers={"Content-Type": "application/json"}),
                     401, "UNAUTHENTICATED")
        # signed with another secret
        assert_coded(client.send("POST", "/v1/records", body, signature="0" * 64),
                     401, "UNAUTHENTICATED")
        # signed over another body than the one sent
        hdr = client.headers("POST", "/v1/records", hashlib.sha256(b"{}").hexdigest())
        assert_coded(client.http.post(url + "/v1/records", content=body,
                                      headers={**hdr, "Content-Type": "application/json"}),
                     401, "UNAUTHENTICATED")
        # stale
        assert_coded(client.send("POST", "/v1/records", body, ts=str(int(time.time()) - 3600)),
                     401, "UNAUTHENTICATED")
        # the exact request again: the nonce was used
        ts, nonce = str(int(time.time())), secrets.token_hex(16)
        assert _statuses(client.send("POST", "/v1/records", body, ts=ts, nonce=nonce)) == ["accepted"]
        assert_coded(client.send("POST", "/v1/records", body, ts=ts, nonce=nonce), 401, "REPLAYED")
        # a canonical partner on a training base's endpoint; a base for another base code
        push = orjson.dumps({"base_code": "QHJD-001", "plan_id": "P-1", "results": []})
        assert_coded(client.send("POST", "/v1/partners/training_base/records", push),
                     403, "SCOPE_VIOLATION")
        other = orjson.dumps({"base_code": "QHJD-999", "plan_id": "P-1", "results": [{
            "result_id": "X-1", "id_no": "630102198704139126", "name": "赵伟", "hours": "8",
            "passed": True, "started_on": "2026-05-10", "completed_on": "2026-05-11"}]})
        assert_coded(base_client.send("POST", "/v1/partners/training_base/records", other),
                     403, "SCOPE_VIOLATION")
        # a body over MAX_BODY_BYTES, declared and chunked
        big = orjson.dumps({"records": [record(f"B-{i}", 100 + i) for i in range(20)]})
        assert len(big) > 4096
        assert_coded(retried_on_reset(lambda: client.send("POST", "/v1/records", big)),
                     413, "PAYLOAD_TOO_LARGE")

        def chunked_post() -> httpx.Response:
            hdr = client.headers("POST", "/v1/records", hashlib.sha256(big).hexdigest())
            return client.http.post(url + "/v1/records", content=iter([big[:3000], big[3000:]]),
                                    headers={**hdr, "Content-Type": "application/json"})

        chunked = retried_on_reset(chunked_post)
        assert "content-length" not in chunked.request.headers
        assert_coded(chunked, 413, "PAYLOAD_TOO_LARGE")
        # not JSON, and not {"records": [...]}
        assert_coded(client.send("POST", "/v1/records", b"{not json"), 422, "SCHEMA")
        error = assert_coded(client.send("POST", "/v1/records", b'{"records": []}'), 422, "SCHEMA")
        assert error["field"] == "records"


def test_over_the_rate_limit_is_429_with_retry_after(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine)
    settings = make_settings(db_url, rate_limit_per_minute=2, rate_limit_burst=2)
    with gateway(settings) as url, doc_client(url, partner) as client:
        answers = [client.send("GET", "/v1/batches") for _ in range(3)]
        assert [a.status_code for a in answers[:2]] == [200, 200], answers[1].text
        assert_coded(answers[2], 429, "RATE_LIMITED")
        retry_after = answers[2].headers.get("retry-after", "")
        assert retry_after.isdigit() and int(retry_after) >= 1, answers[2].headers


# --- timestamps and nonces ---------------------------------------------------------------------


def test_the_timestamp_window_and_format(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine)
    with gateway(make_settings(db_url)) as url, doc_client(url, partner) as client:
        def at(ts: str) -> httpx.Response:
            return client.send("GET", "/v1/batches", ts=ts)

        # ±300 s in whole unix seconds, each try inside one wall-clock second
        assert within_one_second(lambda now: at(str(now + 300))).status_code == 200
        assert_coded(within_one_second(lambda now: at(str(now + 301))), 401, "UNAUTHENTICATED")
        assert_coded(within_one_second(lambda now: at(str(now - 301))), 401, "UNAUTHENTICATED")
        # unix seconds with leading zeros are still unix seconds (and signed as sent)
        assert at("0" + str(int(time.time()))).status_code == 200
        # not unix seconds: refused as unsigned, coded, never a 400 or 500
        for bad in (f"{int(time.time())}.0", f"{int(time.time()) * 1000}", f"-{int(time.time())}",
                    "", "now"):
            resp = at(bad)
            assert_coded(resp, 401, "UNAUTHENTICATED")


def test_a_timestamp_exactly_300_s_behind_is_accepted(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine)
    with gateway(make_settings(db_url)) as url, doc_client(url, partner) as client:
        resp = within_one_second(lambda now: client.send("GET", "/v1/batches", ts=str(now - 300)))
        assert resp.status_code == 200, resp.text


def test_nonce_lengths_and_characters(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine)
    with gateway(make_settings(db_url)) as url, doc_client(url, partner) as client:
        assert client.send("GET", "/v1/batches", nonce="n" * 16).status_code == 200
        assert_coded(client.send("GET", "/v1/batches", nonce="m" * 15), 401, "UNAUTHENTICATED")
        # 16+ "random characters": a UUID is fine
        assert client.send("GET", "/v1/batches", nonce="3b241101-e2bb-4255-8caf-4136c566a962"
                           ).status_code == 200
        # a non-ASCII nonce (sent as UTF-8) is refused coded, not as a 400 or a 500
        assert_coded(client.send("GET", "/v1/batches", nonce="随机数随机数随机数随机数随机数随机".encode()),
                     401, "UNAUTHENTICATED")


def test_a_long_nonce_is_accepted_or_its_limit_documented(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = re.search(r"16\s*[–-]\s*128", readme) is not None
    with gateway(make_settings(db_url)) as url, doc_client(url, partner) as client:
        accepted = client.send("GET", "/v1/batches", nonce=secrets.token_hex(80)).status_code == 200
    assert documented or accepted


# --- path-with-query ---------------------------------------------------------------------------


def test_queries_are_signed_as_sent_in_any_order_and_encoding(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine, adapter="health")
    with gateway(make_settings(db_url)) as url, doc_client(url, partner) as client:
        for target in ("/v1/batches?kind=monthly&adapter=health",
                       "/v1/batches?adapter=health&kind=monthly",
                       "/v1/batches?period=2026%2d03",  # lowercase escape of "-"
                       "/v1/batches?period=2026%2D03",
                       "/v1/batches?period=" + quote("二〇二六年三月"),
                       "/v1/batches?period=" + quote("二〇二六年三月").lower(),
                       "/v1/batches?kind=monthly&kind=annual",
                       "/v1/batches?period=2026-03&limit=5&period=2026-04"):
            resp = client.send("GET", target)
            assert resp.status_code == 200, (target, resp.text)
            assert resp.json()["items"] == []
        # a signature over the same query in another order is not the one sent
        hdr = client.headers("GET", "/v1/batches?adapter=health&kind=monthly", EMPTY_SHA256)
        assert_coded(client.http.get(url + "/v1/batches?kind=monthly&adapter=health", headers=hdr),
                     401, "UNAUTHENTICATED")
        # a non-ASCII period on an upload is a coded SCHEMA refusal naming it
        target = "/v1/batches?adapter=health&kind=monthly&period=" + quote("二〇二六-03")
        resp = client.send("POST", target, b"a,b\n1,2\n")
        assert assert_coded(resp, 422, "SCHEMA")["field"] == "period"


def test_a_trailing_question_mark_is_signed_as_sent(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine)
    with gateway(make_settings(db_url)) as url, doc_client(url, partner) as client:
        resp = client.send("GET", "/v1/batches?")
        assert resp.request.url.raw_path == b"/v1/batches?"
        assert resp.status_code == 200, resp.text


def test_the_docs_say_the_path_is_signed_as_sent() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Partners: signing a request", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"percent-encoded|as sent|exactly as", section), section[:400]


def test_withdrawing_source_ids_that_need_encoding(
        db_url: str, engine: Engine, make_settings: MakeSettings, new_partner: NewPartner) -> None:
    partner = new_partner(engine)
    ids = {"JD/2026/1": "/v1/records/JD%2F2026%2F1",
           "JD/2026/2": "/v1/records/JD%2f2026%2f2",  # lowercase escapes, signed as sent
           "JD/2026/3": "/v1/records/JD/2026/3",  # the slash sent raw
           "JD 2026 4": "/v1/records/JD%202026%204",
           "培训-2026-5": "/v1/records/" + quote("培训-2026-5", safe=""),
           "培训 2026/6": "/v1/records/" + quote("培训 2026/6", safe="").lower()}
    with gateway(make_settings(db_url)) as url, doc_client(url, partner) as client:
        submitted = client.submit([record(sid, 10 + i) for i, sid in enumerate(ids)])
        assert _statuses(submitted) == ["accepted"] * len(ids)
        for sid, target in ids.items():
            # DELETE has no body: the hash signed is that of the empty string (e3b0…)
            resp = client.send("DELETE", target)
            assert resp.status_code == 200, (sid, resp.text)
            answer = resp.json()
            assert answer["source_record_id"] == sid and answer["version"] == 2, answer
        # withdrawn once; the same id again is a new nonce, not a replay, and still answered
        again = client.send("DELETE", ids["JD 2026 4"])
        assert again.status_code in (200, 404), again.text
        # a signature over the decoded path is not the target sent
        hdr = client.headers("DELETE", "/v1/records/JD 2026 4", EMPTY_SHA256)
        assert_coded(client.http.delete(url + "/v1/records/JD%202026%204", headers=hdr),
                     401, "UNAUTHENTICATED")
        # a body hash other than the empty string's for a bodiless DELETE
        hdr = client.headers("DELETE", ids["JD/2026/1"], hashlib.sha256(b"{}").hexdigest())
        assert_coded(client.http.delete(url + ids["JD/2026/1"], headers=hdr),
                     401, "UNAUTHENTICATED")
        # an id the partner never sent
        missing = client.send("DELETE", "/v1/records/" + quote("没有/这条", safe=""))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
        assert_coded(client.send("DELETE", "/v1/records/NO%2FSUCH"), 404, "NOT_FOUND")


# --- batch files -------------------------------------------------------------------------------


def _health_file(path: Path, seed: int, rows: int) -> Path:
    write_csv(path, list(health_rows(seed, rows, 2026, 3, bad_ratio=0.0)), HEALTH_HEADERS,
              encoding="gb18030")
    return path


def _finished(client: DocClient, batch_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        resp = client.send("GET", f"/v1/batches/{batch_id}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body if body["status"] in ("done", "failed") else None

    result: dict[str, Any] = poll(check, 60, interval=0.1, what=f"batch {batch_id}")
    return result


def _items(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [item["batch_id"] for item in resp.json()["items"]]


def test_a_chunked_batch_upload_signed_over_the_file_hash_and_the_partner_batch_reads(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    health = new_partner(engine, adapter="health")
    other = new_partner(engine, adapter="health")
    canon = new_partner(engine)
    path = _health_file(tmp_path / "卫健委_2026-03.csv", 31, 25)
    settings = make_settings(db_url, batch_dir=tmp_path / "b")
    # the query in the partner's own order, an escape in lowercase
    target = "/v1/batches?period=2026%2d03&kind=monthly&adapter=health"
    with gateway(settings, run_worker=True) as url, doc_client(url, health) as client, \
            doc_client(url, other) as other_client, doc_client(url, canon) as canon_client:
        resp = client.upload(path, target, extra={"X-CE-Row-Count": "25"})
        assert "content-length" not in resp.request.headers
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        assert accepted["bytes"] == path.stat().st_size
        batch_id = accepted["batch_id"]
        status = _finished(client, batch_id)
        assert status["status"] == "done", status
        assert (status["adapter"], status["kind"], status["period"]) == ("health", "monthly",
                                                                         "2026-03")
        assert status["counts"]["rows"] == 25 and status["counts"]["accepted"] == 25, status
        # the same file again is the resend of a lost 202
        again = client.upload(path, target, extra={"X-CE-Row-Count": "25"})
        assert again.status_code == 202 and again.json()["batch_id"] == batch_id, again.text
        assert again.json()["resent"] is True

        # GET /v1/batches signed by a partner lists its own; another partner sees none of them
        assert _items(client.send("GET", "/v1/batches")) == [batch_id]
        assert _items(client.send("GET", "/v1/batches?adapter=health&period=2026-03")) == [batch_id]
        assert _items(client.send("GET", f"/v1/batches?partner_id={health.partner_id}")) == [batch_id]
        assert _items(other_client.send("GET", "/v1/batches")) == []
        assert_coded(other_client.send("GET", f"/v1/batches?partner_id={health.partner_id}"),
                     403, "SCOPE_VIOLATION")
        assert_coded(other_client.send("GET", f"/v1/batches/{batch_id}"), 404, "NOT_FOUND")
        # a read signed over a body hash other than the empty string's is refused
        hdr = client.headers("GET", f"/v1/batches/{batch_id}", hashlib.sha256(b"x").hexdigest())
        assert_coded(client.http.get(f"{url}/v1/batches/{batch_id}", headers=hdr),
                     401, "UNAUTHENTICATED")
        # unsigned reads are refused
        assert_coded(client.http.get(f"{url}/v1/batches"), 401, "UNAUTHENTICATED")

        # refusals of an upload: another adapter's partner; a file signed over other bytes
        assert_coded(canon_client.upload(path, target), 403, "SCOPE_VIOLATION")
        hdr = client.headers("POST", target, hashlib.sha256(b"other").hexdigest())
        assert_coded(client.http.post(url + target, content=path.read_bytes(), headers=hdr),
                     401, "UNAUTHENTICATED")


def test_batch_upload_size_refusals(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner) -> None:
    health = new_partner(engine, adapter="health")
    path = _health_file(tmp_path / "big.csv", 32, 40)
    settings = make_settings(db_url, batch_dir=tmp_path / "b", max_batch_bytes=1024,
                             max_batch_rows=100)
    target = "/v1/batches?adapter=health&kind=monthly&period=2026-03"
    with gateway(settings) as url, doc_client(url, health) as client:
        assert path.stat().st_size > 1024
        resp = retried_on_reset(lambda: client.upload(path, target))  # chunked: refused streaming
        assert "content-length" not in resp.request.headers
        assert_coded(resp, 413, "PAYLOAD_TOO_LARGE")
        small = tmp_path / "small.csv"
        small.write_bytes(path.read_bytes()[:600].rsplit(b"\n", 1)[0] + b"\n")
        assert_coded(client.upload(small, target, extra={"X-CE-Row-Count": "101"}),
                     413, "PAYLOAD_TOO_LARGE")
        # nothing of a refused upload stays on disk
        assert not list((tmp_path / "b").glob("*"))
