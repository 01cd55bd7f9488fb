"""Docs review: what README.md and docs/ promise, checked against the code that runs.

A newcomer, a partner and an ops person meet the gateway through its documents first, so the
commands, settings, metrics and answers written there are pinned here, read from the documents
themselves (a command or setting added to a document is checked without touching this file):

- every ``ce-gateway …`` invocation in README.md and docs/*.md resolves to a command whose
  options accept what is written (parsed by the real Typer app, placeholders filled in), and
  SPEC §5's CLI list exists, with ``--json`` where a script would read the answer;
- the README's ops commands run against a fresh store and exit as documented;
- every setting in a documentation table exists in ``Settings`` with the stated default;
- every metric family in docs/metrics-and-alerts.md is served with its type and labels, by
  ``serve`` and (its own half) by ``worker --metrics-port``;
- the README's curl recipe for a signed request works as written, and the HTTP status column of
  docs/error-codes.md is what a whole request is answered with;
- SPEC §5's HTTP surface is in ``/openapi.json``.

Product bugs found are strict xfails (``/readyz`` on a store behind the code's migrations; no
CLI view of a record's timeline).  Documentation errors are strict xfails too where a test
reads the document (the fix is the document's), and listed in the review report.
"""

from __future__ import annotations

import inspect
import os
import random
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import typer
from alembic import command
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import Engine

from contracts.errors import CATALOGUE
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.cli import app as cli_app
from gateway.config import DEV_PERSON_KEY_SECRET, DEV_SECRET_KEY, Settings
from gateway.delivery.policy import Action
from gateway.demo import free_port
from gateway.masking import mask_id
from gateway.signing import SigningClient, signed_headers
from gateway.store.db import alembic_config, make_engine
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission
from tests.fixtures import make_golden
from tests.integration.test_metrics import Scrape
from tests.support.servers import WorkerProcess, cli, poll, uvicorn_thread

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SPEC_EXAMPLE_ID = "630102198704139126"  # SPEC §3's example person (赵伟, 630200)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`((?:\.venv/bin/)?ce-gateway\s[^`]*)`")


@pytest.fixture
def engine_sqlite(sqlite_url: str) -> Iterator[Engine]:
    """The store of ``sqlite_url`` (these checks are about documents, not backends)."""
    eng = make_engine(sqlite_url)
    yield eng
    eng.dispose()


def _readme_block(holding: str) -> str:
    """The README's fenced block that holds ``holding``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return next(m.group(2) for m in FENCE.finditer(text) if holding in m.group(2))


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


# -- the CLI as the documents show it ------------------------------------------------------------

def block_invocations(block: str) -> Iterator[tuple[int, str]]:
    """(line offset, command line) of the ``ce-gateway`` commands of one shell block."""
    lines = block.split("\n")
    i = 0
    while i < len(lines):
        at, line = i, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):  # continued
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        i += 1
        if line.strip().startswith((".venv/bin/ce-gateway ", "ce-gateway ")):
            yield at, line.strip()


def documented_invocations() -> list[tuple[str, str]]:
    """(file:line, command line) of every ``ce-gateway`` command in README.md and docs/*.md."""
    found: list[tuple[str, str]] = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if block.group(1) not in ("sh", "bash", ""):
                continue
            first = text.count("\n", 0, block.start(2)) + 1
            found += [(_where(path, first + at), line) for at, line in block_invocations(block.group(2))]
        for span in INLINE.finditer(text):  # in prose; may wrap across lines
            found.append((_where(path, text.count("\n", 0, span.start()) + 1),
                          " ".join(span.group(1).split())))
    return found


# Documentation errors a reader would hit (the code is right; the document is to be fixed).
DOC_ERRORS: dict[str, str] = {}  # none left: each was fixed in its document


def _placeholders(tmp_path: Path) -> dict[str, str]:
    """What a reader puts in for the documents' placeholders (files must exist: Typer checks)."""
    a_file = tmp_path / "bases.csv"
    a_file.write_text("code,name,level,status,assessed_on\n", encoding="utf-8")
    return {"FILE": str(a_file), "bases.csv": str(a_file), "ID": SPEC_EXAMPLE_ID, "YEAR": "2026"}


def _argv(line: str, tmp_path: Path) -> list[str]:
    """The arguments after ``ce-gateway``: comments dropped, ``[optional]`` brackets opened."""
    words = shlex.split(line, comments=True)[1:]
    words = [w.strip("[]") for w in words]
    fill = _placeholders(tmp_path)
    return [fill.get(w, w) for w in words if w]


def parse_invocation(argv: list[str]) -> tuple[list[str], Any]:
    """Resolve ``argv`` through the real Typer app and parse its options; raise if refused.

    The click context is made (types converted, required options checked, files checked to
    exist) but the command is not run.
    """
    command_ = typer.main.get_command(cli_app)
    path = ["ce-gateway"]
    while hasattr(command_, "commands"):  # a group: the next word names the sub-command
        assert argv, f"{' '.join(path)} needs a sub-command"
        name, argv = argv[0], argv[1:]
        assert name in command_.commands, f"{' '.join(path)} has no command {name!r}"
        command_ = command_.commands[name]
        path.append(name)
    return path, command_.make_context(" ".join(path), list(argv))


def _invocation_params() -> Iterator[Any]:
    seen: dict[str, int] = {}
    for where, line in documented_invocations():
        seen[where] = seen.get(where, 0) + 1
        test_id = where if seen[where] == 1 else f"{where}#{seen[where]}"
        marks = ([pytest.mark.xfail(strict=True, raises=typer.TyperException,
                                    reason=DOC_ERRORS[where])] if where in DOC_ERRORS else [])
        yield pytest.param(line, id=test_id, marks=marks)


def test_the_documents_show_the_cli_at_all() -> None:
    """The parser below found the documents' commands (a format change must not empty it)."""
    lines = [line for _, line in documented_invocations()]
    assert len(lines) >= 40, lines
    assert any("partner add" in line for line in lines)


@pytest.mark.parametrize("line", list(_invocation_params()))
def test_every_documented_cli_invocation_is_accepted_as_written(line: str, tmp_path: Path) -> None:
    parse_invocation(_argv(line, tmp_path))


# SPEC §5 "CLI", written out literally (placeholders filled): each must exist as listed.
SPEC_CLI = [
    "serve --no-worker",
    "serve --host 127.0.0.1 --port 8000 --no-worker",
    "worker",
    "demo",
    "db upgrade",
    "partner add --id qh-base-009 --adapter training_base --base-code QHJD-009 --json",
    "operator add --name wang --role viewer --json",
    "ingest FILE --adapter health --kind monthly --period 2026-03",
    "deliveries list",
    "deliveries show 1",
    "deliveries reprocess --reason why --dry-run",
    "revalidate --dry-run",
    "reconcile health 2026",
    "reference import bases FILE",
    "reference sync",
    "audit verify",
    "mock ce-system --port 8780 --error-rate 0.1 --latency-ms 5 --rate-limit-every 3 "
    "--outage-seconds 10 --duplicate-receipts --lost-reply-rate 0.05",
    "mock cadre-college --port 8781 --error-rate 0.1 --latency-ms 5 --rate-limit-every 3",
]

# "--json where a script would read it" (SPEC §5): every command that answers with data.
SCRIPTED = ["partner add", "partner list", "partner rotate-secret", "partner disable",
            "partner enable", "operator add", "operator list", "operator revoke",
            "operator reissue", "audit verify", "ingest", "reconcile", "compliance",
            "revalidate", "reference import", "reference sync", "deliveries list",
            "deliveries show", "deliveries reprocess", "conflicts list", "conflicts resolve",
            "pull cadre-college", "retention run", "alerts check"]


@pytest.mark.parametrize("line", SPEC_CLI)
def test_spec_cli_surface_exists(line: str, tmp_path: Path) -> None:
    parse_invocation(_argv(f"ce-gateway {line}", tmp_path))


@pytest.mark.parametrize("name", SCRIPTED)
def test_commands_a_script_reads_take_json(name: str) -> None:
    command_: Any = typer.main.get_command(cli_app)
    for word in name.split():
        command_ = command_.commands[word]
    assert any("--json" in p.opts for p in command_.params), f"ce-gateway {name} has no --json"


def test_readme_ops_commands_run_on_a_fresh_store_and_exit_as_documented(
        sqlite_url: str, tmp_path: Path) -> None:
    """README "Ops … CLI": each command of the block, run for real on an empty store.

    Read commands and dry runs exit 0; ``deliveries show 123``, ``records show REC_ID`` and
    ``conflicts resolve REC_ID`` name nothing on an empty store: a coded NOT_FOUND and exit 1, never a traceback.
    """
    block = _readme_block("deliveries list --status dead")
    lines = [line for _, line in block_invocations(block)]
    assert len(lines) >= 9, lines
    env = {"CE_GATEWAY_DATABASE_URL": sqlite_url, "CE_GATEWAY_SECRET_KEY": "docs-review",
           "CE_GATEWAY_DOWNSTREAM_URL": "http://127.0.0.1:9", "CE_GATEWAY_BATCH_DIR": str(tmp_path)}
    with ThreadPoolExecutor(4) as pool:  # ~1.5 s a process; the store is migrated already
        results = list(pool.map(lambda line: (line, cli(env, *_argv(line, tmp_path))), lines))
    for line, done in results:
        assert "Traceback" not in done.stderr, (line, done.stderr)
        if " show 123" in line or "REC_ID" in line:
            assert done.returncode == 1 and "NOT_FOUND" in done.stderr, (line, done.stderr)
        else:
            assert done.returncode == 0, (line, done.stdout, done.stderr)


# -- settings --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DocSetting:
    where: str
    name: str  # without the CE_GATEWAY_ prefix
    default: str  # as written, backticks and notes kept


def _table_rows(path: Path, first_header: str) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) of every row of the tables in ``path`` whose first header is given."""
    inside = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells:
            inside = False
        elif cells[0] == first_header:
            inside = True
        elif inside and not set(cells[0]) <= set("-: "):
            yield number, cells


def documented_settings() -> list[DocSetting]:
    """Rows of the settings tables: README "Configuration" and the docs' "setting" tables."""
    found = []
    for path in DOCS:
        for header in ("variable", "setting"):
            for number, cells in _table_rows(path, header):
                names = [n.removeprefix("CE_GATEWAY_") for n in re.findall(r"`([A-Z_]+)`", cells[0])]
                defaults = (re.split(r"(?:^|\s)/(?:\s|$)", cells[1]) if len(names) > 1
                            else [cells[1]])
                assert len(defaults) == len(names), (path, number, cells)
                found += [DocSetting(_where(path, number), n, d.strip())
                          for n, d in zip(names, defaults, strict=True)]
    return found


def _unit(text: str) -> str:
    """A size written for people (``16 MiB``, ``2,000,000``) as a plain number."""
    match = re.fullmatch(r"([\d.]+)\s*(KiB|MiB|GiB)", text)
    if match:
        factor = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[match.group(2)]
        return str(int(Decimal(match.group(1)) * factor))
    return text.replace(",", "") if re.fullmatch(r"-?[\d,]+", text) else text


def expected_default(setting: DocSetting, actual: Any) -> Any:
    """The documented default as a value of the type ``Settings`` holds."""
    text = re.sub(r"\(.*?\)", "", setting.default).replace("`", "").strip()
    if setting.name == "DELIVERY_MAX_ATTEMPTS":  # "schedule length + 1": None, then computed
        assert text == "schedule length + 1", setting
        return None
    if isinstance(actual, SecretStr):
        assert text == "a development value", setting
        return actual  # compared below by value
    if actual is None or isinstance(actual, dict):
        assert text == "", setting
        return type(actual)() if isinstance(actual, dict) else None
    if isinstance(actual, tuple):
        return tuple(int(part) for part in text.split(","))
    text = _unit(text)
    for kind in (bool, Decimal, float, int, Path, str):
        if isinstance(actual, kind):
            return kind(text)
    raise AssertionError(f"{setting}: no reading for {type(actual).__name__}")


def _field_default(name: str) -> Any:
    info = Settings.model_fields[name.lower()]
    return info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]


def test_the_documents_list_settings_at_all() -> None:
    names = {s.name for s in documented_settings()}
    assert {"DATABASE_URL", "RETRY_SCHEDULE", "ALERT_WEBHOOK_TIMEOUT_SECONDS",
            "RETENTION_PAYLOAD_DAYS", "JOB_LEASE_SECONDS"} <= names


@pytest.mark.parametrize("setting", documented_settings(), ids=lambda s: f"{s.where}:{s.name}")
def test_every_documented_setting_exists_with_its_documented_default(setting: DocSetting) -> None:
    assert setting.name.lower() in Settings.model_fields, f"{setting.where}: no setting {setting.name}"
    actual = _field_default(setting.name)
    expected = expected_default(setting, actual)
    if isinstance(actual, SecretStr):
        dev = {"SECRET_KEY": DEV_SECRET_KEY, "PERSON_KEY_SECRET": DEV_PERSON_KEY_SECRET}
        assert actual.get_secret_value() == dev[setting.name]
    else:
        assert actual == expected, f"{setting.where}: {setting.name} documented {setting.default!r}"


# Settings named in prose (not a table): each must exist; SPEC §5's list too.
PROSE_SETTINGS = ["BATCH_STALL_SECONDS", "BATCH_PARSE_MIN_BYTES", "DOWNSTREAM_TIMEOUT_SECONDS",
                  "INLINE_RETRY_MAX_WAIT_SECONDS", "BATCH_LEASE_SECONDS", "BATCH_MAX_ATTEMPTS"]
SPEC_SETTINGS = ["DATABASE_URL", "DOWNSTREAM_URL", "CADRE_COLLEGE_URL", "DELIVERY_BATCH_SIZE",
                 "DELIVERY_MAX_ATTEMPTS", "RETRY_SCHEDULE", "YEAR_CLOSE", "PULL_INTERVAL_SECONDS",
                 "ALERT_WEBHOOK_URL", "SECRET_KEY"]
NOT_SETTINGS = {"CE_GATEWAY_", "TEST_POSTGRES_URL", "INTEGRITY_", "SIGKILL", "SIGTERM", "GET", "DELETE",
                "UPDATE", "AUDIT_RETENTION_DAYS"}


def test_settings_named_in_prose_and_in_spec_exist_with_the_stated_values() -> None:
    for name in PROSE_SETTINGS + SPEC_SETTINGS:
        assert name.lower() in Settings.model_fields, name
    # Every other ALL_CAPS name in backticks is a setting or a code (docs' spelling check).
    for path in DOCS:
        for token in re.findall(r"`(?:CE_GATEWAY_)?([A-Z][A-Z0-9_]{2,})`", path.read_text(encoding="utf-8")):
            if token not in CATALOGUE and token not in NOT_SETTINGS:
                assert token.lower() in Settings.model_fields, (path.name, token)
    # docs/retention-and-audit.md: "there is no AUDIT_RETENTION_DAYS setting".
    assert "audit_retention_days" not in Settings.model_fields
    defaults = {n: _field_default(n) for n in ("inline_retries", "downstream_timeout_seconds",
                                               "inline_retry_max_wait_seconds", "batch_parse_min_bytes",
                                               "batch_max_attempts", "year_close", "delivery_batch_size")}
    # docs/operations.md "Leases": "(defaults: 3 × 15 s = 45 s)", below DELIVERY_LEASE_SECONDS.
    assert defaults["inline_retries"] * (defaults["downstream_timeout_seconds"]
                                         + defaults["inline_retry_max_wait_seconds"]) == 45
    assert defaults["batch_parse_min_bytes"] == 4 << 20  # README: "(4 MiB)"
    assert defaults["batch_max_attempts"] == 5  # README: "`BATCH_MAX_ATTEMPTS` (5)"
    assert (defaults["year_close"], defaults["delivery_batch_size"]) == ("12-30", 500)  # SPEC §5
    # SPEC §5: "in the spirit of 5 s … 10 h over about a day".
    schedule = _field_default("retry_schedule")
    assert schedule[0] == 5 and max(schedule) == 36_000 and 20 * 3600 <= sum(schedule) <= 30 * 3600
    assert Settings.model_config.get("env_prefix") == "CE_GATEWAY_"


def test_documented_setting_formats_are_read_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The spellings the README shows for list- and map-valued settings."""
    monkeypatch.setenv("CE_GATEWAY_RETRY_SCHEDULE", "5,30,120")
    monkeypatch.setenv("CE_GATEWAY_YEAR_CLOSE_EXTENSIONS", "2026=2027-03-31")
    monkeypatch.setenv("CE_GATEWAY_ALERT_WEBHOOK_FORMAT", "dingtalk")
    monkeypatch.setenv("CE_GATEWAY_HEALTH_HOURS_PER_CREDIT", "3.6")
    settings = Settings()
    assert settings.retry_schedule == (5, 30, 120)
    assert settings.max_attempts == 4  # "schedule length + 1"
    assert settings.year_close_extensions == {2026: date(2027, 3, 31)}
    assert settings.alert_webhook_format == "dingtalk"
    assert settings.health_hours_per_credit == Decimal("3.6")


# -- metrics ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DocFamily:
    name: str
    type: str
    labels: frozenset[str]


def documented_families() -> list[DocFamily]:
    rows = _table_rows(ROOT / "docs" / "metrics-and-alerts.md", "family")
    return [DocFamily(cells[0].strip("`"), cells[1], frozenset(re.findall(r"`(\w+)`", cells[2])))
            for _, cells in rows]


def _family(scrape: Scrape, name: str) -> Any:
    """The exposition's family of a documented name (a counter is declared without ``_total``)."""
    return scrape.families.get(name) or scrape.families.get(name.removesuffix("_total"))


def test_documented_delivery_outcomes_are_the_policy_tables_actions() -> None:
    row = next(cells for _, cells in _table_rows(ROOT / "docs" / "metrics-and-alerts.md", "family")
               if cells[0] == "`ce_gateway_delivery_attempts_total`")
    assert set(re.findall(r"`(\w+)`", row[3])) == {a.value for a in Action} | {"transport_error"}


def test_every_documented_metric_family_is_served_with_its_type_and_labels(
        sqlite_url: str, engine_sqlite: Engine, tmp_path: Path, mock_ce: tuple[str, Faults],
        make_settings: Callable[..., Settings], new_partner: Callable[..., Partner]) -> None:
    families = documented_families()
    assert len(families) >= 11, families
    canon = new_partner(engine_sqlite)
    health = new_partner(engine_sqlite, adapter="health")
    settings = make_settings(sqlite_url, mock_ce[0], batch_dir=tmp_path / "batches")
    with uvicorn_thread(create_app(settings, run_worker=True)) as url, \
            SigningClient(url, canon.app_key, canon.secret) as client, \
            SigningClient(url, health.app_key, health.secret) as uploader:
        answer = client.submit([canonical_submission(random.Random(3), "DOC-M-1")])
        assert answer.json()["results"][0]["status"] == "accepted", answer.text
        batch_id = uploader.upload_batch(make_golden.HEALTH_CSV, adapter="health", kind="monthly",
                                         period="2026-03").json()["batch_id"]
        poll(lambda: uploader.get(f"/v1/batches/{batch_id}").json()["status"] == "done", 60,
             what="the batch to finish")

        def delivered() -> Scrape | None:
            now = Scrape(url)
            return now if (now.value("ce_gateway_backlog_records") == 0 and now.value(
                "ce_gateway_delivery_attempts_total", outcome="delivered")) else None

        scrape = poll(delivered, 60, what="the records delivered")
    for doc in families:
        served = _family(scrape, doc.name)
        assert served is not None, f"{doc.name} is documented but not served"
        assert served.type == doc.type, doc
        for sample in served.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            assert set(sample.labels) == doc.labels, (doc, sample)
    for moved in ("ce_gateway_ingested_records_total", "ce_gateway_batch_rows_processed_total",
                  "ce_gateway_delivery_attempts_total", "ce_gateway_circuit_state",
                  "ce_gateway_store_up"):
        assert [s for s in _family(scrape, moved).samples if not s.name.endswith("_created")], moved


def test_a_worker_with_metrics_port_serves_its_own_half(
        sqlite_url: str, tmp_path: Path, mock_ce: tuple[str, Faults]) -> None:
    """A ``worker --metrics-port`` serves its own half of the families.

    docs/metrics-and-alerts.md: its delivery counters and ``ce_gateway_circuit_state``; the
    store gauges are the replicas' to report (docs/operations.md).
    """
    port = free_port()
    env = {"CE_GATEWAY_DATABASE_URL": sqlite_url, "CE_GATEWAY_SECRET_KEY": "docs-review",
           "CE_GATEWAY_DOWNSTREAM_URL": mock_ce[0], "CE_GATEWAY_BATCH_DIR": str(tmp_path / "b"),
           "CE_GATEWAY_PULL_INTERVAL_SECONDS": "0", "CE_GATEWAY_REFERENCE_SYNC_INTERVAL_SECONDS": "0",
           "CE_GATEWAY_RETENTION_INTERVAL_SECONDS": "0"}
    worker = WorkerProcess(env, tmp_path / "worker.log", "--metrics-port", str(port)).start()
    try:  # prometheus_client's own server: text format 0.0.4 by default, not Scrape's 1.0.0
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        worker.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    worker_half = {"ce_gateway_circuit_state", "ce_gateway_delivery_attempts_total",
                   "ce_gateway_delivery_latency_seconds", "ce_gateway_batch_rows_processed_total",
                   "ce_gateway_ingested_records_total", "ce_gateway_writer_retries_total"}
    documented = {f.name for f in documented_families()}
    assert worker_half <= documented
    for name in worker_half:
        assert families.get(name.removesuffix("_total")), name
    assert [s.value for s in families["ce_gateway_circuit_state"].samples] == [0], \
        "a worker reports its own circuit (closed)"
    for gauge in ("ce_gateway_backlog_records", "ce_gateway_dead_letters", "ce_gateway_store_up"):
        assert gauge not in families, f"{gauge}: the replicas' to report"


# -- a partner's requests, as the README writes them ----------------------------------------------

@pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "curl", "openssl", "sha256sum")),
                    reason="the README's recipe needs bash, curl, openssl and sha256sum")
def test_readme_curl_recipe_for_a_signed_request_is_accepted(
        sqlite_url: str, engine_sqlite: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner]) -> None:
    recipe = _readme_block("openssl dgst")
    partner = new_partner(engine_sqlite)
    with uvicorn_thread(create_app(make_settings(sqlite_url), run_worker=False)) as url:
        assert "http://127.0.0.1:8000" in recipe
        done = subprocess.run(["bash", "-c", recipe.replace("http://127.0.0.1:8000", url)],
                              env={**os.environ, "APP_KEY": partner.app_key, "SECRET": partner.secret},
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout)["results"][0]
    assert (result["source_record_id"], result["status"]) == ("JD-2026-000123", "accepted"), result


def _codes_doc() -> dict[str, str]:
    """Each code → the "HTTP status" column of docs/error-codes.md."""
    return {cells[0].strip("`"): cells[2]
            for _, cells in _table_rows(ROOT / "docs" / "error-codes.md", "code")}


def test_error_codes_doc_lists_every_spec_code() -> None:
    spec = ROOT.parent / "shared" / "SPEC.md"  # beside the checkout, where the team keeps it
    doc = _codes_doc()
    assert set(doc) == set(CATALOGUE)
    if spec.exists():  # SPEC §6, read from the contract itself
        section = spec.read_text(encoding="utf-8").split("## 6.")[1].split("## 7.")[0]
        for code in re.findall(r"`([A-Z][A-Z_]+)`", section):
            assert code.endswith("_") or code in doc, code


def test_whole_request_answers_carry_the_documented_status_and_code(
        sqlite_url: str, engine_sqlite: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], new_operator: Callable[..., str]) -> None:
    """Refusals of a whole request: the status docs/error-codes.md gives each code.

    The body is ``{"error": {code, field, message, message_zh}}`` (the documented four).
    """
    documented = _codes_doc()
    rng = random.Random(11)
    settings = make_settings(sqlite_url, max_records_per_request=2, rate_limit_burst=3,
                             rate_limit_per_minute=1)
    canon, other, scoped, limited = (new_partner(engine_sqlite) for _ in range(4))
    viewer, operator = new_operator(engine_sqlite, "viewer"), new_operator(engine_sqlite)
    seen: dict[str, int] = {}

    def expect(code: str, response: httpx.Response) -> dict[str, Any]:
        body: dict[str, Any] = response.json()
        assert set(body["error"]) == {"code", "field", "message", "message_zh"}, body
        assert body["error"]["code"] == code, body
        seen[code] = response.status_code
        return body

    with uvicorn_thread(create_app(settings, run_worker=False)) as url, \
            SigningClient(url, canon.app_key, canon.secret) as client:
        expect("SCHEMA", client.submit([]))
        expect("PAYLOAD_TOO_LARGE", client.submit(
            [canonical_submission(rng, f"DOC-E-{i}") for i in range(3)]))
        expect("UNAUTHENTICATED", httpx.post(f"{url}/v1/records", content=b"{}"))
        body = orjson.dumps({"records": [canonical_submission(rng, "DOC-E-R")]})
        headers = {**signed_headers(other.app_key, other.secret, "POST", "/v1/records", body),
                   "Content-Type": "application/json"}
        assert httpx.post(f"{url}/v1/records", content=body, headers=headers).status_code == 200
        expect("REPLAYED", httpx.post(f"{url}/v1/records", content=body, headers=headers))
        with SigningClient(url, scoped.app_key, scoped.secret) as base:
            expect("SCOPE_VIOLATION", base.post("/v1/partners/training_base/records", json={
                "base_code": "QHJD-001", "plan_id": "P", "results": []}))
        with SigningClient(url, limited.app_key, limited.secret) as busy:
            answers = [busy.get("/v1/batches/none") for _ in range(4)]
            expect("RATE_LIMITED", answers[-1])
            assert answers[-1].headers.get("retry-after", "").isdigit()
        bearer = {"Authorization": f"Bearer {viewer}"}
        expect("NOT_FOUND", httpx.get(f"{url}/v1/records/R-none", headers=bearer))
        expect("ID_NUMBER_INVALID", httpx.get(f"{url}/v1/compliance/123/2026", headers=bearer))
        expect("FORBIDDEN", httpx.post(f"{url}/v1/deliveries/reprocess", headers=bearer,
                                       json={"dry_run": True, "reason": "r"}))
        record_id = client.submit([canonical_submission(rng, "DOC-E-A")]).json()["results"][0]["record_id"]
        acting = {"Authorization": f"Bearer {operator}"}
        expect("NOT_A_CONFLICT", httpx.post(f"{url}/v1/conflicts/{record_id}/resolve",
                                            headers=acting, json={"keep": "this", "reason": "r"}))
        expect("NOT_EDITABLE", httpx.post(f"{url}/v1/records/{record_id}/edit", headers=acting,
                                          json={"changes": {"activity.title": "x"}, "reason": "r"}))
        # A rule's code answers a whole request when an ops edit is refused by the rules.
        bad = canonical_submission(rng, "DOC-E-B")
        bad["person"]["region_code"] = "999999"
        with SigningClient(url, other.app_key, other.secret) as second:
            assert second.submit([bad]).json()["results"][0]["errors"][0]["code"] == "REGION_UNKNOWN"
        [rejection] = httpx.get(f"{url}/v1/rejections", headers=acting).json()["items"]
        expect("REGION_UNKNOWN", httpx.post(f"{url}/v1/rejections/{rejection['id']}/edit",
                                            headers=acting, json={"changes": {
                                                "activity.title": "高原医学专题"}, "reason": "r"}))
    for code, status in seen.items():
        assert documented[code] == str(status), (code, status, documented[code])


def test_codes_reported_per_record_or_per_batch_answer_no_request_with_their_status(
        sqlite_url: str, engine_sqlite: Engine, tmp_path: Path,
        make_settings: Callable[..., Settings], new_partner: Callable[..., Partner]) -> None:
    """What a partner really meets for two codes docs/error-codes.md gives a status (409, 422).

    CONFLICT_WITH_EXISTING is a record's answer inside a 200; CONTROL_TOTALS_MISMATCH is an
    accepted upload (202) whose batch then fails with that code — neither is ever the status of a
    request, which the table's "HTTP status" column does not say (review report, doc finding).
    """
    first, second = new_partner(engine_sqlite), new_partner(engine_sqlite)
    health = new_partner(engine_sqlite, adapter="health")
    sub = canonical_submission(random.Random(5), "DOC-C-1", hours="8")
    other = {**sub, "source_record_id": "DOC-C-2", "claimed": {**sub["claimed"], "quantity": "16"}}
    settings = make_settings(sqlite_url, batch_dir=tmp_path / "batches")
    with uvicorn_thread(create_app(settings, run_worker=True)) as url, \
            SigningClient(url, first.app_key, first.secret) as a, \
            SigningClient(url, second.app_key, second.secret) as b, \
            SigningClient(url, health.app_key, health.secret) as uploader:
        assert a.submit([sub]).json()["results"][0]["status"] == "accepted"
        answer = b.submit([other])
        assert answer.status_code == 200
        result = answer.json()["results"][0]
        assert result["status"] == "conflict"
        assert [e["code"] for e in result["errors"]] == ["CONFLICT_WITH_EXISTING"]
        upload = uploader.upload_batch(make_golden.HEALTH_CSV, adapter="health", kind="monthly",
                                       period="2026-03", row_count=999)
        assert upload.status_code == 202, upload.text
        batch_id = upload.json()["batch_id"]

        def ended() -> dict[str, Any] | None:
            now: dict[str, Any] = uploader.get(f"/v1/batches/{batch_id}").json()
            return now if now["status"] in ("done", "failed") else None

        status = poll(ended, 60, what="the batch to end")
    assert status["status"] == "failed"
    assert status["failure"]["code"] == "CONTROL_TOTALS_MISMATCH"


# -- SPEC §5's HTTP surface -------------------------------------------------------------------------

SPEC_HTTP = [("post", "/v1/records"), ("post", "/v1/partners/{adapter}/records"),
             ("delete", "/v1/records/{source_record_id}"), ("post", "/v1/batches"),
             ("get", "/v1/batches/{batch_id}"), ("get", "/v1/records/{record_id}"),
             ("get", "/v1/deliveries"), ("post", "/v1/deliveries/reprocess"),
             ("post", "/v1/records/revalidate"), ("get", "/v1/reconciliation/{adapter}/{year}"),
             ("get", "/v1/compliance/{id_number}/{year}"), ("get", "/v1/audit"),
             ("get", "/v1/audit/verify"), ("get", "/healthz"), ("get", "/readyz"),
             ("get", "/metrics"),
             # README "API" adds these
             ("get", "/v1/conflicts"), ("post", "/v1/conflicts/{record_id}/resolve"),
             ("post", "/v1/records/{record_id}/edit"), ("get", "/v1/rejections"),
             ("post", "/v1/rejections/{rejection_id}/edit")]


def test_spec_http_surface_is_served_and_in_openapi(
        sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    with uvicorn_thread(create_app(make_settings(sqlite_url), run_worker=False)) as url:
        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
        login = httpx.get(f"{url}/ops/login")
        ops = httpx.get(f"{url}/ops", follow_redirects=False)
        deliveries = httpx.get(f"{url}/v1/deliveries", params={
            "status": "dead", "adapter": "health", "partner_id": "p", "error_code": "RETRIES_EXHAUSTED",
            "since": "2026-01-01", "until": "2026-12-31"}, headers={"Authorization": "Bearer nope"})
    missing = [(m, p) for m, p in SPEC_HTTP if m not in paths.get(p, {})]
    assert not missing, missing
    assert login.status_code == 200 and '<html lang="zh-CN">' in login.text  # the console, zh-CN
    assert ops.status_code in (302, 303) and "/ops/login" in ops.headers["location"]
    assert deliveries.status_code == 401  # the documented filters parse; the token is checked
    params = {p["name"] for p in paths["/v1/deliveries"]["get"].get("parameters", [])}
    assert {"status", "adapter", "partner_id", "error_code", "since", "until"} <= params


# Paged reads as README "API" documents them: (path, the README's words for it).
PAGED_IN_README = [("/v1/batches", "`GET /v1/batches?"), ("/v1/batches/{batch_id}", "`rejected_rows`"),
                   *((path, "lists answer") for path in ("/v1/deliveries", "/v1/conflicts",
                                                         "/v1/rejections"))]


@pytest.mark.parametrize(("path", "where"), PAGED_IN_README)
def test_readme_gives_the_paged_reads_cursor_and_limit_as_served(
        path: str, where: str, sqlite_url: str, make_settings: Callable[..., Settings]) -> None:
    """The README gives a paged read's ``cursor`` and ``limit`` as the route takes them.

    Where it describes the read: ``cursor`` named, and ``limit``'s bounds and default
    (```limit`, 1–N, …default D``) those of the route's OpenAPI.
    """
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert where in text, where
    told = text[text.index(where):][:300]
    assert "`cursor`" in told or "cursor=" in told, told
    bounds = re.search(r"`limit`,? (\d+)–(\d+)[^)]*?default (\d+)", told)
    assert bounds, told
    served = create_app(make_settings(sqlite_url), run_worker=False).openapi()
    params = {p["name"]: p for p in served["paths"][path]["get"]["parameters"]}
    assert "cursor" in params
    schema = params["limit"]["schema"]
    assert tuple(int(n) for n in bounds.groups()) == (
        schema["minimum"], schema["maximum"], schema["default"]), told


def test_signing_client_has_the_readme_calls() -> None:
    """The README's calls on ``gateway.signing.SigningClient`` exist as written.

    ``submit(records)`` and ``upload_batch(path, adapter=, kind=, period=, row_count=)``, on a
    context manager.
    """
    upload = inspect.signature(SigningClient.upload_batch).parameters
    assert {"adapter", "kind", "period", "row_count", "total_credits"} <= set(upload)
    assert list(inspect.signature(SigningClient.submit).parameters) == ["self", "records"]
    assert hasattr(SigningClient, "__enter__")


def test_operations_says_what_the_start_does_with_a_pending_repair() -> None:
    """docs/operations.md on 0024's repairs: SQLite's start runs one, PostgreSQL's does not.

    As ``test_session24_review.test_serve_runs_a_queued_repair_on_sqlite_and_refuses_to_start_on_postgresql``
    finds on both stores (only ``db upgrade`` runs it on PostgreSQL).
    """
    text = " ".join((ROOT / "docs" / "operations.md").read_text(encoding="utf-8").split())
    repairs = text[text.index("0024 adds `store_repairs`"):][:2500]
    assert "On SQLite the gateway's own start runs a pending repair" in repairs
    assert "`ce-gateway serve` finds the repair queued, runs it" in repairs
    assert "On PostgreSQL no process runs it" in repairs
    assert "`STORE_NOT_MIGRATED`, the repair still queued" in repairs


# -- product bugs ----------------------------------------------------------------------------------

@pytest.mark.postgres
def test_readyz_is_not_ready_on_a_store_behind_the_codes_migrations(
        postgres_url: str, make_settings: Callable[..., Settings]) -> None:
    command.downgrade(alembic_config(postgres_url), "-1")
    # `serve --no-worker` on PostgreSQL: replicas never migrate it (docs/operations.md).
    with uvicorn_thread(create_app(make_settings(postgres_url), run_worker=False)) as url:
        ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 503, ready.text


def test_the_cli_shows_a_records_timeline(
        sqlite_url: str, engine_sqlite: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner]) -> None:
    partner = new_partner(engine_sqlite)
    with uvicorn_thread(create_app(make_settings(sqlite_url), run_worker=False)) as url, \
            SigningClient(url, partner.app_key, partner.secret) as client:
        sub = canonical_submission(random.Random(2), "DOC-T-1")
        record_id = client.submit([sub]).json()["results"][0]["record_id"]
    shown = cli({"CE_GATEWAY_DATABASE_URL": sqlite_url}, "records", "show", record_id, "--json")
    assert shown.returncode == 0, shown.stderr
    page = orjson.loads(shown.stdout)
    assert page["record"]["record_id"] == record_id
    assert [e["kind"] for e in page["timeline"]][:2] == ["received", "queued"]
    # Masked in the terminal, as in the console (both forms).
    table = cli({"CE_GATEWAY_DATABASE_URL": sqlite_url}, "records", "show", record_id)
    id_number = sub["person"]["id_number"]
    assert table.returncode == 0 and "received" in table.stdout, table.stderr
    assert id_number not in shown.stdout + table.stdout and mask_id(id_number) in shown.stdout
