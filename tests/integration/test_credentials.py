"""The credential lifecycle as ops run it, on SQLite and PostgreSQL.

Real ``ce-gateway`` processes change the credentials while a real gateway (uvicorn on
127.0.0.1) serves the same store: a rotated partner secret is refused at once and the new one
works, a disabled partner is 401 until enabled, a revoked operator token is refused by the ops
API and its console session ends, a reissued one works.  Every action leaves an audit event
with its reason, never the secret or token, and the chain verifies.  Migration 0025 is a
rolling release: the previous release's code (exported with ``git archive``, as
tests/integration/test_upgrade_review.py does) refuses a revoked token and a disabled partner too.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
from alembic import command
from sqlalchemy import Engine, func, inspect, select

from contracts.errors import message
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.console import session as sessions
from gateway.secrets_box import hash_token
from gateway.signing import SigningClient
from gateway.store.db import upgrade
from gateway.store.tables import audit_events, operators
from mock_partners.generators import canonical_submission
from tests.conftest import SECRET_KEY
from tests.integration import test_upgrade_review as upgrade_review
from tests.integration.test_upgrade_review import run_old
from tests.support.keys import unsafe_downgrade_config
from tests.support.servers import cli, uvicorn_thread

old_trees = upgrade_review.old_trees  # an old commit's exported tree (git archive)
BEFORE_0025 = "a01aa06"  # the release before: store at 0024, no revoked_at / disabled_at

MakeSettings = Callable[..., Settings]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ACTOR = "zhang"


def _env(db_url: str) -> dict[str, str]:
    return {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY,
            "USER": ACTOR, "LOGNAME": ACTOR}


def _run(db_url: str, *args: str) -> Any:
    """A command that must succeed; its ``--json`` output."""
    done = cli(_env(db_url), *args, "--json")
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout)


@contextmanager
def _gateway(db_url: str, make_settings: MakeSettings) -> Iterator[str]:
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        yield url


def _submit(url: str, app_key: str, secret: str, source_id: str) -> httpx.Response:
    with SigningClient(url, app_key, secret, timeout=30) as client:
        return client.submit([canonical_submission(random.Random(source_id), source_id)])


def _accepted(resp: httpx.Response) -> None:
    assert resp.status_code == 200, resp.text
    assert [r["status"] for r in resp.json()["results"]] == ["accepted"], resp.text


def _unauthenticated(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "UNAUTHENTICATED"


def _events(engine: Engine, *kinds: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(audit_events.c.kind, audit_events.c.actor, audit_events.c.detail)
                            .where(audit_events.c.kind.in_(kinds))
                            .order_by(audit_events.c.seq)).all()
    return [{"kind": r.kind, "actor": r.actor, **orjson.loads(r.detail)} for r in rows]


def _audit_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_events)).scalar_one())


def _verified(db_url: str) -> None:
    done = cli(_env(db_url), "audit", "verify", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["ok"] is True, done.stdout


def test_partner_rotate_disable_enable_take_effect_at_once(
        db_url: str, engine: Engine, make_settings: MakeSettings) -> None:
    added = _run(db_url, "partner", "add", "--id", "qh-canon-007", "--adapter", "canonical")
    app_key, old = added["app_key"], added["secret"]
    with _gateway(db_url, make_settings) as url:
        _accepted(_submit(url, app_key, old, "CRED-1"))

        rotated = _run(db_url, "partner", "rotate-secret", "--id", "qh-canon-007",
                       "--reason", "密钥出现在工单 #4711 中")
        assert rotated["app_key"] == app_key and rotated["enabled"] is True
        new = rotated["secret"]
        assert new != old and len(new) >= 32
        _unauthenticated(_submit(url, app_key, old, "CRED-2"))
        _accepted(_submit(url, app_key, new, "CRED-3"))

        assert _run(db_url, "partner", "disable", "--id", "qh-canon-007",
                    "--reason", "合同到期")["changed"] is True
        _unauthenticated(_submit(url, app_key, new, "CRED-4"))
        # Again: nothing changes and nothing is appended.
        before = _audit_count(engine)
        again = _run(db_url, "partner", "disable", "--id", "qh-canon-007", "--reason", "again")
        assert again["changed"] is False and again["since"] is not None
        assert _audit_count(engine) == before

        listed = cli(_env(db_url), "partner", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert old not in listed.stdout and new not in listed.stdout
        [row] = [p for p in json.loads(listed.stdout) if p["partner_id"] == "qh-canon-007"]
        assert row["enabled"] is False and row["disabled_at"] and "secret" not in row
        assert (row["adapter"], row["base_code"], row["app_key"]) == ("canonical", None, app_key)

        assert _run(db_url, "partner", "enable", "--id", "qh-canon-007",
                    "--reason", "续签完成")["changed"] is True
        _accepted(_submit(url, app_key, new, "CRED-5"))
        _unauthenticated(_submit(url, app_key, old, "CRED-6"))
    [row] = [p for p in _run(db_url, "partner", "list") if p["partner_id"] == "qh-canon-007"]
    assert row["enabled"] is True and row["disabled_at"] is None

    events = _events(engine, "partner_secret_rotated", "partner_disabled", "partner_enabled")
    assert [(e["kind"], e["actor"], e["reason"], e["partner_id"]) for e in events] == [
        ("partner_secret_rotated", f"cli:{ACTOR}", "密钥出现在工单 #4711 中", "qh-canon-007"),
        ("partner_disabled", f"cli:{ACTOR}", "合同到期", "qh-canon-007"),
        ("partner_enabled", f"cli:{ACTOR}", "续签完成", "qh-canon-007")]
    assert not any(old in json.dumps(e) or new in json.dumps(e) for e in events)
    _verified(db_url)


def _console_login(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, follow_redirects=False)
    page = client.get("/ops/login")
    found = CSRF.search(page.text)
    assert page.status_code == 200 and found is not None
    client.post("/ops/login", data={"token": token, "csrf": found.group(1), "next": "/ops"})
    return client


def test_operator_revoke_and_reissue_take_effect_at_once_api_and_console(
        db_url: str, engine: Engine, make_settings: MakeSettings) -> None:
    old = _run(db_url, "operator", "add", "--name", "li", "--role", "operator")["token"]

    def api(token: str) -> httpx.Response:
        return httpx.get(f"{url}/v1/deliveries", headers={"Authorization": f"Bearer {token}"},
                         timeout=10)

    with _gateway(db_url, make_settings) as url:
        assert api(old).status_code == 200
        browser = _console_login(url, old)
        assert sessions.COOKIE in browser.cookies and browser.get("/ops").status_code == 200

        revoked = _run(db_url, "operator", "revoke", "--name", "li", "--reason", "离职")
        assert revoked["changed"] is True
        _unauthenticated(api(old))
        home = browser.get("/ops")  # the session of a revoked operator is no session
        assert home.status_code == 303 and home.headers["location"].startswith("/ops/login")
        again = _console_login(url, old)
        assert sessions.COOKIE not in again.cookies
        # What code before migration 0025 reads refuses it too: the old hash is gone.
        with engine.connect() as conn:
            assert conn.execute(select(operators.c.id).where(
                operators.c.token_hash == hash_token(old))).first() is None
        listed = cli(_env(db_url), "operator", "list", "--json")
        assert listed.returncode == 0 and old not in listed.stdout
        [row] = [o for o in json.loads(listed.stdout) if o["name"] == "li"]
        assert row["role"] == "operator" and row["revoked_at"] and "token" not in row

        new = _run(db_url, "operator", "reissue", "--name", "li", "--reason", "返岗")["token"]
        assert new != old
        assert api(new).status_code == 200
        _unauthenticated(api(old))
        fresh = _console_login(url, new)
        assert fresh.get("/ops").status_code == 200
        assert browser.get("/ops").status_code == 303  # the revoked session stays ended

        # Reissuing an operator never revoked ends its token and sessions too (a rotation).
        newer = _run(db_url, "operator", "reissue", "--name", "li", "--reason", "定期轮换")["token"]
        _unauthenticated(api(new))
        assert fresh.get("/ops").status_code == 303
        assert api(newer).status_code == 200
        for client in (browser, again, fresh):
            client.close()
    [row] = [o for o in _run(db_url, "operator", "list") if o["name"] == "li"]
    assert row["revoked_at"] is None

    events = _events(engine, "operator_revoked", "operator_reissued")
    assert [(e["kind"], e["actor"], e["reason"], e["name"]) for e in events] == [
        ("operator_revoked", f"cli:{ACTOR}", "离职", "li"),
        ("operator_reissued", f"cli:{ACTOR}", "返岗", "li"),
        ("operator_reissued", f"cli:{ACTOR}", "定期轮换", "li")]
    assert [e["was_revoked"] for e in events[1:]] == [True, False]
    assert not any(t in json.dumps(e) for e in events for t in (old, new, newer))
    _verified(db_url)


def test_blank_reason_is_schema_and_unknown_names_not_found(db_url: str, engine: Engine) -> None:
    _run(db_url, "partner", "add", "--id", "qh-canon-008", "--adapter", "canonical")
    _run(db_url, "operator", "add", "--name", "zhao")
    before = _audit_count(engine)
    cases = [(("partner", "rotate-secret", "--id", "qh-canon-008"), "partner_id", "qh-canon-009"),
             (("partner", "disable", "--id", "qh-canon-008"), "partner_id", "qh-canon-009"),
             (("partner", "enable", "--id", "qh-canon-008"), "partner_id", "qh-canon-009"),
             (("operator", "revoke", "--name", "zhao"), "name", "qian"),
             (("operator", "reissue", "--name", "zhao"), "name", "qian")]
    runs = [(args, "  ", 2, "SCHEMA", "reason") for args, _, _ in cases]
    runs += [((*args[:-1], unknown), "why", 1, "NOT_FOUND", field)
             for args, field, unknown in cases]
    with ThreadPoolExecutor(4) as pool:  # ~1.5 s a process
        done = list(pool.map(lambda r: (r, cli(_env(db_url), *r[0], "--reason", r[1])), runs))
    for (args, _, exit_code, code, field), result in done:
        en, zh = message(code)
        assert result.returncode == exit_code, (args, result.stderr)
        assert f"{code} ({field}): {en}" in result.stderr, (args, result.stderr)
        assert f"{code} ({field}): {zh}" in result.stderr and "Traceback" not in result.stderr
    assert _audit_count(engine) == before


def test_rotation_under_another_secret_key_is_refused_and_changes_nothing(
        db_url: str, engine: Engine, make_settings: MakeSettings) -> None:
    """A shell without the deployment's SECRET_KEY would seal a secret no replica can open."""
    added = _run(db_url, "partner", "add", "--id", "qh-canon-010", "--adapter", "canonical")
    before = _audit_count(engine)
    done = cli({**_env(db_url), "CE_GATEWAY_SECRET_KEY": "not-this-deployments-key"},
               "partner", "rotate-secret", "--id", "qh-canon-010", "--reason", "x", "--json")
    assert done.returncode == 2 and "CONFIG_INVALID (CE_GATEWAY_SECRET_KEY)" in done.stderr
    assert done.stdout == "" and _audit_count(engine) == before
    with _gateway(db_url, make_settings) as url:
        _accepted(_submit(url, added["app_key"], added["secret"], "CRED-10"))


def test_0025_adds_the_lifecycle_columns_and_downgrades(db_url: str, engine: Engine) -> None:
    """Accounts made before 0025 are neither disabled nor revoked after it; 0024 drops them."""
    _run(db_url, "partner", "add", "--id", "qh-canon-011", "--adapter", "canonical")
    _run(db_url, "operator", "add", "--name", "sun")
    command.downgrade(unsafe_downgrade_config(db_url), "0024")

    def columns(table: str) -> set[str]:
        return {c["name"] for c in inspect(engine).get_columns(table)}

    assert "revoked_at" not in columns("operators") and "disabled_at" not in columns("partners")
    upgrade(db_url)
    assert "revoked_at" in columns("operators") and "disabled_at" in columns("partners")
    partner = next(p for p in _run(db_url, "partner", "list") if p["partner_id"] == "qh-canon-011")
    operator = next(o for o in _run(db_url, "operator", "list") if o["name"] == "sun")
    assert (partner["enabled"], partner["disabled_at"], operator["revoked_at"]) == (True, None, None)


OLD_AUTH = r'''
import json, sys
spec = json.load(open(sys.argv[1]))
import gateway
from gateway.accounts import operator_by_token, partner_by_app_key
from gateway.console import session as sessions
from gateway.secrets_box import SecretBox
from gateway.store.db import make_engine
engine = make_engine(spec["url"])
partner = partner_by_app_key(engine, SecretBox(spec["secret"]), spec["steps"]["app_key"])
out = {"gateway": gateway.__file__,
       "tokens": [operator_by_token(engine, t) is not None for t in spec["steps"]["tokens"]],
       "session": sessions.load(engine, sessions.Signer(spec["secret"]),
                                spec["steps"]["cookie"]) is not None,
       "partner_secret": partner.secret if partner else None}
engine.dispose()
print(json.dumps(out))
'''


def test_the_release_before_0025_refuses_what_this_code_revoked_and_disabled(
        db_url: str, engine: Engine, old_trees: Callable[[str], Path], tmp_path: Path) -> None:
    """A rolling release: a replica of the previous release still serving the store at 0025."""
    tree = old_trees(BEFORE_0025)
    token = _run(db_url, "operator", "add", "--name", "zhou")["token"]
    added = _run(db_url, "partner", "add", "--id", "qh-canon-012", "--adapter", "canonical")
    logged = sessions.log_in(engine, sessions.Signer(SECRET_KEY), token)  # a console cookie
    assert logged is not None

    def old_auth(*tokens: str) -> dict[str, Any]:
        # The driver reads its one step as a dict (``run_old`` passes it through as JSON).
        step: Any = {"app_key": added["app_key"], "tokens": list(tokens), "cookie": logged[0]}
        return run_old(tree, db_url, "http://127.0.0.1:9", step, tmp_path, driver_source=OLD_AUTH)

    before = old_auth(token)
    assert (before["tokens"], before["session"], before["partner_secret"]) == (
        [True], True, added["secret"])

    _run(db_url, "operator", "revoke", "--name", "zhou", "--reason", "离职")
    rotated = _run(db_url, "partner", "rotate-secret", "--id", "qh-canon-012", "--reason", "泄露")
    mid = old_auth(token)
    assert (mid["tokens"], mid["session"], mid["partner_secret"]) == (
        [False], False, rotated["secret"])  # the old code checks signatures with the new secret

    _run(db_url, "partner", "disable", "--id", "qh-canon-012", "--reason", "停用")
    new = _run(db_url, "operator", "reissue", "--name", "zhou", "--reason", "返岗")["token"]
    after = old_auth(token, new)
    assert (after["tokens"], after["partner_secret"]) == ([False, True], None)
