"""``ce-gateway``: the command line of the gateway (Typer + Rich).

Every command reads the one :class:`~gateway.config.Settings` (``CE_GATEWAY_*`` environment);
commands meant for scripts take ``--json``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from contracts.errors import message
from gateway.config import (
    DEV_PERSON_KEY_SECRET,
    DEV_SECRET_KEY,
    ENV_PREFIX,
    Settings,
    get_settings,
    setting_errors,
    unknown_variables,
)
from gateway.errors import PayloadRejected
from gateway.ops import commands as ops_commands

app = typer.Typer(help="CE Gateway — 青海省继续教育学时对接网关", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations", no_args_is_help=True)
partner_app = typer.Typer(help="Partner registration", no_args_is_help=True)
operator_app = typer.Typer(help="Operator tokens", no_args_is_help=True)
audit_app = typer.Typer(help="Audit trail", no_args_is_help=True)
mock_app = typer.Typer(help="Mock partner systems for tests and the demo", no_args_is_help=True)
pull_app = typer.Typer(help="Pull partners (the Cadre Network College)", no_args_is_help=True)
reference_app = typer.Typer(help="Reference data: bases, plans, deferrals, title applicants",
                            no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(partner_app, name="partner")
app.add_typer(operator_app, name="operator")
app.add_typer(audit_app, name="audit")
app.add_typer(mock_app, name="mock")
app.add_typer(pull_app, name="pull")
app.add_typer(reference_app, name="reference")
# deliveries list|show|reprocess, conflicts list|resolve (issue 5): gateway/ops/commands.py
app.add_typer(ops_commands.deliveries_app, name="deliveries")
app.add_typer(ops_commands.conflicts_app, name="conflicts")
app.add_typer(ops_commands.records_app, name="records")
retention_app = typer.Typer(help="Payload retention (the audit trail is never pruned)",
                              no_args_is_help=True)
app.add_typer(retention_app, name="retention")
alerts_app = typer.Typer(help="Alerts to the ops group robot (WeCom / DingTalk)", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")
console = Console()
err = Console(stderr=True)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _refused(exc: PayloadRejected) -> typer.Exit:
    """Print a coded refusal in English and Chinese (SPEC §6); the caller raises the Exit (2)."""
    return _coded(exc.code, exc.field, exc.message, exc.message_zh)


def _coded(code: str, field: str | None, text: str, text_zh: str) -> typer.Exit:
    """``CODE (field): English`` and ``CODE (field): 中文``; the caller raises the Exit (2).

    Masked as the API masks its refusals: what an operator typed (an identity number given as
    an error code, say) is quoted back, and terminal output ends up in tickets and logs.
    """
    from gateway.masking import mask_text

    where = f" ({field})" if field else ""
    err.print(mask_text(f"{code}{where}: {text}\n{code}{where}: {text_zh}"),
              style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _check_year(year: int) -> None:
    """A CE year the store can hold, as the API's paths take it (ops.common's bounds)."""
    from gateway.ops.common import FIRST_YEAR, LAST_YEAR

    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise _refused(PayloadRejected(
            "SCHEMA", field="year", detail=f"({year}: expected {FIRST_YEAR}-{LAST_YEAR})",
            detail_zh=f"（{year}：应在 {FIRST_YEAR}–{LAST_YEAR} 之间）"))


_named_unknown: list[bool] = []  # once a process, however often a command reads the settings


def _settings() -> Settings:
    """The deployment's settings, or a coded refusal naming each bad variable (exit 2).

    A CE_GATEWAY_* variable that no setting reads is named in a warning, not refused: a
    Kubernetes Service named ce-gateway injects CE_GATEWAY_SERVICE_HOST and the like (those are
    left unnamed), and a variable kept for a newer release must not stop an older one.
    """
    if not _named_unknown:
        _named_unknown.append(True)
        for variable, like in unknown_variables():
            hint, hint_zh = (f"; did you mean {like}?", f"；是否应为 {like}？") if like else ("", "")
            err.print(f"warning ({variable}): not a setting, ignored{hint}\n"
                      f"warning ({variable}): 不是配置项，已忽略{hint_zh}",
                      style="yellow", markup=False, highlight=False, soft_wrap=True)
    try:
        return get_settings()
    except ValidationError as exc:
        en, zh = message("CONFIG_INVALID")
        for bad in setting_errors(exc):
            _coded("CONFIG_INVALID", bad.variable, f"{en} {bad.detail}", f"{zh}{bad.detail_zh}")
        raise typer.Exit(2) from None


def _setup_logging(settings: Settings) -> None:
    from gateway.masking import install_log_masking

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    # Alembic says "Context impl SQLiteImpl." and "Will assume non-transactional DDL." on every
    # command that opens SQLite; a migration that runs still says "Running upgrade …".
    logging.getLogger("alembic.runtime.migration").addFilter(
        lambda record: not record.getMessage().startswith(("Context impl", "Will assume")))
    install_log_masking()


def _engine(settings: Settings, migrate: bool = True):  # type: ignore[no-untyped-def]
    """The store's engine, connected once up front, its person keys checked.

    An unreachable store is then one coded line (exit 2), not a traceback from the command's
    first query; so is a PERSON_KEY_SECRET other than the store's, for every command: a
    one-off ``ingest`` or ``reference import`` from a shell without the deployment's secret
    would otherwise file everyone it writes under a second key (split caps, deferrals and
    compliance, and no command re-keys them), and a report would find nobody.
    """
    from gateway.store.db import is_sqlite, upgrade_if_behind

    engine = _connected(settings)
    if migrate and is_sqlite(engine):  # then at this code's head, or ahead of it
        upgrade_if_behind(engine, settings.database_url,
                          person_key_secret=settings.person_key_secret, settings=settings)
    else:
        _check_revision(settings, engine)
    _check_person_keys(settings, engine)
    return engine


def _check_revision(settings: Settings, engine) -> None:  # type: ignore[no-untyped-def]
    """Refuse (exit 2) a store behind this code's migrations, naming ``ce-gateway db upgrade``.

    PostgreSQL is migrated once a release, never by the processes (docs/operations.md): a
    command on a store nobody migrated would otherwise end in "relation … does not exist", and
    a worker would log it every cycle while its supervisor sees it running.
    """
    from sqlalchemy.engine import make_url

    from gateway.store.db import reading, revision_behind

    with reading(engine) as conn:
        behind = revision_behind(conn)
    if behind is None:
        return
    engine.dispose()
    at, head = behind
    where = make_url(settings.database_url).render_as_string(hide_password=True)
    en, zh = message("STORE_NOT_MIGRATED")
    raise _coded("STORE_NOT_MIGRATED", f"{ENV_PREFIX}DATABASE_URL",
                 f"{en} {where}: store at {at or 'no migration'}, code needs {head}.",
                 f"{zh}{where}：数据存储{f'处于迁移 {at}' if at else '从未迁移'}，"
                 f"本版本需要迁移 {head}。")


def _connected(settings: Settings):  # type: ignore[no-untyped-def]
    """The store's engine after one ``SELECT 1``: a bad URL or an unreachable store exits 2."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from gateway.store.db import make_engine

    variable = f"{ENV_PREFIX}DATABASE_URL"

    def unavailable(reason: object) -> typer.Exit:
        # The driver's own words (refused, unknown host, authentication failed) on one line,
        # and the URL without its password.
        said = " ".join(str(reason).split())[:300]
        if url.password:
            said = said.replace(str(url.password), "***")
        where = url.render_as_string(hide_password=True)
        en, zh = message("STORE_UNAVAILABLE")
        return _coded("STORE_UNAVAILABLE", variable, f"{en} {where}: {said}", f"{zh}{where}：{said}")

    try:
        url = make_url(settings.database_url)
        engine = make_engine(settings.database_url)
    # Not a URL, no dialect for its scheme (NoSuchModuleError), or its driver not installed.
    except (ArgumentError, ImportError) as exc:
        en, zh = message("CONFIG_INVALID")
        raise _coded("CONFIG_INVALID", variable,
                     f"{en} Not a database URL this gateway can use: {exc}.",
                     f"{zh}不是本网关可用的数据库 URL：{exc}。") from None
    except OSError as exc:  # an SQLite file's folder that cannot be made
        raise unavailable(exc) from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        engine.dispose()
        raise unavailable(exc.orig) from None
    return engine


def _check_person_keys(settings: Settings, engine) -> None:  # type: ignore[no-untyped-def]
    """Refuse (exit 2) a PERSON_KEY_SECRET other than the one the store's person keys use."""
    from gateway.person_keys import PersonKeys, WrongPersonKey, verify
    from gateway.store.db import reading

    with reading(engine) as conn:
        try:
            verify(conn, PersonKeys(settings.person_key_secret))
        except WrongPersonKey as exc:
            engine.dispose()
            en, zh = message("CONFIG_INVALID")
            raise _coded("CONFIG_INVALID", f"{ENV_PREFIX}PERSON_KEY_SECRET", f"{en} {exc}.",
                         f"{zh}该密钥不是本数据存储中人员标识所用的密钥：去重、上限与达标统计会把"
                         f"同一人分成两人。") from None


def _warn_dev_person_key(settings: Settings) -> None:
    # Not refused like the dev SECRET_KEY: that one can be replaced (partner secrets are sealed
    # again), this one cannot once a store is keyed with it (docs/operations.md).
    if settings.person_key_secret.get_secret_value() == DEV_PERSON_KEY_SECRET:
        err.print("[yellow]CE_GATEWAY_PERSON_KEY_SECRET is the development default: person "
                  "keys are as guessable as plain digests; set your own before the store holds "
                  "real people (it cannot be changed afterwards).[/yellow]")


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000,
          no_worker: Annotated[bool, typer.Option("--no-worker", help="HTTP only; delivery runs in `worker` processes")] = False,
          ) -> None:
    """Run the gateway HTTP server (and, unless --no-worker, the delivery worker)."""
    import uvicorn

    from gateway.api.app import create_app

    settings = _settings()
    _setup_logging(settings)
    if settings.secret_key.get_secret_value() == DEV_SECRET_KEY:
        if not _loopback(host):
            err.print(f"[red]CE_GATEWAY_SECRET_KEY is the development default, which anyone with "
                      f"the source knows; set your own before serving on {escape(host)}.[/red]")
            raise typer.Exit(2)
        logging.getLogger("gateway").warning("CE_GATEWAY_SECRET_KEY is the development default: partner secrets are "
                    "sealed with a public key; set your own before serving beyond this machine")
    _warn_dev_person_key(settings)
    # Fail fast on an unreachable store, one behind this code (PostgreSQL: `db upgrade` was not
    # run; SQLite is migrated here) or a wrong PERSON_KEY_SECRET (exit 2), as `worker` does;
    # the app makes its own engine and checks the key again.
    _engine(settings).dispose()
    uvicorn.run(create_app(settings, run_worker=not no_worker, migrate=False), host=host, port=port,
                log_level="warning", timeout_graceful_shutdown=10)


@app.command()
def worker(
    metrics_port: Annotated[int, typer.Option(help="serve this process's /metrics here (0: none)")] = 0,
    metrics_host: Annotated[str, typer.Option(help="address for --metrics-port")] = "127.0.0.1",
) -> None:
    """Run the background half without HTTP: delivery, batch files, scheduled jobs.

    Beside ``serve --no-worker`` replicas; several may share one PostgreSQL store (outbox
    batches and batch files are claimed by lease, scheduled jobs run once cluster-wide).
    ``--metrics-port`` exposes what only this process knows (its delivery attempts and
    latency, batch rows, circuit state); the store's gauges come from any replica's /metrics.
    """
    import signal
    import threading

    from gateway.runtime import Background

    settings = _settings()
    _setup_logging(settings)
    # The store first: unreachable, the worker exits 2 with one line instead of logging a
    # traceback a cycle from every thread while a supervisor sees it "running".
    _warn_dev_person_key(settings)
    engine = _engine(settings)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    started: list[Background] = []
    if metrics_port:  # listening before any work starts, so no delivery goes unscraped
        from prometheus_client import start_http_server

        from gateway.metrics import build_registry

        # The Background is known before it starts its threads: a scrape right after the
        # worker logs that it runs already finds its circuit.
        registry = build_registry(lambda: started[0].worker if started else None)
        start_http_server(metrics_port, addr=metrics_host, registry=registry)
    background = Background(engine, settings)
    started.append(background)
    background.start()
    try:
        while not stopping.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        background.stop()
        background.engine.dispose()


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply Alembic migrations to CE_GATEWAY_DATABASE_URL."""
    from gateway.store.db import upgrade

    settings = _settings()
    _warn_dev_person_key(settings)
    engine = _connected(settings)  # an unreachable store: STORE_UNAVAILABLE, exit 2
    _check_person_keys(settings, engine)  # a data repair files people under the store's keys
    engine.dispose()
    upgrade(settings.database_url, revision, person_key_secret=settings.person_key_secret,
            settings=settings)
    console.print(f"database at revision {escape(revision)}")


@partner_app.command("add")
def partner_add(
    id: Annotated[str, typer.Option("--id", help="partner id, e.g. qh-base-001")],
    adapter: Annotated[str, typer.Option(help="canonical | training_base | health | finance")],
    base_code: Annotated[str | None, typer.Option(
        help="training base code this partner may submit for (required for training_base)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Register a partner; prints its app key and secret ONCE."""
    from gateway.accounts import RegistrationRefused, add_partner
    from gateway.secrets_box import SecretBox

    settings = _settings()
    try:
        p = add_partner(_engine(settings), SecretBox(settings.secret_key.get_secret_value()),
                        id, adapter, base_code, actor=ops_commands.terminal_actor())
    except RegistrationRefused as exc:
        raise _refused(exc) from exc
    out = {"partner_id": p.partner_id, "app_key": p.app_key, "secret": p.secret}
    if as_json:
        print(json.dumps(out))
    else:
        console.print(f"partner [bold]{escape(p.partner_id)}[/bold] ({adapter})\n"
                      f"  app key: {p.app_key}\n"
                      f"  secret:  {p.secret}\n[yellow]The secret is shown once; store it now.[/yellow]")


@operator_app.command("add")
def operator_add(
    name: Annotated[str, typer.Option("--name")],
    role: Annotated[str, typer.Option("--role", help="viewer | operator")] = "operator",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create an operator token (shown once; only its hash is stored)."""
    from gateway.accounts import RegistrationRefused, add_operator

    try:
        op, token = add_operator(_engine(_settings()), name, role, actor=ops_commands.terminal_actor())
    except RegistrationRefused as exc:
        raise _refused(exc) from exc
    if as_json:
        print(json.dumps({"name": op.name, "role": op.role, "token": token}))
    else:
        console.print(f"operator {escape(op.name)} ({op.role}) token: {token}")


@audit_app.command("verify")
def audit_verify(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    anchor: Annotated[str | None, typer.Option(
        help="SEQ:HASH, the head_seq and head_hash an earlier --json run printed and you kept "
             "outside the database: a chain rewritten from that event on is found too")] = None,
) -> None:
    """Walk the hash chain; exit 1 and name the first bad event on any edit, deletion or move."""
    from gateway import audit
    from gateway.store.db import reading

    try:
        kept = None if anchor is None else audit.parse_anchor(anchor)
    except ValueError as exc:
        raise _refused(PayloadRejected("SCHEMA", field="anchor", detail=f"({exc})",
                                       detail_zh="（锚点格式为 序号:哈希，即先前 verify --json "
                                                 "输出的 head_seq 与 head_hash）")) from None
    engine = _engine(_settings(), migrate=False)
    with reading(engine) as conn:
        result = audit.verify(conn, anchor=kept)
    engine.dispose()
    if as_json:
        print(json.dumps(result.as_dict()))
    elif result.ok:
        console.print(f"[green]audit chain intact[/green]: {result.checked} events")
    else:
        console.print(f"[red]audit chain broken at event {result.first_bad_seq}[/red]: "
                      f"{escape(result.reason or '')}")
    raise typer.Exit(0 if result.ok else 1)


@mock_app.command("ce-system")
def mock_ce_system(
    port: int = 8780, host: str = "127.0.0.1",
    error_rate: Annotated[float, typer.Option(help="share of requests answered 503, not applied")] = 0.0,
    latency_ms: Annotated[int, typer.Option(help="added to every intake request")] = 0,
    rate_limit_every: Annotated[int, typer.Option(help="every Nth request answers 429")] = 0,
    lost_reply_rate: Annotated[float, typer.Option(help="share applied, then answered 503")] = 0.0,
    outage_seconds: Annotated[float, typer.Option(
        help="an outage window from start: every request answers 503 for this long")] = 0.0,
    retry_after: Annotated[str, typer.Option(
        help='Retry-After sent with 429s and outage 503s: seconds or an HTTP date ("" = none)')] = "1",
    duplicate_receipts: Annotated[bool, typer.Option(help="each receipt appears twice")] = False,
    replay_conflict: Annotated[bool, typer.Option(help="a replayed key answers 409")] = False,
    reject_title_marker: Annotated[str, typer.Option(
        help="a record whose title holds it is rejected")] = "[REJECT]",
    seed: int | None = None,
) -> None:
    """Run the mock CE management system (intake + reference API) with fault injection.

    Every fault can also be changed while it runs: ``POST /_mock/faults`` with a JSON object
    of fields (``outage_seconds`` opens an outage window from now).
    """
    from mock_partners.ce_system import Faults, serve

    faults = Faults(error_rate=error_rate, latency_ms=latency_ms, rate_limit_every=rate_limit_every,
                    lost_reply_rate=lost_reply_rate, retry_after=retry_after,
                    duplicate_receipts=duplicate_receipts, replay_conflict=replay_conflict,
                    reject_title_marker=reject_title_marker, seed=seed)
    if outage_seconds > 0:
        faults.start_outage(outage_seconds)
    serve(host=host, port=port, faults=faults)


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    adapter: Annotated[str, typer.Option(help="health | finance | training_base")],
    kind: Annotated[str, typer.Option(help="monthly | annual | roster")],
    period: Annotated[str, typer.Option(help="YYYY-MM (monthly) or YYYY (annual)")],
    partner_id: Annotated[str | None, typer.Option(
        help="whose batch this is (default: <adapter>-local; a roster: a registered base)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ingest a batch file locally, exactly as an upload would be processed (progress bar)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from adapters.tabular import UnreadableFile, count_rows, detect_format
    from gateway.accounts import registration_of
    from gateway.batches import (
        TRANSIENT_FAILURES,
        BatchProcessor,
        NewBatch,
        batch_status,
        check_batch_request,
        new_batch_id,
        record_batch,
    )
    from gateway.errors import PayloadRejected, ScopeViolation
    from gateway.ops.overview import period_bounds
    from gateway.pipeline.rules_tables import BASE_ADAPTERS
    from gateway.signing import file_sha256
    from gateway.store.db import snapshot

    settings = _settings()
    _setup_logging(settings)
    owner = partner_id or f"{adapter}-local"
    try:  # refused as an upload would be (422), before a batch exists
        check_batch_request(adapter, kind, period, *period_bounds(settings))
        if file.stat().st_size == 0:
            raise PayloadRejected("SCHEMA", field="file", detail="(empty file)", detail_zh="（文件为空）")
        with file.open("rb") as handle:
            fmt = detect_format(handle.read(4096), file.name, None)
    except UnreadableFile as exc:  # a legacy .xls workbook
        raise _refused(PayloadRejected("SCHEMA", field="file",
                                       detail=f"(the file cannot be read: {exc})",
                                       detail_zh=f"（文件无法读取：{exc}）")) from exc
    except PayloadRejected as exc:
        raise _refused(exc) from exc
    engine = _engine(settings)
    registered = registration_of(engine, owner)
    if registered is not None and registered[0] != adapter:
        # As an upload's scope (SPEC §7): a partner submits for its own adapter only.  A health
        # partner's name on finance rows would also count as its monthly push (missed_push).
        raise _refused(ScopeViolation(field="partner_id", detail=(
            f"(partner {owner!r} is registered for adapter {registered[0]!r}, not {adapter!r})"),
            detail_zh=f"（合作方 {owner!r} 登记的适配器是 {registered[0]!r}，不是 {adapter!r}）"))
    if adapter in BASE_ADAPTERS and (registered is None or not registered[1]):
        # A roster's rows are scoped by their partner's base code (SPEC §7): without one,
        # every row would be refused SCOPE_VIOLATION.
        raise _refused(ScopeViolation(field="partner_id", detail=(
            f"(partner {owner!r} is not a training base registered with --base-code; "
            "pass --partner-id of one)"), detail_zh=(
            f"（合作方 {owner!r} 不是用 --base-code 登记的培训基地；请用 --partner-id 指定一个）")))
    batch = NewBatch(new_batch_id(), owner, adapter, kind, period,
                     file.resolve(), fmt, file.stat().st_size, file_sha256(file))
    acknowledged = record_batch(engine, batch, actor=ops_commands.terminal_actor())
    batch_id = acknowledged.batch_id
    if acknowledged.resent:  # the same file again: its batch answers (and is resumed)
        err.print(f"the same file was taken already as batch {batch_id}; its result follows "
                  f"(同一文件已作为批次 {batch_id} 接收)", markup=False, highlight=False)
    try:
        total: int | None = count_rows(file, fmt)
    except UnreadableFile:  # processing meets it too, and fails the batch with the reason
        total = None
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, disable=as_json) as bar:
        task = bar.add_task(f"{escape(file.name)} → {batch_id}", total=total)
        processor = BatchProcessor(engine, settings, progress=lambda row: bar.update(task, completed=row - 1))
        # This batch only: batches queued by others are the workers' (oldest first), and a
        # broken one among them must not become the failure of every later ingest.
        claimed = processor.claim(batch_id)
        failure = None
        while claimed is not None:
            failure = processor.run(claimed)
            if not isinstance(failure, TRANSIENT_FAILURES):
                break
            # Put back after a pause (the store went away, a parse worker died): take it again
            # once the pause is over; BATCH_MAX_ATTEMPTS without progress fails it for good.
            claimed, until = None, time.monotonic() + settings.batch_lease_seconds + 1
            while claimed is None and time.monotonic() < until:
                time.sleep(0.2)
                claimed = processor.claim(batch_id)
        bar.update(task, completed=total)
    with snapshot(engine) as conn:
        status = batch_status(conn, batch_id, limit=20)
    assert status is not None
    if as_json:
        print(json.dumps(status, ensure_ascii=False))
    else:
        console.print_json(data={k: status[k] for k in ("batch_id", "status", "counts", "error")})
        for row in status["rejected_rows"]:
            console.print(f"  row {row['row']} {escape(row['column'] or '')} {row['code']}: "
                          f"{escape(row['message_zh'])}")
    if isinstance(failure, UnreadableFile):  # the batch failed whole, as an upload's would
        raise _refused(PayloadRejected("SCHEMA", field="file",
                                       detail=f"(the file cannot be read: {failure})",
                                       detail_zh=f"（文件无法读取：{failure}）"))
    if status["status"] == "failed":
        err.print(f"batch {batch_id} failed: {status['error']}", style="red", markup=False,
                  highlight=False, soft_wrap=True)
    elif claimed is None:
        err.print(f"batch {batch_id} was taken by another batch processor; "
                  f"its status: {status['status']}", style="yellow", markup=False, soft_wrap=True)
    raise typer.Exit(0 if status["status"] == "done" else 1)


@app.command()
def reconcile(adapter: Annotated[str, typer.Argument(help="health | finance")],
              year: Annotated[int, typer.Argument()],
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Annual vs monthly batches: per month what the annual adds, corrects, conflicts, lacks."""
    from rich.table import Table

    from gateway.reconcile import ADAPTERS, CATEGORIES, report
    from gateway.store.db import snapshot

    if adapter not in ADAPTERS:
        raise _refused(PayloadRejected("SCHEMA", field="adapter", detail=(
            f"(reconciliation covers the monthly/annual partners: {', '.join(ADAPTERS)})"),
            detail_zh=f"（对账只适用于按月和按年报送的合作方：{'、'.join(ADAPTERS)}）"))
    _check_year(year)
    with snapshot(_engine(_settings())) as conn:
        result = report(conn, adapter, year)
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    table = Table(title=f"{adapter} {year} 年度与月度对账 (annual {result['annual_batch_id'] or '—'})")
    table.add_column("month")
    for c in CATEGORIES:
        table.add_column(c, justify="right")
    for m in result["months"]:
        table.add_row(m["month"], *(str(m[c]) for c in CATEGORIES))
    table.add_row("[bold]total", *(f"[bold]{result['totals'][c]}" for c in CATEGORIES))
    console.print(table)
    console.print(f"months never pushed: {', '.join(result['months_never_pushed']) or 'none'}")


@app.command("compliance")
def compliance_cmd(id_number: Annotated[str, typer.Argument(help="the person's identity number")],
                   year: Annotated[int, typer.Argument()],
                   as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One person's year: credited hours by category and type, what is missing, which records.

    Records whose last version sent the management system refused (DOWNSTREAM_REJECTED) are
    listed apart; what it still counts of an earlier version is in the totals.
    """
    from rich.table import Column, Table

    from gateway.compliance import check_person, report
    from gateway.store.db import snapshot

    _check_year(year)
    try:
        check_person(id_number)
    except PayloadRejected as exc:
        raise _refused(exc) from exc
    from gateway.person_keys import PersonKeys

    settings = _settings()
    with snapshot(_engine(settings)) as conn:
        result = report(conn, id_number, year, keys=PersonKeys(settings.person_key_secret))
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    console.print(f"{result['person']} {year}: credited {result['credited']} "
                  f"missing {result['missing']} ({'compliant' if result['compliant'] else 'not yet'})")
    if result["merged_from"] is not None:
        # 七(二): a deferred year computed together with this one; requirement and missing
        # are the years' together.
        console.print(f"merged from {result['merged_from']} (合并计算): requirement "
                      f"{result['requirement']}, of which counted there "
                      f"{result['merged_credited']}")
    if result["deferred_to"] is not None:
        console.print(f"deferred to {result['deferred_to']} (顺延): compliant is the merged "
                      f"judgement there")
    cover = result["professional_covered_by"]
    if cover is not None:
        console.print(f"professional requirement covered by {escape(cover['source_record_id'])} "
                      f"({cover['year']}, R7 四(二)5)")
    for note in result["notes"]:
        console.print(f"  {note['code']}: {escape(note['message'])} / {escape(note['message_zh'])}")
    table = Table("record", "partner", "category", "type", "hours", "credited", "delivery")
    for r in result["records"]:
        table.add_row(escape(r["source_record_id"]), escape(r["partner_id"]), r["category"],
                      r["activity_type"], r["hours"], r["credited_hours"],
                      " ".join(x for x in (r["delivery"] or "—", r["delivery_code"]) if x))
    console.print(table)
    if result["not_counted"]:
        # What the management system refused for good: out of the totals above.
        refused = Table("record", "partner", "type", "hours", "code", "reason",
                        Column("still counted", no_wrap=True),
                        title="not counted (refused by the management system; what it still "
                              "counts of an earlier version is in the totals) "
                              "未计入（管理系统拒收；其仍计入的早先版本学时已计入合计）",
                        style="red")
        for r in result["not_counted"]:
            # Partner ids and the downstream's reason are data, not Rich markup ("[REJECT]").
            there = "—" if r["applied_version"] is None else (
                f"v{r['applied_version']} {r['applied_hours'] or '?'} h")
            refused.add_row(escape(r["source_record_id"]), escape(r["partner_id"]),
                            r["activity_type"], r["hours"], r["delivery_code"], escape(r["reason"]),
                            there)
        console.print(refused)
    if result["refused_changes"]:
        # Withdrawals and 0-hour versions it refused: it still counts the earlier hours, and so
        # do the totals above.
        # "still counted": the version it applied and its hours, never cut short.
        changes = Table("record", "partner", "here", "refused", "code", "reason",
                        Column("still counted", no_wrap=True),
                        title="changes refused by the management system (it still counts the "
                              "version it applied, and so do the totals) "
                              "管理系统拒收的变更（仍计入其已接收的版本，已计入合计）",
                        style="yellow")
        for r in result["refused_changes"]:
            hours = "?" if r["applied_hours"] is None else r["applied_hours"]
            changes.add_row(escape(r["source_record_id"]), escape(r["partner_id"]), r["status"],
                            f"v{r['version']}", r["delivery_code"], escape(r["reason"]),
                            f"v{r['applied_version']} {hours} h")
        console.print(changes)


@pull_app.command("cadre-college")
def pull_cadre_college(
    max_pages: int | None = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    from_start: Annotated[bool, typer.Option(
        "--from-start", help="forget the stored cursor first (one the college no longer "
        "accepts); what was pulled before comes back as duplicates")] = False,
    reason: Annotated[str, typer.Option(help="why, with --from-start (kept in the audit trail)")] = "",
    actor: Annotated[str | None, typer.Option(
        help="who, with --from-start (kept in the audit trail; default cli:<OS user>)")] = None,
) -> None:
    """Pull new completions from the Cadre Network College now (cursor kept in the store)."""
    from dataclasses import asdict

    from gateway.pull.cadre_college import pull_once, reset_cursor

    settings = _settings()
    _setup_logging(settings)
    engine = _engine(settings)
    if from_start:
        if not reason.strip():
            raise _refused(PayloadRejected("SCHEMA", field="reason",
                                           detail="(--from-start needs --reason)",
                                           detail_zh="（使用 --from-start 时须说明原因 --reason）"))
        reset_cursor(engine, actor or ops_commands.terminal_actor(), reason.strip())
    result = pull_once(engine, settings, max_pages=max_pages)
    if as_json:
        print(json.dumps(asdict(result), ensure_ascii=False, default=str))
    else:
        console.print(result)
    if result.error and not result.cursor_moved:  # a failed pull is not a success (cron, CI)
        err.print(f"{result.error_code}: {message(result.error_code or 'PULL_FAILED')[0]} ({result.error})"
                  f"\n{result.error_code}: {result.error_zh}", style="red", markup=False,
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@reference_app.command("import")
def reference_import(
    kind: Annotated[str, typer.Argument(help="bases | plans | deferrals | title-applicants")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    actor: Annotated[str | None, typer.Option(
        help="who is importing (kept in the audit trail; default cli:<OS user>)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Import reference data from a CSV file (a new version; bad rows are listed, not imported)."""
    from gateway.person_keys import PersonKeys
    from gateway.reference import import_csv
    from gateway.reference_store import UnknownReferenceKind

    try:
        settings = _settings()
        result = import_csv(_engine(settings), kind, file, actor or ops_commands.terminal_actor(),
                            keys=PersonKeys(settings.person_key_secret))
    except UnknownReferenceKind as exc:
        raise _refused(PayloadRejected("SCHEMA", field="kind", detail=f"({exc})",
                                       detail_zh="（未知的参考数据类型，应为 bases、plans、deferrals 或 "
                                                 "title-applicants）")) from exc
    if as_json:
        print(json.dumps(result.as_dict(), ensure_ascii=False, default=str))
    else:
        console.print(result.as_dict())
    raise typer.Exit(0 if result.ok else 1)


@reference_app.command("sync")
def reference_sync(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Pull changed reference data from the management system's reference API now."""
    from gateway.reference import sync

    settings = _settings()
    _setup_logging(settings)
    result = sync(_engine(settings), settings, actor=ops_commands.terminal_actor())
    if as_json:
        print(json.dumps(result.as_dict(), ensure_ascii=False, default=str))
    else:
        console.print(result.as_dict())
    raise typer.Exit(0 if result.ok else 1)


@retention_app.command("run")
def retention_run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count only; change nothing")] = False,
    actor: Annotated[str | None, typer.Option(
        help="who is acting (kept in the audit trail; default cli:<OS user>)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Prune old payloads of delivered versions (RETENTION_PAYLOAD_DAYS; progress bar)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from gateway.retention import prune

    settings = _settings()
    _setup_logging(settings)
    engine = _engine(settings)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err, disable=as_json) as bar:
        task = bar.add_task("counting" if dry_run else "pruning", total=None)
        result = prune(engine, settings, dry_run=dry_run, actor=actor or ops_commands.terminal_actor(),
                       progress=lambda done, total: bar.update(task, completed=done, total=total))
    engine.dispose()
    if as_json:
        print(json.dumps(result.as_dict()))
    elif result.cutoff is None:
        console.print("retention is off (CE_GATEWAY_RETENTION_PAYLOAD_DAYS=0): nothing pruned")
    else:
        verb = "would prune" if dry_run else "pruned"
        console.print(f"{verb} {result.versions} version payloads and {result.rejections} closed "
                      f"rejections delivered/received before {result.cutoff.isoformat()}")


@mock_app.command("cadre-college")
def mock_cadre_college(
    port: int = 8781, host: str = "127.0.0.1", seed: int = 1,
    initial: int = 500, growth_per_call: int = 0,
    error_rate: Annotated[float, typer.Option(help="share of page requests answered 503")] = 0.0,
    fail_next: Annotated[int, typer.Option(help="the first N page requests answer 503")] = 0,
    rate_limit_every: Annotated[int, typer.Option(help="every Nth page request answers 429")] = 0,
    retry_after: Annotated[str, typer.Option(
        help='Retry-After sent with 429s and 503s ("" = none)')] = "1",
    latency_ms: Annotated[int, typer.Option(help="added to every page request")] = 0,
    outage: Annotated[bool, typer.Option(help="every page request answers 503")] = False,
    bad_item_every: Annotated[int, typer.Option(
        help="every Nth completion has a broken id check digit")] = 0,
) -> None:
    """Run the mock Cadre Network College (paged completions with pinyin keys) with faults.

    Every fault can also be changed while it runs: ``POST /_mock/faults`` with a JSON object.
    """
    from mock_partners.cadre_college import Faults, serve

    faults = Faults(error_rate=error_rate, fail_next=fail_next, rate_limit_every=rate_limit_every,
                    retry_after=retry_after, latency_ms=latency_ms, outage=outage,
                    bad_item_every=bad_item_every, seed=seed)
    serve(host=host, port=port, seed=seed, initial=initial, growth_per_call=growth_per_call,
          faults=faults)


@mock_app.command("webhook-sink")
def mock_webhook_sink(port: int = 8782, host: str = "127.0.0.1") -> None:
    """Run a mock WeCom/DingTalk robot webhook that keeps what it receives (GET /_mock/received)."""
    from mock_partners.webhook_sink import serve

    serve(host=host, port=port)


@alerts_app.command("check")
def alerts_check(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Evaluate the alert conditions once and send what is new (as the scheduled job does)."""
    from rich.table import Table

    from gateway.alerts import evaluate

    settings = _settings()
    result = evaluate(_engine(settings), settings)
    if as_json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        if not result.configured:
            console.print("[yellow]CE_GATEWAY_ALERT_WEBHOOK_URL is not set: nothing is sent[/yellow]")
        outcome = {**dict.fromkeys(result.fired, "[green]sent 已发送"),
                   **dict.fromkeys(result.already, "sent before 已告警"),
                   **{k: f"[red]failed 发送失败: {escape(v)}" for k, v in result.failed.items()}}
        table = Table("condition 告警", "key", "outcome", title=f"alerts at {result.now.isoformat()}")
        for c in result.active:
            table.add_row(c.title, c.key, outcome.get(c.key, "not sent 未发送 (no URL)"))
        console.print(table if result.active else "no active alert conditions 无告警")
        for key in result.cleared:
            console.print(f"cleared 已恢复: {key}")
    raise typer.Exit(1 if result.failed else 0)


@app.command()
def demo(records: int = 300, keep: bool = False) -> None:
    """End to end on SQLite: mock with faults, gateway, a partner, records, a summary."""
    from gateway.demo import run_demo

    raise typer.Exit(run_demo(console, n_records=records, keep=keep))


@app.command()
def revalidate(
    partner_id: Annotated[str | None, typer.Option(help="only this partner's rejections")] = None,
    adapter: Annotated[str | None, typer.Option(help="canonical | training_base | health | finance | cadre_college")] = None,
    error_code: Annotated[str | None, typer.Option(help="only rejections with this code, e.g. BASE_NOT_RECOGNIZED")] = None,
    batch_id: Annotated[str | None, typer.Option(help="only rows of this batch")] = None,
    since: Annotated[str | None, typer.Option(help="received at or after (ISO date/time; no offset: CE_GATEWAY_TIMEZONE)")] = None,
    until: Annotated[str | None, typer.Option(help="received before this time, or through this date (ISO)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count only; change nothing")] = False,
    reason: Annotated[str | None, typer.Option(help="why (required unless --dry-run; kept in the audit trail)")] = None,
    actor: Annotated[str | None, typer.Option(help="who is acting (kept in the audit trail; default: cli:<OS user>)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-run validation for rejected records after reference data was fixed (progress bar).

    --since and --until read as the console and ``deliveries`` read them (a bare --until date
    is through that day), so a count previewed there selects the same rejections here.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from gateway.ops.common import parse_when
    from gateway.pipeline.items import RulesContext
    from gateway.pipeline.rules_tables import RulesConfig
    from gateway.reference import ReferenceCache
    from gateway.revalidate import RevalidationFilter, RevalidationRefused
    from gateway.revalidate import revalidate as run_revalidation

    settings = _settings()
    _setup_logging(settings)
    if not dry_run and not (reason and reason.strip()):
        raise _refused(PayloadRejected("SCHEMA", field="reason",
                                       detail="(--reason is required unless --dry-run)",
                                       detail_zh="（不是试运行时必须填写原因 --reason）"))
    try:
        flt = RevalidationFilter(partner_id, adapter, error_code, batch_id,
                                 parse_when(since, "since", settings.timezone),
                                 parse_when(until, "until", settings.timezone))
    except PayloadRejected as exc:
        raise _refused(exc) from exc
    except RevalidationRefused as exc:
        raise _refused(exc.coded()) from exc
    # Audited as `deliveries reprocess` is: cli:<OS user> unless the operator names someone.
    actor = actor or ops_commands.terminal_actor()
    engine = _engine(settings)
    config = RulesConfig.from_settings(settings)
    rules = RulesContext(ReferenceCache(engine, config.keys).current(), config)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err, disable=as_json) as bar:
        task = bar.add_task("revalidating" if not dry_run else "counting", total=None)
        result = run_revalidation(engine, flt, actor=actor, reason=reason, dry_run=dry_run,
                                  rules=rules,
                                  progress=lambda done, matched: bar.update(task, completed=done,
                                                                            total=matched))
    out = result.as_dict()
    if as_json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        console.print_json(data=out)


if __name__ == "__main__":  # pragma: no cover
    app()
