"""Review of today's settings, body-limit and readiness changes, on real stores and real HTTP.

Every gateway here is a real uvicorn on 127.0.0.1 (``test_api_security.gateway``); requests the
HTTP clients would tidy up (chunked bodies without a length) go through a raw socket.  The CLI
runs as a real process (``tests.support.servers.cli``).

Bugs found, each a strict xfail naming the cause and the fix:

- a body sent without a Content-Length (chunked) and over MAX_BODY_BYTES is refused 413 with the
  English "(limit N bytes)" inside ``message_zh`` and without ``Connection: close``, unlike the
  refusal of a declared length (``test_a_chunked_body_over_the_limit…``);
- ``POST /v1/batches/`` (trailing slash), which the app redirects to the upload route, is held
  to MAX_BODY_BYTES: a real batch file there is refused 413 instead of redirected
  (``test_the_batch_upload_with_a_trailing_slash…``).

Confirmed right, and pinned: /readyz with no partners, with only inactive partners under another
SECRET_KEY, with an active partner under another key (503), with a store one migration behind
(503 naming ``db upgrade``) and with no ``alembic_version`` table on either store (503); a
Content-Length with spaces around it is still bounded, one with a ``+`` never reaches the app;
the misspelt-variable warning goes to stderr, so ``--json`` output still parses.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
from sqlalchemy import text, update

from gateway.accounts import Partner
from gateway.config import Settings
from gateway.store.db import code_revisions
from gateway.store.tables import partners
from tests.conftest import SECRET_KEY
from tests.integration.test_api_security import _assert_coded, engine_for, gateway
from tests.support.servers import cli

LIMIT = 100
REPROCESS = "/v1/deliveries/reprocess"


def _raw(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is on a fresh connection; the status, headers and body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=30) as conn:
        conn.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body

# 500 bytes in one chunk (0x1f4), then the last chunk: past LIMIT with no length declared.
CHUNKED_500 = b"1f4\r\n" + b"x" * 500 + b"\r\n0\r\n\r\n"


def _reprocess(url: str, rest: bytes) -> tuple[int, dict[str, str], bytes]:
    """A raw ``POST`` of a reprocess body: ``rest`` is the headers' tail, blank line and body."""
    return _raw(url, b"POST " + REPROCESS.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n" + rest)



def _settings(make_settings: Callable[..., Settings], url: str, **overrides: object) -> Settings:
    return make_settings(url, max_body_bytes=LIMIT, **overrides)


# -- the body limit (gateway/api/limits.py) ------------------------------------------------------

def test_a_declared_length_over_the_limit_is_refused_in_both_languages(
        sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    """The reference refusal: Content-Length (spaces around it too) over the limit, coded 413."""
    with gateway(_settings(make_settings, sqlite_url)) as url:
        for declared in (b"500", b"  500 "):
            status, headers, body = _reprocess(
                url, b"Content-Length:" + declared + b"\r\n\r\n" + b"x" * 500)
            assert status == 413
            error = json.loads(body)["error"]
            assert error["code"] == "PAYLOAD_TOO_LARGE"
            assert f"（上限 {LIMIT} 字节）" in error["message_zh"]
            assert headers.get("connection") == "close"
        # A "+500" is no length at all: the server refuses it before the app sees a byte.
        status, _, _ = _reprocess(url, b"Content-Length: +500\r\n\r\n" + b"x" * 500)
        assert status == 400


def test_a_chunked_body_over_the_limit_is_refused_in_chinese_as_a_declared_one_is(
        sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    with gateway(_settings(make_settings, sqlite_url)) as url:
        status, headers, body = _reprocess(url, b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_500)
        assert status == 413
        error = json.loads(body)["error"]
        assert error["code"] == "PAYLOAD_TOO_LARGE"
        assert "limit" not in error["message_zh"], error
        assert f"（上限 {LIMIT} 字节）" in error["message_zh"], error
        assert headers.get("connection") == "close"


def test_a_chunked_body_with_a_small_content_length_is_still_counted(
        sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    """Transfer-Encoding: chunked plus a small Content-Length: the bytes are counted, not the header."""
    with gateway(_settings(make_settings, sqlite_url)) as url:
        status, _, body = _reprocess(
            url, b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + CHUNKED_500)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"


def test_the_batch_upload_with_a_trailing_slash_is_redirected_whatever_its_size(
        sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    query = "?adapter=health&kind=monthly&period=2026-01"
    with gateway(_settings(make_settings, sqlite_url)) as url:
        small = httpx.post(f"{url}/v1/batches/{query}", content=b"x" * 10, follow_redirects=False)
        assert small.status_code == 307, small.text
        large = httpx.post(f"{url}/v1/batches/{query}", content=b"x" * (LIMIT * 5),
                           follow_redirects=False)
        assert large.status_code == 307, large.text


def test_the_batch_upload_itself_is_not_held_to_max_body_bytes(
        sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    """Exempt, with a query string: unsigned, it gets 401, never the body limit's 413."""
    with gateway(_settings(make_settings, sqlite_url)) as url:
        resp = httpx.post(f"{url}/v1/batches?adapter=health&kind=monthly&period=2026-01",
                          content=b"x" * (LIMIT * 5))
        _assert_coded(resp, 401, "UNAUTHENTICATED")


# -- /readyz ------------------------------------------------------------------------------------

def _ready(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=30)


def test_readyz_with_no_partner_at_all_is_ready(
        db_url: str, make_settings: Callable[..., Settings]) -> None:
    with gateway(make_settings(db_url)) as url:
        resp = _ready(url)
        assert resp.status_code == 200, resp.text


def test_readyz_under_another_secret_key(
        db_url: str, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner]) -> None:
    """Inactive partners only: nothing to open, ready.  One active: 503 naming SECRET_KEY."""
    other = "another-key-" + "k" * 40
    with engine_for(db_url) as eng:
        p = new_partner(eng)
        with eng.begin() as conn:
            conn.execute(update(partners).where(partners.c.partner_id == p.partner_id).values(active=False))
        with gateway(make_settings(db_url, secret_key=other)) as url:
            assert _ready(url).status_code == 200
            new_partner(eng)  # sealed with the tests' key, not the replica's
            resp = _ready(url)
            assert resp.status_code == 503, resp.text
            assert "SECRET_KEY" in resp.json()["reason"]


def test_readyz_on_a_store_one_migration_behind_names_db_upgrade(
        db_url: str, make_settings: Callable[..., Settings]) -> None:
    head, _ = code_revisions()
    behind = f"{int(head) - 1:04d}"
    with engine_for(db_url) as eng, gateway(make_settings(db_url)) as url:
        assert _ready(url).status_code == 200
        with eng.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": behind})
        try:
            resp = _ready(url)
            assert resp.status_code == 503, resp.text
            assert "db upgrade" in resp.json()["reason"]
            # A store ahead of this code (a newer release's revision) is served.
            with eng.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
            assert _ready(url).status_code == 200
            with eng.begin() as conn:
                conn.execute(text("DROP TABLE alembic_version"))
            resp = _ready(url)
            assert resp.status_code == 503, resp.text
        finally:
            with eng.begin() as conn:
                conn.execute(text("CREATE TABLE IF NOT EXISTS alembic_version "
                                  "(version_num VARCHAR(32) NOT NULL)"))
                conn.execute(text("DELETE FROM alembic_version"))
                conn.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": head})


# -- the CLI's settings -------------------------------------------------------------------------

def test_a_misspelt_variable_is_warned_on_stderr_and_json_stays_parseable(sqlite_url: str) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": sqlite_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_DELIVERY_BATCH_SIZ": "10"}
    done = cli(env, "deliveries", "list", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["items"] == []
    assert "CE_GATEWAY_DELIVERY_BATCH_SIZ" in done.stderr
    assert "CE_GATEWAY_DELIVERY_BATCH_SIZE" in done.stderr  # the suggestion


def test_a_bad_setting_is_one_coded_line_per_variable(sqlite_url: str) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": sqlite_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_DELIVERY_LEASE_SECONDS": "0", "CE_GATEWAY_TIMEZONE": "Mars/Olympus"}
    done = cli(env, "deliveries", "list", "--json")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "CONFIG_INVALID (CE_GATEWAY_DELIVERY_LEASE_SECONDS)" in done.stderr
    assert "CONFIG_INVALID (CE_GATEWAY_TIMEZONE)" in done.stderr
    assert "Traceback" not in done.stderr
