"""The CLI as an operator runs it: real processes against a real store."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import update

from gateway.config import DEV_SECRET_KEY
from gateway.store.db import make_engine
from gateway.store.tables import audit_events
from tests.support.servers import cli


def test_partner_and_operator_add_print_credentials_once_and_audit_verify_catches_edits(
        tmp_path: Path) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
           "CE_GATEWAY_SECRET_KEY": "cli-test"}
    added = cli(env, "partner", "add", "--id", "qh-base-001", "--adapter", "canonical", "--json")
    assert added.returncode == 0, added.stderr
    partner = json.loads(added.stdout)
    assert partner["partner_id"] == "qh-base-001" and partner["app_key"].startswith("ak_")
    assert len(partner["secret"]) >= 32
    again = cli(env, "partner", "add", "--id", "qh-base-001", "--adapter", "canonical", "--json")
    assert again.returncode == 2 and "already exists" in again.stderr

    op = cli(env, "operator", "add", "--name", "wang", "--role", "viewer", "--json")
    assert op.returncode == 0, op.stderr
    assert json.loads(op.stdout)["role"] == "viewer"

    # Nothing stored in clear: neither the partner secret nor the operator token.
    raw = (tmp_path / "cli.sqlite3").read_bytes()
    assert partner["secret"].encode() not in raw
    assert json.loads(op.stdout)["token"].encode() not in raw

    ok = cli(env, "audit", "verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    engine = make_engine(env["CE_GATEWAY_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.seq == 1).values(actor="mallory"))
    engine.dispose()
    broken = cli(env, "audit", "verify", "--json")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["first_bad_seq"] == 1


def test_unknown_adapter_is_refused(tmp_path: Path) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}"}
    result = cli(env, "partner", "add", "--id", "x", "--adapter", "nonsense", "--json")
    assert result.returncode == 2 and "unknown adapter" in result.stderr


def test_serve_refuses_the_development_secret_key_beyond_loopback(tmp_path: Path) -> None:
    """Partner secrets sealed with the public default key are not secret (SPEC §7)."""
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
           "CE_GATEWAY_SECRET_KEY": DEV_SECRET_KEY}
    refused = cli(env, "serve", "--host", "0.0.0.0", "--port", "-1")
    assert refused.returncode == 2 and "CE_GATEWAY_SECRET_KEY" in refused.stderr
    # With a key of its own, it gets as far as binding (port -1 then fails it).
    own = cli({**env, "CE_GATEWAY_SECRET_KEY": "a-key-of-this-deployment-only-0123456789"},
              "serve", "--host", "0.0.0.0", "--port", "-1")
    assert own.returncode == 1 and "port must be 0-65535" in own.stderr
