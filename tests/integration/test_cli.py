"""The CLI as an operator runs it: real processes against a real store."""

from __future__ import annotations

import csv
import json
import random
import zipfile
from pathlib import Path

from sqlalchemy import select, update

from contracts.errors import message
from gateway.batch_requests import NewBatch, new_batch_id, record_batch
from gateway.config import DEV_SECRET_KEY
from gateway.signing import file_sha256
from gateway.store.db import make_engine
from gateway.store.tables import audit_events, batches, partners
from mock_partners.training_base import results
from tests.fixtures import make_golden
from tests.support.servers import cli

HEALTH_MARCH = ("--adapter", "health", "--kind", "monthly", "--period", "2026-03")


def assert_refused(stderr: str, code: str, field: str) -> None:
    """A coded refusal in both languages (SPEC §6), and never a traceback."""
    en, zh = message(code)
    assert f"{code} ({field}): {en}" in stderr and f"{code} ({field}): {zh}" in stderr, stderr
    assert "Traceback" not in stderr


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


def test_ingest_of_an_unreadable_file_fails_its_own_batch_and_leaves_others_to_the_workers(
        db_url: str, tmp_path: Path) -> None:
    """A broken file is a coded refusal (exit 2), never a traceback or a batch left queued.

    And a broken batch someone else queued is no later ingest's business.
    """
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": "cli-test",
           "CE_GATEWAY_BATCH_DIR": str(tmp_path / "b")}
    not_a_workbook = tmp_path / "notabook.xlsx"  # a ZIP archive, but no workbook inside
    with zipfile.ZipFile(not_a_workbook, "w") as archive:
        archive.writestr("a.txt", "hi")
    legacy = tmp_path / "legacy.xls"  # OLE2: a legacy workbook the gateway does not read
    legacy.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600))
    engine = make_engine(db_url)
    # Queued earlier (an upload waiting for a worker, or an ingest killed before this fix).
    waiting = NewBatch(new_batch_id(), "health-upload", "health", "monthly", "2026-03",
                       not_a_workbook.resolve(), "xlsx", not_a_workbook.stat().st_size,
                       file_sha256(not_a_workbook))
    record_batch(engine, waiting, actor="test")

    broken = cli(env, "ingest", str(not_a_workbook), *HEALTH_MARCH, "--json")
    assert broken.returncode == 2, broken.stderr
    assert_refused(broken.stderr, "SCHEMA", "file")
    failed = json.loads(broken.stdout)
    assert failed["status"] == "failed" and failed["batch_id"] != waiting.batch_id
    assert failed["error"].startswith("the file cannot be read: not a readable XLSX workbook")
    assert failed["failure"]["code"] == "SCHEMA" and "文件无法读取" in failed["failure"]["message_zh"]

    refused = cli(env, "ingest", str(legacy), *HEALTH_MARCH, "--json")
    assert refused.returncode == 2 and refused.stdout == ""
    assert_refused(refused.stderr, "SCHEMA", "file")
    assert "legacy .xls workbooks are not supported" in refused.stderr

    good = cli(env, "ingest", str(make_golden.HEALTH_CSV), *HEALTH_MARCH, "--json")
    assert good.returncode == 0, good.stderr
    done = json.loads(good.stdout)
    assert done["status"] == "done" and done["counts"]["accepted"] > 0
    with engine.connect() as conn:
        states = dict(conn.execute(select(batches.c.batch_id, batches.c.status)).all())
    engine.dispose()
    # The legacy file never became a batch (as an upload's 422); the waiting one is untouched.
    assert states == {waiting.batch_id: "queued", failed["batch_id"]: "failed",
                      done["batch_id"]: "done"}


def test_partner_add_refuses_an_empty_id_and_a_training_base_without_its_base_code(
        tmp_path: Path) -> None:
    """SPEC §7: a base may only submit for its own base code, so it cannot be added without one."""
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    env = {"CE_GATEWAY_DATABASE_URL": url, "CE_GATEWAY_SECRET_KEY": "cli-test"}
    for args, why in ((("--id", "", "--adapter", "canonical"), "partner id must not be empty"),
                      (("--id", "  ", "--adapter", "canonical"), "partner id must not be empty"),
                      (("--id", "qh-base-009", "--adapter", "training_base"), "--base-code"),
                      (("--id", "qh-base-009", "--adapter", "training_base", "--base-code", ""),
                       "base code must not be empty")):
        refused = cli(env, "partner", "add", *args, "--json")
        assert refused.returncode == 2 and why in refused.stderr, (args, refused.stderr)
        assert refused.stdout == ""
    added = cli(env, "partner", "add", "--id", "qh-base-009", "--adapter", "training_base",
                "--base-code", "QHJD-009", "--json")
    assert added.returncode == 0, added.stderr
    engine = make_engine(url)
    with engine.connect() as conn:
        stored = [tuple(r) for r in conn.execute(select(partners.c.partner_id, partners.c.base_code))]
    engine.dispose()
    assert stored == [("qh-base-009", "QHJD-009")]


def test_ingest_of_a_roster_is_scoped_by_a_registered_bases_code(tmp_path: Path) -> None:
    """As an upload's rows are (SPEC §7): no base code, no roster; another base's row, refused."""
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
           "CE_GATEWAY_SECRET_KEY": "cli-test"}
    added = cli(env, "partner", "add", "--id", "qh-base-009", "--adapter", "training_base",
                "--base-code", "QHJD-009", "--json")
    assert added.returncode == 0, added.stderr
    roster = tmp_path / "roster.csv"
    with roster.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, [*results(random.Random(9), 1)[0], "base_code", "plan_id"])
        writer.writeheader()
        for result, base in zip(results(random.Random(9), 2), ("QHJD-009", "QHJD-002"), strict=True):
            writer.writerow({**result, "passed": "是", "base_code": base, "plan_id": f"{base}-P1"})
    as_roster = ("--adapter", "training_base", "--kind", "roster", "--period", "2026", "--json")
    nobody = cli(env, "ingest", str(roster), *as_roster)
    assert nobody.returncode == 2 and nobody.stdout == ""
    assert_refused(nobody.stderr, "SCOPE_VIOLATION", "partner_id")
    ingested = cli(env, "ingest", str(roster), *as_roster, "--partner-id", "qh-base-009")
    assert ingested.returncode == 0, ingested.stderr
    status = json.loads(ingested.stdout)
    # Row 2 is judged (QHJD-009 is in no directory here); row 3 is not this base's to send.
    rejected = [(r["row"], r["column"], r["code"]) for r in status["rejected_rows"]]
    assert (2, "base_code", "BASE_NOT_RECOGNIZED") in rejected
    assert [r for r in rejected if r[0] == 3] == [(3, "base_code", "SCOPE_VIOLATION")]


def test_read_commands_refuse_bad_input_with_a_coded_error_not_a_traceback(tmp_path: Path) -> None:
    """What the API refuses, the CLI refuses too (exit 2, both languages); nothing reads as 0 h."""
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    env = {"CE_GATEWAY_DATABASE_URL": url, "CE_GATEWAY_SECRET_KEY": "cli-test"}
    assert cli(env, "db", "upgrade").returncode == 0
    csv_file = tmp_path / "bases.csv"
    csv_file.write_text("code,name\nX,Y\n", encoding="utf-8")
    valid_id = "630102198704139126"
    for args, code, field in ((("reconcile", "health", "26"), "SCHEMA", "year"),
                              (("reconcile", "health", "99999999999999999999"), "SCHEMA", "year"),
                              (("reconcile", "bogus", "2026"), "SCHEMA", "adapter"),
                              (("compliance", "630102198704139127", "2026"), "ID_NUMBER_INVALID",
                               "id_number"),
                              (("compliance", valid_id, "99999999999"), "SCHEMA", "year"),
                              (("reference", "import", "bogus", str(csv_file)), "SCHEMA", "kind")):
        refused = cli(env, *args, "--json")
        assert refused.returncode == 2 and refused.stdout == "", (args, refused.stderr)
        assert_refused(refused.stderr, code, field)
        assert "630102198704139127" not in refused.stderr  # masked
    shown = cli(env, "deliveries", "show", "99999999999999999999")
    assert shown.returncode == 1 and "NOT_FOUND" in shown.stderr and "Traceback" not in shown.stderr
    listed = cli(env, "deliveries", "list", "--cursor",
                 "WyJkZWxpdmVyaWVzIiwxODQ0Njc0NDA3MzcwOTU1MTYxNV0", "--json")
    assert listed.returncode == 2 and "Traceback" not in listed.stderr, listed.stderr


# -- configuration and the store at start (gateway/cli/common.py _settings, _engine) ---------------

UNREACHABLE = "postgresql://ops:pw@127.0.0.1:9/ce"  # nothing listens on the discard port


def test_several_bad_settings_are_each_named_and_nothing_runs(tmp_path: Path) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
           "CE_GATEWAY_TIMEZONE": "Asia/Shanghia", "CE_GATEWAY_HEALTH_HOURS_PER_CREDIT": "-3.6"}
    done = cli(env, "deliveries", "list", "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert_refused(done.stderr, "CONFIG_INVALID", "CE_GATEWAY_TIMEZONE")
    assert_refused(done.stderr, "CONFIG_INVALID", "CE_GATEWAY_HEALTH_HOURS_PER_CREDIT")
    assert "'Asia/Shanghia'" in done.stderr and "'-3.6'" in done.stderr
    assert not (tmp_path / "cli.sqlite3").exists()  # refused before the store was touched


def test_a_refused_secret_or_database_url_is_not_echoed(tmp_path: Path) -> None:
    done = cli({"CE_GATEWAY_SECRET_KEY": " ", "CE_GATEWAY_DATABASE_URL": "nosuch://u:hunter2@h/d"},
               "deliveries", "list", "--json")
    assert done.returncode == 2
    assert_refused(done.stderr, "CONFIG_INVALID", "CE_GATEWAY_SECRET_KEY")
    # Settings are valid but for the key; the URL's scheme is refused once the key is fixed.
    done = cli({"CE_GATEWAY_SECRET_KEY": "k", "CE_GATEWAY_DATABASE_URL": "nosuch://u:hunter2@h/d"},
               "deliveries", "list", "--json")
    assert done.returncode == 2
    assert_refused(done.stderr, "CONFIG_INVALID", "CE_GATEWAY_DATABASE_URL")
    assert "hunter2" not in done.stderr


def test_a_misspelt_setting_is_a_warning_and_the_command_runs(tmp_path: Path) -> None:
    """Named, with the setting it resembles, but not refused.

    A Kubernetes Service named ce-gateway injects CE_GATEWAY_SERVICE_HOST and CE_GATEWAY_PORT_*
    into every pod of its namespace: those are not named at all.
    """
    env = {"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
           "CE_GATEWAY_DELIVERY_BATCH_SIZ": "100", "CE_GATEWAY_SERVICE_HOST": "10.0.0.1",
           "CE_GATEWAY_PORT_8000_TCP": "tcp://10.0.0.1:8000"}
    done = cli(env, "deliveries", "list", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["total"] == 0
    assert "CE_GATEWAY_DELIVERY_BATCH_SIZ)" in done.stderr
    assert "did you mean CE_GATEWAY_DELIVERY_BATCH_SIZE?" in done.stderr
    assert "不是配置项" in done.stderr
    assert "SERVICE_HOST" not in done.stderr and "PORT_8000" not in done.stderr
    assert done.stderr.count("not a setting") == 1  # once a process


def test_serve_and_ops_commands_refuse_an_unreachable_store_at_start() -> None:
    for command in (("serve", "--port", "0"), ("deliveries", "list", "--json"),
                    ("operator", "add", "--name", "n", "--json")):
        done = cli({"CE_GATEWAY_DATABASE_URL": UNREACHABLE}, *command)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert_refused(done.stderr, "STORE_UNAVAILABLE", "CE_GATEWAY_DATABASE_URL")
        assert "ops:***@127.0.0.1:9" in done.stderr and "pw@" not in done.stderr


def test_audit_verify_on_an_sqlite_store_never_migrated_names_db_upgrade(tmp_path: Path) -> None:
    """Commands migrate SQLite themselves; ``audit verify`` only reads, so it says what to run."""
    done = cli({"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'new.sqlite3'}"},
               "audit", "verify", "--json")
    assert done.returncode == 2, done.stderr[-2000:]
    assert_refused(done.stderr, "STORE_NOT_MIGRATED", "CE_GATEWAY_DATABASE_URL")
    assert "ce-gateway db upgrade" in done.stderr and "store at no migration" in done.stderr


def test_an_sqlite_store_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    done = cli({"CE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'file' / 'store.sqlite3'}"},
               "deliveries", "list", "--json")
    assert done.returncode == 2
    assert_refused(done.stderr, "STORE_UNAVAILABLE", "CE_GATEWAY_DATABASE_URL")
