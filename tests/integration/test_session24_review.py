"""Review of sessions 23–24: credentials lifecycle, the batch list, signatures, URL redaction.

Each finding is a strict xfail asserting the correct behaviour; what was checked and found
right stays as an ordinary test.  Real SQLite and PostgreSQL (the ``db_url`` fixtures), a real
uvicorn for the signed requests.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import Engine, insert, select

from gateway import repairs
from gateway.accounts import RegistrationRefused, add_operator
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.credentials import (
    list_operators,
    reissue_operator,
    revoke_operator,
    rotate_partner_secret,
    set_partner_enabled,
)
from gateway.demo import free_port
from gateway.masking import redact_urls
from gateway.ops.common import encode_cursor
from gateway.secrets_box import SecretBox, hash_token
from gateway.signing import signed_headers
from gateway.store import db
from gateway.store.tables import audit_events, operators, partners, store_repairs
from tests.conftest import SECRET_KEY
from tests.support.servers import GatewayProcess, cli, uvicorn_thread

MakeSettings = Callable[..., Settings]
ID_NUMBER = "11010519491231002X"  # a checksum-valid example identity number


def _postgres(db_url: str) -> bool:
    return db_url.startswith("postgresql")


# -- 1. credentials lifecycle -------------------------------------------------------------------

def test_a_reason_holding_an_id_number_is_masked_in_the_audit_event(
        engine: Engine, new_partner: Callable[..., object]) -> None:
    partner = new_partner(engine)
    set_partner_enabled(engine, partner.partner_id, False,  # type: ignore[attr-defined]
                        f"投诉人 {ID_NUMBER} 要求停用", actor="cli:zhang")
    with engine.connect() as conn:
        detail = conn.execute(select(audit_events.c.detail)
                              .where(audit_events.c.kind == "partner_disabled")).scalar_one()
    assert ID_NUMBER not in detail and "1101" in orjson.loads(detail)["reason"]
    assert partner.secret not in detail  # type: ignore[attr-defined]


def test_a_reissued_viewer_stays_a_viewer_and_its_old_token_is_dead(
        engine: Engine, new_operator: Callable[..., str]) -> None:
    old = new_operator(engine, "viewer")
    with engine.connect() as conn:
        name = conn.execute(select(operators.c.name)
                            .where(operators.c.token_hash == hash_token(old))).scalar_one()
    assert revoke_operator(engine, name, "离职", actor="cli:zhang").changed
    account, token = reissue_operator(engine, name, "返岗", actor="cli:zhang")
    assert account.role == "viewer" and token != old
    listed = {o.name: o for o in list_operators(engine)}
    assert listed[name].role == "viewer" and listed[name].revoked_at is None
    with engine.connect() as conn:
        stored = conn.execute(select(operators.c.token_hash)
                              .where(operators.c.name == name)).scalar_one()
    assert stored == hash_token(token) != hash_token(old)


def test_two_rotations_at_once_leave_one_working_secret_and_two_events(
        engine: Engine, box: SecretBox, new_partner: Callable[..., object]) -> None:
    partner = new_partner(engine)
    pid = partner.partner_id  # type: ignore[attr-defined]
    with ThreadPoolExecutor(2) as pool:
        rotated = list(pool.map(lambda n: rotate_partner_secret(
            engine, box, pid, f"轮换 {n}", actor="cli:zhang"), range(2)))
    with engine.connect() as conn:
        stored = box.decrypt(conn.execute(select(partners.c.secret_enc)
                                          .where(partners.c.partner_id == pid)).scalar_one())
        details = conn.execute(select(audit_events.c.detail).where(
            audit_events.c.kind == "partner_secret_rotated")).scalars().all()
    assert stored in {r.secret for r in rotated} and rotated[0].secret != rotated[1].secret
    assert len(details) == 2 and not any(r.secret in d for r in rotated for d in details)


def test_a_revoked_name_cannot_be_added_again(
        engine: Engine, new_operator: Callable[..., str]) -> None:
    new_operator(engine, "operator")
    name = list_operators(engine)[0].name
    revoke_operator(engine, name, "离职", actor="cli:zhang")
    with pytest.raises(RegistrationRefused):
        add_operator(engine, name, "operator")


# -- 2. GET /v1/batches -------------------------------------------------------------------------

@pytest.mark.parametrize("forged", [
    # Review finding, fixed: a NUL in the cursor's batch id was PostgreSQL's 500 and SQLite's 200.
    pytest.param(("2026-03-01T00:00:00+00:00", "B\x001"), id="nul-batch-id"),
    pytest.param(("2026-03-01T00:00:00+00:00", "B" * 65), id="batch-id-too-long"),
    pytest.param(("0001-01-01T00:00:00+08:00", "B1"), id="year-1"),
    pytest.param(("9999-12-31T23:59:59-12:00", "B1"), id="year-10000-utc")])
def test_a_forged_cursor_is_refused_coded_never_500(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_operator: Callable[..., str], forged: tuple[str, str]) -> None:
    token = new_operator(engine, "viewer")
    cursor = encode_cursor("batches", *forged)
    with uvicorn_thread(create_app(make_settings(db_url, batch_dir=tmp_path / "b"),
                                   run_worker=False)) as url:
        resp = httpx.get(f"{url}/v1/batches", params={"cursor": cursor},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "SCHEMA"


# -- 3. store_repairs --------------------------------------------------------------------------

def _queue(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(store_repairs).values(name="refused_pins", queued_at=datetime.now(UTC),
                                                  reason="review"))


def _repaired(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(audit_events.c.seq)
                                .where(audit_events.c.kind == "store_repaired")).all())


def test_a_queued_repair_keeps_readyz_503_runs_once_and_survives_a_crash(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(db_url, batch_dir=tmp_path / "b")
    _queue(engine)
    with db.reading(engine) as conn:
        assert db.revision_behind(conn) is not None
    # migrate=False: on SQLite the gateway's start would run the repair (upgrade_if_behind).
    with uvicorn_thread(create_app(settings, run_worker=False, migrate=False)) as url:
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 503

    def crash(*_: object) -> None:
        raise RuntimeError("power cut mid-repair")

    monkeypatch.setitem(repairs.REPAIRS, "refused_pins", crash)
    with pytest.raises(RuntimeError):
        repairs.run_pending(engine, settings)
    monkeypatch.undo()
    with engine.connect() as conn:  # still queued, nothing recorded
        assert conn.execute(select(store_repairs.c.name)).scalars().all() == ["refused_pins"]
    assert _repaired(engine) == 0

    db.upgrade(db_url, settings=settings)
    db.upgrade(db_url, settings=settings)  # again: nothing left to do
    assert _repaired(engine) == 1
    with db.reading(engine) as conn:
        assert db.revision_behind(conn) is None
    with uvicorn_thread(create_app(settings, run_worker=False)) as url:
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def test_serve_runs_a_queued_repair_on_sqlite_and_refuses_to_start_on_postgresql(
        db_url: str, engine: Engine, tmp_path: Path) -> None:
    """What docs/operations.md says of ``ce-gateway serve`` and a pending repair, as a process."""
    _queue(engine)
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
           "CE_GATEWAY_BATCH_DIR": str(tmp_path / "b"), "CE_GATEWAY_PULL_INTERVAL_SECONDS": "0",
           "CE_GATEWAY_REFERENCE_SYNC_INTERVAL_SECONDS": "0",
           "CE_GATEWAY_RETENTION_INTERVAL_SECONDS": "0", "CE_GATEWAY_ALERT_INTERVAL_SECONDS": "0"}
    if _postgres(db_url):
        # Never migrated nor repaired by a process: exit 2 naming `db upgrade`, the repair queued.
        done = cli(env, "serve", "--no-worker", "--port", str(free_port()))
        assert done.returncode == 2, done.stdout + done.stderr
        assert "STORE_NOT_MIGRATED" in done.stderr and "db upgrade" in done.stderr, done.stderr
        expected = (["refused_pins"], 0)
    else:
        gw = GatewayProcess(env, tmp_path / "serve.log", "--no-worker").start()  # /readyz 200
        gw.stop()
        expected = ([], 1)
    with engine.connect() as conn:
        queued = conn.execute(select(store_repairs.c.name)).scalars().all()
    assert (queued, _repaired(engine)) == expected


# -- 4. signatures: the ``path?`` variant ---------------------------------------------------------

def test_the_question_mark_variant_opens_no_replay_and_no_other_path(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: Callable[..., object]) -> None:
    partner = new_partner(engine, adapter="health")
    key, secret = partner.app_key, partner.secret  # type: ignore[attr-defined]
    with uvicorn_thread(create_app(make_settings(db_url, batch_dir=tmp_path / "b"),
                                   run_worker=False)) as url:
        with_mark = signed_headers(key, secret, "GET", "/v1/batches?", b"")
        assert httpx.get(f"{url}/v1/batches", headers=with_mark).status_code == 200
        # The same nonce again, signed without the mark: still a replay.
        again = signed_headers(key, secret, "GET", "/v1/batches", b"",
                               nonce=with_mark["X-CE-Nonce"])
        replay = httpx.get(f"{url}/v1/batches", headers=again)
        assert replay.status_code == 401, replay.text
        # A signature over another path (with or without the mark) opens nothing here.
        for other in ("/v1/records?", "/v1/batches/x?", "/v1/batches??"):
            resp = httpx.get(f"{url}/v1/batches", headers=signed_headers(key, secret, "GET", other, b""))
            assert resp.status_code == 401, (other, resp.text)
        # A request with a query has no variant: its signature must cover the query.
        resp = httpx.get(f"{url}/v1/batches?status=done",
                         headers=signed_headers(key, secret, "GET", "/v1/batches?", b""))
        assert resp.status_code == 401, resp.text


# -- 6. URL redaction ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "secret"), [
    ("dsn postgresql://u:S1@h:5/db?sslpassword=S2&x=2.", "S1"),
    ("dsn postgresql://u:S1@h:5/db?sslpassword=S2&x=2.", "S2"),
    ("(see https://oapi.dingtalk.com/robot/send?access_token=S3), then", "S3"),
    ("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=S4;", "S4"),
    ("http://h/?token=S5(x)", "S5"),
])
def test_redact_urls_stars_userinfo_and_query_values(text: str, secret: str) -> None:
    assert secret not in redact_urls(text)


def test_redact_urls_keeps_the_prose_after_a_url() -> None:
    assert redact_urls("(see http://h/?k=v), then") == "(see http://h/?k=***), then"


BAD_LIST_QUERIES = [
    {"since": "0001-01-01"}, {"until": "0001-01-01T00:00:00+08:00"},
    {"until": "9999-12-31T23:59:59-12:00"}, {"since": "2026-01-01\x00"},
    {"partner_id": "p\x00"}, {"period": "2026\x00"}, {"status": "done\x00"},
    {"limit": "99999999999999999999"}, {"limit": "\x00"}, {"cursor": "\x00"},
    {"cursor": "A" * 600}, {"since": "2026-02-30"}, {"since": "+002026-01-01"},
]


def test_the_batch_list_refuses_bad_parameters_coded_never_500(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_operator: Callable[..., str]) -> None:
    token = new_operator(engine, "viewer")
    got = {}
    with uvicorn_thread(create_app(make_settings(db_url, batch_dir=tmp_path / "b"),
                                   run_worker=False)) as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                         timeout=30) as ops:
        for query in BAD_LIST_QUERIES:
            resp = ops.get("/v1/batches", params=query)
            got[repr(query)] = (resp.status_code, resp.json().get("error", {}).get("code")
                                if resp.status_code != 200 else None)
    assert set(got.values()) == {(422, "SCHEMA")}, got
