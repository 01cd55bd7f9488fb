"""Security review of SPEC §7 "Partner auth" and issue 6, against real gateways (strict xfails).

Everything runs through uvicorn on 127.0.0.1 (one test runs ``ce-gateway serve`` itself) on
real stores; helpers come from ``test_api_security`` and ``test_console``.  What those files and
``test_api_partner`` already cover is not repeated here (see ``test_api_security``'s docstring).

Bugs found, each a strict xfail naming the cause and the fix:

- the ops API and the console read a POST's whole body, with no size limit, before they look
  at the bearer token or the session (``test_unauthenticated_ops_and_console_posts…``,
  ``test_an_ops_or_console_body_over_the_limit…``);
- a replica whose SECRET_KEY cannot open the partner secrets answers every partner request
  500 with a traceback, not the 401 docs/operations.md promises (``test_a_replica_whose…``);
- a partner registered without a base code reports for any base, its plans included
  (``test_a_partner_without_a_base_code_cannot_report_for_a_base``);
- the masker misses an identity number whose check digit is a full-width Ｘ, so answers and
  console pages echo it whole (``test_a_full_width_x_check_digit_is_masked…``);
- a partner disabled while its upload streams still gets its batch accepted
  (``test_a_partner_disabled_while_its_upload_streams…``);
- a batch's control-total failure quotes the declared X-CE-Total-Credits unmasked in the
  batch status (``test_a_control_total_that_is_an_identity_number…``).

Confirmed right, and pinned: replicas racing on one nonce (one wins, the other is REPLAYED);
the signature over a reordered or differently percent-encoded query; the +300 s edge; headers
given twice; odd nonces; disabled and rotated partners at their next request; the base-code
scope per record, per roster row and per plan; the rate limit on uploads and status polls;
secrets and tokens nowhere in clear in the store; no operator token taken from a query
string; and, through ``ce-gateway serve`` at DEBUG, no identity number in the log, the
answers, the console, the audit text, the batch errors or /metrics, wherever a partner or an
operator puts one.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from sqlalchemy import Engine, select, update

from gateway.accounts import Partner
from gateway.config import Settings
from gateway.masking import mask_id
from gateway.secrets_box import SecretBox, hash_token, new_secret
from gateway.signing import SigningClient, signed_headers
from gateway.store.tables import (
    audit_events,
    batch_errors,
    metadata,
    operators,
    partners,
    record_versions,
    records,
)
from mock_partners.ce_system import Faults
from mock_partners.files import HEALTH_HEADERS, health_rows, write_csv
from mock_partners.generators import canonical_submission, corrupt_check_digit
from mock_partners.training_base import plan_period
from mock_partners.training_base import results as base_results
from tests.conftest import SECRET_KEY
from tests.integration.test_api_security import (
    JSON,
    RECORDS,
    _assert_coded,
    _body,
    _open_year,
    engine_for,
    gateway,
)
from tests.integration.test_console import _login
from tests.support.reference import load_base_and_plan
from tests.support.servers import GatewayProcess, poll

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]
NewOperator = Callable[..., str]
FORM = "application/x-www-form-urlencoded"
NATIVE = "/v1/partners/training_base/records"


def _head_only(url: str, method: str, target: str, headers: dict[str, str],
               content_length: int, wait: float = 5.0) -> bytes:
    """Send a request's head and no body byte; the answer's first bytes (``b""`` if none came).

    A gateway that refuses on the head answers at once; one that waits for the body does not
    answer within ``wait`` seconds.
    """
    parts = urlsplit(url)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}",
             f"Content-Length: {content_length}", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            return sock.recv(65536)
        except TimeoutError:
            return b""


@pytest.fixture
def store(sqlite_url: str) -> Iterator[tuple[str, Engine]]:
    with engine_for(sqlite_url) as eng:
        yield sqlite_url, eng


# -- 1. bodies read before authentication, without a limit ------------------------------------------

PRE_AUTH_POSTS = {
    "ops-reprocess": ("/v1/deliveries/reprocess", "application/json"),
    "ops-revalidate": ("/v1/records/revalidate", "application/json"),
    "console-reprocess": ("/ops/deliveries/reprocess", FORM),
    "console-logout": ("/ops/logout", FORM),
}


@pytest.mark.parametrize("case", list(PRE_AUTH_POSTS))
def test_unauthenticated_ops_and_console_posts_are_refused_before_their_body(
    store: tuple[str, Engine], make_settings: MakeSettings, case: str
) -> None:
    db_url, _ = store
    target, content_type = PRE_AUTH_POSTS[case]
    with gateway(make_settings(db_url, max_body_bytes=4096)) as url:
        answer = _head_only(url, "POST", target, {"Content-Type": content_type}, 10**9)
    assert answer.split(b" ", 2)[1:2] in ([b"401"], [b"403"], [b"303"], [b"413"]), answer[:200]


def test_an_ops_or_console_body_over_the_limit_is_413(
    store: tuple[str, Engine], make_settings: MakeSettings, new_operator: NewOperator
) -> None:
    db_url, eng = store
    token = new_operator(eng)
    big = "x" * 8192
    with gateway(make_settings(db_url, max_body_bytes=4096)) as url:
        ops = httpx.post(f"{url}/v1/deliveries/reprocess",
                         headers={"Authorization": f"Bearer {token}"},
                         json={"dry_run": True, "reason": big})
        login = httpx.post(f"{url}/ops/login", data={"token": big})
    _assert_coded(ops, 413, "PAYLOAD_TOO_LARGE")
    assert login.status_code == 413, login.text[:300]


def test_a_body_sent_without_a_length_is_counted_and_refused_past_the_limit(
    store: tuple[str, Engine], make_settings: MakeSettings, new_operator: NewOperator
) -> None:
    """A chunked body (no Content-Length) is counted as it arrives: 413 once past the limit."""
    db_url, eng = store
    token = new_operator(eng)

    def chunks(total: int) -> Iterator[bytes]:
        yield b'{"dry_run": true, "reason": "'
        for _ in range(total // 256):
            yield b"x" * 256
        yield b'"}'

    with gateway(make_settings(db_url, max_body_bytes=4096)) as url:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        big = httpx.post(f"{url}/v1/deliveries/reprocess", headers=headers,
                         content=chunks(8192))
        small = httpx.post(f"{url}/v1/deliveries/reprocess", headers=headers,
                           content=chunks(768))
    assert "content-length" not in big.request.headers
    _assert_coded(big, 413, "PAYLOAD_TOO_LARGE")
    assert small.status_code == 200 and small.json()["dry_run"] is True, small.text


# -- 2. SECRET_KEY that cannot open the partner secrets ---------------------------------------------


def test_a_replica_whose_secret_key_cannot_open_partner_secrets_refuses_with_401(
    store: tuple[str, Engine], make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    db_url, eng = store
    partner = new_partner(eng)  # sealed with tests.conftest.SECRET_KEY
    with gateway(make_settings(db_url, secret_key="another-replicas-key")) as url, \
            SigningClient(url, partner.app_key, partner.secret) as client:
        resp = client.submit(orjson.loads(_body())["records"])
        ready = httpx.get(f"{url}/readyz")
    _assert_coded(resp, 401, "UNAUTHENTICATED")
    # The balancer takes the replica out: no partner request can be checked on it.
    assert ready.status_code == 503 and "SECRET_KEY" in ready.json()["reason"], ready.text
    with gateway(make_settings(db_url)) as url:
        assert httpx.get(f"{url}/readyz").status_code == 200


# -- 3. base-code scope (SPEC §7 "its own adapter and base code") -----------------------------------


def _as_base(seed: int, source_id: str, base_code: str | None, plan_id: str | None) -> dict[str, Any]:
    sub = canonical_submission(random.Random(seed), source_id, within=plan_period(2026))
    sub["activity"].update(provider_code=base_code, plan_id=plan_id)
    return sub


def test_a_partner_without_a_base_code_cannot_report_for_a_base(
    store: tuple[str, Engine], make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    db_url, eng = store
    load_base_and_plan(eng, "QHJD001", "PLAN-1")
    stranger = new_partner(eng)  # canonical, no base code
    with gateway(make_settings(db_url)) as url, \
            SigningClient(url, stranger.app_key, stranger.secret) as client:
        resp = client.submit([_as_base(3, "IMP-1", "QHJD001", "PLAN-1")])
    assert resp.status_code == 200, resp.text
    (answer,) = resp.json()["results"]
    assert answer["status"] == "rejected", answer
    assert [e["code"] for e in answer["errors"]] == ["SCOPE_VIOLATION"]


def test_a_base_code_is_judged_per_record_per_roster_row_and_per_plan(
    store: tuple[str, Engine], tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    """Another base's code fails its own record, roster row or plan, never its neighbours.

    A base's push naming another base's plan is PLAN_NOT_FILED; a per-result base code is
    ignored (the document's is the one judged).
    """
    db_url, eng = store
    load_base_and_plan(eng, "QHJD001", "PLAN-1")
    load_base_and_plan(eng, "QHJD002", "PLAN-2")
    relay = new_partner(eng, base_code="QHJD001")  # a canonical partner of one base
    base = new_partner(eng, adapter="training_base", base_code="QHJD001")
    rows = base_results(random.Random(70), 3)
    roster = tmp_path / "roster.csv"
    with roster.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, [*rows[0], "base_code", "plan_id"])
        writer.writeheader()
        writer.writerows({**r, "passed": "是", "base_code": code, "plan_id": plan}
                         for r, (code, plan) in zip(rows, [("QHJD001", "PLAN-1"),
                                                           ("QHJD002", "PLAN-2"),
                                                           ("QHJD001", "PLAN-1")], strict=True))
    settings = make_settings(db_url, batch_dir=tmp_path / "batches")
    with gateway(settings, run_worker=True) as url, \
            SigningClient(url, relay.app_key, relay.secret) as mixed, \
            SigningClient(url, base.app_key, base.secret) as client:
        resp = mixed.submit([_as_base(71, "M-1", "QHJD001", "PLAN-1"),
                             _as_base(72, "M-2", "QHJD002", "PLAN-2"),
                             _as_base(73, "M-3", None, None)])
        assert [(a["status"], [e["code"] for e in a["errors"]]) for a in resp.json()["results"]] == [
            ("accepted", []), ("rejected", ["SCOPE_VIOLATION"]), ("accepted", [])], resp.text
        # Its own base code, another base's plan; a result naming another base is still its own.
        results = base_results(random.Random(74), 2)
        results[1]["base_code"] = "QHJD002"
        other_plan = client.post(NATIVE, headers=JSON, content=orjson.dumps(
            {"base_code": "QHJD001", "plan_id": "PLAN-2", "results": results[:1]}))
        own = client.post(NATIVE, headers=JSON, content=orjson.dumps(
            {"base_code": "QHJD001", "plan_id": "PLAN-1", "results": results[1:]}))
        upload = client.upload_batch(roster, adapter="training_base", kind="roster", period="2026")
        assert upload.status_code == 202, upload.text
        status = poll(lambda: (r := client.get(f"/v1/batches/{upload.json()['batch_id']}"))
                      .json()["status"] == "done" and r.json(), 60, what="roster done")
    (refused,) = other_plan.json()["results"]
    assert (refused["status"], [e["code"] for e in refused["errors"]]) == (
        "rejected", ["PLAN_NOT_FILED"]), other_plan.text
    assert own.json()["results"][0]["status"] == "accepted", own.text
    with eng.connect() as conn:
        payload = conn.execute(select(record_versions.c.payload).join(
            records, records.c.record_id == record_versions.c.record_id).where(
            records.c.source_record_id == str(results[1]["result_id"]))).scalar_one()
    assert orjson.loads(payload)["activity"]["provider_code"] == "QHJD001"
    assert status["counts"]["accepted"] == 2 and status["counts"]["rejected"] == 1, status
    assert [(r["row"], r["code"]) for r in status["rejected_rows"]] == [(3, "SCOPE_VIOLATION")]


# -- 4. masking: a full-width Ｘ check digit --------------------------------------------------------


def test_a_full_width_x_check_digit_is_masked_in_answers_and_pages(
    store: tuple[str, Engine], make_settings: MakeSettings, new_partner: NewPartner,
    new_operator: NewOperator,
) -> None:
    db_url, eng = store
    full_width = "63212319870413120\uff38"  # valid GB 11643 with an ASCII X
    partner, token = new_partner(eng), new_operator(eng)
    with gateway(make_settings(db_url)) as url, \
            SigningClient(url, partner.app_key, partner.secret) as client, \
            httpx.Client(base_url=url) as browser:
        answers = {
            "withdrawal 404": client.delete(f"/v1/records/{full_width}"),
            "batch 404": client.get(f"/v1/batches/{full_width}"),
            "ops filter 422": httpx.get(f"{url}/v1/deliveries", params={"since": full_width},
                                        headers={"Authorization": f"Bearer {token}"}, timeout=10),
        }
        assert _login(browser, token).status_code == 303
        answers["console search"] = browser.get("/ops/deliveries",
                                                params={"partner_id": full_width})
        answers["console batches"] = browser.get("/ops/batches", params={"partner_id": full_width})
    leaked = [where for where, resp in answers.items() if full_width in resp.text]
    assert leaked == [], leaked


def test_a_control_total_that_is_an_identity_number_is_masked_in_the_batch_status(
    store: tuple[str, Engine], tmp_path: Path, make_settings: MakeSettings,
    new_partner: NewPartner, new_operator: NewOperator,
) -> None:
    db_url, eng = store
    health, token = new_partner(eng, adapter="health"), new_operator(eng)
    rows = list(health_rows(83, 2, _open_year(), 3))
    shifted = str(rows[0]["身份证号"])  # the id where the credits total belongs
    path = tmp_path / "h.csv"
    write_csv(path, rows, HEALTH_HEADERS, encoding="utf-8")
    settings = make_settings(db_url, batch_dir=tmp_path / "batches")
    with gateway(settings, run_worker=True) as url, \
            SigningClient(url, health.app_key, health.secret) as client:
        upload = client.upload_batch(path, adapter="health", kind="monthly",
                                     period=f"{_open_year()}-03", total_credits=shifted)
        assert upload.status_code == 202, upload.text
        target = f"/v1/batches/{upload.json()['batch_id']}"
        status = poll(lambda: (r := client.get(target)).json()["status"] in ("done", "failed")
                      and r, 60, what="batch")
        ops = httpx.get(url + target, headers={"Authorization": f"Bearer {token}"})
    assert status.json()["failure"]["code"] == "CONTROL_TOTALS_MISMATCH", status.text
    # The declared totals are echoed as data ("declared"); the error texts must not quote it.
    for answer in (status.json(), ops.json()):
        texts = orjson.dumps([answer["error"], answer["failure"]]).decode()
        assert shifted not in texts and mask_id(shifted) in texts, texts


# -- 5. a partner disabled or rotated -----------------------------------------------------------------


def test_a_disabled_or_rotated_partner_is_refused_at_its_next_request(
    store: tuple[str, Engine], make_settings: MakeSettings, new_partner: NewPartner, box: SecretBox
) -> None:
    db_url, eng = store
    gone, rotated = new_partner(eng), new_partner(eng)
    fresh = new_secret()

    def records_of(partner: Partner, n: int) -> list[dict[str, Any]]:
        subs: list[dict[str, Any]] = orjson.loads(_body(f"{partner.partner_id}-{n}"))["records"]
        return subs

    with gateway(make_settings(db_url)) as url:
        with SigningClient(url, gone.app_key, gone.secret) as client:
            assert client.submit(records_of(gone, 1)).status_code == 200
            with eng.begin() as conn:
                conn.execute(update(partners).where(partners.c.partner_id == gone.partner_id)
                             .values(active=False))
            _assert_coded(client.submit(records_of(gone, 2)), 401, "UNAUTHENTICATED")
        with eng.begin() as conn:
            conn.execute(update(partners).where(partners.c.partner_id == rotated.partner_id)
                         .values(secret_enc=box.encrypt(fresh)))
        with SigningClient(url, rotated.app_key, rotated.secret) as old:
            _assert_coded(old.submit(records_of(rotated, 1)), 401, "UNAUTHENTICATED")
        with SigningClient(url, rotated.app_key, fresh) as new:
            assert new.submit(records_of(rotated, 2)).status_code == 200


def test_a_partner_disabled_while_its_upload_streams_gets_no_batch(
    store: tuple[str, Engine], tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    db_url, eng = store
    health = new_partner(eng, adapter="health")
    rows = list(health_rows(80, 4, _open_year(), 3))
    path = tmp_path / "health.csv"
    write_csv(path, rows, HEALTH_HEADERS, encoding="utf-8")
    content = path.read_bytes()
    batch_dir = tmp_path / "batches"
    target = f"/v1/batches?adapter=health&kind=monthly&period={_open_year()}-03"
    headers = {**signed_headers(health.app_key, health.secret, "POST", target, content),
               "Content-Type": "text/csv"}
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield content[:10]
        assert release.wait(30)
        yield content[10:]

    answer: list[httpx.Response] = []
    with gateway(make_settings(db_url, batch_dir=batch_dir)) as url:
        sender = threading.Thread(target=lambda: answer.append(
            httpx.post(url + target, content=body(), headers=headers, timeout=30)))
        sender.start()
        try:
            # The .part file opens after the partner was looked up: disable it now.
            poll(lambda: list(batch_dir.glob("*.part")), 20, what="the upload to stream")
            with eng.begin() as conn:
                conn.execute(update(partners).where(partners.c.partner_id == health.partner_id)
                             .values(active=False))
        finally:
            release.set()
            sender.join(30)
    _assert_coded(answer[0], 401, "UNAUTHENTICATED")


# -- 6. signatures: replicas racing on one nonce, query encodings, edges, odd headers ---------------


def test_replicas_racing_on_one_nonce_admit_it_once(
    db_url: str, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    rounds = 6
    with engine_for(db_url) as eng:
        partner = new_partner(eng)
        settings = make_settings(db_url)
        with gateway(settings) as a, gateway(settings) as b:
            for n in range(rounds):
                body = _body(f"RACE-{n}", seed=100 + n)
                headers = {**JSON, **signed_headers(partner.app_key, partner.secret, "POST",
                                                    RECORDS, body)}
                start = threading.Barrier(2)
                got: dict[str, httpx.Response] = {}

                def send(url: str, body: bytes = body, headers: dict[str, str] = headers,
                         start: threading.Barrier = start,
                         got: dict[str, httpx.Response] = got) -> None:
                    with httpx.Client(timeout=30) as client:
                        start.wait(10)
                        got[url] = client.post(url + RECORDS, content=body, headers=headers)

                threads = [threading.Thread(target=send, args=(u,)) for u in (a, b)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(60)
                codes = sorted(r.status_code for r in got.values())
                assert codes == [200, 401], [r.text for r in got.values()]
                (refused,) = [r for r in got.values() if r.status_code == 401]
                _assert_coded(refused, 401, "REPLAYED")
        with eng.connect() as conn:
            assert len(conn.execute(select(records.c.record_id)).all()) == rounds


def test_the_signature_covers_the_query_exactly_as_sent(
    store: tuple[str, Engine], tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    """A reordered, differently percent-encoded query is fine when signed as sent, never else."""
    db_url, eng = store
    health = new_partner(eng, adapter="health")
    year = _open_year()
    path = tmp_path / "h.csv"
    write_csv(path, list(health_rows(81, 2, year, 3)), HEALTH_HEADERS, encoding="utf-8")
    content = path.read_bytes()
    as_sent = f"/v1/batches?period={year}%2D03&kind=monthl%79&adapter=health"
    canonical = f"/v1/batches?adapter=health&kind=monthly&period={year}-03"
    with gateway(make_settings(db_url, batch_dir=tmp_path / "batches")) as url:
        def upload(target: str, signed_for: str) -> httpx.Response:
            headers = signed_headers(health.app_key, health.secret, "POST", signed_for, content)
            return httpx.post(url + target, content=content, timeout=30,
                              headers={**headers, "Content-Type": "text/csv"})

        _assert_coded(upload(as_sent, canonical), 401, "UNAUTHENTICATED")
        _assert_coded(upload(canonical, as_sent), 401, "UNAUTHENTICATED")
        accepted = upload(as_sent, as_sent)
        assert accepted.status_code == 202, accepted.text
        with SigningClient(url, health.app_key, health.secret) as client:
            status = client.get(f"/v1/batches/{accepted.json()['batch_id']}").json()
    assert (status["kind"], status["period"]) == ("monthly", f"{year}-03"), status


def test_headers_given_twice_and_odd_nonces_never_let_a_request_through(
    store: tuple[str, Engine], make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    db_url, eng = store
    partner = new_partner(eng)
    body = _body("TWICE-1")
    with gateway(make_settings(db_url)) as url:
        def post(headers: list[tuple[str, str]], content: bytes = body) -> httpx.Response:
            return httpx.post(url + RECORDS, content=content,
                              headers=[("Content-Type", "application/json"), *headers])

        def signed(nonce: str | None = None, timestamp: int | None = None) -> list[tuple[str, str]]:
            return list(signed_headers(partner.app_key, partner.secret, "POST", RECORDS, body,
                                       nonce=nonce, timestamp=timestamp).items())

        # The +300 s edge is inside the window (SPEC: more than 300 s off is refused).
        first = signed(timestamp=int(time.time()) + 300)
        assert post(first).status_code == 200
        # Replayed with a fresh nonce added after the used one, or before it: never admitted.
        for extra in ([*first, ("X-CE-Nonce", "f" * 32)], [("X-CE-Nonce", "f" * 32), *first]):
            assert post(extra).status_code == 401, extra
        # A wrong signature before the right one; an unknown app key first; a proxy-joined nonce.
        fresh = signed()
        _assert_coded(post([("X-CE-Signature", "0" * 64), *fresh]), 401, "UNAUTHENTICATED")
        assert post([("X-CE-App-Key", "ak-nobody"), *fresh]).status_code == 401
        joined = [(k, f"{v}, {v}" if k == "X-CE-Nonce" else v) for k, v in signed()]
        _assert_coded(post(joined), 401, "UNAUTHENTICATED")
        # Odd nonces: a tab inside, a non-ASCII character, 129 characters.
        for nonce in ("a" * 8 + "\t" + "b" * 8, "é" * 16, "n" * 129):
            raw = [(k.encode(), v.encode("latin-1")) for k, v in signed(nonce=nonce)]
            resp = httpx.post(url + RECORDS, content=body,
                              headers=[(b"Content-Type", b"application/json"), *raw])
            _assert_coded(resp, 401, "UNAUTHENTICATED")
        # 128 printable characters of any kind are a nonce.
        odd = ("!#$%&'*+-.^_`|~,;:=?@[]{}()<>/ " * 5)[:127] + "z"
        assert post(signed(nonce=odd)).status_code == 200
    with eng.connect() as conn:
        assert len(conn.execute(select(records.c.record_id)).all()) == 1


def test_the_rate_limit_counts_uploads_and_status_polls(
    store: tuple[str, Engine], tmp_path: Path, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    db_url, eng = store
    health = new_partner(eng, adapter="health")
    path = tmp_path / "h.csv"
    write_csv(path, list(health_rows(82, 1, _open_year(), 3)), HEALTH_HEADERS, encoding="utf-8")
    settings = make_settings(db_url, batch_dir=tmp_path / "batches", rate_limit_per_minute=2,
                             rate_limit_burst=1)
    with gateway(settings) as url, SigningClient(url, health.app_key, health.secret) as client:
        upload = client.upload_batch(path, adapter="health", kind="monthly",
                                     period=f"{_open_year()}-03")
        assert upload.status_code == 202, upload.text
        poll_answer = client.get(f"/v1/batches/{upload.json()['batch_id']}")
        _assert_coded(poll_answer, 429, "RATE_LIMITED")
        assert 1 <= int(poll_answer.headers["Retry-After"]) <= 30
        again = client.upload_batch(path, adapter="health", kind="monthly",
                                    period=f"{_open_year()}-03")
        _assert_coded(again, 429, "RATE_LIMITED")
    assert list((tmp_path / "batches").iterdir()) == [
        tmp_path / "batches" / f"{upload.json()['batch_id']}.csv"]


# -- 7. secrets and tokens at rest; tokens only in the Authorization header ------------------------


def test_secrets_and_tokens_are_nowhere_in_clear_in_the_store(
    db_url: str, make_settings: MakeSettings, new_partner: NewPartner, new_operator: NewOperator
) -> None:
    with engine_for(db_url) as eng:
        partner, token = new_partner(eng), new_operator(eng)
        with gateway(make_settings(db_url)) as url, \
                SigningClient(url, partner.app_key, partner.secret) as client:
            assert client.submit(orjson.loads(_body())["records"]).status_code == 200
            # An operator token is taken from the Authorization header only.
            for where in ({"params": {"token": token}},
                          {"params": {"access_token": token}},
                          {"headers": {"X-Operator-Token": token}}):
                resp = httpx.get(f"{url}/v1/deliveries", **where)  # type: ignore[arg-type]
                _assert_coded(resp, 401, "UNAUTHENTICATED")
            console = httpx.get(f"{url}/ops", params={"token": token})
            assert console.status_code == 303 and "/ops/login" in console.headers["location"]
        dump: list[str] = []
        with eng.connect() as conn:
            for table in metadata.sorted_tables:
                dump.extend(repr(tuple(row)) for row in conn.execute(select(table)))
            sealed = conn.execute(select(partners.c.secret_enc).where(
                partners.c.partner_id == partner.partner_id)).scalar_one()
            hashed = conn.execute(select(operators.c.token_hash)).scalar_one()
    text = "\n".join(dump)
    for secret in (partner.secret, token, token.removeprefix("op_"), SECRET_KEY):
        assert secret not in text
    assert SecretBox(SECRET_KEY).decrypt(sealed) == partner.secret
    with pytest.raises(ValueError, match="SECRET_KEY"):
        SecretBox("some-other-key").decrypt(sealed)
    assert hashed == hash_token(token) == hashlib.sha256(token.encode()).hexdigest()


# -- 8. identity numbers wherever they are put, through `ce-gateway serve` at DEBUG ------------------


def test_identity_numbers_put_anywhere_stay_masked_under_serve_at_debug(
    sqlite_url: str, tmp_path: Path, new_partner: NewPartner, new_operator: NewOperator,
    mock_ce: tuple[str, Faults],
) -> None:
    """The real ``serve`` logging set-up (not pytest's caplog) at DEBUG, and every outlet.

    Identity numbers (18 digits, a lowercase x, 15 digits) as a source id, a name, an activity
    title, a date, a batch file's name, a date cell, an ops filter, a reprocess reason, a
    console search box; the downstream forwards the accepted ones.
    """
    mock_url, _ = mock_ce
    rng = random.Random(90)
    subs = [canonical_submission(rng, f"D-{i}") for i in range(4)]
    ids = [s["person"]["id_number"] for s in subs]
    lower_x, fifteen = "63212319870413120x", "630102870413912"
    subs[0]["source_record_id"] = ids[0]
    subs[1]["person"]["name"] = lower_x
    subs[1]["activity"]["title"] = f"高原医学培训（{ids[1]}）"
    subs[2]["activity"]["completed_on"] = ids[2]
    subs[3]["person"]["id_number"] = corrupt_check_digit(ids[3])
    ids += [subs[3]["person"]["id_number"], lower_x, fifteen]
    year = _open_year()
    rows = list(health_rows(91, 2, year, 3))
    rows[0]["完成日期"] = rows[0]["身份证号"]
    ids += [str(r["身份证号"]) for r in rows]
    batch_file = tmp_path / f"{ids[0]}.csv"
    write_csv(batch_file, rows, HEALTH_HEADERS, encoding="gb18030")
    log = tmp_path / "gateway.log"
    with engine_for(sqlite_url) as eng:
        partner, health = new_partner(eng), new_partner(eng, adapter="health")
        token = new_operator(eng)
        env = {"CE_GATEWAY_DATABASE_URL": sqlite_url, "CE_GATEWAY_DOWNSTREAM_URL": mock_url,
               "CE_GATEWAY_SECRET_KEY": SECRET_KEY, "CE_GATEWAY_LOG_LEVEL": "DEBUG",
               "CE_GATEWAY_BATCH_DIR": str(tmp_path / "batches"),
               "CE_GATEWAY_DELIVERY_POLL_SECONDS": "0.05", "CE_GATEWAY_PULL_INTERVAL_SECONDS": "0",
               "CE_GATEWAY_REFERENCE_SYNC_INTERVAL_SECONDS": "0"}
        bearer = {"Authorization": f"Bearer {token}"}
        answers: list[str] = []
        gw = GatewayProcess(env, log).start()
        try:
            url = gw.url
            with SigningClient(url, partner.app_key, partner.secret) as client:
                resp = client.submit(subs)
                answers.append(resp.text)
                assert [a["status"] for a in resp.json()["results"]] == [
                    "accepted", "accepted", "rejected", "rejected"], resp.text
                for number in (ids[0], lower_x, fifteen):
                    answers.append(client.delete(f"/v1/records/{number}").text)
            with SigningClient(url, health.app_key, health.secret) as files:
                upload = files.upload_batch(batch_file, adapter="health", kind="monthly",
                                            period=f"{year}-03")
                assert upload.status_code == 202, upload.text
                status = poll(lambda: (r := files.get(f"/v1/batches/{upload.json()['batch_id']}"))
                              .json()["status"] in ("done", "failed") and r, 60, what="batch")
                answers.append(status.text)
                answers.append(files.get(f"/v1/batches/{lower_x}").text)
            for path, params in ((f"/v1/compliance/{ids[1]}/{year}", {}),
                                 (f"/v1/compliance/{lower_x}/{year}", {}),
                                 ("/v1/deliveries", {"partner_id": ids[1], "since": ids[1]}),
                                 ("/v1/deliveries", {"error_code": fifteen, "until": lower_x}),
                                 (f"/v1/records/{ids[1]}", {}), ("/v1/audit", {"record_id": ids[0]})):
                answers.append(httpx.get(url + path, params=params, headers=bearer).text)
            answers.append(httpx.post(f"{url}/v1/deliveries/reprocess", headers=bearer,
                                      json={"partner_id": ids[1], "dry_run": False,
                                            "reason": f"查 {ids[1]} 和 {lower_x}"}).text)
            with httpx.Client(base_url=url) as browser:
                assert _login(browser, token).status_code == 303
                for path, params in (("/ops/deliveries", {"partner_id": ids[1]}),
                                     ("/ops/batches", {"partner_id": lower_x}),
                                     ("/ops/rejections", {"status": "all"}),
                                     (f"/ops/records/{fifteen}", {}), ("/ops/audit", {})):
                    answers.append(browser.get(path, params=params).text)
            record_id = resp.json()["results"][0]["record_id"]
            poll(lambda: httpx.get(f"{mock_url}/_mock/applied/{record_id}")
                 .json()["versions"], 30, what="delivery")
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            gw.stop()
        with eng.connect() as conn:
            audit_text = "\n".join(conn.execute(select(audit_events.c.detail)).scalars())
            errors_text = "\n".join(f"{m} {z}" for m, z in conn.execute(
                select(batch_errors.c.message, batch_errors.c.message_zh)))
    logged = log.read_text(encoding="utf-8", errors="replace")
    assert logging.getLevelName(logging.DEBUG) in logged  # DEBUG lines were really written
    assert mask_id(ids[1]) in audit_text
    # A partner's own record id comes back to that partner as sent (its key, over its signed
    # channel): the submission's and the withdrawal's answers name it whole.
    own_key = f'"source_record_id":"{ids[0]}"'
    scanned = {"log": logged, "answers": "\n".join(answers).replace(own_key, ""),
               "audit text": audit_text,
               "batch errors": errors_text, "metrics": metrics}
    for where, text in scanned.items():
        for number in ids:
            at = text.find(number)
            assert at < 0, f"{number} unmasked in the {where}: …{text[max(0, at - 200):at + 40]}"
        for secret in (partner.secret, health.secret, token, SECRET_KEY):
            assert secret not in text, where
